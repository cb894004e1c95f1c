//! azure-bridge end to end: real processes (broker, probe producer, bridge, plug-bridge) and
//! a stand-in for IoT Hub that behaves as Microsoft documents it (`wattbus_e2e::iothub`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::iothub::{FakeHub, HubEvent, Received, X509_DEVICE};
use wattbus_e2e::servers::metric;
use wattbus_e2e::{BrokerSetup, Proc, free_port, run_ok, wait_until, wattbus_bin};

const DEVICE: &str = "pi-lab";
/// A device key as the portal shows one (base64 of 32 bytes).
const KEY: &str = "q2p5C0mQb1b2W9m7l0Zq3n4s8v1x6y5z2A7B8C9D0E4=";

/// A test's world: a runtime for the fake hub, a directory, the hub (up) and a broker.
struct Site {
    rt: tokio::runtime::Runtime,
    hub: FakeHub,
    broker: BrokerSetup,
    _broker: Proc,
    // Last: dropped after the processes that use it.
    dir: tempfile::TempDir,
}

impl Site {
    fn start(hub_name: &str) -> Site {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let hub = rt.block_on(FakeHub::start(hub_name, &[(DEVICE, KEY)]));
        let broker = BrokerSetup::new(dir.path());
        let proc = broker.start(&dir.path().join("broker.log"));
        Site {
            rt,
            hub,
            broker,
            _broker: proc,
            dir,
        }
    }
}

/// The bridge's config: the service config of `broker` plus `[azure_bridge]` for `hub`
/// (over its WebSocket port when `extra` chooses `transport = "websocket"`).
fn config(
    broker: &BrokerSetup,
    dir: &Path,
    hub: &FakeHub,
    connection_string: &str,
    extra: &str,
) -> (PathBuf, u16) {
    let path = broker.service_config(
        dir,
        [
            "level = \"info,rumqttd=warn\"",
            "reconnect_max_ms = 1000",
            "",
        ],
    );
    let secret = dir.join("azure-connection-string");
    std::fs::write(&secret, format!("{connection_string}\n")).unwrap();
    let health = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[azure_bridge]\nhealth_listen = \"127.0.0.1:{health}\"\nconnection_string_file = \"{}\"\n\
         endpoint = \"localhost:{}\"\nca_file = \"{}\"\nmax_age_ms = 300\nreconnect_min_ms = 100\n\
         reconnect_max_ms = 1000\n{extra}\n",
        secret.display(),
        if extra.contains("transport = \"websocket\"") {
            hub.ws_port
        } else {
            hub.port
        },
        hub.ca_file.display(),
    ));
    std::fs::write(&path, text).unwrap();
    (path, health)
}

fn bridge(config: &Path, log: &Path) -> Proc {
    Proc::spawn(
        "azure-bridge",
        Command::new(wattbus_bin())
            .args(["run", "azure-bridge", "--config"])
            .arg(config),
        log,
    )
}

fn probe_bin() -> PathBuf {
    wattbus_bin().with_file_name("probe")
}

/// `count` fresh readings at `rate`/s from a probe producer that waits for azure-bridge.
fn produce(
    broker: &BrokerSetup,
    dir: &Path,
    count: u64,
    rate: u64,
    base: &str,
    log: &Path,
) -> Proc {
    Proc::spawn(
        "probe",
        Command::new(probe_bin())
            .args([
                "--port",
                &broker.port.to_string(),
                "--password",
                &broker.password,
            ])
            .args(["--site", "lab", "--data-dir"])
            .arg(dir)
            .args([
                "produce",
                "--count",
                &count.to_string(),
                "--rate",
                &rate.to_string(),
            ])
            .args([
                "--wait-for",
                "azure-bridge",
                "--ack-timeout-ms",
                "1000",
                "--base-ts-ms",
                base,
            ]),
        log,
    )
}

/// Every message the hub received, deduplicated by message id: (id, its readings' read
/// times, which identify a probe's readings: `base + n`).
fn unique_messages(received: &[Received]) -> Vec<(String, Vec<u64>)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in received {
        if !r.topic.contains("kind=readings") {
            continue;
        }
        let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let id = body["id"].as_str().unwrap().to_string();
        // The id is in the property bag too, for routing and dedup without the body.
        assert!(r.topic.contains(&format!("$.mid={id}&")), "{}", r.topic);
        if !seen.insert(id.clone()) {
            continue;
        }
        let readings = azure_bridge::pack::unpack(&r.payload).unwrap();
        let ns = readings.iter().map(|m| m.ts_ms as u64).collect();
        out.push((id, ns));
    }
    out
}

fn seq_of(id: &str) -> u64 {
    id.rsplit('-').next().unwrap().parse().unwrap()
}

/// Readings by read time, with how often each arrived (after dedup by message id).
fn counts(messages: &[(String, Vec<u64>)]) -> BTreeMap<u64, usize> {
    let mut c = BTreeMap::new();
    for (_, ns) in messages {
        for n in ns {
            *c.entry(*n).or_insert(0) += 1;
        }
    }
    c
}

/// `count` readings from a fresh producer, all acknowledged by the bridge, then every one at
/// the hub exactly once (after dedup by message id); the bridge's log in the failure.
fn deliver(broker: &BrokerSetup, hub: &FakeHub, d: &Path, count: u64, rate: u64, log: &Path) {
    let mut producer = produce(
        broker,
        &d.join("probe"),
        count,
        rate,
        "now",
        &d.join("probe.log"),
    );
    assert!(
        producer
            .wait(Duration::from_secs(120))
            .is_some_and(|s| s.success()),
        "the producer's readings were not all acknowledged; its log:\n{}",
        std::fs::read_to_string(d.join("probe.log")).unwrap_or_default()
    );
    assert!(
        wait_until(
            Duration::from_secs(60),
            || counts(&unique_messages(&hub.received())).len() as u64 == count
        ),
        "not every reading reached the hub: {} of {count}; events {:?}; bridge log:\n{}",
        counts(&unique_messages(&hub.received())).len(),
        hub.events(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    assert!(
        counts(&unique_messages(&hub.received()))
            .values()
            .all(|n| *n == 1),
        "a reading in two messages"
    );
}

/// SAS tokens equal those of Microsoft's documented algorithm, computed by its own Python
/// sample ("Control access to IoT Hub with shared access signatures": `generate_sas_token`),
/// for a device key and for a shared access policy.
#[test]
fn sas_tokens_equal_microsofts_documented_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, policy) in [
        (
            format!("HostName=myhub.azure-devices.net;DeviceId=pi-kitchen;SharedAccessKey={KEY}"),
            None,
        ),
        (
            format!(
                "HostName=myhub.azure-devices.net;DeviceId=pi-kitchen;SharedAccessKeyName=device;SharedAccessKey={KEY}"
            ),
            Some("device"),
        ),
    ] {
        let file = dir.path().join("cs");
        std::fs::write(&file, &cs).unwrap();
        let out = run_ok(
            Command::new(wattbus_bin())
                .args(["azure", "sas", "--connection-string-file"])
                .arg(&file)
                .args(["--expiry-s", "3600"]),
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .trim()
                .to_string()
        };
        assert_eq!(
            field("username:"),
            "myhub.azure-devices.net/pi-kitchen/?api-version=2021-04-12"
        );
        assert_eq!(field("client id:"), "pi-kitchen");
        let password = field("password:");
        let expiry: u64 = field("expires:")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let python = format!(
            r#"
from base64 import b64encode, b64decode
from hashlib import sha256
from hmac import HMAC
from urllib.parse import quote_plus, urlencode

def generate_sas_token(uri, key, policy_name, ttl):
    sign_key = "%s\n%d" % ((quote_plus(uri)), int(ttl))
    signature = b64encode(HMAC(b64decode(key), sign_key.encode('utf-8'), sha256).digest())
    rawtoken = {{'sr': uri, 'sig': signature, 'se': str(int(ttl))}}
    if policy_name is not None:
        rawtoken['skn'] = policy_name
    return 'SharedAccessSignature ' + urlencode(rawtoken)

print(generate_sas_token("myhub.azure-devices.net/devices/pi-kitchen", "{KEY}", {}, {expiry}))
"#,
            policy.map_or("None".to_string(), |p| format!("'{p}'"))
        );
        let out = run_ok(Command::new("python3").args(["-c", &python]));
        let expected = String::from_utf8(out.stdout).unwrap();
        assert_eq!(password, expected.trim(), "policy {policy:?}");
    }
}

/// Steady readings with the hub down for most of the run and the bridge killed -9 in
/// between: once the hub is back every reading arrives exactly once after dedup by message
/// id, messages in the order they were packed, and nothing is left behind anywhere.
#[test]
fn readings_survive_a_hub_outage_and_a_kill_9_and_arrive_exactly_once_in_order() {
    let site = Site::start("testhub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    let (cfg, health) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, KEY),
        "max_message_bytes = 4096\n",
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    let count = 2000;
    let mut producer = produce(
        broker,
        &d.join("probe"),
        count,
        100,
        "now",
        &d.join("probe.log"),
    );
    let reached = |n: usize| {
        wait_until(Duration::from_secs(60), || {
            !unique_messages(&hub.received()).is_empty()
                && counts(&unique_messages(&hub.received())).len() >= n
        })
    };
    assert!(
        reached(100),
        "no readings reached the hub; bridge log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The hub goes away; readings pile up in the outbox.
    hub.set_up(false);
    let outbox = "wattbus_journal_records{service=\"azure-bridge\",stream=\"azure-outbox\"}";
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, outbox)
            .is_some_and(|n| n >= 10.0)),
        "the outbox did not fill while the hub was down"
    );
    b.kill9();
    b = bridge(&cfg, &log);
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, outbox)
            .is_some_and(|n| n >= 20.0)),
        "the restarted bridge did not go on storing"
    );
    hub.set_up(true);
    let status = producer.wait(Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "the producer's readings were not all acknowledged; its log:\n{}",
        std::fs::read_to_string(d.join("probe.log")).unwrap_or_default()
    );
    assert!(
        wait_until(
            Duration::from_secs(120),
            || counts(&unique_messages(&hub.received())).len() as u64 == count
        ),
        "not every reading reached the hub: {} of {count}",
        counts(&unique_messages(&hub.received())).len()
    );
    // Everything acknowledged by the hub is gone from the outbox (within 30 s: trims wait for
    // the dedup state to be saved).
    assert!(
        wait_until(Duration::from_secs(90), || metric(health, outbox)
            == Some(0.0)),
        "the outbox kept messages the hub had"
    );
    let messages = unique_messages(&hub.received());
    let c = counts(&messages);
    let twice: Vec<_> = c.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "readings in two messages: {twice:?}");
    let first = *c.keys().next().unwrap();
    assert_eq!(
        c.keys().copied().collect::<Vec<_>>(),
        (first..first + count).collect::<Vec<_>>()
    );
    // In order: by the order they were packed (message seqs only grow, across the restart).
    let seqs: Vec<u64> = messages.iter().map(|(id, _)| seq_of(id)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "messages out of order: {seqs:?}"
    );
    // Packed: far fewer messages than readings.
    assert!(
        messages.len() * 20 < count as usize,
        "{} messages for {count} readings",
        messages.len()
    );
    // A persistent session, and never a refused login.
    let events = hub.events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            HubEvent::Connected {
                clean_session: false,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, HubEvent::Refused { .. })),
        "{events:?}"
    );
    b.terminate(Duration::from_secs(10));
}

/// A SAS token that expires mid-stream: the bridge reconnects with a new one before the hub
/// closes the connection (at 80 % of its life), and no reading is lost.
#[test]
fn a_token_expiring_mid_stream_is_renewed_with_no_reading_lost() {
    let site = Site::start("renewhub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    let (cfg, _) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, KEY),
        "token_ttl_s = 10\nmax_message_bytes = 1024\n",
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    deliver(broker, hub, d, 1500, 60, &log);
    let events = hub.events();
    let connects = events
        .iter()
        .filter(|e| matches!(e, HubEvent::Connected { .. }))
        .count();
    assert!(
        connects >= 3,
        "expected a renewal every 8 s over 25 s: {events:?}"
    );
    // Renewed before the hub had to close a connection for an expired token.
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, HubEvent::Closed { why, .. } if why.contains("expired"))),
        "{events:?}"
    );
    b.terminate(Duration::from_secs(10));
}

/// Readings the hub has not taken within the TTL are dropped with an ERROR and a counter,
/// never silently; fresh ones still arrive.
#[test]
fn data_older_than_the_ttl_is_dropped_with_an_error_and_a_counter() {
    let site = Site::start("ttlhub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    hub.set_up(false);
    let (cfg, health) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, KEY),
        "ttl_s = 60\n",
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    // Read two hours ago (a Pi that was offline and is now catching up), and read now.
    let old_base = (proto::now_ms() - 2 * 3600 * 1000).to_string();
    let mut old = produce(
        broker,
        &d.join("probe-old"),
        100,
        0,
        &old_base,
        &d.join("old.log"),
    );
    assert!(
        old.wait(Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "the old readings were not stored in the outbox"
    );
    hub.set_up(true);
    let expired = "wattbus_azure_expired_readings_total ";
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, expired)
            == Some(100.0)),
        "expired readings not counted: {:?}",
        metric(health, expired)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("ERROR") && l.contains("older than ttl_s")),
        "no ERROR for the dropped readings:\n{text}"
    );
    let errors = "wattbus_errors_total{service=\"azure-bridge\",kind=\"expired\"}";
    assert!(metric(health, errors).is_some_and(|n| n >= 1.0));
    // Fresh readings still go through, and none of the old ones was sent.
    let mut fresh = Proc::spawn(
        "probe",
        Command::new(probe_bin())
            .args([
                "--port",
                &broker.port.to_string(),
                "--password",
                &broker.password,
            ])
            .args(["--site", "lab", "--data-dir"])
            .arg(d.join("probe-fresh"))
            .args(["produce", "--count", "50", "--instance", "probe-fresh"])
            .args(["--wait-for", "azure-bridge", "--base-ts-ms", "now"]),
        &d.join("fresh.log"),
    );
    assert!(
        fresh
            .wait(Duration::from_secs(60))
            .is_some_and(|s| s.success())
    );
    assert!(wait_until(Duration::from_secs(30), || counts(
        &unique_messages(&hub.received())
    )
    .len()
        == 50));
    b.terminate(Duration::from_secs(10));
}

/// The hub refusing the credentials is an ERROR that says what to check, and the bridge does
/// not retry in a loop.
#[test]
fn a_refused_login_is_an_error_naming_what_to_check_not_a_tight_loop() {
    let site = Site::start("authhub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    // A regenerated key: the old one no longer signs.
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let (cfg, _) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, wrong),
        "auth_retry_ms = 60000\n",
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    assert!(wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("IoT Hub refused the credentials")
    }));
    std::thread::sleep(Duration::from_secs(3));
    let refused = hub
        .events()
        .iter()
        .filter(|e| matches!(e, HubEvent::Refused { .. }))
        .count();
    assert_eq!(refused, 1, "{:?}", hub.events());
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("IoT Hub refused"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("SharedAccessKey") && line.contains("clock"),
        "{line}"
    );
    assert!(!text.contains(wrong), "the key was logged");
    b.terminate(Duration::from_secs(10));
}

/// A direct method from the cloud switches a simulated plug through plug-bridge and answers
/// with the plug's confirmed state; a cloud-to-device message does the same and its result
/// comes back as a message; an unknown method and a plug that does not answer say so.
#[test]
fn a_direct_method_switches_a_plug_and_returns_its_confirmed_state() {
    use simulators::plugs::{SimPlug, Vendor};
    let site = Site::start("methodhub");
    let (rt, d, hub, broker) = (&site.rt, site.dir.path(), &site.hub, &site.broker);
    let lamp = SimPlug::new(Vendor::Mystrom, 60.0, None);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let lamp_port = listener.local_addr().unwrap().port();
    rt.spawn(lamp.clone().serve(listener));
    let (cfg, _) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, KEY),
        &format!(
            "command_timeout_ms = 3000\ntwin_interval_s = 10\n\
             [plug_bridge]\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 200\ntimeout_ms = 500\n\
             [[plug_bridge.plugs]]\nid = \"lamp\"\nkind = \"mystrom\"\nurl = \"http://127.0.0.1:{lamp_port}\"\n",
            free_port()
        ),
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    let mut plugs = Proc::spawn(
        "plug-bridge",
        Command::new(wattbus_bin())
            .args(["run", "plug-bridge", "--config"])
            .arg(&cfg),
        &d.join("plug-bridge.log"),
    );
    assert!(lamp.relay_on());
    let call = |method: &str, body: serde_json::Value| {
        rt.block_on(hub.invoke_method(DEVICE, method, body, Duration::from_secs(10)))
    };
    // Connected and subscribed, and plug-bridge polling: the first switch may race them.
    let mut answer = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            answer = call(
                "switch",
                serde_json::json!({"device": "lamp", "action": "off"}),
            );
            answer.as_ref().is_some_and(|(s, _)| *s == 200)
        }),
        "no 200 from the switch method: {answer:?}; bridge log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (_, v) = answer.unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["relay_on"].as_bool()),
        (Some(true), Some(false)),
        "{v}"
    );
    assert!(!lamp.relay_on(), "the plug was not switched");
    let (status, v) = call(
        "switch",
        serde_json::json!({"device": "lamp", "action": "toggle"}),
    )
    .unwrap();
    assert_eq!((status, v["relay_on"].as_bool()), (200, Some(true)), "{v}");
    assert!(lamp.relay_on());
    // What cannot be done says why.
    let (status, v) = call("reboot", serde_json::json!({})).unwrap();
    assert_eq!(status, 404, "{v}");
    let (status, v) = call(
        "switch",
        serde_json::json!({"device": "lamp", "action": "explode"}),
    )
    .unwrap();
    assert_eq!(status, 400, "{v}");
    let (status, v) = call(
        "switch",
        serde_json::json!({"device": "nobody", "action": "on"}),
    )
    .unwrap();
    assert_eq!((status, v["ok"].as_bool()), (504, Some(false)), "{v}");
    // A cloud-to-device message: the same switch, its result as a message back.
    assert!(rt.block_on(hub.send_c2d(
        DEVICE,
        "c2d-1",
        serde_json::json!({"device": "lamp", "action": "off"})
    )));
    assert!(
        wait_until(Duration::from_secs(20), || hub
            .received()
            .iter()
            .any(
                |r| r.topic.contains("kind=command-result") && r.topic.contains("c2d-1")
            )),
        "no result for the cloud-to-device message: {:?}",
        hub.received().iter().map(|r| &r.topic).collect::<Vec<_>>()
    );
    assert!(!lamp.relay_on());
    let result = hub
        .received()
        .into_iter()
        .find(|r| r.topic.contains("kind=command-result"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&result.payload).unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["relay_on"].as_bool()),
        (Some(200), Some(false)),
        "{v}"
    );
    // The twin carries the site's status.
    assert!(
        wait_until(Duration::from_secs(30), || hub
            .twin_reported(DEVICE)
            .is_some_and(|t| {
                let w = &t["wattbus"];
                // plug-bridge online, its journal's depth, the newest reading (the plug's).
                w["services"]["plug-bridge"]["online"] == true
                    && w["services"]["plug-bridge"]["journal_records"].is_u64()
                    && w["last_reading_ms"]
                        .as_i64()
                        .is_some_and(|t| t > proto::now_ms() - 60_000)
                    && w["outbox"]["messages"].is_u64()
            })),
        "twin: {:?}",
        hub.twin_reported(DEVICE)
    );
    plugs.terminate(Duration::from_secs(10));
    b.terminate(Duration::from_secs(10));
}

/// MQTT over WebSocket on "443", for networks that block 8883: readings arrive and a direct
/// method is answered, through the upgrade and masked frames.
#[test]
fn readings_and_a_direct_method_go_over_websocket() {
    let site = Site::start("wshub");
    let (rt, d, hub, broker) = (&site.rt, site.dir.path(), &site.hub, &site.broker);
    let (cfg, _) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, KEY),
        "transport = \"websocket\"\nmax_message_bytes = 2048\n",
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    deliver(broker, hub, d, 300, 200, &log);
    // A method call and its answer go both ways over the WebSocket too.
    let answer = rt.block_on(hub.invoke_method(
        DEVICE,
        "reboot",
        serde_json::json!({}),
        Duration::from_secs(10),
    ));
    assert_eq!(answer.map(|(s, _)| s), Some(404));
    b.terminate(Duration::from_secs(10));
}

/// An X.509 device: the connection string says `x509=true`, the device's certificate
/// authenticates it (the hub checks its thumbprint) and no password is sent; readings arrive.
#[test]
fn an_x509_device_connects_with_its_certificate_and_no_password() {
    let site = Site::start("x509hub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    let (path, _) = config(
        broker,
        d,
        hub,
        &format!(
            "HostName={};DeviceId={X509_DEVICE};x509=true",
            hub.host_name
        ),
        &format!(
            "certificate_file = \"{}\"\nprivate_key_file = \"{}\"\n",
            hub.device_cert.display(),
            hub.device_key.display()
        ),
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&path, &log);
    deliver(broker, hub, d, 100, 200, &log);
    assert!(
        hub.events()
            .iter()
            .any(|e| matches!(e, HubEvent::Connected { device, .. } if device == X509_DEVICE))
    );
    assert!(
        !hub.events()
            .iter()
            .any(|e| matches!(e, HubEvent::Refused { .. })),
        "{:?}",
        hub.events()
    );
    b.terminate(Duration::from_secs(10));
}

/// A power cut takes the producer and the bridge at once, after the hub already has part of
/// the readings: the restarted producer replays everything it had not seen acknowledged, and
/// nothing reaches the hub twice — not what the outbox still holds, nor what it sent and
/// trimmed long before.
#[test]
fn a_producer_replaying_after_a_power_cut_sends_nothing_twice() {
    let site = Site::start("cuthub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    let (cfg, health) = config(
        broker,
        d,
        hub,
        &hub.connection_string(DEVICE, KEY),
        "max_message_bytes = 2048\n",
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    let probe_dir = d.join("probe");
    let mut producer = produce(broker, &probe_dir, 3000, 100, "now", &d.join("probe.log"));
    assert!(
        wait_until(Duration::from_secs(60), || counts(&unique_messages(
            &hub.received()
        ))
        .len()
            >= 800),
        "readings did not flow; bridge log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The power goes: both die without a word, the producer's acknowledged point unsaved.
    producer.kill9();
    // What reached the outbox by then reaches the hub, and is trimmed (which waits until the
    // origins are saved, up to 30 s).
    let outbox = "wattbus_journal_records{service=\"azure-bridge\",stream=\"azure-outbox\"}";
    assert!(wait_until(Duration::from_secs(90), || metric(
        health, outbox
    ) == Some(0.0)));
    b.kill9();
    let before = counts(&unique_messages(&hub.received())).len();
    b = bridge(&cfg, &log);
    // The producer comes back and replays its journal (then sends one more reading).
    let mut again = produce(broker, &probe_dir, 1, 0, "now", &d.join("probe2.log"));
    assert!(
        again
            .wait(Duration::from_secs(120))
            .is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(d.join("probe2.log")).unwrap_or_default()
    );
    assert!(
        wait_until(Duration::from_secs(30), || counts(&unique_messages(
            &hub.received()
        ))
        .len()
            > before),
        "the new reading did not arrive"
    );
    let c = counts(&unique_messages(&hub.received()));
    let twice: Vec<_> = c.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} readings reached the hub twice: {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let repeats = metric(health, "wattbus_azure_repeated_readings_total ").unwrap_or(0.0);
    assert!(repeats > 0.0, "the replay was not recognised");
    b.terminate(Duration::from_secs(10));
}

/// A producer whose journal is recreated numbers from 1 again, here with its clock an hour
/// behind: its new readings are new, not repeats (its journal's new epoch tells them apart),
/// and every one arrives.
#[test]
fn a_producer_renumbered_from_one_is_not_taken_for_a_replay() {
    let site = Site::start("renumberhub");
    let (d, hub, broker) = (site.dir.path(), &site.hub, &site.broker);
    let (cfg, health) = config(broker, d, hub, &hub.connection_string(DEVICE, KEY), "");
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    std::fs::create_dir_all(d.join("first")).unwrap();
    std::fs::create_dir_all(d.join("second")).unwrap();
    deliver(broker, hub, &d.join("first"), 100, 200, &log);
    // The same producer, its journal (and volume) gone: numbered from 1 again, and its clock
    // an hour behind (a Pi without a real-time clock after a power cut, before NTP).
    let behind = (proto::now_ms() - 3_600_000).to_string();
    let mut p = produce(
        broker,
        &d.join("second").join("probe"),
        100,
        200,
        &behind,
        &d.join("second.log"),
    );
    assert!(p.wait(Duration::from_secs(60)).is_some_and(|s| s.success()));
    assert!(
        wait_until(Duration::from_secs(30), || counts(&unique_messages(
            &hub.received()
        ))
        .len()
            == 200),
        "{} of 200 readings arrived; bridge log:\n{}",
        counts(&unique_messages(&hub.received())).len(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Told apart by its journal's new epoch: nothing was taken for a repeat.
    let repeats = metric(health, "wattbus_azure_repeated_readings_total ").unwrap_or(-1.0);
    assert_eq!(repeats, 0.0);
    b.terminate(Duration::from_secs(10));
}
