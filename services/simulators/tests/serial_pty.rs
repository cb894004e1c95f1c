//! The serial drivers over real virtual serial ports: a socat PTY pair (as a user would make
//! one to try serial-ingest) and the in-process pair the demo uses.
//!
//! On the socat pair the driver under test plays the device on the `sim` end; the test reads
//! and writes the `dev` end, as serial-ingest would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use runtime::shutdown;
use simulators::serial::{
    self, Load, Port, PowMon, PowMonConfig, Prime, PrimeConfig, PrimeFault, Sensor, SensorConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use wattbus_testkit::Socat;

fn open(path: &Path) -> BufReader<SerialStream> {
    BufReader::new(
        tokio_serial::new(path.to_string_lossy(), 115_200)
            .open_native_async()
            .unwrap(),
    )
}

fn path_port(path: &Path) -> Port {
    Port::Path {
        path: path.to_string_lossy().into_owned(),
        baud: 115_200,
    }
}

async fn read_line(r: &mut BufReader<SerialStream>) -> String {
    let mut buf = Vec::new();
    timeout(Duration::from_secs(2), r.read_until(b'\n', &mut buf))
        .await
        .expect("a line within 2 s")
        .unwrap();
    String::from_utf8(buf).unwrap()
}

/// Parses a stream line per the doc; returns (seq, value count) after checking the checksum.
fn check_stream_line(line: &str) -> (u16, usize) {
    let body = line.strip_suffix('\n').unwrap();
    let (payload, cs) = body.split_once('*').unwrap();
    let xor = payload.bytes().fold(0u8, |a, b| a ^ b);
    assert_eq!(format!("{xor:02X}"), cs, "checksum of {line:?}");
    let (seq, values) = payload.split_once(':').unwrap();
    for v in values.split(',') {
        let v: u16 = v.parse().unwrap();
        assert!(v <= 1023);
    }
    (seq.parse().unwrap(), values.split(',').count())
}

fn single_load(amps: f64) -> PowMon {
    PowMon::new(PowMonConfig {
        sensors: vec![Load::Constant { amps }],
        ..PowMonConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn prime_streams_continuous_checksummed_lines_over_a_socat_pty() {
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path(), "line");
    let (trigger, stop) = shutdown::channel();
    let model = Prime::new(
        PrimeConfig {
            first_seq: 65_500,
            ..PrimeConfig::default()
        },
        1,
        proto::now_ms(),
    )
    .unwrap();
    let mut reader = open(socat.dev());
    let driver = tokio::spawn(serial::run_prime(model, path_port(socat.sim()), stop));
    assert_eq!(
        read_line(&mut reader).await,
        "# wattbus-stream rate=2000 channels=1\n"
    );
    let started = std::time::Instant::now();
    let mut last: Option<u16> = None;
    // 100 lines is 1 s of samples at 2 kHz; the seq wraps on the way.
    for _ in 0..100 {
        let (seq, n) = check_stream_line(&read_line(&mut reader).await);
        assert_eq!(n, 20);
        if let Some(l) = last {
            assert_eq!(seq, l.wrapping_add(1), "sequence gap");
        }
        last = Some(seq);
    }
    let elapsed = started.elapsed();
    // Paced at the sample rate: 100 lines take about a second, not a burst.
    assert!(
        elapsed > Duration::from_millis(800) && elapsed < Duration::from_millis(1500),
        "{elapsed:?}"
    );
    assert_eq!(last, Some(65_500u16.wrapping_add(99)));
    trigger.fire();
    timeout(Duration::from_secs(2), driver)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn prime_faults_garble_lines_that_fail_their_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path(), "line");
    let (trigger, stop) = shutdown::channel();
    let model = Prime::new(
        PrimeConfig {
            fault: PrimeFault {
                garble_every: Some(4),
            },
            ..PrimeConfig::default()
        },
        1,
        proto::now_ms(),
    )
    .unwrap();
    let mut reader = open(socat.dev());
    let driver = tokio::spawn(serial::run_prime(model, path_port(socat.sim()), stop));
    assert!(read_line(&mut reader).await.starts_with("# wattbus-stream"));
    let mut bad = 0;
    for _ in 0..20 {
        let line = read_line(&mut reader).await;
        let (payload, cs) = line.trim_end().split_once('*').unwrap();
        let xor = payload.bytes().fold(0u8, |a, b| a ^ b);
        if format!("{xor:02X}") != cs {
            bad += 1;
        }
    }
    assert_eq!(bad, 5);
    trigger.fire();
    driver.await.unwrap().unwrap();
}

#[tokio::test]
async fn powmon_answers_read_requests_over_a_socat_pty_and_ignores_other_lines() {
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path(), "line");
    let (trigger, stop) = shutdown::channel();
    let driver = tokio::spawn(serial::run_powmon(
        single_load(6.510_416_666),
        path_port(socat.sim()),
        stop,
    ));
    let mut host = open(socat.dev());
    // Not a request: no answer. Then the Pi's six bytes: the doc's 600 for 6.51 A.
    host.get_mut().write_all(b"hello\n").await.unwrap();
    host.get_mut().write_all(b"read \n").await.unwrap();
    assert_eq!(read_line(&mut host).await, "600\r\n");
    // A request split across writes is still one request.
    host.get_mut().write_all(b"re").await.unwrap();
    host.get_mut().write_all(b"ad \n").await.unwrap();
    assert_eq!(read_line(&mut host).await, "600\r\n");
    // Nothing else was sent.
    let mut extra = Vec::new();
    assert!(
        timeout(
            Duration::from_millis(200),
            host.read_until(b'\n', &mut extra)
        )
        .await
        .is_err(),
        "unexpected {extra:?}"
    );
    trigger.fire();
    driver.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_driver_returns_an_error_when_its_port_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut socat = Socat::start(dir.path(), "line");
    let (_trigger, stop) = shutdown::channel();
    let model = Sensor::new(SensorConfig::default(), 1).unwrap();
    let mut reader = open(socat.dev());
    let driver = tokio::spawn(serial::run_sensor(
        model,
        Duration::from_millis(20),
        path_port(socat.sim()),
        stop,
    ));
    let line = read_line(&mut reader).await;
    assert!(line.starts_with("fridge="), "{line}");
    socat.kill();
    let result = timeout(Duration::from_secs(2), driver)
        .await
        .expect("the driver ends when its port is gone")
        .unwrap();
    assert!(
        matches!(result, Err(serial::DriverError::Gone { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_pty_pair_device_answers_across_host_reopens() {
    let (device, path) = serial::pty_pair().unwrap();
    assert!(path.starts_with("/dev/"), "{path}");
    let (trigger, stop) = shutdown::channel();
    let driver = tokio::spawn(serial::run_powmon(single_load(0.0), device, stop));
    // The host is not listening yet: the driver waits rather than ending.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!driver.is_finished());
    for _ in 0..2 {
        let mut host = open(Path::new(&path));
        host.get_mut().write_all(b"read \n").await.unwrap();
        assert_eq!(read_line(&mut host).await, "512\r\n");
        drop(host);
        // Closed again: the device outlives the host's close, as after an unplug-replug.
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!driver.is_finished());
    }
    trigger.fire();
    driver.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_pty_pair_stream_starts_fresh_when_the_host_opens_late() {
    let (device, path) = serial::pty_pair().unwrap();
    let (trigger, stop) = shutdown::channel();
    let model = Prime::new(PrimeConfig::default(), 1, proto::now_ms()).unwrap();
    let driver = tokio::spawn(serial::run_prime(model, device, stop));
    // Half a second with nobody listening: those lines are lost, not queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut host = open(Path::new(&path));
    // The banner was written before anyone listened and waits in the PTY, as it should.
    assert_eq!(
        read_line(&mut host).await,
        "# wattbus-stream rate=2000 channels=1\n"
    );
    let (first, _) = check_stream_line(&read_line(&mut host).await);
    assert!(
        first >= 40,
        "lines from before the host opened were queued: seq {first}"
    );
    let mut last = first;
    for _ in 0..20 {
        let (seq, _) = check_stream_line(&read_line(&mut host).await);
        assert_eq!(seq, last.wrapping_add(1));
        last = seq;
    }
    trigger.fire();
    driver.await.unwrap().unwrap();
}

/// Read system calls made so far by this thread (`syscr` of `/proc/thread-self/io`). The
/// tests below run on a current-thread runtime, so the driver's reads are this thread's.
fn thread_reads() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// How many reads the thread makes in `window` while the test itself does nothing.
async fn reads_while_idle(window: Duration) -> u64 {
    let before = thread_reads();
    tokio::time::sleep(window).await;
    thread_reads() - before
}

/// The host closes its end and opens it again (serial-ingest reopening a port), which once
/// left tokio's readiness of the master stuck at "hung up": every wait returned at once and
/// every read failed with EAGAIN, ~100,000 reads a second. Idle, the device must sleep.
#[tokio::test]
async fn a_pty_pair_device_sleeps_while_its_reopened_host_is_idle() {
    let (device, path) = serial::pty_pair().unwrap();
    let (trigger, stop) = shutdown::channel();
    let driver = tokio::spawn(serial::run_powmon(single_load(0.0), device, stop));
    // The scenario: the host opens late, and is away a while between its sessions (long
    // enough for the reactor to see each hangup).
    let host_away = Duration::from_millis(100);
    tokio::time::sleep(host_away).await;
    for _ in 0..2 {
        let mut host = open(Path::new(&path));
        host.get_mut().write_all(b"read \n").await.unwrap();
        assert_eq!(read_line(&mut host).await, "512\r\n");
        drop(host);
        tokio::time::sleep(host_away).await;
    }
    let mut host = open(Path::new(&path));
    host.get_mut().write_all(b"read \n").await.unwrap();
    assert_eq!(read_line(&mut host).await, "512\r\n");
    // Half a second of an open, silent host: a sleeping device reads nothing (the bound leaves
    // room for a few wake-ups; the spinning one made tens of thousands of reads).
    let reads = reads_while_idle(Duration::from_millis(500)).await;
    assert!(reads < 20, "{reads} reads in 0.5 s from an idle device");
    // And it still answers.
    host.get_mut().write_all(b"read \n").await.unwrap();
    assert_eq!(read_line(&mut host).await, "512\r\n");
    trigger.fire();
    driver.await.unwrap().unwrap();
}

/// A streaming device writes on its clock and reads nothing it is not sent, across a host
/// reopen too.
#[tokio::test]
async fn a_pty_pair_stream_device_reads_nothing_between_its_lines() {
    let (device, path) = serial::pty_pair().unwrap();
    let (trigger, stop) = shutdown::channel();
    let model = Prime::new(PrimeConfig::default(), 1, proto::now_ms()).unwrap();
    let driver = tokio::spawn(serial::run_prime(model, device, stop));
    let mut host = open(Path::new(&path));
    assert!(read_line(&mut host).await.starts_with("# wattbus-stream"));
    check_stream_line(&read_line(&mut host).await);
    drop(host);
    // Away long enough for the reactor to see the hangup.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut host = open(Path::new(&path));
    // Lines flow again once the device has seen the host back.
    check_stream_line(&read_line(&mut host).await);
    // 0.3 s is 30 lines; reading them is the host's business (below), not the device's.
    let reads = reads_while_idle(Duration::from_millis(300)).await;
    assert!(reads < 20, "{reads} reads in 0.3 s from a streaming device");
    for _ in 0..5 {
        check_stream_line(&read_line(&mut host).await);
    }
    trigger.fire();
    driver.await.unwrap().unwrap();
}
