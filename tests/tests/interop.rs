// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Interop with MQTT software nobody here wrote: mosquitto's clients against our broker, and
//! our runtime against a mosquitto broker (started by tests/run.sh, see MOSQUITTO_TEST_BROKER).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use proto::{Measurement, Payload, ServiceState, Status};
use wattbus_e2e::{BrokerSetup, Proc, wait_subscribed, wait_until, wattbus_bin};

fn mosquitto(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}); tests/run.sh installs mosquitto-clients")
        })
}

#[test]
fn mosquitto_clients_publish_and_subscribe_through_our_broker_with_auth() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerSetup::new(dir.path());
    let _broker = b.start(&dir.path().join("broker.log"));
    let port = b.port.to_string();
    let creds = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-u",
        &b.user,
        "-P",
        &b.password,
    ];
    let payload = r#"{"hello":"from mosquitto_pub"}"#;
    // Retained, so the subscriber gets it whenever it attaches.
    let publ = mosquitto(
        "mosquitto_pub",
        &[
            &creds[..],
            &[
                "-t",
                "wattbus/v1/lab/meas/x/y",
                "-m",
                payload,
                "-q",
                "1",
                "-r",
            ],
        ]
        .concat(),
    );
    assert!(
        publ.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&publ.stderr)
    );
    let sub = mosquitto(
        "mosquitto_sub",
        &[
            &creds[..],
            &["-t", "wattbus/v1/#", "-C", "1", "-W", "10", "-v", "-q", "1"],
        ]
        .concat(),
    );
    assert!(
        sub.status.success(),
        "mosquitto_sub failed: {}",
        String::from_utf8_lossy(&sub.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&sub.stdout).trim(),
        format!("wattbus/v1/lab/meas/x/y {payload}")
    );

    // MQTT 5 on the v5 listener reaches a 3.1.1 subscriber.
    let port5 = b.port_v5.to_string();
    let publ5 = mosquitto(
        "mosquitto_pub",
        &[
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            &port5,
            "-u",
            &b.user,
            "-P",
            &b.password,
            "-t",
            "wattbus/v1/lab/meas/v5/y",
            "-m",
            "five",
            "-q",
            "1",
            "-r",
        ],
    );
    assert!(
        publ5.status.success(),
        "v5 publish failed: {}",
        String::from_utf8_lossy(&publ5.stderr)
    );
    let sub5 = mosquitto(
        "mosquitto_sub",
        &[
            &creds[..],
            &["-t", "wattbus/v1/lab/meas/v5/+", "-C", "1", "-W", "10"],
        ]
        .concat(),
    );
    assert_eq!(String::from_utf8_lossy(&sub5.stdout).trim(), "five");
}

#[test]
fn wrong_or_missing_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerSetup::new(dir.path());
    let _broker = b.start(&dir.path().join("broker.log"));
    let port = b.port.to_string();
    let wrong = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            &b.user,
            "-P",
            "guess",
            "-t",
            "wattbus/v1/x/meas/a/b",
            "-m",
            "x",
        ],
    );
    assert!(!wrong.status.success(), "a wrong password was accepted");
    let none = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "wattbus/v1/x/meas/a/b",
            "-m",
            "x",
        ],
    );
    assert!(!none.status.success(), "an anonymous client was accepted");
    let unknown = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "mallory",
            "-P",
            &b.password,
            "-t",
            "t",
            "-m",
            "x",
        ],
    );
    assert!(!unknown.status.success(), "an unknown user was accepted");
}

#[test]
fn a_service_publishes_readings_mosquitto_sub_can_decode_and_says_offline_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let config = b.service_config(d, ["", "", "interval_ms = 100"]);
    let mut sim = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin())
            .args(["run", "simulator", "--config"])
            .arg(&config),
        &d.join("sim.log"),
    );
    let port = b.port.to_string();
    let creds = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-u",
        &b.user,
        "-P",
        &b.password,
    ];
    let sub = mosquitto(
        "mosquitto_sub",
        &[
            &creds[..],
            &["-t", "wattbus/v1/lab/meas/+/+", "-C", "3", "-W", "15"],
        ]
        .concat(),
    );
    let text = String::from_utf8_lossy(&sub.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "expected 3 readings; sim log:\n{}",
        std::fs::read_to_string(d.join("sim.log")).unwrap_or_default()
    );
    for line in lines {
        let m = Measurement::decode(line.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(m.device.as_str(), "sim-meter-1");
        assert!((100.0..2500.0).contains(&m.fields["power_w"]), "{line}");
        assert!(
            (proto::now_ms() - m.ts_ms).abs() < 60_000,
            "timestamp is not the read time: {line}"
        );
        assert_eq!(m.origin.as_ref().map(|o| o.stream.as_str()), Some("meas"));
    }
    let status = sim.terminate(Duration::from_secs(10));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "simulator did not exit 0 on SIGTERM"
    );
    let st = mosquitto(
        "mosquitto_sub",
        &[
            &creds[..],
            &[
                "-t",
                "wattbus/v1/lab/status/simulator",
                "-C",
                "1",
                "-W",
                "10",
            ],
        ]
        .concat(),
    );
    let status = Status::decode(String::from_utf8_lossy(&st.stdout).trim().as_bytes()).unwrap();
    assert_eq!(status.state, ServiceState::Offline);
}

#[test]
fn our_runtime_delivers_everything_through_a_mosquitto_broker() {
    let spec = std::env::var("MOSQUITTO_TEST_BROKER").expect(
        "MOSQUITTO_TEST_BROKER is not set: run the suite with tests/run.sh, which starts mosquitto",
    );
    let parts: Vec<&str> = spec.split(':').collect();
    let (port, user, pass) = (parts[1], parts[2], parts[3]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let probe = env!("CARGO_BIN_EXE_probe");
    let base = |extra: &str| {
        let mut c = Command::new(probe);
        c.args([
            "--port",
            port,
            "--user",
            user,
            "--password",
            pass,
            "--data-dir",
        ])
        .arg(d.join(extra));
        c
    };
    let store = d.join("store.txt");
    let tag = std::process::id().to_string();
    let mut cons = Proc::spawn(
        "consumer",
        base("c")
            .args([
                "consume",
                "--instance",
                &format!("c-{tag}"),
                "--sink",
                &format!("s-{tag}"),
                "--store",
            ])
            .arg(&store),
        &d.join("consumer.log"),
    );
    assert!(
        wait_subscribed(&d.join("consumer.log")),
        "consumer did not subscribe"
    );
    let mut prod = Proc::spawn(
        "producer",
        base("p").args([
            "produce",
            "--count",
            "500",
            "--instance",
            &format!("p-{tag}"),
            "--wait-for",
            &format!("s-{tag}"),
            "--timeout-s",
            "60",
        ]),
        &d.join("producer.log"),
    );
    let done = prod.wait(Duration::from_secs(90));
    assert!(
        done.is_some_and(|s| s.success()),
        "producer failed: {}",
        std::fs::read_to_string(d.join("producer.log")).unwrap_or_default()
    );
    assert!(wait_until(
        Duration::from_secs(5),
        || std::fs::read_to_string(&store)
            .map(|t| t.lines().count())
            .unwrap_or(0)
            == 500
    ));
    cons.terminate(Duration::from_secs(10));
    let text = std::fs::read_to_string(&store).unwrap();
    let mut ts: Vec<i64> = text
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    ts.sort_unstable();
    ts.dedup();
    assert_eq!(ts.len(), 500);
}

#[test]
fn wattbus_tail_prints_readable_lines_for_what_flows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let config = b.service_config(d, ["format = \"json\"", "", "interval_ms = 100"]);
    let _sim = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin())
            .args(["run", "simulator", "--config"])
            .arg(&config),
        &d.join("sim.log"),
    );
    let out = wattbus_e2e::run_ok(
        Command::new(wattbus_bin())
            .args(["tail", "wattbus/v1/lab/meas/#", "-n", "3", "--config"])
            .arg(&config),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in lines {
        assert!(
            l.starts_with("meas   lab/sim-meter-1/main  power ") && l.contains(" power_w="),
            "{l}"
        );
        assert!(l.contains("[good]") && l.contains("(simulator#"), "{l}");
    }
    // `[log] format = "json"`: every log line the simulator wrote is one JSON object.
    let log = std::fs::read_to_string(d.join("sim.log")).unwrap();
    let first = log
        .lines()
        .next()
        .unwrap_or_else(|| panic!("the simulator logged nothing"));
    let v: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert!(
        v.get("level").is_some() && v.get("message").is_some(),
        "{first}"
    );
}

#[test]
fn a_crashed_service_is_marked_offline_by_its_last_will() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let config = b.service_config(d, ["", "keep_alive_s = 5", ""]);
    let port = b.port.to_string();
    let creds = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-u",
        &b.user,
        "-P",
        &b.password,
    ];
    let status_now = || {
        let o = mosquitto(
            "mosquitto_sub",
            &[
                &creds[..],
                &[
                    "-t",
                    "wattbus/v1/lab/status/simulator",
                    "-C",
                    "1",
                    "-W",
                    "3",
                ],
            ]
            .concat(),
        );
        Status::decode(String::from_utf8_lossy(&o.stdout).trim().as_bytes()).ok()
    };
    let mut sim = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin())
            .args(["run", "simulator", "--config"])
            .arg(&config),
        &d.join("sim.log"),
    );
    assert!(
        wait_until(Duration::from_secs(15), || status_now()
            .is_some_and(|s| s.state == ServiceState::Online)),
        "never online"
    );
    sim.kill9();
    // No clean disconnect: the broker notices the dropped connection and publishes the will.
    assert!(
        wait_until(Duration::from_secs(20), || status_now()
            .is_some_and(|s| s.state == ServiceState::Offline)),
        "the last will did not mark the simulator offline (it reads {:?}); the broker's log:\n{}\nthe simulator's:\n{}",
        status_now(),
        std::fs::read_to_string(d.join("broker.log")).unwrap_or_default(),
        std::fs::read_to_string(d.join("sim.log")).unwrap_or_default()
    );
}
