//! modbus-ingest's `run_on` against a real broker (wattbus's own, started in the test, with
//! modbus-ingest logged in as the producer it is in a deployment) and a Modbus RTU peer on the
//! far end of a socat PTY pair. The peer is written here byte by byte (Modbus over Serial Line
//! v1.02: slave address, PDU, CRC-16 low byte first), so a test can answer with exactly the
//! bytes it wants: a WE-515's registers, an exception, a short frame, a wrong CRC, another
//! slave's address, or nothing at all. Every test uses its own bus name, so the process-wide
//! counters of one test are not another's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker, close, count, counter, is, rtu_pty, start, watch};
use proto::{Measurement, Quality, Segment};
use wattbus_testkit::{Socat, TestBroker, TestService, Watch, seg, site};

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// A read request as the peer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req {
    slave: u8,
    function: u8,
    start: u16,
    count: u16,
}

/// What the peer sends back to one request.
#[derive(Debug, Clone)]
enum Reply {
    /// The registers the peer's map holds, as a valid answer.
    Good,
    Exception(u8),
    /// These bytes exactly (no CRC added).
    Raw(Vec<u8>),
    Silent,
}

fn good_answer(req: Req, words: &[u16]) -> Vec<u8> {
    let mut f = vec![req.slave, req.function, (words.len() * 2) as u8];
    for w in words {
        f.extend_from_slice(&w.to_be_bytes());
    }
    with_crc(f)
}

type Seen = Arc<Mutex<Vec<Req>>>;
type Script = Arc<Mutex<VecDeque<Reply>>>;

/// Register maps per slave; a slave that is not in `maps` or is switched off never answers.
struct Peer {
    maps: HashMap<u8, BTreeMap<u16, u16>>,
    off: HashMap<u8, Arc<AtomicBool>>,
    /// Replies used before the map, one per request, in order (hostile scripts).
    script: Script,
    seen: Seen,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            maps: HashMap::new(),
            off: HashMap::new(),
            script: Arc::default(),
            seen: Arc::default(),
        }
    }

    fn slave(&mut self, id: u8, map: BTreeMap<u16, u16>) -> Arc<AtomicBool> {
        self.maps.insert(id, map);
        self.off.entry(id).or_default().clone()
    }

    /// Serves on `port` until it closes (socat killed).
    fn spawn(self, mut port: std::fs::File) -> (Seen, Script) {
        let (seen, script) = (self.seen.clone(), self.script.clone());
        std::thread::spawn(move || {
            let mut buf: Vec<u8> = Vec::new();
            let mut chunk = [0u8; 256];
            loop {
                let n = match port.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                // A read request is 8 bytes; resync on a bad CRC by dropping a byte.
                while buf.len() >= 8 {
                    let f = &buf[..8];
                    if crc16(&f[..6]).to_le_bytes() != [f[6], f[7]] {
                        buf.remove(0);
                        continue;
                    }
                    let req = Req {
                        slave: f[0],
                        function: f[1],
                        start: u16::from_be_bytes([f[2], f[3]]),
                        count: u16::from_be_bytes([f[4], f[5]]),
                    };
                    buf.drain(..8);
                    self.seen.lock().unwrap().push(req);
                    let scripted = self.script.lock().unwrap().pop_front();
                    let off = self
                        .off
                        .get(&req.slave)
                        .is_none_or(|o| o.load(Ordering::SeqCst));
                    let reply = match scripted {
                        Some(r) => r,
                        None if off => Reply::Silent,
                        None => Reply::Good,
                    };
                    let bytes = match reply {
                        Reply::Silent => continue,
                        Reply::Raw(b) => b,
                        Reply::Exception(code) => {
                            with_crc(vec![req.slave, req.function | 0x80, code])
                        }
                        Reply::Good => {
                            let map = &self.maps[&req.slave];
                            let words: Vec<u16> = (req.start..req.start + req.count)
                                .map(|a| map.get(&a).copied().unwrap_or(0))
                                .collect();
                            good_answer(req, &words)
                        }
                    };
                    if port.write_all(&bytes).is_err() {
                        return;
                    }
                }
            }
        });
        (seen, script)
    }
}

/// A WE-515's registers: exporting `export_w` watts at a leading power factor of -0.994.
fn we515_map(export_w: i32, energy_centi_kwh: u32) -> BTreeMap<u16, u16> {
    let mut m = BTreeMap::new();
    let put32 = |m: &mut BTreeMap<u16, u16>, a: u16, v: u32| {
        m.insert(a, (v >> 16) as u16);
        m.insert(a + 1, v as u16);
    };
    m.insert(0x0130, 5001); // 50.01 Hz
    // 231.45 V: as floats, 23145 × 0.01 is 231.45000000000002, which was once published.
    m.insert(0x0131, 23145);
    put32(&mut m, 0x0139, 5123); // 5.123 A
    put32(&mut m, 0x0140, (-export_w) as u32); // INT32 W, negative = export
    put32(&mut m, 0x0146, (-export_w) as u32);
    put32(&mut m, 0x0148, (-120i32) as u32);
    put32(&mut m, 0x014E, (-120i32) as u32);
    put32(&mut m, 0x0150, 1185);
    put32(&mut m, 0x0156, 1185);
    m.insert(0x0158, (-994i16) as u16); // PF -0.994, leading
    m.insert(0x015B, (-994i16) as u16);
    put32(&mut m, 0xA000, energy_centi_kwh);
    put32(&mut m, 0xA002, 100_000);
    put32(&mut m, 0xA004, energy_centi_kwh - 100_000);
    put32(&mut m, 0xA01E, 789);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_we515_on_one_rtu_bus_take_two_requests_per_poll_and_publish_signed_values() {
    let dir = tempfile::tempdir().unwrap();
    let socat = rtu_pty(dir.path());
    let mut peer = Peer::new();
    let off1 = peer.slave(1, we515_map(1178, 123_456));
    let off2 = peer.slave(2, we515_map(250, 200_000));
    off1.store(false, Ordering::SeqCst);
    off2.store(false, Ordering::SeqCst);
    let (seen, _) = peer.spawn(socat.sim_file());
    let site = site("two-we515");
    let broker = broker().await;
    let mut watch = watch(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[modbus_ingest]
[[modbus_ingest.buses]]
name = "two-we515"
transport = "rtu"
path = "{}"
[[modbus_ingest.buses.devices]]
name = "house"
slave = 1
profile = "orno-we-515"
poll = {{ fast = 1000, slow = 1000 }}
[[modbus_ingest.buses.devices]]
name = "garage"
slave = 2
profile = "orno-we-514"
poll = {{ fast = 1000, slow = 1000 }}
"#,
            socat.dev().display()
        ),
    )
    .await;
    let got = watch
        .until(Duration::from_secs(15), |g| {
            count(g, "house", "power", "l1") >= 3 && count(g, "garage", "power", "l1") >= 3
        })
        .await;
    svc.stop().await;
    // What was in flight at the stop has arrived by now.
    let mut got = got;
    got.extend(watch.during(Duration::from_millis(500)).await);

    let l1 = got.iter().find(|m| is(m, "house", "power", "l1")).unwrap();
    assert_eq!(l1.quality, Quality::Good);
    assert_eq!(l1.fields["power_w"], -1178.0, "export is negative");
    assert!(
        close(l1.fields["power_factor"], -0.994),
        "leading PF is negative"
    );
    // Published with the meter's decimals, exactly (the payload is parsed back bit for bit).
    assert_eq!(l1.fields["voltage_v"], 231.45);
    assert_eq!(l1.fields["current_a"], 5.123);
    assert_eq!(l1.fields["reactive_power_var"], -120.0);
    let total = got
        .iter()
        .find(|m| is(m, "house", "power", "total"))
        .unwrap();
    assert!(close(total.fields["frequency_hz"], 50.01));
    assert_eq!(total.fields["power_w"], -1178.0);
    let garage = got.iter().find(|m| is(m, "garage", "power", "l1")).unwrap();
    assert_eq!(garage.fields["power_w"], -250.0);
    let energy = got
        .iter()
        .find(|m| is(m, "house", "energy", "total"))
        .unwrap();
    assert_eq!(energy.fields["energy_wh"], 1_234_560.0);
    assert_eq!(energy.fields["reactive_energy_varh"], 7890.0);
    let t2 = got
        .iter()
        .find(|m| {
            m.device.as_str() == "house"
                && m.tags.get(&seg("tariff")).map(Segment::as_str) == Some("t2")
                && m.fields.contains_key("energy_wh")
        })
        .unwrap();
    assert_eq!(t2.fields["energy_wh"], 234_560.0);
    // Stamped when read: within the test's run.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((now_ms - l1.ts_ms).abs() < 30_000);

    // Server side: each poll is exactly the two block reads, in order.
    let seen = seen.lock().unwrap().clone();
    for (slave, device) in [(1u8, "house"), (2, "garage")] {
        let reqs: Vec<(u8, u16, u16)> = seen
            .iter()
            .filter(|r| r.slave == slave)
            .map(|r| (r.function, r.start, r.count))
            .collect();
        let polls = count(&got, device, "power", "l1");
        let pairs = reqs.len() / 2;
        for (i, pair) in reqs.chunks(2).enumerate() {
            assert_eq!(pair[0], (3, 0x0130, 44), "slave {slave} poll {i}: {reqs:?}");
            if let Some(second) = pair.get(1) {
                assert_eq!(*second, (3, 0xA000, 40), "slave {slave} poll {i}");
            }
        }
        // Every complete poll published its reading; at most the poll cut by the stop is
        // left with one request.
        assert_eq!(
            pairs,
            polls,
            "slave {slave}: {} requests, {polls} polls",
            reqs.len()
        );
        assert_eq!(
            counter("wattbus_modbus_timeouts_total", "two-we515", device),
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_switched_off_leaves_the_other_at_its_rate_and_recovers_when_on() {
    let dir = tempfile::tempdir().unwrap();
    let socat = rtu_pty(dir.path());
    let mut peer = Peer::new();
    peer.slave(1, we515_map(500, 123_456))
        .store(false, Ordering::SeqCst);
    let off2 = peer.slave(2, we515_map(600, 200_000));
    off2.store(false, Ordering::SeqCst);
    peer.spawn(socat.sim_file());
    let site = site("off-on");
    let broker = broker().await;
    let mut watch = watch(&broker, &site).await;
    let bus = "off-on";
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[modbus_ingest]
health_interval_ms = 1000
[[modbus_ingest.buses]]
name = "{bus}"
transport = "rtu"
path = "{}"
timeout_ms = 300
[[modbus_ingest.buses.devices]]
name = "keeps"
slave = 1
profile = "orno-we-515"
[[modbus_ingest.buses.devices]]
name = "goes-off"
slave = 2
profile = "orno-we-515"
"#,
            socat.dev().display()
        ),
    )
    .await;
    watch
        .until(Duration::from_secs(10), |g| {
            count(g, "goes-off", "power", "l1") >= 1
        })
        .await;
    off2.store(true, Ordering::SeqCst);
    // Let the switch take effect, then count over 5 s.
    watch.during(Duration::from_millis(1200)).await;
    let window = watch.during(Duration::from_secs(5)).await;
    let kept = count(&window, "keeps", "power", "l1");
    assert!(
        (4..=6).contains(&kept),
        "the answering meter read {kept} times in 5 s"
    );
    assert_eq!(count(&window, "goes-off", "power", "l1"), 0);
    // Backed off: 1 s, 2 s, 4 s … so at most 4 polls of the silent meter in ~6 s, each a
    // request and one retry.
    let timeouts = counter("wattbus_modbus_timeouts_total", bus, "goes-off");
    assert!((2..=10).contains(&timeouts), "{timeouts} timeouts");
    let degraded = window
        .iter()
        .rfind(|m| is(m, "goes-off", "modbus_device", "health"))
        .unwrap();
    assert_eq!(degraded.fields["degraded"], 1.0);
    assert!(degraded.fields["timeouts"] >= 2.0);

    off2.store(false, Ordering::SeqCst);
    let back = watch
        .until(Duration::from_secs(15), |g| {
            count(g, "goes-off", "power", "l1") >= 1
                && g.iter().any(|m| {
                    is(m, "goes-off", "modbus_device", "health") && m.fields["degraded"] == 0.0
                })
        })
        .await;
    let reading = back
        .iter()
        .find(|m| is(m, "goes-off", "power", "l1"))
        .unwrap();
    assert_eq!(reading.fields["power_w"], -600.0);
    let health = back
        .iter()
        .rfind(|m| is(m, bus, "modbus_bus", "health"))
        .unwrap();
    assert!(health.fields["requests"] > 0.0);
    assert!(health.fields["errors"] >= 2.0);
    assert!(health.fields.contains_key("utilisation"));
    svc.stop().await;
}

/// A profile whose one measurement needs two requests (`max_hole = 0`), so a failed request
/// shows as a reading with quality `error` and only the fields that were read.
const SPLIT_PROFILE: &str = r#"
[meter]
model = "split-meter"
vendor = "Test"
name = "A meter read in two requests"
source = "this test"

[defaults]
function = "holding"
poll = "fast"

[limits]
max_hole = 0

[poll_ms]
fast = 500

[[registers]]
address = 0x0000
type = "u16"
scale = 0.1
unit = "V"
measurement = "power"
channel = "l1"
field = "voltage_v"

[[registers]]
address = 0x0100
type = "i32"
unit = "W"
measurement = "power"
channel = "l1"
field = "power_w"
"#;

/// Runs the split meter at slave 7 behind a scripted peer: `script` replaces the first
/// answers. Returns the service, the watch and the dir (keep alive).
#[allow(clippy::type_complexity)]
async fn hostile(
    name: &str,
    script: Vec<Reply>,
) -> (
    TestBroker,
    TestService<modbus_ingest::Error>,
    Watch<Measurement>,
    Socat,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("split.toml"), SPLIT_PROFILE).unwrap();
    let socat = rtu_pty(dir.path());
    let mut peer = Peer::new();
    let mut map = BTreeMap::new();
    map.insert(0x0000, 2301); // 230.1 V
    map.insert(0x0100, 0xFFFF);
    map.insert(0x0101, 0xFC18); // -1000 W
    peer.slave(7, map).store(false, Ordering::SeqCst);
    peer.script.lock().unwrap().extend(script);
    peer.spawn(socat.sim_file());
    let site = site(name);
    let broker = broker().await;
    let watch = watch(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[modbus_ingest]
profiles_dir = "{}"
health_interval_ms = 1000
[[modbus_ingest.buses]]
name = "{name}"
transport = "rtu"
path = "{}"
timeout_ms = 200
retries = 1
[[modbus_ingest.buses.devices]]
name = "meter"
slave = 7
profile = "split-meter"
"#,
            dir.path().display(),
            socat.dev().display()
        ),
    )
    .await;
    (broker, svc, watch, socat, dir)
}

fn good(m: &Measurement) -> bool {
    is(m, "meter", "power", "l1")
        && m.quality == Quality::Good
        && close(m.fields["voltage_v"], 230.1)
        && m.fields["power_w"] == -1000.0
}

/// The valid answer to the split meter's second request, for building hostile variants.
fn power_answer(slave: u8) -> Vec<u8> {
    let req = Req {
        slave,
        function: 3,
        start: 0x0100,
        count: 2,
    };
    good_answer(req, &[0xFFFF, 0xFC18])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_is_counted_and_the_reading_carries_quality_error() {
    let name = "hostile-exception";
    let (_broker, svc, mut watch, _s, _d) =
        hostile(name, vec![Reply::Good, Reply::Exception(2)]).await;
    let got = watch
        .until(Duration::from_secs(10), |g| g.iter().any(good))
        .await;
    let first = got.iter().find(|m| is(m, "meter", "power", "l1")).unwrap();
    assert_eq!(first.quality, Quality::Error);
    assert_eq!(
        first.fields.len(),
        1,
        "only what was read: {:?}",
        first.fields
    );
    assert!(close(first.fields["voltage_v"], 230.1));
    let by_code = wattbus_testkit::counter(
        "wattbus_modbus_exceptions_total",
        &[("bus", name), ("device", "meter"), ("code", "02")],
    );
    assert_eq!(by_code, 1);
    // The device answered: no retry, no backoff.
    assert_eq!(counter("wattbus_modbus_retries_total", name, "meter"), 0);
    svc.stop().await;
}

async fn garbled_then_good(name: &str, bad: Vec<u8>, counter_name: &'static str) {
    let (_broker, svc, mut watch, _s, _d) = hostile(name, vec![Reply::Good, Reply::Raw(bad)]).await;
    let got = watch
        .until(Duration::from_secs(10), |g| g.iter().any(good))
        .await;
    assert_eq!(counter(counter_name, name, "meter"), 1, "{counter_name}");
    // The retry got the good answer: the first poll's reading is complete, nothing invented.
    let first = got.iter().find(|m| is(m, "meter", "power", "l1")).unwrap();
    assert!(good(first), "{first:?}");
    assert_eq!(counter("wattbus_modbus_retries_total", name, "meter"), 1);
    assert_eq!(counter("wattbus_modbus_timeouts_total", name, "meter"), 0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_frame_is_counted_and_the_retry_is_published() {
    let mut bad = power_answer(7);
    bad.truncate(5);
    garbled_then_good("hostile-short", bad, "wattbus_modbus_crc_errors_total").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_crc_is_counted_and_the_retry_is_published() {
    let mut bad = power_answer(7);
    let last = bad.len() - 1;
    bad[last] ^= 0x5A;
    garbled_then_good("hostile-crc", bad, "wattbus_modbus_crc_errors_total").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_another_slave_is_counted_and_the_retry_is_published() {
    garbled_then_good(
        "hostile-slave",
        power_answer(9),
        "wattbus_modbus_wrong_slave_total",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_retries_degrades_and_recovers() {
    let name = "hostile-silent";
    // Two polls' worth of silence: each a request and its retry.
    let (_broker, svc, mut watch, _s, _d) = hostile(name, vec![Reply::Silent; 4]).await;
    let got = watch
        .until(Duration::from_secs(15), |g| g.iter().any(good))
        .await;
    assert_eq!(counter("wattbus_modbus_timeouts_total", name, "meter"), 4);
    assert_eq!(counter("wattbus_modbus_retries_total", name, "meter"), 2);
    // Nothing was published for the silent polls (no value is invented).
    let first = got.iter().find(|m| is(m, "meter", "power", "l1")).unwrap();
    assert!(good(first), "{first:?}");
    // It was degraded while silent, and health says so.
    let health: Vec<&Measurement> = got
        .iter()
        .filter(|m| is(m, "meter", "modbus_device", "health"))
        .collect();
    assert!(
        health.iter().any(|m| m.fields["degraded"] == 1.0),
        "{health:?}"
    );
    let more = watch
        .until(Duration::from_secs(5), |g| {
            g.iter()
                .any(|m| is(m, "meter", "modbus_device", "health") && m.fields["degraded"] == 0.0)
        })
        .await;
    assert!(more.iter().any(|m| m.fields.get("timeouts") == Some(&4.0)));
    svc.stop().await;
}
