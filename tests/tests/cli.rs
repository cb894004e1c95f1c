// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The `wattbus` binary as a person meets it: config errors, exit codes, the demo, health.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use wattbus_e2e::{Proc, free_port, port_open, wait_until, wattbus_bin};

fn wattbus(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(wattbus_bin());
    c.args(args).env_remove("WATTBUS_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run wattbus")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn config_check_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "ok.toml",
        "site = \"home\"\n[bus]\nport = 1883\n[simulator]\ndevices = 2\n",
    );
    let o = wattbus(&["config", "check", &f], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("OK"));
}

#[test]
fn bad_values_exit_64_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "type.toml",
            "[bus]\nport = \"eighteen\"\n",
            "key `bus.port`",
        ),
        (
            "unknown-key.toml",
            "[simulator]\ndevics = 2\n",
            "key `simulator.devics`: unknown field",
        ),
        (
            "unknown-section.toml",
            "[brokr]\nlisten = \"0.0.0.0:1\"\n",
            "key `brokr`: unknown key",
        ),
        (
            "range.toml",
            "[simulator]\ndevices = 0\n",
            "key `simulator.devices`: must be between 1 and 1000",
        ),
        (
            // tokio panics on a channel this large: `run` aborted where `check` said OK.
            "capacity.toml",
            "[bus]\nroute_capacity = 2305843009213693952\n",
            "key `bus.route_capacity`: must be between 1 and 1000000",
        ),
        (
            "reconnect.toml",
            "[bus]\nreconnect_max_ms = 9223372036854775807\n",
            "key `bus.reconnect_max_ms`: must be at most 3600000",
        ),
        ("syntax.toml", "[bus\nport = 1\n", "line 1"),
        ("site.toml", "site = \"my home\"\n", "key `site`"),
    ];
    for (name, text, expected) in cases {
        let f = write(dir.path(), name, text);
        let o = wattbus(&["config", "check", &f], &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(64), "{name}: {err}");
        assert!(err.contains(&f), "{name}: the file is not named: {err}");
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{name}: one line, please: {err}");
    }
}

#[test]
fn bad_environment_overrides_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "ok.toml", "site = \"home\"\n");
    let o = wattbus(&["config", "check", &f], &[("WATTBUS_BUS__PORT", "lots")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("WATTBUS_BUS__PORT"), "{}", stderr(&o));
    let o = wattbus(&["config", "check", &f], &[("WATTBUS_BUS__PROT", "1")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("bus.prot"), "{}", stderr(&o));
    let o = wattbus(
        &["config", "check", &f],
        &[("WATTBUS_SIMULATOR__DEVICES", "3")],
    );
    assert!(
        o.status.success(),
        "a valid override was refused: {}",
        stderr(&o)
    );
}

#[test]
fn missing_file_unknown_service_and_no_broker_users_exit_64() {
    let o = wattbus(&["config", "check", "/nonexistent/wattbus.toml"], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("/nonexistent/wattbus.toml"));
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "empty.toml", "");
    let o = wattbus(&["run", "toaster", "--config", &f], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("unknown service \"toaster\""),
        "{}",
        stderr(&o)
    );
    // Authentication is on by default: a broker with no users is a config error, not an open door.
    let o = wattbus(&["run", "broker", "--config", &f], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("broker.users"), "{}", stderr(&o));
}

#[test]
fn secrets_never_appear_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "s.toml",
        "[bus]\nusername = \"u\"\npassword = \"hunter2-secret\"\nport = \"x\"\n",
    );
    let o = wattbus(&["config", "check", &f], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(!stderr(&o).contains("hunter2"), "{}", stderr(&o));
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn broker_serves_health_and_metrics_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (port, health) = (free_port(), free_port());
    let f = write(
        dir.path(),
        "b.toml",
        &format!(
            "[broker]\nlisten = \"127.0.0.1:{port}\"\nlisten_v5 = \"127.0.0.1:{}\"\nhealth_listen = \"127.0.0.1:{health}\"\n[[broker.users]]\nusername = \"a\"\npassword = \"b\"\nrole = \"admin\"\n",
            free_port()
        ),
    );
    let mut broker = Proc::spawn(
        "broker",
        Command::new(wattbus_bin()).args(["run", "broker", "--config", &f]),
        &dir.path().join("b.log"),
    );
    assert!(wait_until(Duration::from_secs(10), || port_open(health)
        && http_get(health, "/healthz").starts_with("HTTP/1.1 200")));
    assert!(port_open(port));
    let metrics = http_get(health, "/metrics");
    assert!(
        metrics.contains("wattbus_up{service=\"broker\"} 1"),
        "{metrics}"
    );
    let status = broker.terminate(Duration::from_secs(10));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
    // Its log went to a file: plain text, no colour codes for a terminal nobody has.
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(log.contains("Broker is accepting connections."), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log file: {log:?}");
}

/// Two copies of a producer on one data directory would write one journal and fight over one
/// client id (`docker compose up --scale simulator=2`, or a copy started by hand beside the
/// unit): the second refuses to start, naming the lock, and the first runs on.
#[test]
fn a_second_copy_of_a_producer_on_one_data_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "sim.toml",
        &format!(
            "data_dir = \"{}\"\n[bus]\nport = {}\nusername = \"s\"\npassword = \"p\"\n\
             reconnect_max_ms = 500\n[simulator]\nhealth_listen = \"127.0.0.1:{}\"\n",
            dir.path().join("data").display(),
            free_port(),
            free_port()
        ),
    );
    let log = dir.path().join("first.log");
    let mut first = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin()).args(["run", "simulator", "--config", &f]),
        &log,
    );
    // It holds its lock once it tries the bus (nothing listens there).
    assert!(wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Broker connection lost or refused"))
    }));
    // Its own health port (a container has its own network): only the state is shared.
    let health = format!("127.0.0.1:{}", free_port());
    let second_log = dir.path().join("second.log");
    let mut second = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin())
            .args(["run", "simulator", "--config", &f])
            .env("WATTBUS_SIMULATOR__HEALTH_LISTEN", &health),
        &second_log,
    );
    // A second copy that ran would run forever: it is stopped, and the test fails.
    let status = second.wait(Duration::from_secs(60));
    let err = std::fs::read_to_string(&second_log).unwrap_or_default();
    assert_eq!(status.map(|s| s.code()), Some(Some(1)), "{err}");
    assert!(
        err.contains("another process runs simulator instance `simulator`")
            && err.contains("locks/simulator.lock")
            && err.contains("must not be scaled"),
        "{err}"
    );
    assert!(first.is_running(), "the first copy stopped");
    assert_eq!(
        first.terminate(Duration::from_secs(15)).map(|s| s.code()),
        Some(Some(0))
    );
}

#[test]
fn config_check_refuses_the_log_level_that_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "log.toml",
        "[log]\nlevel = \"info,rumqttd=loud\"\n[simulator]\n",
    );
    for args in [
        &["config", "check", &f][..],
        &["run", "simulator", "--config", &f][..],
    ] {
        let o = wattbus(args, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains("key `log.level`") && err.contains("log.toml"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn run_help_lists_every_service() {
    let o = wattbus(&["run", "--help"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    for service in [
        "broker",
        "simulator",
        "influx-writer",
        "serial-ingest",
        "rms-processor",
        "modbus-ingest",
    ] {
        assert!(help.contains(service), "{service} missing: {help}");
    }
}

#[test]
fn demo_runs_with_no_hardware_and_shows_acknowledged_readings() {
    let dir = tempfile::tempdir().unwrap();
    let readings = dir.path().join("readings");
    let o = wattbus(
        &[
            "demo",
            "--duration-s",
            "4",
            "--meters",
            "2",
            "--readings-dir",
            readings.to_str().unwrap(),
        ],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "demo failed: {}\n{out}", stderr(&o));
    // With no InfluxDB, the influx-writer stored every reading in a CSV file.
    let files: Vec<_> = std::fs::read_dir(&readings).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let csv = std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap();
    assert!(csv.starts_with("time,site,device,channel,measurement,field,value,quality,tags\n"));
    for meter in ["sim-meter-1", "sim-meter-2"] {
        let rows = csv
            .lines()
            .filter(|l| l.contains(&format!(",demo,{meter},main,power,power_w,")))
            .count();
        assert!(rows >= 2, "{meter}: {rows} power rows\n{csv}");
    }
    assert!(
        out.contains("sim-meter-1/main") && out.contains("sim-meter-2/main"),
        "{out}"
    );
    assert!(out.contains("power_w="), "{out}");
    let stored: u64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Demo stopped: ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no summary line: {out}"));
    assert!(
        stored >= 4,
        "only {stored} readings in 4 s from 2 meters: {out}"
    );
}

/// The value of `field` on the console lines of `device/channel`.
fn console_values(out: &str, series: &str, field: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| {
            // `series` alone, or followed by its tags (`{power_basis=measured}`) unless the
            // series names tags itself.
            (l.contains(&format!("  {series}  "))
                || (!series.contains('{') && l.contains(&format!("  {series} {{"))))
                && !l.contains("replayed")
        })
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

#[test]
fn demo_shows_ct_channels_two_we515_meters_a_powmon_and_a_temperature_sensor_from_simulated_devices()
 {
    let dir = tempfile::tempdir().unwrap();
    let o = wattbus(
        &[
            "demo",
            "--duration-s",
            "6",
            "--meters",
            "1",
            "--readings-dir",
            dir.path().join("readings").to_str().unwrap(),
        ],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "demo failed: {}\n{out}", stderr(&o));
    // The demo's CT clamps carry 100, 16 and 40 ADC counts RMS of fundamental (+3rd/5th
    // harmonics on the third), at 0.05 A per count: the RMS current the processor must find.
    let expected = [
        ("ct-1/ct1", 5.0),
        ("ct-2/ct1", 0.8),
        ("ct-3/ct1", 2.0 * (1.0f64 + 0.09 + 0.0225).sqrt()),
    ];
    for (series, amps) in expected {
        let mut currents = console_values(&out, series, "current_a");
        assert!(currents.len() >= 3, "{series}: {currents:?}\n{out}");
        // The steady value to 0.5% (the accuracy the kernel and service tests prove exactly);
        // each single reading looser: on a loaded machine a line the simulated device could
        // not write in time makes a short window, a few cycles of quantised samples.
        currents.sort_by(f64::total_cmp);
        let median = currents[currents.len() / 2];
        assert!(
            (median - amps).abs() / amps < 0.005,
            "{series}: median {median} A of {currents:?}, expected {amps}"
        );
        for a in &currents {
            assert!(
                (a - amps).abs() / amps < 0.03,
                "{series}: {a} A, expected {amps}"
            );
        }
    }
    // The first also measures the voltage (230 V), its current lagging by 30°: real power
    // 5 × 230 × cos 30° and PF 0.866, energy in Wh.
    for (field, want) in [
        ("voltage_v", 230.0),
        ("power_w", 5.0 * 230.0 * 0.866_025),
        ("power_factor", 0.866_025),
    ] {
        let mut got = console_values(&out, "ct-1/ct1", field);
        assert!(!got.is_empty(), "ct-1 {field}: {out}");
        got.sort_by(f64::total_cmp);
        let median = got[got.len() / 2];
        assert!(
            (median - want).abs() / want < 0.01,
            "ct-1 {field}: median {median} of {got:?}, expected {want}"
        );
        for v in &got {
            assert!(
                (v - want).abs() / want < 0.03,
                "ct-1 {field} = {v}, expected {want}"
            );
        }
    }
    for (series, field) in [
        ("ct-1/ct1", "energy_import_wh"),
        ("ct-2/ct1", "apparent_energy_vah"),
        ("ct-3/ct1", "apparent_energy_vah"),
    ] {
        let energy = console_values(&out, series, field);
        assert!(
            energy.windows(2).all(|w| w[1] >= w[0]) && energy.last().is_some_and(|e| *e > 0.0),
            "{series} {field} must grow: {energy:?}"
        );
    }
    assert!(
        out.contains("ct-2/ct1 {power_basis=nominal_voltage}")
            && out.contains("ct-1/ct1 {power_basis=measured}"),
        "labelled as nominal or measured: {out}"
    );
    // Two ORNO WE-515 on a simulated RS485 line, polled by modbus-ingest every second:
    // signed power, voltage, current, frequency, PF, and energy per tariff.
    for meter in ["house", "heat-pump"] {
        let volts = console_values(&out, &format!("{meter}/l1"), "voltage_v");
        assert!(
            volts.len() >= 3,
            "{meter}: one reading a second: {volts:?}\n{out}"
        );
        assert!(
            volts.iter().all(|v| (200.0..260.0).contains(v)),
            "{meter}: {volts:?}"
        );
        for field in ["current_a", "power_w", "power_factor"] {
            assert!(
                !console_values(&out, &format!("{meter}/l1"), field).is_empty(),
                "{meter} {field}"
            );
        }
        let hz: Vec<f64> = out
            .lines()
            .filter(|l| l.contains(&format!("  {meter}/total  ")))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("frequency_hz="))
            })
            .filter_map(|v| v.parse().ok())
            .collect();
        assert!(
            !hz.is_empty() && hz.iter().all(|f| (49.0..51.0).contains(f)),
            "{meter}: {hz:?}"
        );
        for tariff in ["t1", "t2"] {
            let e = console_values(
                &out,
                &format!("{meter}/total {{tariff={tariff}}}"),
                "energy_wh",
            );
            assert!(
                !e.is_empty() && e.iter().all(|e| *e > 0.0),
                "{meter} {tariff}: {e:?}\n{out}"
            );
        }
    }
    for series in ["powmon/fridge", "powmon/kettle"] {
        assert!(
            !console_values(&out, series, "adc_counts").is_empty(),
            "{series}: {out}"
        );
    }
    let fridge = console_values(&out, "kitchen/fridge", "temperature_c");
    assert!(
        !fridge.is_empty() && fridge.iter().all(|t| (2.0..7.0).contains(t)),
        "{fridge:?}: {out}"
    );
}

#[test]
fn unknown_environment_variables_with_our_prefix_are_refused_by_name() {
    let o = wattbus(&["config", "check"], &[("WATTBUS_SIMULATR__DEVICES", "2")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("environment variable WATTBUS_SIMULATR"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_reference_config_in_compose_is_valid() {
    // It points at Docker secrets; stand them in with temporary files.
    let dir = tempfile::tempdir().unwrap();
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/wattbus.toml");
    let text = std::fs::read_to_string(&reference).unwrap();
    for secret in text.split("/run/secrets/").skip(1) {
        let name: String = secret
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            .collect();
        std::fs::write(dir.path().join(name), "pw\n").unwrap();
    }
    let text = text.replace("/run/secrets/", &format!("{}/", dir.path().display()));
    let f = write(dir.path(), "wattbus.toml", &text);
    let o = wattbus(&["config", "check", &f], &[]);
    assert!(
        o.status.success(),
        "compose/wattbus.toml is not valid: {}",
        stderr(&o)
    );
    // The demo profile's containers layer demo.toml over it, and its simulator serves the
    // hardware that file names.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/demo.toml");
    let o = wattbus(
        &["config", "check", &f, demo.to_str().unwrap()],
        &[("WATTBUS_SIMULATOR__HARDWARE__LISTEN", "0.0.0.0")],
    );
    assert!(
        o.status.success(),
        "compose/demo.toml over compose/wattbus.toml is not valid: {}",
        stderr(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("demo.toml: OK"), "{out}");
}

#[test]
fn a_second_config_file_is_layered_and_its_errors_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = write(
        dir.path(),
        "base.toml",
        "site = \"home\"\n[serial_ingest]\ninstance = \"serial-ingest\"\n",
    );
    let over = write(
        dir.path(),
        "over.toml",
        "[serial_ingest]\ninstance = \"serial-ingest-demo\"\n[[serial_ingest.ports]]\npath = \"tcp://x\"\ndevice = \"d\"\nprotocol = \"lines\"\n",
    );
    let o = wattbus(&["config", "check", &base, &over], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("serial_ingest.ports[0].path") && err.contains("tcp://host:port"),
        "{err}"
    );
    assert!(
        err.contains("over.toml") && !err.contains("base.toml"),
        "the error is blamed on the file that has the list: {err}"
    );
    // A bad value in a list the second file wrote is that file's, and so is a default that
    // does not fit what the list sets (here a response timeout above the poll interval).
    for (text, key) in [
        (
            "[[serial_ingest.ports]]\npath = \"/dev/ttyUSB0\"\ndevice = \"d\"\nprotocol = \"lines\"\nbaud = 1\n",
            "serial_ingest.ports[0].baud",
        ),
        (
            "[[serial_ingest.ports]]\npath = \"/dev/x\"\ndevice = \"d\"\nprotocol = \"request-response\"\npoll_interval_ms = 100\n",
            "serial_ingest.ports[0].response_timeout_ms",
        ),
    ] {
        let over = write(dir.path(), "over.toml", text);
        for files in [[&base, &over], [&over, &base]] {
            let o = wattbus(&["config", "check", files[0], files[1]], &[]);
            let err = stderr(&o);
            assert!(
                err.contains(key) && err.contains("over.toml") && !err.contains("base.toml"),
                "{files:?}: {err}"
            );
        }
    }
    // A default in a table that does not fit what is set there (here a segment larger than
    // half the journal) is put on every source that sets something in that table, and on
    // no other.
    let a = write(
        dir.path(),
        "a.toml",
        "[serial_ingest.meas_stream]\nmax_bytes = 1048576\n",
    );
    let b = write(
        dir.path(),
        "b.toml",
        "[serial_ingest.meas_stream]\nfsync_interval_ms = 0\n",
    );
    let origin = |files: &[&str], env: &[(&str, &str)]| {
        let o = wattbus(&[&["config", "check"][..], files].concat(), env);
        assert_eq!(o.status.code(), Some(64));
        let err = stderr(&o);
        assert!(
            err.contains("serial_ingest.meas_stream.segment_bytes"),
            "{err}"
        );
        err.split(": key").next().unwrap_or_default().to_string()
    };
    let both = origin(&[&a, &b], &[]);
    assert!(
        both.contains("a.toml + ") && both.ends_with("b.toml"),
        "{both}"
    );
    let one = origin(&[&base, &a], &[]);
    assert!(
        one.ends_with("a.toml") && !one.contains("base.toml"),
        "{one}"
    );
    let var = origin(
        &[&base],
        &[("WATTBUS_SERIAL_INGEST__MEAS_STREAM__MAX_BYTES", "1048576")],
    );
    assert!(
        var.ends_with("environment variable WATTBUS_SERIAL_INGEST__MEAS_STREAM__MAX_BYTES"),
        "{var}"
    );
    let o = wattbus(&["config", "check", &base, "/nonexistent/over.toml"], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("/nonexistent/over.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_broken_influx_writer_section_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key, reason) in [
        (
            "[influx_writer.influx]\nurl = \"http://influxdb:8086\"\norg = \"home\"\n",
            "influx_writer.influx.bucket",
            "is required with api = \"v2\"",
        ),
        (
            "[influx_writer.influx]\nurl = \"http://influxdb:8086\"\napi = \"v1\"\ndatabase = \"w\"\ntoken = \"x\"\n",
            "influx_writer.influx.token",
            "belongs to api = \"v2\"",
        ),
        (
            "[influx_writer.influx]\nurl = \"http://influxdb:8086\"\napi = \"v3\"\n",
            "influx_writer.influx.api",
            "v3",
        ),
        (
            "[influx_writer.files]\nenabled = false\n",
            "influx_writer.files.enabled",
            "readings would go nowhere",
        ),
    ] {
        let f = write(dir.path(), "w.toml", text);
        let o = wattbus(&["config", "check", &f], &[]);
        assert_eq!(o.status.code(), Some(64), "{text}");
        let err = stderr(&o);
        assert!(err.contains(key) && err.contains(reason), "{text}: {err}");
        assert!(err.contains("w.toml"), "names the file: {err}");
    }
}

#[test]
fn numbers_where_text_belongs_say_how_to_quote_them() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "ok.toml", "[bus]\nusername = \"u\"\n");
    let o = wattbus(
        &["config", "check", &f],
        &[("WATTBUS_BUS__PASSWORD", "123456")],
    );
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(
        err.contains("WATTBUS_BUS__PASSWORD") && err.contains("quote it"),
        "{err}"
    );
    assert!(!err.contains("123456"), "the secret was printed: {err}");
    // Quoted, it is text, and fine.
    let o = wattbus(
        &["config", "check", &f],
        &[("WATTBUS_BUS__PASSWORD", "\"123456\"")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = wattbus(&["config", "check", &f], &[("WATTBUS_SITE", "42")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("key `site`"), "{}", stderr(&o));
}

#[test]
fn an_energy_reset_is_explicit_refused_while_the_counters_are_in_use_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = write(
        dir.path(),
        "wattbus.toml",
        &format!("data_dir = \"{}\"\n[rms_processor]\n", data.display()),
    );
    let state = data.join("rms-processor/rms-processor");
    std::fs::create_dir_all(&state).unwrap();
    let file = state.join("energy.json");
    std::fs::write(
        &file,
        r#"{"version":1,"channels":{"prime-1/ct1":{"import_wh":1234.5,"export_wh":6.5,"resets":0,"since_ms":1764000000000}},"marks":{"prime-1":1764000100000000}}"#,
    )
    .unwrap();
    // A file written before the checksum line (version 1) is read, and written back with it.
    let counters = || -> serde_json::Value {
        let text = std::fs::read_to_string(&file).unwrap();
        let json = match text.trim_end().rsplit_once('\n') {
            Some((json, last)) if last.starts_with("crc32 ") => json.to_string(),
            _ => text,
        };
        serde_json::from_str(&json).unwrap()
    };

    let o = wattbus(&["energy", "show", "--config", &cfg], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("prime-1/ct1: import 1234.500 Wh"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Not a terminal and no --yes: nothing is reset.
    let o = wattbus(&["energy", "reset", "prime-1/ct1", "--config", &cfg], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    assert_eq!(counters()["channels"]["prime-1/ct1"]["import_wh"], 1234.5);
    // A typo names what is there.
    let o = wattbus(
        &["energy", "reset", "prime-1/ct9", "--config", &cfg, "--yes"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("known: prime-1/ct1"), "{}", stderr(&o));
    // While a processor holds the counters, a reset would be overwritten: refused.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("energy.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let o = wattbus(
        &["energy", "reset", "prime-1/ct1", "--config", &cfg, "--yes"],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in use by another process"),
        "{}",
        stderr(&o)
    );
    drop(lock);
    let o = wattbus(
        &["energy", "reset", "prime-1/ct1", "--config", &cfg, "--yes"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let c = &counters()["channels"]["prime-1/ct1"];
    assert_eq!(
        (c["import_wh"].as_f64(), c["export_wh"].as_f64()),
        (Some(0.0), Some(0.0))
    );
    assert_eq!(c["resets"], 1, "the reset is counted");
    assert!(
        c["since_ms"].as_i64().unwrap() > 1_764_000_000_000,
        "and dated"
    );
    assert_eq!(
        counters()["marks"]["prime-1"],
        1_764_000_100_000_000i64,
        "the mark of what is counted is kept"
    );
}

/// `wattbus sinks`: what is registered, what this machine's journals wait for, and a group
/// forgotten on purpose (against the mosquitto of tests/run.sh, MOSQUITTO_TEST_BROKER).
#[test]
fn sinks_list_shows_the_registered_groups_and_forget_withdraws_one_on_purpose() {
    let bus = wattbus_testkit::mosquitto();
    let password = bus.password.as_ref().unwrap().expose().to_string();
    let user = bus.username.clone().unwrap();
    let site = wattbus_testkit::site("sinks-cli");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let learned = data.join("journal/modbus-ingest/meas");
    std::fs::create_dir_all(&learned).unwrap();
    runtime::learned::save(&learned, ["old-writer"]).unwrap();
    let cfg = write(
        dir.path(),
        "wattbus.toml",
        &format!(
            "site = \"{site}\"\ndata_dir = \"{}\"\n[bus]\nhost = \"{}\"\nport = {}\nusername = \"{user}\"\npassword = \"{password}\"\n",
            data.display(),
            bus.host,
            bus.port
        ),
    );
    let topic = format!("wattbus/v1/{site}/sink/old-writer");
    let registered = Command::new("mosquitto_pub")
        .args(["-h", &bus.host, "-p", &bus.port.to_string(), "-u", &user, "-P", &password])
        .args(["-q", "1", "-r", "-t", &topic, "-m"])
        .arg(format!(
            r#"{{"group":"old-writer","filters":["wattbus/v1/{site}/meas/+/+"],"ts_ms":1764000000000}}"#
        ))
        .status()
        .expect("mosquitto_pub (mosquitto-clients; tests/run.sh installs it)");
    assert!(registered.success());
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let o = wattbus(&["sinks", "list", "--config", &cfg], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("old-writer: consumes wattbus/v1/{site}/meas/+/+")),
        "{out}"
    );
    assert!(out.contains("modbus-ingest/meas: old-writer"), "{out}");

    // Not a terminal and no --yes: nothing is withdrawn.
    let o = wattbus(&["sinks", "forget", "old-writer", "--config", &cfg], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    let list = || stdout(&wattbus(&["sinks", "list", "--config", &cfg], &[]));
    assert!(list().contains("old-writer: consumes"), "{}", list());

    let o = wattbus(
        &["sinks", "forget", "old-writer", "--config", &cfg, "--yes"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Forgotten"), "{}", stdout(&o));
    assert!(list().contains("old-writer: withdrawn"), "{}", list());
    // A name that cannot be a group is refused before anything is sent.
    let o = wattbus(&["sinks", "forget", "a/b", "--config", &cfg, "--yes"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a sink group name"),
        "{}",
        stderr(&o)
    );
}
/// A `wattbus demo` in the background, its stdout and stderr in files; killed (`-9`) on drop.
struct Demo {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Demo {
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Demo {
        let (out, err) = (dir.join("demo.out"), dir.join("demo.err"));
        let readings = dir.join("readings");
        let mut c = Command::new(wattbus_bin());
        c.arg("demo")
            .args(["--readings-dir", readings.to_str().unwrap()])
            .args(args)
            .env_remove("WATTBUS_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        Demo {
            child: c.spawn().expect("start wattbus demo"),
            out,
            err,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Wait until the console has shown a reading of every series in `series`.
    fn wait_for_readings(&self, series: &[&str], timeout: Duration) {
        assert!(
            wait_until(timeout, || {
                let out = self.stdout();
                series.iter().all(|s| out.contains(&format!("  {s}")))
            }),
            "not every one of {series:?} within {timeout:?}:\n{}\n{}",
            self.stdout(),
            self.stderr()
        );
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {}", self.pid());
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Running processes whose parent is `parent` and whose command line contains `args`.
fn children(parent: u32, args: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after its `)`.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if fields.get(1) == Some(&parent.to_string().as_str())
            && fields.first() != Some(&"Z")
            && cmdline.contains(args)
        {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more code).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Lines of `text` logged at ERROR or WARN.
fn errors_and_warnings(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect()
}

/// The series every kind of simulated device produces, as the console shows them.
const EVERY_DEVICE: [&str; 5] = [
    "sim-meter-1/main",
    "ct-1/ct1",
    "house/l1",
    "powmon/fridge",
    "kitchen/fridge",
];

#[test]
fn a_ctrl_c_stops_the_demo_without_an_error_or_warning_and_takes_its_broker_along() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(dir.path(), &["--meters", "1"], &[]);
    demo.wait_for_readings(&EVERY_DEVICE, Duration::from_secs(60));
    let broker = children(demo.pid(), "run broker");
    assert_eq!(broker.len(), 1, "one broker child: {broker:?}");
    // Only what is logged from the Ctrl-C on counts (a loaded machine may replay before).
    let before = demo.stderr().len();
    demo.signal("INT");
    let status = demo.wait(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", demo.stderr());
    let after = demo.stderr()[before..].to_string();
    assert!(
        errors_and_warnings(&after).is_empty(),
        "logged while stopping:\n{after}"
    );
    assert!(
        demo.stdout().contains("Demo stopped: "),
        "{}",
        demo.stdout()
    );
    assert!(gone(broker[0]), "the broker outlived the demo");
}

#[test]
fn a_killed_demo_takes_its_broker_along() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(dir.path(), &["--meters", "1", "--no-serial"], &[]);
    demo.wait_for_readings(&["sim-meter-1/main"], Duration::from_secs(60));
    let broker = children(demo.pid(), "run broker");
    assert_eq!(broker.len(), 1, "one broker child: {broker:?}");
    demo.signal("KILL");
    demo.wait(Duration::from_secs(10));
    // Its stdin pipe closed with the demo: the broker stops by itself.
    assert!(
        wait_until(Duration::from_secs(20), || gone(broker[0])),
        "the broker outlived a killed demo"
    );
}

/// `stored` and `missing` of the console's last progress line (INFO) in `err`, from `from` on.
fn progress(err: &str) -> Option<(u64, u64)> {
    let line = err
        .lines()
        .rev()
        .find(|l| l.contains("Console sink: readings so far"))?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))?
            .parse()
            .ok()
    };
    Some((field("stored")?, field("missing")?))
}

#[test]
fn the_demo_restarts_a_killed_broker_and_no_reading_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut demo = Demo::start(
        dir.path(),
        &["--meters", "1", "--data-dir", data.to_str().unwrap()],
        &[("RUST_LOG", "warn,rumqttd=off,wattbus::demo=info")],
    );
    demo.wait_for_readings(&EVERY_DEVICE, Duration::from_secs(60));
    let broker = children(demo.pid(), "run broker");
    assert_eq!(broker.len(), 1, "one broker child: {broker:?}");
    // Its password files and config are its owner's only; no password on its command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", broker[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    for entry in std::fs::read_dir(data.join("broker/users")).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        let password = std::fs::read_to_string(&path).unwrap();
        assert!(!cmdline.contains(password.trim()), "{cmdline}");
    }

    let shown_before = demo.stdout().lines().count();
    assert!(
        Command::new("kill")
            .args(["-KILL", &broker[0].to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            demo.stderr()
                .contains("The demo's broker exited; restarting it.")
                && children(demo.pid(), "run broker")
                    .iter()
                    .any(|&p| p != broker[0])
        }),
        "no restart:\n{}",
        demo.stderr()
    );
    let restart = demo
        .stderr()
        .lines()
        .find(|l| l.contains("restarting it"))
        .unwrap()
        .to_string();
    assert!(
        restart.contains(" ERROR ") && restart.contains("SIGKILL"),
        "{restart}"
    );
    // Readings continue, and every reading sent before is stored: replays fill what the
    // dead broker dropped. Judged by the console's progress reports (every 10 s) after the
    // restart.
    let restarted_at = demo.stderr().len();
    let mut last = None;
    let settled = wait_until(Duration::from_secs(90), || {
        last = progress(&demo.stderr()[restarted_at..]);
        demo.stdout().lines().count() > shown_before + 20 && last.is_some_and(|(_, m)| m == 0)
    });
    assert!(
        settled,
        "readings missing after the restart: {last:?}\n{}",
        demo.stderr()
    );
    demo.signal("INT");
    assert_eq!(
        demo.wait(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );
    // Per stream at the end: nothing missing from the first reading to the last.
    let err = demo.stderr();
    let streams: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("Console sink: readings stored from this stream."))
        .collect();
    for producer in [
        "simulator",
        "modbus-ingest",
        "serial-ingest",
        "rms-processor",
    ] {
        let line = streams
            .iter()
            .find(|l| l.contains(&format!("producer={producer} ")))
            .unwrap_or_else(|| panic!("no summary for {producer}:\n{err}"));
        assert!(line.contains(" missing=0"), "{line}");
    }
}

/// Read system calls process `pid` has made (`syscr` of `/proc/<pid>/io`).
fn read_calls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn the_demos_simulated_devices_sleep_between_their_events() {
    // Its simulated devices once spun on their PTY masters: ~115,000 failed reads a second.
    // What is left is real work: serial-ingest reading 300 lines a second from three CT
    // sensors, the Modbus line, the broker connections.
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), &["--meters", "1"], &[]);
    demo.wait_for_readings(&EVERY_DEVICE, Duration::from_secs(60));
    let window = Duration::from_secs(3);
    let before = read_calls(demo.pid());
    std::thread::sleep(window);
    let reads = read_calls(demo.pid()) - before;
    let per_s = reads as f64 / window.as_secs_f64();
    assert!(per_s < 5000.0, "{per_s:.0} reads a second");
}

#[test]
fn serial_ingest_sleeps_on_a_silent_port() {
    // A port with nothing to say costs serial-ingest no reads: it waits on readiness, never
    // polls (the demo's simulated devices once did, 115,000 times a second).
    let dir = tempfile::tempdir().unwrap();
    let b = wattbus_e2e::BrokerSetup::new(dir.path());
    let _broker = b.start(&dir.path().join("broker.log"));
    let socat = wattbus_testkit::Socat::start(dir.path(), "quiet");
    let cfg = dir.path().join("serial.toml");
    std::fs::write(
        &cfg,
        format!(
            "site = \"lab\"\ndata_dir = \"{data}\"\n[bus]\nport = {port}\nusername = \"{user}\"\n\
             password = \"{password}\"\n[serial_ingest]\nhealth_listen = \"127.0.0.1:{health}\"\n\
             [serial_ingest.meas_stream]\nwait_for = []\n[[serial_ingest.ports]]\npath = \"{path}\"\n\
             device = \"quiet\"\nprotocol = \"lines\"\nsilence_timeout_ms = 600000\n",
            data = dir.path().join("data").display(),
            port = b.port,
            user = b.user,
            password = b.password,
            health = free_port(),
            path = socat.dev().display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("serial.log");
    let svc = Proc::spawn(
        "serial-ingest",
        Command::new(wattbus_bin())
            .args(["run", "serial-ingest", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info"),
        &log,
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || text()
            .contains("Serial port opened.")),
        "serial-ingest did not open the port:\n{}",
        text()
    );
    let pid = svc.id();
    let before = read_calls(pid);
    std::thread::sleep(Duration::from_secs(2));
    let reads = read_calls(pid) - before;
    assert!(reads < 20, "{reads} reads in 2 s on a silent port");
}

/// The demo prints a reader's credentials for watching the bus. The tools that only watch,
/// `wattbus tail` and `wattbus sinks list`, must work with them: a reader may publish nothing,
/// so a tool that left a last will (as services do) was refused by the broker and printed
/// nothing, or "cannot reach the broker" (hostile review).
#[test]
fn the_demos_reader_can_watch_with_tail_and_list_the_sink_groups() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), &["--no-serial"], &[]);
    demo.wait_for_readings(&["sim-meter-1/main"], Duration::from_secs(60));
    let hint = demo
        .stdout()
        .lines()
        .find(|l| l.contains("mosquitto_sub -h"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no mosquitto_sub hint:\n{}", demo.stdout()));
    let words: Vec<&str> = hint.split_whitespace().collect();
    let after = |flag: &str| {
        let i = words.iter().position(|w| *w == flag).unwrap();
        words[i + 1].to_string()
    };
    let (port, user, password) = (after("-p"), after("-u"), after("-P"));
    let cfg = write(
        dir.path(),
        "reader.toml",
        &format!(
            "site = \"demo\"\n[bus]\nport = {port}\nusername = \"{user}\"\npassword = \"{password}\"\n"
        ),
    );
    // Bounded: a tail that cannot log in waits for messages forever.
    let o = Command::new("timeout")
        .arg("60")
        .arg(wattbus_bin())
        .args([
            "tail",
            "wattbus/v1/demo/meas/#",
            "-n",
            "30",
            "--config",
            &cfg,
        ])
        .env_remove("WATTBUS_CONFIG")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "tail failed: {}\n{out}", stderr(&o));
    // The meters (every second) among the plugs (three, and their availability): 30 lines
    // hold both.
    assert_eq!(out.lines().count(), 30, "{out}");
    assert!(out.contains("sim-meter-"), "{out}");
    let o = wattbus(&["sinks", "list", "--config", &cfg], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "sinks list failed: {}\n{out}",
        stderr(&o)
    );
    assert!(out.contains("consumes wattbus/v1/demo/meas/+/+"), "{out}");
}

/// Out of file descriptors (systemd gives a service 1024), rumqttd's accept loop retried at
/// once and logged a line per try: a flood of connections from anyone who can reach the port
/// wrote 290 MB of log in 18 s (hostile review). Now it waits between tries and logs at most a
/// line per 10 s, and serves again once descriptors are free.
#[test]
fn a_broker_out_of_file_descriptors_neither_spins_nor_floods_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let f = write(
        dir.path(),
        "b.toml",
        &format!(
            // Every listener on a port of its own: the defaults (1884, 9100) may be taken by
            // another test's broker, and the broker would exit before this test begins.
            "[log]\nlevel = \"info\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\nlisten_v5 = \"127.0.0.1:{}\"\nhealth_listen = \"127.0.0.1:{}\"\n[[broker.users]]\nusername = \"a\"\npassword = \"b\"\nrole = \"admin\"\n",
            free_port(),
            free_port(),
        ),
    );
    let log = dir.path().join("b.log");
    let _broker = Proc::spawn(
        "broker",
        Command::new("prlimit")
            .args(["--nofile=48:48", "--"])
            .arg(wattbus_bin())
            .args(["run", "broker", "--config", &f]),
        &log,
    );
    assert!(
        wait_until(Duration::from_secs(30), || port_open(port)),
        "the broker did not listen:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Far more connections than the broker has descriptors left; held open. From 13 loopback
    // addresses: the broker keeps at most 16 from one source waiting for their login.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let mut flood = Vec::new();
    // The flood can take a while: past the broker's backlog, connects wait for SYN retries.
    let flood_start = std::time::Instant::now();
    for i in 0..200u16 {
        let host = 2 + (i / 16) as u8;
        let connected = rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))?;
            socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
        });
        if let Ok(s) = connected {
            flood.push(s);
        }
    }
    let failing = |text: &str| text.matches("Unable to accept socket").count();
    assert!(
        wait_until(Duration::from_secs(20), || failing(
            &std::fs::read_to_string(&log).unwrap_or_default()
        ) >= 1),
        "the broker never ran out of descriptors:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Three seconds more: a spinning loop would have logged thousands of lines by now, the
    // waiting one a line per 10 s since the flood began (however long the flood took).
    std::thread::sleep(Duration::from_secs(3));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let allowed = 2 + flood_start.elapsed().as_secs() / 10;
    assert!(
        failing(&text) as u64 <= allowed,
        "{} lines (at most {allowed}):\n{}",
        failing(&text),
        text.lines()
            .filter(|l| l.contains("Unable to accept") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The flood goes away: a client gets in again.
    drop(flood);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            // CONNECT, MQTT 3.1.1, clean session, user a / password b, client id "x".
            let connect: &[u8] = &[
                0x10, 19, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30, 0, 1, b'x', 0, 1, b'a', 0,
                1, b'b',
            ];
            let mut ack = [0u8; 4];
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(connect).is_ok() && s.read_exact(&mut ack).is_ok() && ack[0] == 0x20
        }),
        "no CONNACK once the flood was gone"
    );
}

/// `wattbus health <service>` is what a container's HEALTHCHECK runs (the image has no curl):
/// exit 0 when the service is ready, 1 when it is not (naming the checks) or nothing answers.
#[test]
fn health_asks_a_running_service_whether_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let b = wattbus_e2e::BrokerSetup::new(dir.path());
    let broker_cfg = b.config.display().to_string();
    let mut broker = b.start(&dir.path().join("broker.log"));
    let ready = || wattbus(&["health", "broker", "--config", &broker_cfg], &[]);
    assert!(
        wait_until(Duration::from_secs(30), || ready().status.success()),
        "the broker never answered ready: {}",
        stderr(&ready())
    );
    assert!(
        String::from_utf8_lossy(&ready().stdout).contains("broker at 127.0.0.1:"),
        "{}",
        String::from_utf8_lossy(&ready().stdout)
    );

    // A simulator whose broker is not there: up, answering, not ready, and says why.
    let health = free_port();
    let sim_cfg = write(
        dir.path(),
        "sim.toml",
        &format!(
            "data_dir = \"{}\"\n[bus]\nport = {}\n[simulator]\nhealth_listen = \"127.0.0.1:{health}\"\n",
            dir.path().join("sim").display(),
            free_port(),
        ),
    );
    let _sim = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin()).args(["run", "simulator", "--config", &sim_cfg]),
        &dir.path().join("sim.log"),
    );
    let asked = || wattbus(&["health", "simulator", "--config", &sim_cfg], &[]);
    assert!(
        wait_until(Duration::from_secs(30), || stderr(&asked())
            .contains("not ready")),
        "{}",
        stderr(&asked())
    );
    let o = asked();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bus:simulator"), "{}", stderr(&o));

    // Nothing there any more: exit 1, and the address it tried.
    broker.kill9();
    let o = ready();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing answers at"), "{}", stderr(&o));

    // An unknown service is a usage error, like `wattbus run`'s (64).
    let o = wattbus(&["health", "nonesuch", "--addr", "127.0.0.1:1"], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
}

/// The systemd template unit (compose/systemd/wattbus@.service) is one systemd accepts
/// without a warning: every key known, every value parsed, the command executable.
#[test]
fn the_systemd_unit_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../compose/systemd/wattbus@.service"
    ))
    .unwrap();
    let verify = |text: &str| {
        // The binary where the unit expects it is this build's; the instance, a service.
        let unit = text.replace(
            "/usr/local/bin/wattbus",
            &wattbus_bin().display().to_string(),
        );
        std::fs::write(dir.path().join("wattbus@.service"), unit).unwrap();
        let instance = dir.path().join("wattbus@broker.service");
        let _ = std::fs::remove_file(&instance);
        std::os::unix::fs::symlink("wattbus@.service", &instance).unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&instance)
            .output()
            .expect("systemd-analyze (tests/run.sh installs systemd)");
        (o.status.success(), stderr(&o))
    };
    let (ok, warnings) = verify(&shipped);
    assert!(ok && warnings.trim().is_empty(), "{warnings}");
    // It would notice: a misspelt key is reported.
    let (_, warnings) = verify(&shipped.replace("ProtectHome=yes", "ProtectHomes=yes"));
    assert!(warnings.contains("Unknown key"), "{warnings}");
}
