// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `wattbus modbus scan | read | set-address | set-baud` against a Modbus server nobody here
//! wrote: pymodbus (tests/modbus/we515_server.py, a WE-515 register map), over Modbus TCP and
//! over RTU through a socat PTY pair. Needs `pip install pymodbus==3.16.1 pyserial==3.5` and
//! socat.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wattbus_e2e::wattbus_bin;
use wattbus_testkit::{Socat, wait_until};

/// A pymodbus WE-515 server; its stdout lines (READY, REQ, MOVED) are collected for asserts.
struct Pymodbus {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// `127.0.0.1:PORT` for TCP, empty for RTU.
    addr: String,
}

impl Pymodbus {
    fn start(args: &[&str]) -> Pymodbus {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("modbus/we515_server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(args)
            .arg("--trace")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run python3");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Pymodbus {
            child,
            lines,
            addr: String::new(),
        };
        let ready = wait_until(Duration::from_secs(20), || {
            server.lines().iter().any(|l| l.starts_with("READY "))
        });
        if !ready {
            let status = server.child.try_wait().ok().flatten();
            panic!(
                "pymodbus server did not get ready (exit: {status:?}); is it installed? \
                 pip install pymodbus==3.16.1 pyserial==3.5"
            );
        }
        let ready = server
            .lines()
            .into_iter()
            .find(|l| l.starts_with("READY tcp "));
        if let Some(line) = ready {
            server.addr = line.split_whitespace().nth(2).unwrap().to_string();
        }
        server
    }

    fn tcp(slaves: &str) -> Pymodbus {
        Pymodbus::start(&["--tcp", "0", "--slaves", slaves])
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until the server printed `line`: it prints after answering, so a
    /// client can be done before the line is.
    fn printed(&self, line: &str) -> bool {
        wait_until(Duration::from_secs(5), || {
            self.lines().iter().any(|l| l == line)
        })
    }

    /// The requests the server answered (its REQ lines), once `expected` of them are in.
    fn requests_after(&self, expected: usize) -> Vec<String> {
        wait_until(Duration::from_secs(5), || self.requests().len() >= expected);
        self.requests()
    }

    /// The requests the server answered (its REQ lines).
    fn requests(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with("REQ "))
            .collect()
    }
}

impl Drop for Pymodbus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wattbus(args: &[&str]) -> Output {
    Command::new(wattbus_bin())
        .arg("modbus")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run wattbus")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The slave ids a scan printed, in order.
fn scanned_ids(o: &Output) -> Vec<u8> {
    stdout(o)
        .lines()
        .filter_map(|l| l.strip_prefix("slave "))
        .filter_map(|l| l.split(':').next())
        .map(|id| id.trim().parse().unwrap())
        .collect()
}

fn line_with<'a>(text: &'a str, needles: &[&str]) -> &'a str {
    text.lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no line with {needles:?} in:\n{text}"))
}

#[test]
fn scan_over_tcp_finds_the_slaves_pymodbus_serves_and_no_others() {
    let server = Pymodbus::tcp("2,5");
    let o = wattbus(&[
        "scan",
        "--tcp",
        &server.addr,
        "--from",
        "1",
        "--to",
        "7",
        "--timeout-ms",
        "200",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(scanned_ids(&o), [2, 5], "{}", stdout(&o));
    let out = stdout(&o);
    for id in ["2", "5"] {
        let line = line_with(&out, &[&format!("slave   {id}: ")]);
        assert!(line.contains(": orno-we-515 ("), "{line}");
        assert!(
            line.contains("frequency 50.01 Hz at holding 0x0130"),
            "{line}"
        );
        assert!(
            line.contains("L1 voltage 231.45 V at holding 0x0131"),
            "{line}"
        );
    }
}

#[test]
fn read_decodes_negative_power_and_power_factor_from_pymodbus_in_two_requests() {
    let server = Pymodbus::tcp("1");
    let o = wattbus(&[
        "read",
        "--tcp",
        &server.addr,
        "--slave",
        "1",
        "--profile",
        "orno-we-515",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // i32 high word first: 0xFFFF 0xFB2E is -1234 W, not 4294966062 W.
    assert!(
        line_with(&out, &["0x0140", "power l1", "power_w"]).ends_with("-1234 W"),
        "{out}"
    );
    assert!(line_with(&out, &["0x0146", "power total", "power_w"]).ends_with("-1234 W"));
    // i16 0xFC9A × 0.001 is -0.870 (leading), not 64.666.
    assert!(
        line_with(&out, &["0x0158", "power_factor"]).ends_with("-0.870"),
        "{out}"
    );
    assert!(line_with(&out, &["0x0131", "voltage_v"]).ends_with("231.45 V"));
    assert!(line_with(&out, &["0x0130", "frequency_hz"]).ends_with("50.01 Hz"));
    assert!(line_with(&out, &["0x0139", "current_a"]).ends_with("5.678 A"));
    assert!(line_with(&out, &["0x0148", "reactive_power_var"]).ends_with("-321 var"));
    assert!(line_with(&out, &["0xa000", "energy total", "energy_wh"]).ends_with("1234560 Wh"));
    assert!(line_with(&out, &["0xa002", "tariff=t1"]).ends_with("1000000 Wh"));
    assert!(line_with(&out, &["0xa004", "tariff=t2"]).ends_with("234560 Wh"));
    // The whole WE-515 map in the two coalesced reads, as pymodbus counted them.
    assert_eq!(
        server.requests_after(2),
        [
            "REQ slave=1 fc=3 addr=0x0130 count=44",
            "REQ slave=1 fc=3 addr=0xa000 count=40"
        ]
    );

    let o = wattbus(&[
        "read",
        "--tcp",
        &server.addr,
        "--slave",
        "1",
        // Short for orno-we-515.
        "--profile",
        "we-515",
        "--register",
        "0x0140",
        "--raw",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = line_with(&out, &["0x0140"]);
    assert!(line.contains("-1234 W"), "{line}");
    assert!(
        line.contains("FC03 i32, high-first word order, scale 1: 0xffff 0xfb2e"),
        "{line}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("0x")).count(),
        1,
        "{out}"
    );

    let o = wattbus(&[
        "read",
        "--tcp",
        &server.addr,
        "--slave",
        "1",
        "--profile",
        "orno-we-515",
        "--field",
        "power_factor",
        "--raw",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        line_with(&out, &["0x0158"]).contains("-0.870  [FC03 i16"),
        "{out}"
    );
    assert!(line_with(&out, &["0x015b"]).contains("0xfc9a"), "{out}");
}

#[test]
fn errors_name_the_timeout_and_the_exception() {
    let server = Pymodbus::tcp("1");
    let o = wattbus(&[
        "read",
        "--tcp",
        &server.addr,
        "--slave",
        "7",
        "--profile",
        "orno-we-515",
        "--field",
        "power_w",
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no answer from slave 7 within 300 ms"),
        "{}",
        stderr(&o)
    );

    // An Eastron profile reads input registers (FC04); this WE-515 has none.
    let o = wattbus(&[
        "read",
        "--tcp",
        &server.addr,
        "--slave",
        "1",
        "--profile",
        "eastron-sdm120",
        "--field",
        "voltage_v",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("slave 1 refused a read of input register 0x0000 (FC04)")
            || err.contains("slave 1 refused a read of 2 input registers from 0x0000 (FC04)"),
        "{err}"
    );
    assert!(
        err.contains(
            "IllegalDataAddress (0x02): the register is not in this meter's map: is the \
             profile right?"
        ),
        "{err}"
    );
}

#[test]
fn set_address_writes_0x0110_and_the_meter_answers_at_the_new_address() {
    let server = Pymodbus::tcp("1,2");
    let o = wattbus(&[
        "set-address",
        "--tcp",
        &server.addr,
        "--slave",
        "2",
        "--to",
        "9",
        "--yes",
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("Will write 9 to holding register 0x0110"),
        "{out}"
    );
    assert!(
        out.contains("OK: slave 2 now answers at address 9"),
        "{out}"
    );
    assert_eq!(
        server.requests_after(2),
        [
            "REQ slave=2 fc=6 addr=0x0110 count=1",
            "REQ slave=9 fc=3 addr=0x0110 count=1"
        ]
    );

    let o = wattbus(&[
        "scan",
        "--tcp",
        &server.addr,
        "--from",
        "1",
        "--to",
        "10",
        "--timeout-ms",
        "150",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(scanned_ids(&o), [1, 9], "{}", stdout(&o));
}

#[test]
fn set_baud_stores_the_code_and_says_how_to_check() {
    let server = Pymodbus::tcp("4");
    let o = wattbus(&[
        "set-baud",
        "--tcp",
        &server.addr,
        "--slave",
        "4",
        "--to",
        "2400",
        "--yes",
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Will write baud code 2 (2400 baud)"), "{out}");
    assert!(
        out.contains("OK: slave 4 stores baud code 2 (2400 baud)"),
        "{out}"
    );
    assert_eq!(
        server.requests_after(2),
        [
            "REQ slave=4 fc=6 addr=0x0111 count=1",
            "REQ slave=4 fc=3 addr=0x0111 count=1"
        ]
    );
}

#[test]
fn a_write_without_yes_and_without_a_terminal_is_refused_before_anything_is_sent() {
    let server = Pymodbus::tcp("1");
    let o = wattbus(&[
        "set-address",
        "--tcp",
        &server.addr,
        "--slave",
        "1",
        "--to",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("add --yes"), "{}", stderr(&o));
    // Given time to show up, no request does.
    let sent = wait_until(Duration::from_millis(500), || !server.requests().is_empty());
    assert!(!sent, "{:?}", server.requests());
}

#[test]
fn bad_arguments_exit_64_with_the_reason() {
    let tcp = ["--tcp", "127.0.0.1:1"];
    let cases: &[(&[&str], &str)] = &[
        (
            &["set-address", "--slave", "1", "--to", "300", "--yes"],
            "slave address must be 1 to 247, got 300",
        ),
        (
            &["set-address", "--slave", "0", "--to", "5", "--yes"],
            "key `--slave`",
        ),
        (
            &["set-baud", "--slave", "1", "--to", "19200", "--yes"],
            "the WE-515 supports 1200, 2400, 4800 and 9600 baud, not 19200",
        ),
        (
            &["read", "--slave", "1", "--profile", "nope"],
            "no profile \"nope\"; known:",
        ),
        (
            &[
                "read",
                "--slave",
                "1",
                "--profile",
                "orno-we-515",
                "--register",
                "0x0141",
            ],
            "0x0141 is inside a wider value of orno-we-515: read 0x0140 (power_w)",
        ),
        (
            &["scan", "--from", "9", "--to", "3"],
            "--from 9 is after --to 3",
        ),
    ];
    for (args, expected) in cases {
        let mut all = args.to_vec();
        all.extend(tcp);
        let o = wattbus(&all);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
    let o = wattbus(&["scan"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("give exactly one link"),
        "{}",
        stderr(&o)
    );
    let o = wattbus(&["scan", "--rtu", "/dev/null", "--stop-bits", "3"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
}

#[test]
fn scan_read_and_set_address_over_rtu_on_a_pty_pair() {
    let dir = tempfile::tempdir().unwrap();
    // `dev` for wattbus, `sim` for pymodbus.
    let socat = Socat::start(dir.path(), "rs485");
    let sim = socat.sim_str();
    let dev = socat.dev_str();
    let server = Pymodbus::start(&["--rtu", &sim, "--baud", "9600", "--slaves", "3,4"]);
    let rtu = ["--rtu", dev.as_str(), "--baud", "9600", "--parity", "none"];

    let mut args = vec!["scan", "--from", "1", "--to", "6", "--timeout-ms", "300"];
    args.extend(rtu);
    let o = wattbus(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(scanned_ids(&o), [3, 4], "{}", stdout(&o));
    assert!(stdout(&o).contains("slave   3: orno-we-515 (frequency 50.01 Hz"));

    let mut args = vec!["read", "--slave", "4", "--profile", "orno-we-515"];
    args.extend(rtu);
    let o = wattbus(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        line_with(&out, &["0x0140", "power_w"]).ends_with("-1234 W"),
        "{out}"
    );
    assert!(
        line_with(&out, &["0x0158", "power_factor"]).ends_with("-0.870"),
        "{out}"
    );
    assert!(
        line_with(&out, &["0xa000", "energy_wh"]).ends_with("1234560 Wh"),
        "{out}"
    );

    let mut args = vec!["set-address", "--slave", "4", "--to", "200", "--yes"];
    args.extend(rtu);
    let o = wattbus(&args);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("OK: slave 4 now answers at address 200"));
    assert!(
        server.printed("MOVED slave=4 to=200"),
        "{:?}",
        server.lines()
    );
}
