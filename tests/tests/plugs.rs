//! plug-bridge as a user runs it: `wattbus run plug-bridge` polling plugs that answer as
//! myStrom and Shelly document (the simulators' plugs, in this process), its readings through
//! a real broker and influx-writer into InfluxDB 1.6.7.
//!
//! What a user relies on: the energy counter stored in InfluxDB never goes down — through a
//! myStrom reboot (new boot id, counter back to 0), a Shelly that loses its total, a `kill -9`
//! of the bridge with a plug rebooting while it is down — and it ends where the plug's real
//! consumption says, within the documented margin; a plug that does not answer, or refuses the
//! token, is reported offline while the others go on; commands on the bus are carried out
//! once, read back, never late, never forged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use simulators::plugs::{SimPlug, Vendor};
use wattbus_e2e::servers::Influxd;
use wattbus_e2e::{BrokerSetup, Proc, free_port, wait_until, wattbus_bin};

const DB: &str = "wattbus";

/// The plugs, served on free ports by a runtime of their own.
struct Plugs {
    _rt: tokio::runtime::Runtime,
    ports: Vec<u16>,
}

fn serve(plugs: &[SimPlug]) -> Plugs {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut ports = Vec::new();
    for p in plugs {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        ports.push(listener.local_addr().unwrap().port());
        rt.spawn(p.clone().serve(listener));
    }
    Plugs { _rt: rt, ports }
}

/// `field` of measurement `m` for `device`, oldest first.
fn series(influx: &Influxd, m: &str, field: &str, device: &str) -> Vec<f64> {
    let v = influx.query(
        DB,
        &format!(
            "SELECT \"{field}\" FROM \"{m}\" WHERE \"device\" = '{device}' AND \"{field}\" >= -1"
        ),
    );
    v["results"][0]["series"][0]["values"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r[1].as_f64()).collect())
        .unwrap_or_default()
}

fn last(influx: &Influxd, device: &str) -> f64 {
    series(influx, "plug", "energy_wh", device)
        .last()
        .copied()
        .unwrap_or(-1.0)
}

fn config(
    broker: &BrokerSetup,
    dir: &Path,
    influx: &Influxd,
    ports: &[u16],
    token: &Path,
) -> std::path::PathBuf {
    let path = broker.service_config(
        dir,
        [
            "level = \"info,rumqttd=warn\"",
            "reconnect_max_ms = 1000",
            "",
        ],
    );
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[influx_writer]\nhealth_listen = \"127.0.0.1:{}\"\nflush_interval_ms = 100\n\
         [influx_writer.influx]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"{DB}\"\n\
         [plug_bridge]\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 100\ntimeout_ms = 500\nretry_ms = 200\nretry_max_ms = 1000\nenergy_margin_wh = 1.0\n\
         [plug_bridge.stream]\nwait_for = [\"influx-writer\"]\n\
         [[plug_bridge.plugs]]\nid = \"kettle\"\nkind = \"mystrom\"\nurl = \"http://127.0.0.1:{}\"\ntoken_file = \"{}\"\n\
         [[plug_bridge.plugs]]\nid = \"heater\"\nkind = \"shelly\"\nurl = \"http://127.0.0.1:{}/\"\n\
         [[plug_bridge.plugs]]\nid = \"gone\"\nkind = \"shelly\"\nurl = \"http://127.0.0.1:{}\"\n\
         [[plug_bridge.plugs]]\nid = \"locked\"\nkind = \"mystrom\"\nurl = \"http://127.0.0.1:{}\"\n",
        free_port(),
        influx.port,
        free_port(),
        ports[0],
        token.display(),
        ports[1],
        ports[2],
        ports[3],
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// `mosquitto_pub` as the test's admin user.
fn publish(broker: &BrokerSetup, topic: &str, payload: &str, retain: bool) {
    let mut c = Command::new("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-u", &broker.user, "-P", &broker.password, "-q", "1"])
        .args(["-t", topic, "-m", payload]);
    if retain {
        c.arg("-r");
    }
    let o = c.output().expect("mosquitto_pub runs (mosquitto-clients)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn command(device: &str, id: &str, action: &str, expires_in_ms: i64) -> String {
    let now = proto::now_ms();
    // Issued a moment before it expires, if it already has.
    let issued = now + expires_in_ms.min(0) - 1000;
    format!(
        r#"{{"id":"{id}","device":"{device}","action":"{action}","issued_ts_ms":{issued},"expires_ts_ms":{}}}"#,
        now + expires_in_ms
    )
}

/// Commands through the bus, answered on `cmd-result/<plug>` with the state read back.
fn switching(broker: &BrokerSetup, d: &Path, kettle: &SimPlug, heater: &SimPlug, gone: &SimPlug) {
    let results = d.join("results.log");
    let mut sub = Proc::spawn(
        "mosquitto_sub",
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args(["-u", &broker.user, "-P", &broker.password, "-q", "1"])
            .args(["-t", "wattbus/v1/lab/cmd-result/+"]),
        &results,
    );
    let said = |needle: &str| {
        std::fs::read_to_string(&results)
            .unwrap_or_default()
            .matches(needle)
            .count()
    };
    // Subscribed once what is published there comes back.
    assert!(
        wait_until(Duration::from_secs(20), || {
            publish(
                broker,
                "wattbus/v1/lab/cmd-result/probe",
                r#"{"id":"ready"}"#,
                false,
            );
            said("ready") > 0
        }),
        "mosquitto_sub did not subscribe"
    );
    let result = |id: &str| -> serde_json::Value {
        let mut found = serde_json::Value::Null;
        let got = wait_until(Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&results).unwrap_or_default();
            match text
                .lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["id"] == id)
            {
                Some(v) => {
                    found = v;
                    true
                }
                None => false,
            }
        });
        assert!(
            got,
            "no result for {id}: {}",
            std::fs::read_to_string(&results).unwrap_or_default()
        );
        found
    };
    let cmd = |device: &str| format!("wattbus/v1/lab/cmd/{device}");

    // Off: done, and the state read back from the plug.
    publish(
        broker,
        &cmd("kettle"),
        &command("kettle", "c1", "off", 10_000),
        false,
    );
    let r = result("c1");
    assert_eq!(
        (r["ok"].as_bool(), r["relay_on"].as_bool()),
        (Some(true), Some(false)),
        "{r}"
    );
    assert!(!kettle.relay_on());
    // The same command again (a resend): answered the same, not carried out again.
    kettle.set_relay(true);
    let switched = kettle.switches();
    publish(
        broker,
        &cmd("kettle"),
        &command("kettle", "c1", "off", 10_000),
        false,
    );
    assert!(wait_until(Duration::from_secs(20), || said("\"c1\"") == 2));
    assert!(
        kettle.relay_on() && kettle.switches() == switched,
        "a repeated command switched the plug again"
    );
    // Expired before it arrived: never carried out.
    publish(
        broker,
        &cmd("kettle"),
        &command("kettle", "c2", "off", -1),
        false,
    );
    let r = result("c2");
    assert_eq!(r["ok"].as_bool(), Some(false), "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("expired"),
        "{r}"
    );
    assert!(kettle.relay_on());
    // Toggle on a Shelly.
    assert!(heater.relay_on());
    publish(
        broker,
        &cmd("heater"),
        &command("heater", "c3", "toggle", 10_000),
        false,
    );
    let r = result("c3");
    assert_eq!(
        (r["ok"].as_bool(), r["relay_on"].as_bool()),
        (Some(true), Some(false)),
        "{r}"
    );
    assert!(!heater.relay_on());
    // A plug that does not answer: failed once the command expired, and nothing switches
    // later by itself when it is back.
    assert!(gone.relay_on());
    publish(
        broker,
        &cmd("gone"),
        &command("gone", "c4", "off", 1500),
        false,
    );
    let r = result("c4");
    assert_eq!(r["ok"].as_bool(), Some(false), "{r}");
    gone.set_down(false);
    // Polled again a few times: a command kept to fire late would have by then.
    let polled = gone.requests();
    assert!(wait_until(Duration::from_secs(20), || gone.requests() >= polled + 3));
    assert!(
        gone.relay_on() && gone.switches() == 0,
        "an expired command fired late"
    );
    // Forged: the payload names another plug than the topic. Refused, nothing switched.
    // A command after it shows the forged one was handled before.
    let (kettle_switched, heater_switched) = (kettle.switches(), heater.switches());
    publish(
        broker,
        &cmd("heater"),
        &command("kettle", "c5", "toggle", 10_000),
        false,
    );
    publish(
        broker,
        &cmd("heater"),
        &command("heater", "c7", "off", 10_000),
        false,
    );
    result("c7");
    assert_eq!(
        (kettle.switches(), heater.switches()),
        (kettle_switched, heater_switched + 1),
        "a forged command switched a plug"
    );
    let text = std::fs::read_to_string(&results).unwrap_or_default();
    assert!(!text.contains("\"c5\""), "{text}");
    sub.terminate(Duration::from_secs(5));
}

fn bridge(config: &Path, log: &Path) -> Proc {
    Proc::spawn(
        "plug-bridge",
        Command::new(wattbus_bin())
            .args(["run", "plug-bridge", "--config"])
            .arg(config),
        log,
    )
}

/// The ceiling of `device`'s counter in the bridge's energy file.
fn saved_ceiling(file: &Path, device: &str) -> f64 {
    let text = std::fs::read_to_string(file).unwrap();
    let json = &text[..text.rfind("crc32 ").unwrap()];
    let saved: serde_json::Value = serde_json::from_str(json).unwrap();
    saved["plugs"][device]["ceiling_wh"].as_f64().unwrap()
}

#[test]
fn energy_never_goes_backwards_through_reboots_and_a_kill_and_ends_where_the_plug_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let influx = Influxd::start(d);
    influx.create_database(DB);
    // 3.6 kW: a watt-hour a second, so the counters move fast.
    let kettle = SimPlug::new(Vendor::Mystrom, 3600.0, Some("sekret".into()));
    let heater = SimPlug::new(Vendor::Shelly, 1800.0, None);
    heater.set_loses_total(true);
    let gone = SimPlug::new(Vendor::Shelly, 100.0, None);
    gone.set_down(true);
    let locked = SimPlug::new(Vendor::Mystrom, 100.0, Some("not-given".into()));
    let plugs = serve(&[kettle.clone(), heater.clone(), gone.clone(), locked.clone()]);
    let token = d.join("kettle_token");
    std::fs::write(&token, "sekret\n").unwrap();

    let broker = BrokerSetup::new(d);
    let mut broker_proc = broker.start(&d.join("broker.log"));
    let cfg = config(&broker, d, &influx, &plugs.ports, &token);
    let mut writer = Proc::spawn(
        "influx-writer",
        Command::new(wattbus_bin())
            .args(["run", "influx-writer", "--config"])
            .arg(&cfg),
        &d.join("writer.log"),
    );
    let log = d.join("bridge.log");
    let mut b = bridge(&cfg, &log);
    let reached =
        |device: &str, wh: f64| wait_until(Duration::from_secs(60), || last(&influx, device) >= wh);
    assert!(
        reached("kettle", 3.0),
        "no kettle readings; see {}",
        log.display()
    );
    assert!(
        reached("heater", 1.5),
        "no heater readings; see {}",
        log.display()
    );

    // A myStrom reboot: boot id new, its counter at 0; ours goes on.
    let before = last(&influx, "kettle");
    kettle.reboot();
    assert!(reached("kettle", before + 2.0));
    // A Shelly that lost its total.
    let before = last(&influx, "heater");
    heater.reboot();
    assert!(reached("heater", before + 1.0));

    // The bridge killed, the kettle rebooting while it is down, the bridge back.
    b.kill9();
    kettle.reboot();
    std::thread::sleep(Duration::from_millis(300));
    let mut b = bridge(&cfg, &log);
    let before = last(&influx, "kettle");
    assert!(reached("kettle", before + 3.0));

    switching(&broker, d, &kettle, &heater, &gone);
    // A retained command is carried out when it is sent, never again when the bridge
    // reconnects and the broker hands it over once more.
    let kettle_cmd = "wattbus/v1/lab/cmd/kettle";
    publish(
        &broker,
        kettle_cmd,
        &command("kettle", "c6", "off", 60_000),
        true,
    );
    assert!(wait_until(Duration::from_secs(10), || !kettle.relay_on()));
    kettle.set_relay(true);
    b.kill9();
    // After this crash (no reboot) the counter is held at the saved ceiling until the plug's
    // own counter passes it: up to a margin high meanwhile. Once past, it is exact again.
    let ceiling = saved_ceiling(&d.join("plug-bridge/plug-bridge/energy.json"), "kettle");
    let mut b = bridge(&cfg, &log);
    assert!(
        reached("kettle", ceiling + 0.2),
        "the counter never passed the ceiling saved before the crash ({ceiling}); see {}",
        log.display()
    );
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("it is retained")),
        "the retained command was not handed over again"
    );
    assert!(
        kettle.relay_on(),
        "a retained command fired again after a reconnect"
    );
    publish(&broker, kettle_cmd, "", true);

    // Stopped cleanly; what the writer has is what InfluxDB has.
    assert!(b.terminate(Duration::from_secs(20)).is_some());
    let (kettle_used, heater_used) = (kettle.lifetime_wh(), heater.lifetime_wh());
    // A clean stop saved each counter exactly as last published; the writer stores it.
    for device in ["kettle", "heater"] {
        let exact = saved_ceiling(&d.join("plug-bridge/plug-bridge/energy.json"), device);
        assert!(
            wait_until(Duration::from_secs(30), || last(&influx, device) == exact),
            "{device}: stored {} but the bridge stopped at {exact}",
            last(&influx, device)
        );
    }

    for (device, used) in [("kettle", kettle_used), ("heater", heater_used)] {
        let s = series(&influx, "plug", "energy_wh", device);
        assert!(s.len() > 20, "{device}: {} readings", s.len());
        for w in s.windows(2) {
            assert!(
                w[1] >= w[0],
                "{device}: the counter went down: {} then {}",
                w[0],
                w[1]
            );
        }
        let end = s[s.len() - 1];
        // At most the margin (1 Wh) high after the crash with a reboot (the counter continued
        // from the ceiling), and low by no more than what was used between a last poll and a
        // reboot (a few tenths of a Wh at 100 ms polls).
        assert!(
            end <= used + 1.0 + 0.05 && end >= used - 1.5,
            "{device}: counter {end} Wh, the plug used {used} Wh"
        );
    }
    // The other readings of a plug: power and relay as the plug said.
    // Power and relay as the plug said them, on and off (the commands switched them).
    let power = series(&influx, "plug", "power_w", "kettle");
    assert!(
        power
            .iter()
            .all(|p| (*p - 3600.0).abs() < 0.01 || *p == 0.0),
        "{power:?}"
    );
    let relay = series(&influx, "plug", "relay_on", "heater");
    assert_eq!(
        (relay.first(), relay.last()),
        (Some(&1.0), Some(&0.0)),
        "{relay:?}"
    );
    assert!(!series(&influx, "plug", "voltage_v", "heater").is_empty());

    // The plug that refused the token: offline, said, while the others went on; no readings
    // of its own. The one that did not answer: offline until it came back.
    let online = series(&influx, "plug_status", "online", "locked");
    assert!(
        !online.is_empty() && online.iter().all(|o| *o == 0.0),
        "{online:?}"
    );
    assert!(series(&influx, "plug", "power_w", "locked").is_empty());
    let online = series(&influx, "plug_status", "online", "gone");
    assert_eq!(
        (online.first(), online.last()),
        (Some(&0.0), Some(&1.0)),
        "{online:?}"
    );
    assert_eq!(
        series(&influx, "plug_status", "online", "kettle").last(),
        Some(&1.0)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("token_file"),
        "the refused token is explained:\n{text}"
    );
    assert!(text.contains("rebooted"), "{text}");
    assert!(!text.contains("sekret"), "the token in the log");
    writer.terminate(Duration::from_secs(20));
    broker_proc.terminate(Duration::from_secs(20));
}

const API_TOKEN: &str = "grafana-button-token-0123456789";

/// A broker and plug-bridge with its HTTP API over `plugs` (myStrom `lamp`, Shelly `fridge`,
/// a plug `gone` at `ports[2]`), every request to a plug bounded by `timeout_ms`.
struct Api {
    port: u16,
    log: std::path::PathBuf,
    bridge: Proc,
    broker_proc: Proc,
    broker: BrokerSetup,
}

fn api(d: &Path, ports: &[u16], api_timeout_ms: u64) -> Api {
    let broker = BrokerSetup::new(d);
    let broker_proc = broker.start(&d.join("broker.log"));
    let path = broker.service_config(
        d,
        [
            "level = \"info,rumqttd=warn\"",
            "reconnect_max_ms = 500",
            "",
        ],
    );
    let token = d.join("api_token");
    // As `echo $TOKEN > file` writes it.
    std::fs::write(&token, format!("{API_TOKEN}\n")).unwrap();
    let port = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[plug_bridge]\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 200\ntimeout_ms = 500\nretry_ms = 200\nretry_max_ms = 400\n\
         [plug_bridge.api]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\ntimeout_ms = {api_timeout_ms}\n\
         [[plug_bridge.plugs]]\nid = \"lamp\"\nkind = \"mystrom\"\nurl = \"http://127.0.0.1:{}\"\n\
         [[plug_bridge.plugs]]\nid = \"fridge\"\nkind = \"shelly\"\nurl = \"http://127.0.0.1:{}\"\n\
         [[plug_bridge.plugs]]\nid = \"gone\"\nkind = \"shelly\"\nurl = \"http://127.0.0.1:{}\"\n",
        free_port(),
        token.display(),
        ports[0],
        ports[1],
        ports[2],
    ));
    std::fs::write(&path, text).unwrap();
    let log = d.join("bridge.log");
    let bridge = bridge(&path, &log);
    assert!(
        wait_until(Duration::from_secs(30), || wattbus_e2e::port_open(port)),
        "the plug API did not listen; see {}",
        log.display()
    );
    Api {
        port,
        log,
        bridge,
        broker_proc,
        broker,
    }
}

impl Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("X-Grafana-User", "maria"),
        ];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let (status, text) =
            wattbus_e2e::servers::http_with(method, self.port, path, &headers, body.as_bytes());
        let v =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}"));
        (status, v)
    }

    fn switch(&self, plug: &str, body: &str) -> (u16, serde_json::Value) {
        self.call(
            "POST",
            &format!("/api/v1/plugs/{plug}/relay"),
            Some(API_TOKEN),
            body,
        )
    }
}

/// The button's path: HTTP with the token → plug-bridge → the plug → read back → the
/// answer; without the token nothing is switched; a plug that does not answer is a 504 and
/// nothing switches later by itself.
#[test]
fn http_api_switches_with_the_token_and_answers_what_the_plug_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lamp = SimPlug::new(Vendor::Mystrom, 60.0, None);
    let fridge = SimPlug::new(Vendor::Shelly, 120.0, None);
    let gone = SimPlug::new(Vendor::Shelly, 10.0, None);
    let plugs = serve(&[lamp.clone(), fridge.clone(), gone.clone()]);
    let a = api(d, &plugs.ports, 1500);
    // The bus hears every switch's result, as for commands sent there.
    let results = d.join("results.log");
    let mut sub = Proc::spawn(
        "mosquitto_sub",
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &a.broker.port.to_string()])
            .args(["-u", &a.broker.user, "-P", &a.broker.password, "-q", "1"])
            .args(["-t", "wattbus/v1/lab/cmd-result/+"]),
        &results,
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            publish(
                &a.broker,
                "wattbus/v1/lab/cmd-result/probe",
                r#"{"id":"ready"}"#,
                false,
            );
            std::fs::read_to_string(&results)
                .unwrap_or_default()
                .contains("ready")
        }),
        "mosquitto_sub did not subscribe"
    );

    // Without the token, or with a wrong one: 401, and the plug is not touched.
    assert!(lamp.relay_on());
    let before = lamp.switches();
    for token in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
        let (status, v) = a.call(
            "POST",
            "/api/v1/plugs/lamp/relay",
            token,
            r#"{"action":"off"}"#,
        );
        assert_eq!(status, 401, "{v}");
        assert!(v["error"].as_str().unwrap().contains("bearer token"), "{v}");
    }
    // Nor can it list plugs.
    assert_eq!(a.call("GET", "/api/v1/plugs", None, "").0, 401);
    assert!(
        lamp.relay_on() && lamp.switches() == before,
        "switched without the token"
    );

    // With it: switched, and the answer is the state read back from the plug.
    let (status, v) = a.switch("lamp", r#"{"action":"off"}"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["ok"].as_bool(), v["relay_on"].as_bool()),
        (Some(true), Some(false)),
        "{v}"
    );
    assert!(!lamp.relay_on());
    let (status, v) = a.switch("fridge", r#"{"action":"toggle","id":"maintenance-1"}"#);
    assert_eq!((status, v["relay_on"].as_bool()), (200, Some(false)), "{v}");
    assert!(!fridge.relay_on());
    // The same id again (a retry after a lost answer): answered again, not toggled back.
    let switched = fridge.switches();
    let (status, v) = a.switch("fridge", r#"{"action":"toggle","id":"maintenance-1"}"#);
    assert_eq!((status, v["relay_on"].as_bool()), (200, Some(false)), "{v}");
    assert!(
        !fridge.relay_on() && fridge.switches() == switched,
        "a repeated id switched again"
    );
    // The same id for another action: refused, never answered as if done.
    let (status, v) = a.switch("fridge", r#"{"action":"on","id":"maintenance-1"}"#);
    assert_eq!((status, v["ok"].as_bool()), (409, Some(false)), "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("another command"),
        "{v}"
    );
    assert!(
        !fridge.relay_on() && fridge.switches() == switched,
        "a conflicting id switched"
    );
    // Switched at the plug's own button: the API reads it back, it does not assume.
    fridge.set_relay(true);
    let (status, v) = a.switch("fridge", r#"{"action":"toggle"}"#);
    assert_eq!((status, v["relay_on"].as_bool()), (200, Some(false)), "{v}");

    // The switch's result is on the bus too, and the log says who asked.
    assert!(wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&results)
            .unwrap_or_default()
            .contains("maintenance-1")
    }));
    let log = std::fs::read_to_string(&a.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("Switch asked over HTTP")
            && l.contains("maria")
            && l.contains("lamp")),
        "{log}"
    );
    assert!(!log.contains(API_TOKEN), "the token is in the log");

    // Reading: every plug, with its latest state.
    assert!(wait_until(Duration::from_secs(20), || {
        let (_, v) = a.call("GET", "/api/v1/plugs/lamp", Some(API_TOKEN), "");
        v["online"] == true && v["relay_on"] == false && v["power_w"].as_f64() == Some(0.0)
    }));
    let (status, v) = a.call("GET", "/api/v1/plugs", Some(API_TOKEN), "");
    assert_eq!(status, 200);
    let ids: Vec<_> = v["plugs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["lamp", "fridge", "gone"]);

    // Clear errors.
    assert_eq!(a.switch("nope", r#"{"action":"on"}"#).0, 404);
    assert_eq!(
        a.call("GET", "/api/v1/plugs/nope", Some(API_TOKEN), "").0,
        404
    );
    let (status, v) = a.switch("lamp", r#"{"action":"explode"}"#);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("action"), "{v}");
    assert_eq!(
        a.call("GET", "/api/v1/plugs/lamp/relay", Some(API_TOKEN), "")
            .0,
        405
    );
    let big = format!(r#"{{"action":"on","id":"{}"}}"#, "x".repeat(5000));
    assert_eq!(a.switch("lamp", &big).0, 413);
    assert!(!lamp.relay_on(), "a refused request switched the plug");

    // A plug that does not answer: 504 once the command's time is up ...
    assert!(gone.relay_on());
    gone.set_down(true);
    let (status, v) = a.switch("gone", r#"{"action":"off"}"#);
    assert_eq!(status, 504, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("did not confirm within 1500 ms"),
        "{v}"
    );
    // ... and when it is back, nothing switches by itself: the bridge reads it again (its
    // polls reach it) and the relay stays as it was.
    let switched = gone.switches();
    gone.set_down(false);
    let answered = gone.requests();
    assert!(wait_until(Duration::from_secs(20), || gone.requests() >= answered + 5));
    assert!(wait_until(Duration::from_secs(20), || {
        a.call("GET", "/api/v1/plugs/gone", Some(API_TOKEN), "").1["online"] == true
    }));
    assert!(
        gone.relay_on() && gone.switches() == switched,
        "the timed-out command fired late"
    );
    // The description is served without the token.
    let (status, v) = a.call("GET", "/api/v1/openapi.json", None, "");
    assert_eq!((status, v["openapi"].as_str()), (200, Some("3.0.3")));

    // Stopped (SIGTERM) while a switch is under way: the switch is finished and answered
    // (not cut off with no answer while the plug switches anyway), then plug-bridge exits.
    lamp.set_delay(Duration::from_millis(300));
    let asked_so_far = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("Switch asked over HTTP")
            .count()
    };
    let before = asked_so_far(&a.log);
    let port = a.port;
    let asked = std::thread::spawn(move || {
        wattbus_e2e::servers::http_with(
            "POST",
            port,
            "/api/v1/plugs/lamp/relay",
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
            br#"{"action":"on"}"#,
        )
    });
    assert!(wait_until(Duration::from_secs(10), || asked_so_far(&a.log) > before));
    let mut a = a;
    let stopped = a.bridge.terminate(Duration::from_secs(15));
    let (status, body) = asked.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""relay_on":true"#), "{body}");
    assert!(lamp.relay_on());
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    sub.terminate(Duration::from_secs(5));
}

/// The API fuzzed from its own OpenAPI description by schemathesis: no 5xx (the plugs all
/// answer here; the 504 of one that does not is the test above's), every answer's status,
/// type and body as described, no malformed request taken, the service still up.
#[test]
fn http_api_fuzzed_from_its_openapi_description() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lamp = SimPlug::new(Vendor::Mystrom, 60.0, None);
    let fridge = SimPlug::new(Vendor::Shelly, 120.0, None);
    let third = SimPlug::new(Vendor::Shelly, 10.0, None);
    let plugs = serve(&[lamp, fridge, third]);
    let a = api(d, &plugs.ports, 600);
    let bin = std::env::var("WBTEST_SCHEMATHESIS")
        .expect("WBTEST_SCHEMATHESIS: schemathesis's `st` (tests/run.sh installs it)");
    let url = format!("http://127.0.0.1:{}/api/v1/openapi.json", a.port);
    let o = Command::new(bin)
        .args([
            "run",
            &url,
            "--url",
            &format!("http://127.0.0.1:{}", a.port),
        ])
        .args(["--header", &format!("Authorization: Bearer {API_TOKEN}")])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "150",
            "--phases",
            "examples,coverage,fuzzing",
        ])
        .args(["--no-color", "--seed", "1", "--generation-database", "none"])
        .current_dir(d)
        .output()
        .expect("schemathesis runs");
    let out = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "schemathesis found problems:\n{out}");
    // It did send requests, and the API still answers.
    assert!(out.contains("passed"), "{out}");
    let (status, _) = a.call("GET", "/api/v1/plugs", Some(API_TOKEN), "");
    assert_eq!(
        status,
        200,
        "plug-bridge does not answer after the fuzzing; see {}",
        a.log.display()
    );
}

/// The Grafana switch as the Plugs dashboard and compose ship it, run without Grafana (which
/// cannot run here): the panel's own code (in Node, as the browser would) makes the request
/// body and reads the answer; this test does what Grafana's data source proxy does with the
/// provisioned data source (its URL, the header with the token from the secret file) and
/// sends the request to plug-bridge. The plug switches, the panel says what it reads back; a
/// plug that does not answer is an error the user reads. The token is nowhere in the dashboard.
#[test]
fn the_grafana_switch_panel_switches_a_plug_through_the_provisioned_data_source() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("grafana/dashboards/plugs.json")).unwrap(),
    )
    .unwrap();
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "volkovlabs-form-panel")
        .expect("the Plugs dashboard has a switch")
        .clone();
    let o = &panel["options"];
    // A single plug is switched at a time, and only after the user confirms.
    let var = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "plug")
        .expect("a plug variable")
        .clone();
    assert_eq!(
        (var["multi"].as_bool(), var["includeAll"].as_bool()),
        (Some(false), Some(false))
    );
    assert_eq!(o["update"]["confirm"], true);
    assert_eq!(o["update"]["method"], "POST");
    assert_eq!(o["initial"]["method"], "GET");
    // Through Grafana's own proxy, to the provisioned data source.
    let proxy = "/api/datasources/proxy/uid/wattbus-plug-bridge";
    let update_url = o["update"]["url"].as_str().unwrap();
    let initial_url = o["initial"]["url"].as_str().unwrap();
    assert_eq!(update_url, format!("{proxy}/api/v1/plugs/${{plug}}/relay"));
    assert_eq!(initial_url, format!("{proxy}/api/v1/plugs/${{plug}}"));
    let source =
        std::fs::read_to_string(repo.join("grafana/provisioning/datasources/plug-bridge.yaml"))
            .unwrap();
    for line in [
        "uid: wattbus-plug-bridge",
        "type: yesoreyeram-infinity-datasource",
        "url: $PLUG_API_URL",
        "httpHeaderName1: Authorization",
        "httpHeaderValue1: Bearer $__file{/run/secrets/plug_api_token}",
    ] {
        assert!(
            source.lines().any(|l| l.trim() == line),
            "plug-bridge.yaml lacks {line:?}"
        );
    }
    // compose: the plugins, the secret, the URL, the Grafana login passed on.
    let compose = std::fs::read_to_string(repo.join("compose/docker-compose.yml")).unwrap();
    let version = panel["pluginVersion"].as_str().unwrap();
    for needle in [
        format!("volkovlabs-form-panel {version}"),
        "yesoreyeram-infinity-datasource ".to_string(),
        "PLUG_API_URL: ${PLUG_API_URL:-http://plug-bridge:9116}".to_string(),
        "GF_DATAPROXY_SEND_USER_HEADER: \"true\"".to_string(),
        "secrets: [grafana_admin_password, influx_grafana_password, plug_api_token]".to_string(),
        "WATTBUS_PLUG_BRIDGE__API__TOKEN_FILE: /run/secrets/plug_api_token".to_string(),
        "WATTBUS_PLUG_BRIDGE__API__LISTEN: 0.0.0.0:9116".to_string(),
    ] {
        assert!(
            compose.contains(&needle),
            "docker-compose.yml lacks {needle:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lamp = SimPlug::new(Vendor::Mystrom, 60.0, None);
    let fridge = SimPlug::new(Vendor::Shelly, 120.0, None);
    let gone = SimPlug::new(Vendor::Shelly, 10.0, None);
    let plugs = serve(&[lamp.clone(), fridge, gone.clone()]);
    let a = api(d, &plugs.ports, 1500);
    assert!(
        !std::fs::read_to_string(repo.join("grafana/dashboards/plugs.json"))
            .unwrap()
            .contains(API_TOKEN)
    );
    // The header as Grafana makes it: `$__file{…}` is the secret file's content, trimmed.
    let token = std::fs::read_to_string(d.join("api_token")).unwrap();
    let header = format!("Bearer {}", token.trim());
    let grafana_proxy = |method: &str, url: &str, plug: &str, body: &str| {
        let path = url.replace("${plug}", plug);
        let path = path.strip_prefix(proxy).unwrap();
        wattbus_e2e::servers::http_with(
            method,
            a.port,
            path,
            &[
                ("Authorization", &header),
                ("Content-Type", "application/json"),
                ("X-Grafana-User", "admin"),
            ],
            body.as_bytes(),
        )
    };
    let run = |code: &str, action: &str, status: u16, body: &str| -> serde_json::Value {
        panel_code(d, code, action, status, body)
    };

    // The state shown: the initial request's answer fills the elements named like its keys.
    assert!(wait_until(Duration::from_secs(20), || {
        let (status, body) = grafana_proxy("GET", initial_url, "lamp", "");
        status == 200 && serde_json::from_str::<serde_json::Value>(&body).unwrap()["online"] == true
    }));
    let (_, body) = grafana_proxy("GET", initial_url, "lamp", "");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    for e in o["elements"].as_array().unwrap() {
        let id = e["id"].as_str().unwrap();
        if id != "action" {
            assert!(
                state.get(id).is_some(),
                "element {id} is not in plug-bridge's answer {state}"
            );
        }
    }
    assert_eq!(state["relay_on"], true);

    // Off: the body the panel makes, through the proxy, the message the user reads.
    let payload = run(o["update"]["getPayload"].as_str().unwrap(), "off", 0, "");
    assert_eq!(payload["returned"], serde_json::json!({"action": "off"}));
    let body = payload["returned"].to_string();
    let (status, answer) = grafana_proxy("POST", update_url, "lamp", &body);
    assert_eq!(status, 200, "{answer}");
    assert!(!lamp.relay_on(), "the plug was not switched");
    let shown = run(
        o["update"]["code"].as_str().unwrap(),
        "off",
        status,
        &answer,
    );
    assert_eq!(
        shown["success"],
        serde_json::json!(["Plug lamp: off", "The plug reads OFF"]),
        "{shown}"
    );
    assert_eq!(shown["reread"], true, "{shown}");

    // A plug that does not answer: the user reads why, and nothing switches later.
    gone.set_down(true);
    let (status, answer) = grafana_proxy("POST", update_url, "gone", &body);
    assert_eq!(status, 504, "{answer}");
    let shown = run(
        o["update"]["code"].as_str().unwrap(),
        "off",
        status,
        &answer,
    );
    let error = shown["error"].to_string();
    assert!(
        error.contains("HTTP 504") && error.contains("did not confirm"),
        "{shown}"
    );
    // What Grafana itself answers when plug-bridge is unreachable (502, no body) is an error too.
    let shown = run(o["update"]["code"].as_str().unwrap(), "off", 502, "");
    assert!(shown["error"].to_string().contains("HTTP 502"), "{shown}");
    // The initial request's error, e.g. a plug removed from the config.
    let (status, answer) = grafana_proxy("GET", initial_url, "removed", "");
    assert_eq!(status, 404);
    let shown = run(o["initial"]["code"].as_str().unwrap(), "", status, &answer);
    assert!(
        shown["error"].to_string().contains("no such plug"),
        "{shown}"
    );
    let log = std::fs::read_to_string(&a.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("Switch asked over HTTP") && l.contains("admin"))
    );
}

/// Run a form panel's `code` in Node as Business Forms does (`new Function("context", code)`),
/// with the action element set to `action` and `response` a fetch Response of `status` and
/// `body`; what it returned and the notifications it raised.
fn panel_code(dir: &Path, code: &str, action: &str, status: u16, body: &str) -> serde_json::Value {
    let script = dir.join("panel.js");
    std::fs::write(
        &script,
        r#"
const [code, action, status, body] = process.argv.slice(2);
const out = { reread: false };
const context = {
  panel: {
    elements: [{ id: 'action', value: action }],
    response: Number(status) === 0 ? undefined : {
      ok: Number(status) >= 200 && Number(status) < 300,
      status: Number(status),
      statusText: 'status ' + status,
      text: () => Promise.resolve(body),
    },
    initialRequest: () => { out.reread = true; },
  },
  grafana: {
    notifySuccess: (m) => { out.success = m; },
    notifyError: (m) => { out.error = m; },
  },
};
Promise.resolve(new Function('context', code)(context)).then((r) => {
  out.returned = r === undefined ? null : r;
  console.log(JSON.stringify(out));
});
"#,
    )
    .unwrap();
    let o = Command::new("node")
        .arg(&script)
        .args([code, action, &status.to_string(), body])
        .output()
        .expect("node runs (nodejs)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Home Assistant MQTT discovery as Home Assistant sees it on the broker: every plug's
/// switch and sensors announced retained (the schema itself is checked in `ha`'s unit
/// tests), reading the topics the readings really arrive on; a plug's availability; all of
/// it back after a broker restart (wattbus's broker keeps retained messages in memory only),
/// and announced again when Home Assistant says `online`.
#[test]
fn home_assistant_discovery_announces_every_plug_and_again_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lamp = SimPlug::new(Vendor::Mystrom, 60.0, None);
    let fridge = SimPlug::new(Vendor::Shelly, 120.0, None);
    let gone = SimPlug::new(Vendor::Shelly, 10.0, None);
    gone.set_down(true);
    let plugs = serve(&[lamp, fridge, gone]);
    let mut a = api(d, &plugs.ports, 1500);
    let sub = |name: &str, topic: &str| {
        let log = d.join(name);
        let p = Proc::spawn(
            "mosquitto_sub",
            Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &a.broker.port.to_string()])
                .args([
                    "-u",
                    &a.broker.user,
                    "-P",
                    &a.broker.password,
                    "-q",
                    "1",
                    "-v",
                ])
                .args(["-t", topic]),
            &log,
        );
        (p, log)
    };
    // (topic, payload) pairs seen so far.
    let seen = |log: &Path| -> Vec<(String, String)> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect()
    };
    let configs = |log: &Path| {
        seen(log)
            .into_iter()
            .filter(|(t, _)| t.ends_with("/config"))
            .count()
    };
    // 4 entities for a myStrom, 6 for a Shelly (voltage, current).
    const ALL: usize = 4 + 6 + 6;
    // Each plug's switch config (found by its command topic: the object ids are hashes),
    // and from it the plug's availability topic.
    let switch_of = |log: &Path, plug: &str| -> Option<serde_json::Value> {
        seen(log)
            .iter()
            .filter(|(t, _)| t.starts_with("homeassistant/switch/") && t.ends_with("/config"))
            .filter_map(|(_, p)| serde_json::from_str::<serde_json::Value>(p).ok())
            .find(|v| v["command_topic"] == format!("wattbus/v1/lab/cmd/{plug}"))
    };
    let available = |log: &Path, plug: &str, state: &str| {
        let Some(switch) = switch_of(log, plug) else {
            return false;
        };
        let topic = switch["availability"][1]["topic"]
            .as_str()
            .unwrap()
            .to_string();
        seen(log).iter().any(|(t, p)| *t == topic && p == state)
    };
    let (mut first, log) = sub("ha-1.log", "homeassistant/#");
    assert!(
        wait_until(Duration::from_secs(30), || configs(&log) >= ALL
            && available(&log, "lamp", "online")
            && available(&log, "gone", "offline")),
        "{:?}",
        seen(&log)
    );
    let all = seen(&log);
    let switch = switch_of(&log, "fridge").expect("the fridge's switch");
    assert_eq!(
        switch["availability"][0]["topic"],
        "wattbus/v1/lab/status/plug-bridge"
    );
    // What the templates read is in the state: `power_w`, `relay_on`, …, only moving forward.
    let state_topic = switch["state_topic"].as_str().unwrap().to_string();
    let (mut states, states_log) = sub("states.log", &state_topic);
    assert!(wait_until(Duration::from_secs(20), || seen(&states_log)
        .len()
        >= 5));
    let mut last_energy = 0.0;
    for (_, state) in seen(&states_log) {
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        for f in [
            "power_w",
            "energy_wh",
            "temperature_c",
            "voltage_v",
            "current_a",
        ] {
            assert!(state[f].is_number(), "{f} not in {state}");
        }
        assert!(state["relay_on"].is_boolean(), "{state}");
        let e = state["energy_wh"].as_f64().unwrap();
        assert!(
            e >= last_energy,
            "the state's energy went back: {last_energy} → {e}"
        );
        last_energy = e;
    }
    states.terminate(Duration::from_secs(5));
    let mut ids = std::collections::BTreeSet::new();
    for (topic, payload) in all.iter().filter(|(t, _)| t.ends_with("/config")) {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert!(
            v["state_topic"]
                .as_str()
                .unwrap()
                .starts_with("homeassistant/switch/wattbus/"),
            "{topic}"
        );
        assert!(
            ids.insert(v["unique_id"].as_str().unwrap().to_string()),
            "{topic}"
        );
        if topic.ends_with("_energy/config") {
            assert_eq!(v["state_class"], "total_increasing", "{topic}");
        }
    }
    assert_eq!(ids.len(), ALL);

    // Home Assistant restarts and says so: announced again (once, however often it says so).
    let before = configs(&log);
    for _ in 0..20 {
        publish(&a.broker, "homeassistant/status", "online", false);
    }
    assert!(
        wait_until(Duration::from_secs(20), || configs(&log) >= before + ALL),
        "not announced again after homeassistant/status online"
    );
    first.terminate(Duration::from_secs(5));
    let text = std::fs::read_to_string(&a.log).unwrap();
    let announced = text.matches("Home Assistant is online").count();
    assert!(
        (1..=2).contains(&announced),
        "announced {announced} times for one restart"
    );

    // The broker restarts, its retained messages gone: plug-bridge announces everything again.
    a.broker_proc.kill9();
    a.broker_proc = a.broker.start(&d.join("broker-2.log"));
    let (mut second, log) = sub("ha-2.log", "homeassistant/#");
    assert!(
        wait_until(Duration::from_secs(30), || configs(&log) >= ALL
            && available(&log, "lamp", "online")),
        "not announced again after a broker restart: {:?}",
        seen(&log)
    );
    second.terminate(Duration::from_secs(5));
}

/// A Tasmota plug played by real MQTT clients (`mosquitto_sub` hears its commands,
/// `mosquitto_pub` answers as Tasmota documents): `cmnd/<topic>/POWER` (empty: the state;
/// `ON`/`OFF`: switch) and `cmnd/<topic>/STATUS 10` (the energy monitor).
struct Tasmota {
    state: std::sync::Arc<std::sync::Mutex<TasmotaState>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    sub: Proc,
}

#[derive(Debug, Clone)]
struct TasmotaState {
    on: bool,
    total_kwh: f64,
    power_w: f64,
    /// Hears but does not answer.
    down: bool,
    switches: u32,
}

impl Tasmota {
    /// On any broker: `(host, port)`, `(user, password)`.
    fn play_on(at: (&str, u16), login: (&str, &str), topic: &str, dir: &Path) -> Tasmota {
        let heard = dir.join(format!("{topic}.cmnd"));
        let sub = Proc::spawn(
            "mosquitto_sub",
            Command::new("mosquitto_sub")
                .args(["-h", at.0, "-p", &at.1.to_string()])
                .args(["-u", login.0, "-P", login.1, "-q", "1"])
                .args(["-F", "%t|%p", "-t", &format!("cmnd/{topic}/#")]),
            &heard,
        );
        let state = std::sync::Arc::new(std::sync::Mutex::new(TasmotaState {
            on: true,
            total_kwh: 12.0,
            power_w: 57.0,
            down: false,
            switches: 0,
        }));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (t, st, sp) = (topic.to_string(), state.clone(), stop.clone());
        let (host, port) = (at.0.to_string(), at.1);
        let (user, password) = (login.0.to_string(), login.1.to_string());
        let thread = std::thread::spawn(move || {
            let publish = |topic: &str, payload: &str, retain: bool| {
                let mut c = Command::new("mosquitto_pub");
                c.args(["-h", &host, "-p", &port.to_string()])
                    .args(["-u", &user, "-P", &password, "-q", "1"])
                    .args(["-t", topic]);
                if payload.is_empty() {
                    c.arg("-n");
                } else {
                    c.args(["-m", payload]);
                }
                if retain {
                    c.arg("-r");
                }
                let o = c.output().expect("mosquitto_pub runs (mosquitto-clients)");
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            };
            // What Tasmota's firmware does on every connect: its will's counterpart, a query
            // of its own state, its discovery announcement.
            publish(&format!("tele/{t}/LWT"), "Online", true);
            publish(&format!("cmnd/{t}/POWER"), "", false);
            publish(
                "tasmota/discovery/5C0A1B2C3D4E/config",
                &format!(r#"{{"t":"{t}","ft":"%prefix%/%topic%/","hn":"{t}"}}"#),
                true,
            );
            let mut done = 0;
            while !sp.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&heard).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                for line in lines.iter().skip(done) {
                    let (topic, payload) = line.split_once('|').unwrap_or((line, ""));
                    let mut s = st.lock().unwrap();
                    if s.down {
                        continue;
                    }
                    let stat = |what: &str| format!("stat/{t}/{what}");
                    match (topic.rsplit('/').next().unwrap_or(""), payload) {
                        ("POWER", "") => {
                            let p = if s.on { "ON" } else { "OFF" };
                            drop(s);
                            publish(&stat("POWER"), p, false);
                        }
                        ("POWER", p @ ("ON" | "OFF")) => {
                            s.on = p == "ON";
                            s.switches += 1;
                            drop(s);
                            publish(&stat("RESULT"), &format!(r#"{{"POWER":"{p}"}}"#), false);
                        }
                        ("STATUS", "10") => {
                            // 57 W for the half second since the last poll, when on.
                            if s.on {
                                s.total_kwh += s.power_w * 0.5 / 3_600_000.0 * 1000.0;
                            }
                            let body = format!(
                                r#"{{"StatusSNS":{{"Time":"2026-12-04T17:00:00","ENERGY":{{"TotalStartTime":"2026-01-01T00:00:00","Total":{:.3},"Yesterday":0.1,"Today":0.2,"Power":{},"ApparentPower":60,"ReactivePower":18,"Factor":0.95,"Voltage":231,"Current":0.26}}}}}}"#,
                                s.total_kwh,
                                if s.on { s.power_w } else { 0.0 }
                            );
                            drop(s);
                            publish(&stat("STATUS10"), &body, false);
                        }
                        _ => {}
                    }
                }
                done = lines.len();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Tasmota {
            state,
            stop,
            thread: Some(thread),
            sub,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut TasmotaState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

impl Drop for Tasmota {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.sub.terminate(Duration::from_secs(5));
    }
}

/// A Tasmota plug on wattbus's broker, read and switched like the HTTP plugs: its power and
/// energy polled over MQTT, switched through the HTTP API with the state it reports, its own
/// counter reset without the bridge's going back, offline when it stops answering (and a
/// switch then 504, nothing sent later), announced to Home Assistant.
#[test]
fn a_tasmota_plug_played_over_mqtt_is_read_switched_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = BrokerSetup::new(d);
    // As users run it: plug-bridge as an actuator, the plug as its own `tasmota` user.
    let mut users = std::fs::read_to_string(&broker.config).unwrap();
    for (name, role) in [("plug-bridge", "actuator"), ("tasmota_5A3F2B", "tasmota")] {
        users.push_str(&format!(
            "[[broker.users]]\nusername = \"{name}\"\npassword_file = \"{}\"\nrole = \"{role}\"\n",
            d.join("broker-password").display()
        ));
    }
    std::fs::write(&broker.config, users).unwrap();
    let _broker = broker.start(&d.join("broker.log"));
    let path = broker.service_config(
        d,
        [
            "level = \"info,rumqttd=warn\"",
            "reconnect_max_ms = 500",
            "",
        ],
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("username = \"probe\"", "username = \"plug-bridge\""),
    )
    .unwrap();
    std::fs::write(d.join("api_token"), API_TOKEN).unwrap();
    let port = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[plug_bridge]\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 500\ntimeout_ms = 1000\nretry_ms = 200\nretry_max_ms = 400\n\
         [plug_bridge.api]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\ntimeout_ms = 2500\n\
         [[plug_bridge.plugs]]\nid = \"washer\"\nkind = \"tasmota\"\ntopic = \"tasmota_5A3F2B\"\n",
        free_port(),
        d.join("api_token").display(),
    ));
    std::fs::write(&path, text).unwrap();
    let plug = Tasmota::play_on(
        ("127.0.0.1", broker.port),
        ("tasmota_5A3F2B", &broker.password),
        "tasmota_5A3F2B",
        d,
    );
    let log = d.join("bridge.log");
    let _bridge = bridge(&path, &log);
    assert!(wait_until(Duration::from_secs(30), || {
        wattbus_e2e::port_open(port)
    }));
    let get = || -> serde_json::Value {
        let (_, body) = wattbus_e2e::servers::http_with(
            "GET",
            port,
            "/api/v1/plugs/washer",
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
            b"",
        );
        serde_json::from_str(&body).unwrap()
    };
    let post = |body: &str| {
        wattbus_e2e::servers::http_with(
            "POST",
            port,
            "/api/v1/plugs/washer/relay",
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
            body.as_bytes(),
        )
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            let v = get();
            v["online"] == true && v["relay_on"] == true && v["power_w"].as_f64() == Some(57.0)
        }),
        "{}; see {}",
        get(),
        log.display()
    );
    let first = get()["energy_wh"].as_f64().unwrap();
    assert!(first >= 12_000.0, "{first}");

    // Switched through the API: the state it reports back.
    let (status, body) = post(r#"{"action":"off"}"#);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""relay_on":false"#), "{body}");
    assert!(!plug.with(|s| s.on));
    let (status, body) = post(r#"{"action":"toggle"}"#);
    assert_eq!(status, 200, "{body}");
    assert!(
        plug.with(|s| s.on) && body.contains(r#""relay_on":true"#),
        "{body}"
    );

    // Its own counter reset (Tasmota's EnergyReset, or flash lost): the bridge's goes on.
    let before = get()["energy_wh"].as_f64().unwrap();
    plug.with(|s| s.total_kwh = 0.0);
    let mut last = before;
    assert!(wait_until(Duration::from_secs(30), || {
        let now = get()["energy_wh"].as_f64().unwrap();
        assert!(now >= last, "the counter went back: {last} → {now}");
        last = now;
        now > before
    }));

    // It stops answering: offline, and a switch is a 504, never carried out later.
    plug.with(|s| s.down = true);
    assert!(wait_until(Duration::from_secs(30), || get()["online"] == false));
    let switches = plug.with(|s| s.switches);
    let (status, body) = post(r#"{"action":"off"}"#);
    assert_eq!(status, 504, "{body}");
    plug.with(|s| s.down = false);
    assert!(wait_until(Duration::from_secs(30), || get()["online"] == true));
    assert!(
        plug.with(|s| s.on && s.switches == switches),
        "a switch was carried out after its 504"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(!log_text.contains("panicked"), "{log_text}");
    // Nobody was disconnected for a refused publish (the plug's firmware connect, plug-bridge's
    // commands and discovery are all within their roles).
    let broker_log = std::fs::read_to_string(d.join("broker.log")).unwrap();
    assert!(!broker_log.contains("Refused a publish"), "{broker_log}");
}

/// A Shelly with a password set: every request answered with SHA-256 digest authentication
/// (RFC 7616, as Shelly documents it), across a change of the plug's nonce; a wrong password
/// is offline with the reason in the log, and the others go on.
#[test]
fn a_shelly_with_a_password_is_read_and_switched_with_digest_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let locked = SimPlug::new(Vendor::Shelly, 200.0, Some("s3cret pass".into()));
    let wrong = SimPlug::new(Vendor::Shelly, 100.0, Some("another".into()));
    let plugs = serve(&[locked.clone(), wrong.clone()]);
    let broker = BrokerSetup::new(d);
    let _broker = broker.start(&d.join("broker.log"));
    let path = broker.service_config(d, ["level = \"info,rumqttd=warn\"", "", ""]);
    std::fs::write(d.join("api_token"), API_TOKEN).unwrap();
    std::fs::write(d.join("shelly_password"), "s3cret pass\n").unwrap();
    let port = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[plug_bridge]\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 200\ntimeout_ms = 1000\nretry_ms = 200\nretry_max_ms = 400\n\
         [plug_bridge.api]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n\
         [[plug_bridge.plugs]]\nid = \"heater\"\nkind = \"shelly\"\nurl = \"http://127.0.0.1:{}\"\npassword_file = \"{}\"\n\
         [[plug_bridge.plugs]]\nid = \"wrong\"\nkind = \"shelly\"\nurl = \"http://127.0.0.1:{}\"\npassword = \"not-it\"\n",
        free_port(),
        d.join("api_token").display(),
        plugs.ports[0],
        d.join("shelly_password").display(),
        plugs.ports[1],
    ));
    std::fs::write(&path, text).unwrap();
    let log = d.join("bridge.log");
    let _bridge = bridge(&path, &log);
    assert!(wait_until(Duration::from_secs(30), || {
        wattbus_e2e::port_open(port)
    }));
    let get = |plug: &str| -> serde_json::Value {
        let (_, body) = wattbus_e2e::servers::http_with(
            "GET",
            port,
            &format!("/api/v1/plugs/{plug}"),
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
            b"",
        );
        serde_json::from_str(&body).unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(30), || get("heater")["power_w"]
            .as_f64()
            == Some(200.0)),
        "{}; see {}",
        get("heater"),
        log.display()
    );
    // The plug takes a new nonce: the bridge answers the new challenge and goes on.
    let requests = locked.requests();
    locked.new_nonce();
    assert!(wait_until(Duration::from_secs(20), || locked.requests() > requests + 5));
    assert_eq!(get("heater")["online"], true);
    let (status, body) = wattbus_e2e::servers::http_with(
        "POST",
        port,
        "/api/v1/plugs/heater/relay",
        &[("Authorization", &format!("Bearer {API_TOKEN}"))],
        br#"{"action":"off"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(!locked.relay_on());
    // The wrong password: offline, the log says what to fix, and the password is not in it.
    assert!(wait_until(
        Duration::from_secs(20),
        || get("wrong")["online"] == false
    ));
    assert!(!wrong.relay_on() || wrong.switches() == 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("refused: the password (password_file) is not the plug's"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret") && !text.contains("not-it"),
        "{text}"
    );
}

/// A plug's counter reset on purpose: refused while plug-bridge runs (it would overwrite it),
/// done with `wattbus energy reset-plug` once stopped, shown by `wattbus energy plugs`, and
/// visible afterwards: the counter starts from zero and every reading carries
/// `energy_resets`.
#[test]
fn a_plug_counter_reset_is_explicit_and_visible() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 360 W: a watt-hour in 10 s.
    let lamp = SimPlug::new(Vendor::Mystrom, 360.0, None);
    let fridge = SimPlug::new(Vendor::Shelly, 100.0, None);
    let gone = SimPlug::new(Vendor::Shelly, 10.0, None);
    let plugs = serve(&[lamp, fridge, gone]);
    let mut a = api(d, &plugs.ports, 1500);
    let config = d.join("service.toml");
    let energy = |plug: &str| {
        a.call("GET", &format!("/api/v1/plugs/{plug}"), Some(API_TOKEN), "")
            .1["energy_wh"]
            .as_f64()
    };
    assert!(wait_until(Duration::from_secs(30), || energy("lamp")
        .is_some_and(|e| e > 2.0)));
    let wattbus = |args: &[&str]| {
        Command::new(wattbus_bin())
            .args(["energy"])
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    // While it runs: refused, nothing changed.
    let o = wattbus(&["reset-plug", "lamp", "--yes"]);
    assert!(
        !o.status.success(),
        "a reset under a running plug-bridge was taken"
    );
    let stopped = a.bridge.terminate(Duration::from_secs(15));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let o = wattbus(&["plugs"]);
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && shown.contains("lamp:") && shown.contains("0 resets"),
        "{shown}"
    );
    // An unknown plug: the error names the known ones.
    let o = wattbus(&["reset-plug", "lamp-2", "--yes"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("lamp"), "{o:?}");
    let o = wattbus(&["reset-plug", "lamp", "--yes"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("energy_resets = 1"));
    // Started again: the lamp counts from zero, the fridge from where it was.
    let shown = wattbus(&["plugs"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("1 resets"));
    let readings = d.join("lamp-readings.log");
    let mut sub = Proc::spawn(
        "mosquitto_sub",
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &a.broker.port.to_string()])
            .args(["-u", &a.broker.user, "-P", &a.broker.password, "-q", "1"])
            .args(["-t", "wattbus/v1/lab/meas/lamp/relay"])
            .args(["-t", "wattbus/v1/lab/cmd-result/probe"]),
        &readings,
    );
    // Subscribed once what is published there comes back.
    assert!(wait_until(Duration::from_secs(20), || {
        publish(
            &a.broker,
            "wattbus/v1/lab/cmd-result/probe",
            r#"{"id":"ready"}"#,
            false,
        );
        std::fs::read_to_string(&readings)
            .unwrap_or_default()
            .contains("ready")
    }));
    a.bridge = bridge(&config, &d.join("bridge-2.log"));
    assert!(wait_until(Duration::from_secs(30), || {
        wattbus_e2e::port_open(a.port)
    }));
    assert!(
        wait_until(Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&readings).unwrap_or_default();
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|v| {
                    v["fields"]["energy_resets"] == 1.0
                        && v["fields"]["energy_wh"].as_f64().is_some_and(|e| e < 2.0)
                })
        }),
        "no reading after the reset with energy_resets = 1 and the counter from zero"
    );
    sub.terminate(Duration::from_secs(5));
}

/// Tasmota plugs on the user's own broker (a mosquitto, as Home Assistant users run), not
/// wattbus's: plug-bridge reaches them over a connection of its own and reads and switches
/// them as on its own broker; its readings still go to wattbus's bus.
#[test]
fn a_tasmota_plug_on_another_broker_is_read_and_switched() {
    let spec = std::env::var("MOSQUITTO_TEST_BROKER").expect(
        "MOSQUITTO_TEST_BROKER is not set: run the suite with tests/run.sh, which starts mosquitto",
    );
    let p: Vec<&str> = spec.split(':').collect();
    assert_eq!(
        p.len(),
        4,
        "MOSQUITTO_TEST_BROKER={spec:?} is not host:port:user:password"
    );
    let (host, port, user, password) = (p[0], p[1].parse::<u16>().unwrap(), p[2], p[3]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // That mosquitto is shared by the suite: a topic of this run's own.
    let topic = format!("tasmota_{}", std::process::id());
    let plug = Tasmota::play_on((host, port), (user, password), &topic, d);
    let broker = BrokerSetup::new(d);
    let _broker = broker.start(&d.join("broker.log"));
    let path = broker.service_config(d, ["level = \"info,rumqttd=warn\"", "", ""]);
    std::fs::write(d.join("api_token"), API_TOKEN).unwrap();
    std::fs::write(d.join("mosquitto_password"), password).unwrap();
    let api = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[plug_bridge]\ninstance = \"pb-{pid}\"\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 500\ntimeout_ms = 1000\n\
         [plug_bridge.tasmota_broker]\nhost = \"{host}\"\nport = {port}\nusername = \"{user}\"\npassword_file = \"{}\"\n\
         [plug_bridge.api]\nlisten = \"127.0.0.1:{api}\"\ntoken_file = \"{}\"\n\
         [[plug_bridge.plugs]]\nid = \"dryer\"\nkind = \"tasmota\"\ntopic = \"{topic}\"\n",
        free_port(),
        d.join("mosquitto_password").display(),
        d.join("api_token").display(),
        pid = std::process::id(),
    ));
    std::fs::write(&path, text).unwrap();
    let log = d.join("bridge.log");
    let _bridge = bridge(&path, &log);
    assert!(wait_until(Duration::from_secs(30), || {
        wattbus_e2e::port_open(api)
    }));
    let get = || -> serde_json::Value {
        let (_, body) = wattbus_e2e::servers::http_with(
            "GET",
            api,
            "/api/v1/plugs/dryer",
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
            b"",
        );
        serde_json::from_str(&body).unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(30), || get()["power_w"].as_f64()
            == Some(57.0)),
        "{}; see {}",
        get(),
        log.display()
    );
    let (status, body) = wattbus_e2e::servers::http_with(
        "POST",
        api,
        "/api/v1/plugs/dryer/relay",
        &[("Authorization", &format!("Bearer {API_TOKEN}"))],
        br#"{"action":"off"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(!plug.with(|s| s.on));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(password),
        "the broker password is in the log"
    );
}
