//! serial-ingest against real virtual serial ports and a real broker.
//!
//! Each test makes PTY pairs with socat (`dev` is the service's end, `sim` the device's) and
//! plays the Arduino on the `sim` end, byte for byte as docs/serial-protocols.md says. The
//! broker is wattbus's own, started in the test (wattbus-testkit's `TestBroker`): serial-ingest
//! logs in as the producer it is in a deployment, and the test watches as a reader.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{Filter, Measurement, Quality, RawFrame, Segment};
use runtime::ConfigSource;

use wattbus_testkit::{
    Role, ServiceBuilder, Socat, TestBroker, TestService, Watch, eventually, site,
};

/// A broker of the test's own, with serial-ingest's user as a deployment has it.
async fn broker() -> TestBroker {
    TestBroker::start(&[("serial-ingest", Role::Producer)]).await
}

/// serial-ingest with the `[serial_ingest]` section `toml_text`, logged in as its own user.
async fn start(
    broker: &TestBroker,
    site: &Segment,
    toml_text: &str,
) -> TestService<serial_ingest::Error> {
    let plan = ConfigSource::from_parts(None, Some(toml_text))
        .unwrap()
        .resolve::<serial_ingest::SerialIngest>()
        .unwrap();
    ServiceBuilder::new(
        broker.bus("serial-ingest"),
        site,
        serial_ingest::identity(&plan),
    )
    .start(async move |bus, ctx| serial_ingest::run_on(&bus, &plan, &ctx).await)
    .await
}

async fn measurements(broker: &TestBroker, site: &Segment) -> Watch<Measurement> {
    Watch::new(broker, site, &Filter::measurements(Some(site), None)).await
}

fn counter(name: &'static str, port: &str, device: &str) -> u64 {
    wattbus_testkit::counter(name, &[("port", port), ("device", device)])
}

/// Polls `cond` until it holds, failing the test with `what` after `wait`.
async fn expect(what: &str, wait: Duration, mut cond: impl FnMut() -> bool) {
    assert!(
        eventually(wait, async || cond()).await,
        "not within {wait:?}: {what}"
    );
}

/// A PowMon sketch: answers each `read` line with the next of `answers`, and records every
/// line the Pi sent. Ends when the port goes away.
fn powmon_device(port: std::fs::File, answers: Vec<&'static str>) -> Arc<Mutex<Vec<Vec<u8>>>> {
    slow_powmon_device(port, answers, Duration::ZERO)
}

/// A PowMon sketch that takes `delay` to answer.
fn slow_powmon_device(
    mut port: std::fs::File,
    answers: Vec<&'static str>,
    delay: Duration,
) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let polls = Arc::new(Mutex::new(Vec::new()));
    let seen = polls.clone();
    std::thread::spawn(move || {
        let mut pending = Vec::new();
        let mut buf = [0u8; 256];
        let mut i = 0;
        while let Ok(n) = port.read(&mut buf) {
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let is_read = line.split(|&b| b == b' ').next() == Some(b"read");
                seen.lock().unwrap().push(line);
                if is_read && !answers.is_empty() {
                    std::thread::sleep(delay);
                    let a = answers[i % answers.len()];
                    i += 1;
                    if port.write_all(a.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    polls
}

/// A sensor sketch printing `<key>=<n>` every `period` until `stop` or the port goes away.
fn ticking_sensor(
    mut port: std::fs::File,
    key: &'static str,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if port.write_all(format!("{key}={n}\r\n").as_bytes()).is_err() {
                return;
            }
            n += 1;
            std::thread::sleep(period);
        }
    })
}

fn field(m: &Measurement, f: &str) -> f64 {
    *m.fields
        .get(f)
        .unwrap_or_else(|| panic!("no field {f} in {m:?}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powmon_answers_become_current_and_power_with_saturation_flagged_not_zeroed() {
    let site = site("powmon");
    let dir = tempfile::tempdir().unwrap();
    let pty = Socat::start(dir.path(), "powmon");
    let polls = powmon_device(pty.sim_file(), vec!["600,512\r\n", "700,400\r\n"]);
    let broker = broker().await;
    let mut watch = measurements(&broker, &site).await;
    let started = proto::now_ms();
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "{}"
device = "powmon"
protocol = "request-response"
poll_interval_ms = 100
response_timeout_ms = 80

[[serial_ingest.ports.channels]]
name = "ct1"

[[serial_ingest.ports.channels]]
name = "ct2"
sensitivity_v_per_a = 0.100
supply_v = 120.0
"#,
            pty.dev_str()
        ),
    )
    .await;
    let got = watch
        .until_with_topics(Duration::from_secs(10), |ms| {
            let seen = |ch: &str, raw: f64| {
                ms.iter()
                    .any(|m| m.channel.as_str() == ch && m.fields.get("adc_counts") == Some(&raw))
            };
            seen("ct1", 600.0) && seen("ct1", 700.0) && seen("ct2", 400.0)
        })
        .await;
    assert!(svc.health().is_ready(), "serial-ingest reports ready");
    let find = |ch: &str, raw: f64| {
        got.iter()
            .find(|(_, m)| m.channel.as_str() == ch && m.fields.get("adc_counts") == Some(&raw))
            .unwrap()
    };
    let (topic, m) = find("ct1", 600.0);
    assert_eq!(topic, &format!("wattbus/v1/{site}/meas/powmon/ct1"));
    assert_eq!(m.measurement.as_str(), "current");
    assert_eq!(m.quality, Quality::Good);
    assert!(close(field(m, "current_a"), 6.510416), "{m:?}");
    assert!(close(field(m, "power_w"), 1497.395), "{m:?}");
    assert_eq!(field(m, "sensor_v"), 0.4296875);
    assert!(
        m.ts_ms >= started && m.ts_ms <= proto::now_ms(),
        "stamped when read"
    );
    // 700 saturates an ACS712-30A read with max_amps 10: kept as read, flagged.
    let (_, m) = find("ct1", 700.0);
    assert_eq!(m.quality, Quality::OutOfRange);
    assert!(close(field(m, "current_a"), 13.908617), "{m:?}");
    assert!(close(field(m, "power_w"), 3198.982), "{m:?}");
    // ct2 has its own calibration: (400 × 5/1024 − 2.5) / 0.1 = −5.46875 A at 120 V.
    let (_, m) = find("ct2", 400.0);
    assert!(close(field(m, "current_a"), -5.46875), "{m:?}");
    assert!(close(field(m, "power_w"), -656.25), "{m:?}");
    assert_eq!(m.quality, Quality::Good);
    // Both channels of one answer share the answer's read time.
    let (_, a) = find("ct1", 600.0);
    assert!(
        got.iter()
            .any(|(_, m)| m.channel.as_str() == "ct2" && m.ts_ms == a.ts_ms)
    );
    // The poll is the six bytes `read \n`, nothing else.
    let polls = polls.lock().unwrap().clone();
    assert!(polls.len() >= 2);
    assert!(polls.iter().all(|p| p == b"read \n"), "{polls:?}");
    svc.stop().await;
}

/// A stream sketch's line: `<seq>:<values>*<XOR>`.
fn stream_line(seq: u16, values: &[i32]) -> String {
    let body = format!(
        "{seq}:{}",
        values
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let cs = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("{body}*{cs:02X}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_frames_abut_carry_scaled_samples_and_split_at_a_sequence_gap() {
    let site = site("stream");
    let dir = tempfile::tempdir().unwrap();
    let pty = Socat::start(dir.path(), "prime");
    let broker = broker().await;
    let mut watch = Watch::new(&broker, &site, &Filter::raw(Some(&site), None)).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "{}"
device = "prime"
protocol = "stream"
sample_rate_hz = 1000.0
frame_ms = 100

[[serial_ingest.ports.channels]]
name = "ct1"
unit = "a"
scale = 0.5

[[serial_ingest.ports.channels]]
name = "mains"
unit = "v"
scale = 2.0
"#,
            pty.dev_str()
        ),
    )
    .await;
    let mut sim = pty.sim_file();
    // Give the service a moment to open its end, so the first lines are not lost to the
    // open (a real device streams before and after; the test wants the frames exact).
    expect("the port is opened", Duration::from_secs(5), || {
        counter("wattbus_serial_lines_total", &pty.dev_str(), "prime") > 0 || {
            // Nothing sent yet; opening is observable by the absence of open errors only, so
            // send a banner, which counts as a line read.
            let _ = sim.write_all(b"# wattbus-stream rate=1000 channels=2\r\n");
            false
        }
    })
    .await;
    // 10 instants (10 ms at 1 kHz) per line, paced like the device: seq 0..=24, then lines
    // 25 and 26 lost, then 27..=46. Instant n carries ct1 = n, mains = 1000 + n.
    let writer = std::thread::spawn(move || {
        let t0 = Instant::now();
        for seq in 0u16..=46 {
            let due = t0 + Duration::from_millis(10 * (u64::from(seq) + 1));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if seq == 25 || seq == 26 {
                continue;
            }
            let values: Vec<i32> = (0..10)
                .flat_map(|i| {
                    let n = i32::from(seq) * 10 + i;
                    [n, 1000 + n]
                })
                .collect();
            sim.write_all(stream_line(seq, &values).as_bytes()).unwrap();
        }
        sim
    });
    let got = watch
        .until_with_topics(Duration::from_secs(10), |fs| {
            fs.iter()
                .map(|f| f.channels[0].samples.len())
                .sum::<usize>()
                >= 450
        })
        .await;
    let _sim = writer.join().unwrap();
    let frames: Vec<&RawFrame> = got.iter().map(|(_, f)| f).collect();
    assert_eq!(
        got[0].0,
        format!("wattbus/v1/{site}/raw/prime"),
        "published on raw/<device>"
    );
    let lens: Vec<usize> = frames.iter().map(|f| f.channels[0].samples.len()).collect();
    assert_eq!(
        lens,
        vec![100, 100, 50, 100, 100],
        "the frame in progress at the gap is closed short"
    );
    for f in &frames {
        assert_eq!(f.sample_rate_hz, 1000.0);
        assert_eq!(f.channels[0].channel.as_str(), "ct1");
        assert_eq!(f.channels[0].unit.as_str(), "a");
        assert_eq!(f.channels[1].unit.as_str(), "v");
    }
    // Samples × scale, DC offset left in; instants 0..250 then 270..470.
    let ct1: Vec<f32> = frames
        .iter()
        .flat_map(|f| f.channels[0].samples.clone())
        .collect();
    let mains: Vec<f32> = frames
        .iter()
        .flat_map(|f| f.channels[1].samples.clone())
        .collect();
    let instants: Vec<i32> = (0..250).chain(270..470).collect();
    assert_eq!(
        ct1,
        instants.iter().map(|&n| n as f32 * 0.5).collect::<Vec<_>>()
    );
    assert_eq!(
        mains,
        instants
            .iter()
            .map(|&n| (1000 + n) as f32 * 2.0)
            .collect::<Vec<_>>()
    );
    // Within a run, frames abut exactly: start + n/rate = next start.
    for pair in [(0, 1), (1, 2), (3, 4)] {
        let (a, b) = (frames[pair.0], frames[pair.1]);
        assert_eq!(
            a.start_ts_us + a.channels[0].samples.len() as i64 * 1000,
            b.start_ts_us,
            "frames {pair:?}"
        );
    }
    // After the gap the new run is stamped from its read time: later than the end of the
    // short frame by about the 20 ms lost, never continued over the hole.
    let gap_end = frames[2].start_ts_us + 50_000;
    assert!(
        frames[3].start_ts_us > gap_end,
        "{} vs {gap_end}",
        frames[3].start_ts_us
    );
    assert_eq!(
        counter("wattbus_serial_lost_lines_total", &pty.dev_str(), "prime"),
        2
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_counted_and_skipped_and_good_lines_after_it_are_published() {
    let site = site("hostile");
    let dir = tempfile::tempdir().unwrap();
    let sensors = Socat::start(dir.path(), "sensors");
    let mute = Socat::start(dir.path(), "mute");
    // A PowMon that reads the polls and never answers.
    let mute_polls = powmon_device(mute.sim_file(), vec![]);
    let broker = broker().await;
    let mut watch = measurements(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "{}"
device = "sensors"
protocol = "lines"
max_line_bytes = 256
channels = [
  {{ key = "fridge", measurement = "temperature", field = "temperature_c", min = -30.0, max = 15.0 }},
  {{ key = "h1", channel = "room", measurement = "humidity", field = "humidity_pct", scale = 0.1 }},
]

[[serial_ingest.ports]]
path = "{}"
device = "mute"
protocol = "request-response"
poll_interval_ms = 60
response_timeout_ms = 40
max_silent_polls = 2
reopen_min_ms = 50
reopen_max_ms = 100
"#,
            sensors.dev_str(),
            mute.dev_str()
        ),
    )
    .await;
    let port = sensors.dev_str();
    let mut sim = sensors.sim_file();
    // Wait until the service reads this port (a line before the open could be lost).
    expect("the lines port is read", Duration::from_secs(5), || {
        let _ = sim.write_all(b"# hello\n");
        counter("wattbus_serial_lines_total", &port, "sensors") > 0
    })
    .await;
    let mut rng = fastrand::Rng::with_seed(20_251_126);
    let noise: Vec<u8> = (0..3000).map(|_| rng.u8(..)).collect();
    sim.write_all(&noise).unwrap();
    sim.write_all(b"\n").unwrap();
    sim.write_all(&[b'x'; 5000]).unwrap();
    sim.write_all(b"\n").unwrap();
    for bad in [
        "temp=nan\n",
        "fridge=NaN\n",
        "fridge=inf\n",
        "fridge=0x1A\n",
        "fridge=4.5C\n",
    ] {
        sim.write_all(bad.as_bytes()).unwrap();
    }
    sim.write_all(b"fridge=4.5 unknown=3\r\n").unwrap();
    sim.write_all(b"h1=480,fridge=20\r\n").unwrap();
    let got = watch
        .until(Duration::from_secs(10), |ms| {
            ms.iter().filter(|m| m.device.as_str() == "sensors").count() >= 3
        })
        .await;
    let sensors_got: Vec<&Measurement> = got
        .iter()
        .filter(|m| m.device.as_str() == "sensors")
        .collect();
    let summary: Vec<(String, String, f64, Quality)> = sensors_got
        .iter()
        .map(|m| {
            let (f, v) = m.fields.iter().next().unwrap();
            (m.channel.to_string(), f.clone(), *v, m.quality)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("fridge".into(), "temperature_c".into(), 4.5, Quality::Good),
            ("room".into(), "humidity_pct".into(), 48.0, Quality::Good),
            (
                "fridge".into(),
                "temperature_c".into(),
                20.0,
                Quality::OutOfRange
            ),
        ],
        "only the good lines are published, nothing from the noise"
    );
    assert_eq!(sensors_got[1].measurement.as_str(), "humidity");
    let garbled = counter("wattbus_serial_garbled_lines_total", &port, "sensors");
    assert!(
        garbled >= 5,
        "nan, NaN, inf, hex and 4.5C garbled: {garbled}"
    );
    assert!(counter("wattbus_serial_overlong_lines_total", &port, "sensors") >= 1);
    assert_eq!(
        counter("wattbus_serial_unknown_keys_total", &port, "sensors"),
        1
    );
    // The PowMon that never answers: timeouts counted, port reopened, polls keep coming.
    let mp = mute.dev_str();
    expect(
        "the mute port times out and is reopened",
        Duration::from_secs(10),
        || {
            counter("wattbus_serial_timeouts_total", &mp, "mute") >= 4
                && counter("wattbus_serial_port_reopens_total", &mp, "mute") >= 1
        },
    )
    .await;
    assert!(mute_polls.lock().unwrap().len() >= 4);
    // And the service is still reading the other port.
    sim.write_all(b"fridge=3.25\n").unwrap();
    let m = watch
        .until(Duration::from_secs(5), |ms| !ms.is_empty())
        .await
        .into_iter()
        .find(|m| m.device.as_str() == "sensors")
        .expect("a reading from the sensors port");
    assert_eq!(m.fields.get("temperature_c"), Some(&3.25));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_port_is_reopened_and_the_other_port_never_stops() {
    let site = site("unplug");
    let dir = tempfile::tempdir().unwrap();
    let mut a = Socat::start(dir.path(), "a");
    let b = Socat::start(dir.path(), "b");
    let stop = Arc::new(AtomicBool::new(false));
    let period = Duration::from_millis(20);
    let ta = ticking_sensor(a.sim_file(), "x", period, stop.clone());
    let tb = ticking_sensor(b.sim_file(), "y", period, stop.clone());
    let broker = broker().await;
    let mut watch = measurements(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "{}"
device = "a"
protocol = "lines"
reopen_min_ms = 50
reopen_max_ms = 200

[[serial_ingest.ports]]
path = "{}"
device = "b"
protocol = "lines"
"#,
            a.dev_str(),
            b.dev_str()
        ),
    )
    .await;
    let from = |ms: &[Measurement], d: &str| ms.iter().filter(|m| m.device.as_str() == d).count();
    watch
        .until(Duration::from_secs(10), |ms| {
            from(ms, "a") >= 3 && from(ms, "b") >= 3
        })
        .await;
    // Unplug a.
    a.kill();
    let _ = ta.join();
    let unplugged = proto::now_ms();
    let port_a = a.dev_str();
    expect("the loss of a is noticed", Duration::from_secs(5), || {
        counter("wattbus_serial_port_errors_total", &port_a, "a") >= 1
    })
    .await;
    // b goes on meanwhile: a second of readings, every one at its pace.
    let during = watch
        .until(Duration::from_secs(5), |ms| {
            ms.iter()
                .filter(|m| m.device.as_str() == "b" && m.ts_ms > unplugged + 1000)
                .count()
                >= 1
        })
        .await;
    let b_during: Vec<i64> = during
        .iter()
        .filter(|m| m.device.as_str() == "b" && m.ts_ms > unplugged)
        .map(|m| m.ts_ms)
        .collect();
    assert!(
        b_during.len() >= 20,
        "b kept publishing while a was gone: {} readings",
        b_during.len()
    );
    assert!(
        b_during.windows(2).all(|w| w[1] - w[0] < 500),
        "no stall in b's readings: {b_during:?}"
    );
    // Plug a back in (same path, new PTY).
    let a2 = Socat::start(dir.path(), "a");
    let ta2 = ticking_sensor(a2.sim_file(), "x", period, stop.clone());
    let replugged = proto::now_ms();
    watch
        .until(Duration::from_secs(10), |ms| {
            ms.iter()
                .any(|m| m.device.as_str() == "a" && m.ts_ms > replugged)
        })
        .await;
    assert!(counter("wattbus_serial_port_reopens_total", &port_a, "a") >= 1);
    stop.store(true, Ordering::Relaxed);
    let _ = ta2.join();
    let _ = tb.join();
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_never_taken_for_the_next_polls_answer() {
    let dir = tempfile::tempdir().unwrap();
    let late = Socat::start(dir.path(), "late");
    let prompt = Socat::start(dir.path(), "prompt");
    // Answers 120 ms after each poll; the service waits 50 ms.
    let late_polls =
        slow_powmon_device(late.sim_file(), vec!["600\r\n"], Duration::from_millis(120));
    powmon_device(prompt.sim_file(), vec!["520\r\n"]);
    late_answers_are_dropped("late", &late.dev_str(), &prompt.dev_str()).await;
    assert!(late_polls.lock().unwrap().len() >= 4);
}

/// A device at `late` answering 600 after each poll's timeout and one at `prompt` answering
/// 520 at once: only the prompt one's readings are published, and the late answers are
/// counted as timeouts and unsolicited lines.
async fn late_answers_are_dropped(name: &str, late: &str, prompt: &str) {
    let site = site(name);
    let broker = broker().await;
    let mut watch = measurements(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "{late}"
device = "late"
protocol = "request-response"
poll_interval_ms = 200
response_timeout_ms = 50
max_silent_polls = 1000

[[serial_ingest.ports]]
path = "{prompt}"
device = "prompt"
protocol = "request-response"
poll_interval_ms = 100
response_timeout_ms = 50
"#
        ),
    )
    .await;
    let got = watch
        .until(Duration::from_secs(10), |ms| {
            ms.iter().filter(|m| m.device.as_str() == "prompt").count() >= 12
        })
        .await;
    // About 1.2 s: six polls of the late device, each answered after its timeout.
    assert!(
        got.iter().all(|m| m.device.as_str() == "prompt"),
        "a late answer was published"
    );
    assert!(
        got.iter()
            .all(|m| m.fields.get("adc_counts") == Some(&520.0))
    );
    expect(
        "late answers counted as timeouts and unsolicited lines",
        Duration::from_secs(10),
        || {
            counter("wattbus_serial_timeouts_total", late, "late") >= 4
                && counter("wattbus_serial_unsolicited_lines_total", late, "late") >= 3
        },
    )
    .await;
    svc.stop().await;
}

/// Lines that arrive in one read (a USB adapter delivers bytes in bursts) must not share a
/// timestamp: a sink keys a reading by series and time, and InfluxDB kept one of ten such
/// lines (fourth hostile review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_read_together_get_distinct_times_so_none_overwrites_another() {
    let site = site("burst");
    let dir = tempfile::tempdir().unwrap();
    let sensors = Socat::start(dir.path(), "burst");
    let broker = broker().await;
    let mut watch = measurements(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "{}"
device = "fridge-mon"
protocol = "lines"
channels = [
  {{ key = "fridge", measurement = "temperature", field = "temperature_c" }},
]
"#,
            sensors.dev_str()
        ),
    )
    .await;
    let port = sensors.dev_str();
    let mut sim = sensors.sim_file();
    expect("the lines port is read", Duration::from_secs(5), || {
        let _ = sim.write_all(b"# hello\n");
        counter("wattbus_serial_lines_total", &port, "fridge-mon") > 0
    })
    .await;
    let burst: String = (0..10).map(|i| format!("fridge={i}.5\n")).collect();
    sim.write_all(burst.as_bytes()).unwrap();
    let got = watch
        .until(Duration::from_secs(10), |ms| {
            ms.iter()
                .filter(|m| m.device.as_str() == "fridge-mon")
                .count()
                >= 10
        })
        .await;
    let times: Vec<i64> = got
        .iter()
        .filter(|m| m.device.as_str() == "fridge-mon")
        .map(|m| m.ts_ms)
        .collect();
    assert_eq!(times.len(), 10, "{times:?}");
    assert!(
        times.windows(2).all(|w| w[1] > w[0]),
        "each line its own, increasing time: {times:?}"
    );
    svc.stop().await;
}

/// A port behind a serial device server (`tcp://host:port`, as ser2net in raw mode serves
/// one): polled and converted as a local port is; when the server drops the connection (it
/// restarted, the Wi-Fi went), the port is reopened and readings go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_behind_a_serial_device_server_is_polled_and_reconnected() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let site = site("tcp-serial");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(0u32));
    let polls = Arc::new(Mutex::new(Vec::<String>::new()));
    let (seen_conn, seen_polls) = (connections.clone(), polls.clone());
    // The server answers three polls per connection, then hangs up.
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let n = {
                let mut c = seen_conn.lock().unwrap();
                *c += 1;
                *c
            };
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            for _ in 0..3 {
                let Ok(Some(line)) = lines.next_line().await else {
                    break;
                };
                seen_polls.lock().unwrap().push(line);
                let answer = format!("{},512\r\n", 600 + n);
                if write.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    let broker = broker().await;
    let mut watch = measurements(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[[serial_ingest.ports]]
path = "tcp://{addr}"
device = "powmon"
protocol = "request-response"
poll_interval_ms = 100
response_timeout_ms = 90
reopen_min_ms = 50
reopen_max_ms = 200
channels = [{{ name = "ct1" }}, {{ name = "ct2" }}]
"#
        ),
    )
    .await;
    // Answers of the first three connections: each reconnect was made and polled.
    let got = watch
        .until(Duration::from_secs(20), |ms| {
            (601..=603).all(|raw| {
                ms.iter().any(|m| {
                    m.channel.as_str() == "ct1"
                        && m.fields.get("adc_counts") == Some(&f64::from(raw))
                })
            })
        })
        .await;
    let m = got
        .iter()
        .find(|m| m.channel.as_str() == "ct1" && m.fields.get("adc_counts") == Some(&601.0))
        .unwrap();
    // The doc's conversion: (601 × 5/1024 − 2.5) / 0.066 A.
    assert!(
        close(field(m, "current_a"), (601.0 * 5.0 / 1024.0 - 2.5) / 0.066),
        "{m:?}"
    );
    assert_eq!(m.quality, Quality::Good);
    assert!(*connections.lock().unwrap() >= 3);
    // Over TCP the poll is still exactly `read \n`, nothing else.
    let polls = polls.lock().unwrap().clone();
    assert!(polls.iter().all(|p| p == "read "), "{polls:?}");
    assert!(
        counter(
            "wattbus_serial_port_errors_total",
            &format!("tcp://{addr}"),
            "powmon"
        ) >= 2,
        "each hang-up is counted as a lost port"
    );
    svc.stop().await;
}

/// A PowMon behind a serial device server that answers each poll `delay` after it.
async fn tcp_powmon(answer: &'static str, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(_poll)) = lines.next_line().await {
                tokio::time::sleep(delay).await;
                if write.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    addr
}

/// Over TCP as over a local port, an answer that comes after its timeout is never published,
/// neither as that poll's nor as the next one's (the input is cleared before each poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_over_tcp_is_never_taken_for_the_next_polls_answer() {
    let late = tcp_powmon("600\r\n", Duration::from_millis(120)).await;
    let prompt = tcp_powmon("520\r\n", Duration::ZERO).await;
    late_answers_are_dropped(
        "tcp-late",
        &format!("tcp://{late}"),
        &format!("tcp://{prompt}"),
    )
    .await;
}
