//! Interop: modbus-ingest against pymodbus (PyPI), a Modbus implementation nobody on wattbus
//! wrote, as the server for Modbus TCP and for RTU on a socat PTY pair. The server is
//! tests/modbus/we515_server.py: two WE-515 (slaves 1 and 2) whose registers pymodbus itself
//! encodes from the values in the script's header (export −1234 W, leading PF −0.870,
//! 231.45 V, …), so a framing, CRC or signedness mistake on our side shows as a wrong number.
//! With `--trace` the script prints one line per request it answers, so the two requests per
//! WE-515 poll are counted on pymodbus's side too.
//!
//! Needs python3 with pymodbus 3.16.1 and pyserial (tests/run.sh installs them); a missing
//! one fails the test with that advice rather than skipping it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::{broker, count, rtu_pty, start, watch};
use proto::{Measurement, Quality, Segment};
use wattbus_testkit::{seg, site};

/// The version the script was written for (its header).
const PYMODBUS: &str = "3.16.1";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/modbus/we515_server.py")
}

/// Fails (never skips) when python3, pymodbus or pyserial is missing.
fn require_pymodbus() {
    let advice = format!(
        "run the suite with tests/run.sh, which installs them \
         (or: pip install pymodbus=={PYMODBUS} pyserial==3.5)"
    );
    let out = Command::new("python3")
        .args(["-c", "import pymodbus, serial; print(pymodbus.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {advice}"));
    assert!(
        out.status.success(),
        "python3 cannot import pymodbus and pyserial ({}): {advice}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        version, PYMODBUS,
        "tests/modbus/we515_server.py is written for pymodbus {PYMODBUS}: {advice}"
    );
}

/// The pymodbus server as a child process; killed on drop. `requests` collects its trace
/// lines (`REQ slave=1 fc=3 addr=0x0130 count=44`).
struct Pymodbus {
    child: Child,
    /// The ready line's second word onwards: `tcp 127.0.0.1:PORT …` or `rtu PATH …`.
    ready: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Pymodbus {
    fn start(args: &[&str]) -> Pymodbus {
        require_pymodbus();
        let mut child = Command::new("python3")
            .arg(script())
            .args(args)
            .args(["--slaves", "1,2", "--trace"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(rest) = line.strip_prefix("READY ") {
                    let _ = ready_tx.send(rest.to_string());
                } else if line.starts_with("REQ ") {
                    seen.lock().unwrap().push(line);
                }
            }
        });
        let mut server = Pymodbus {
            child,
            ready: String::new(),
            requests,
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(ready) => server.ready = ready,
            Err(_) => panic!(
                "we515_server.py {args:?} printed no READY line within 30 s (its stderr is above)"
            ),
        }
        server
    }

    /// The TCP port from `READY tcp 127.0.0.1:PORT slaves=1,2`.
    fn tcp_port(&self) -> u16 {
        let addr = self.ready.split_whitespace().nth(1).unwrap();
        addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Trace lines of requests to `slave`, as `(addr, count)` of FC03 reads; any other
    /// request fails the test.
    fn reads(&self, slave: u8) -> Vec<(String, u16)> {
        let prefix = format!("REQ slave={slave} ");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| {
                let words: Vec<&str> = rest.split_whitespace().collect();
                assert_eq!(words[0], "fc=3", "only FC03 reads: {rest}");
                let addr = words[1].strip_prefix("addr=").unwrap().to_string();
                let count = words[2].strip_prefix("count=").unwrap().parse().unwrap();
                (addr, count)
            })
            .collect()
    }
}

impl Drop for Pymodbus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The values in the script's header, as the WE-515 profile publishes them.
fn assert_documented_values(got: &[Measurement], device: &str) {
    let one = |measurement: &str, channel: &str, tariff: Option<&str>| {
        got.iter()
            .find(|m| {
                m.device.as_str() == device
                    && m.measurement.as_str() == measurement
                    && m.channel.as_str() == channel
                    && m.tags.get(&seg("tariff")).map(Segment::as_str) == tariff
            })
            .unwrap_or_else(|| panic!("no {measurement}/{channel} {tariff:?} of {device}"))
    };
    let want: [(&str, &str, Option<&str>, &str, f64); 16] = [
        ("power", "l1", None, "power_w", -1234.0),
        ("power", "l1", None, "power_factor", -0.870),
        ("power", "l1", None, "voltage_v", 231.45),
        ("power", "l1", None, "current_a", 5.678),
        ("power", "l1", None, "reactive_power_var", -321.0),
        ("power", "l1", None, "apparent_power_va", 1418.0),
        ("power", "total", None, "frequency_hz", 50.01),
        ("power", "total", None, "power_w", -1234.0),
        ("power", "total", None, "reactive_power_var", -321.0),
        ("power", "total", None, "power_factor", -0.870),
        ("energy", "total", None, "energy_wh", 1_234_560.0),
        ("energy", "total", None, "reactive_energy_varh", 65_430.0),
        ("energy", "total", Some("t1"), "energy_wh", 1_000_000.0),
        ("energy", "total", Some("t2"), "energy_wh", 234_560.0),
        (
            "energy",
            "total",
            Some("t1"),
            "reactive_energy_varh",
            60_000.0,
        ),
        (
            "energy",
            "total",
            Some("t2"),
            "reactive_energy_varh",
            5_430.0,
        ),
    ];
    for (measurement, channel, tariff, field, value) in want {
        let m = one(measurement, channel, tariff);
        let got = m.fields.get(field).copied();
        assert!(
            got.is_some_and(|g| (g - value).abs() < 1e-9 * value.abs().max(1.0)),
            "{device} {measurement}/{channel} {tariff:?} {field}: published {got:?}, \
             pymodbus serves {value}"
        );
        assert_eq!(m.quality, Quality::Good, "{m:?}");
    }
}

/// Two WE-515 on pymodbus polled whole every second: the documented values, and each poll
/// two FC03 reads (0x0130 × 44, 0xA000 × 40) on pymodbus's side.
async fn against_pymodbus(name: &str, server: &Pymodbus, link: &str) {
    let site = site(name);
    let broker = broker().await;
    let mut watch = watch(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[modbus_ingest]
[[modbus_ingest.buses]]
name = "{name}"
{link}
timeout_ms = 1000
[[modbus_ingest.buses.devices]]
name = "house"
slave = 1
profile = "orno-we-515"
poll = {{ fast = 1000, slow = 1000 }}
[[modbus_ingest.buses.devices]]
name = "garage"
slave = 2
profile = "orno-we-515"
poll = {{ fast = 1000, slow = 1000 }}
"#
        ),
    )
    .await;
    let mut got = watch
        .until(Duration::from_secs(20), |g| {
            ["house", "garage"]
                .iter()
                .all(|d| count(g, d, "energy", "total") >= 3)
        })
        .await;
    svc.stop().await;
    got.extend(watch.during(Duration::from_millis(500)).await);

    for (slave, device) in [(1u8, "house"), (2, "garage")] {
        assert_documented_values(&got, device);
        let power = count(&got, device, "power", "l1");
        let energy = count(&got, device, "energy", "total");
        let reads = server.reads(slave);
        let first = reads
            .iter()
            .filter(|r| **r == ("0x0130".into(), 44))
            .count();
        let second = reads
            .iter()
            .filter(|r| **r == ("0xa000".into(), 40))
            .count();
        assert_eq!(
            (first, second, reads.len()),
            (power, energy, power + energy),
            "slave {slave}: one 0x0130×44 and one 0xA000×40 read per poll: {reads:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_over_tcp_serves_values_modbus_ingest_publishes_exactly() {
    let server = Pymodbus::start(&["--tcp", "0"]);
    let port = server.tcp_port();
    against_pymodbus(
        "pymodbus-tcp",
        &server,
        &format!("transport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_over_rtu_serves_values_modbus_ingest_publishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let socat = rtu_pty(dir.path());
    let sim = socat.sim_str();
    let server = Pymodbus::start(&["--rtu", &sim]);
    against_pymodbus(
        "pymodbus-rtu",
        &server,
        &format!("transport = \"rtu\"\npath = \"{}\"", socat.dev().display()),
    )
    .await;
}
