//! rms-processor's `run_on` against a real broker (wattbus's own, started in the test): frames
//! in through a producer's journal, measurements out through the processor's, as in
//! production. Every client logs in as a deployment's would: the processor as the `processor`
//! user `rms-processor` (its sink group), the frame sources as producers, the sink that stores
//! the readings as the sink group `test-sink`, and observers as a reader.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{Ack, DeadLetter, Filter, Measurement, Origin, RawChannel, RawFrame, Segment, Topic};
use runtime::Health;
use runtime::bus::Bus;
use runtime::config::{JournalKind, StreamConfig};
use runtime::delivery::{Producer, journal_dir};
use runtime::shutdown::ShutdownTrigger;
use tokio::task::JoinHandle;
use wattbus_testkit::{
    Role, ServiceBuilder, Sink, TestBroker, TestService, Watch, counter, eventually, seg, site,
};

use rms_processor::config::{Config, RmsChannelConfig};

const T0_US: i64 = 1_764_000_000_000_000;
const RATE: f64 = 2000.0;

/// The processor's broker user: its sink group, which the producers' `raw` streams wait for.
/// Its instances' client ids start with it (`rms-processor-a`), as the broker requires.
const USER: &str = "rms-processor";
/// The sink group that stores the processor's readings, which its `meas` stream waits for.
const SINK: &str = "test-sink";

/// A broker of the test's own: the processor, the sink, and producers of frames: `frames`
/// (the honest one), `forger` (another producer's frames for the same device), `bare` (frames
/// without an origin) and `hand` (hand-made frames with one).
async fn broker() -> TestBroker {
    TestBroker::start(&[
        (USER, Role::Processor),
        (SINK, Role::Sink),
        ("frames", Role::Producer),
        ("forger", Role::Producer),
        ("bare", Role::Producer),
        ("hand", Role::Producer),
    ])
    .await
}

/// `rms` × √2 × sin at 50 Hz plus a 3rd harmonic of `h3` and an offset, sampled at `rate`
/// from sample index `from`.
fn wave_at(
    rate: f64,
    from: usize,
    n: usize,
    rms: f64,
    phase: f64,
    offset: f64,
    h3: f64,
) -> Vec<f32> {
    (from..from + n)
        .map(|i| {
            let t = i as f64 / rate;
            let a = rms * 2f64.sqrt();
            (a * (2.0 * PI * 50.0 * t + phase).sin()
                + h3 * a * (3.0 * 2.0 * PI * 50.0 * t + phase).sin()
                + offset) as f32
        })
        .collect()
}

fn wave(from: usize, n: usize, rms: f64, phase: f64, offset: f64, h3: f64) -> Vec<f32> {
    wave_at(RATE, from, n, rms, phase, offset, h3)
}

fn channel(name: &str, unit: &str, samples: Vec<f32>) -> RawChannel {
    RawChannel {
        channel: seg(name),
        unit: seg(unit),
        samples,
    }
}

/// A frame of device `device` holding samples `from..from+n`: ct1 (5 A fundamental + 20% 3rd,
/// lagging 36.87°: PF 0.8 against a pure voltage), ct2 (2 A on a 512-count offset, no
/// voltage), v1 (230 V).
fn frame(site: &Segment, device: &str, from: usize, n: usize) -> RawFrame {
    let phi = -(0.8f64).acos();
    RawFrame {
        origin: None,
        site: site.clone(),
        device: seg(device),
        start_ts_us: T0_US + (from as f64 * 1e6 / RATE) as i64,
        sample_rate_hz: RATE,
        continues: from > 0,
        channels: vec![
            channel("ct1", "a", wave(from, n, 5.0, phi, 0.0, 0.2)),
            channel("ct2", "adc", wave(from, n, 20.0, 0.0, 512.0, 0.0)),
            channel("v1", "v", wave(from, n, 230.0, 0.0, 0.0, 0.0)),
        ],
    }
}

/// A frame of a device whose current is its own: ct1 carries `amps` of fundamental plus 20%
/// 3rd harmonic, lagging v1 (230 V) by 36.87°, from sample `from` of a stream that started at
/// `t0_us`. Its RMS current is `amps`·√1.04 and its power `amps`·230·0.8, so a reading
/// labelled with another device shows at once.
fn ct_frame(
    site: &Segment,
    device: &str,
    t0_us: i64,
    from: usize,
    n: usize,
    amps: f64,
) -> RawFrame {
    let phi = -(0.8f64).acos();
    RawFrame {
        origin: None,
        site: site.clone(),
        device: seg(device),
        start_ts_us: t0_us + (from as f64 * 1e6 / RATE) as i64,
        sample_rate_hz: RATE,
        continues: from > 0,
        channels: vec![
            channel("ct1", "a", wave(from, n, amps, phi, 0.0, 0.2)),
            channel("v1", "v", wave(from, n, 230.0, 0.0, 0.0, 0.0)),
        ],
    }
}

fn ct_current(amps: f64) -> f64 {
    amps * 1.04f64.sqrt()
}

fn ct_power(amps: f64) -> f64 {
    amps * 230.0 * 0.8
}

/// `instance`: the client id (and `origin.producer` of its readings), `rms-processor-<x>`.
/// `partition`: the devices this instance owns (empty: all); `calibrated`: devices whose ct1
/// pairs with v1 and ct2 has scale 0.1.
fn config_for(instance: &str, partition: &[&str], calibrated: &[&str]) -> Config {
    let mut channels = Vec::new();
    for d in calibrated {
        channels.push(RmsChannelConfig {
            device: seg(d),
            channel: seg("ct1"),
            scale: 1.0,
            voltage: Some(seg("v1")),
            phase_shift: 0.0,
            nominal_voltage_v: None,
        });
        channels.push(RmsChannelConfig {
            device: seg(d),
            channel: seg("ct2"),
            scale: 0.1, // 20 counts RMS → 2 A
            voltage: None,
            phase_shift: 0.0,
            nominal_voltage_v: None,
        });
    }
    Config {
        instance: seg(instance),
        group: seg(USER),
        devices: partition.iter().map(|d| seg(d)).collect(),
        checkpoint_interval_ms: 300,
        channels,
        stream: StreamConfig {
            wait_for: vec![seg(SINK)],
            ack_timeout_ms: 1000,
            ..StreamConfig::default()
        },
        health_listen: None,
        ..Config::default()
    }
}

fn processor_config(instance: &str, devices: &[&str]) -> Config {
    let calibrated: &[&str] = if devices.is_empty() {
        &["prime-1"]
    } else {
        devices
    };
    config_for(instance, devices, calibrated)
}

/// Polls `cond` for up to 15 s; says whether it held.
async fn wait_for(cond: impl AsyncFnMut() -> bool) -> bool {
    eventually(Duration::from_secs(15), cond).await
}

/// A processor, which the test can stop or crash. A crash cuts its connection as a crash
/// would (aborting `run_on` alone would leave it up).
struct Running {
    service: TestService<rms_processor::Error>,
    /// The output journal's lock file: free again once the processor's journal is closed.
    journal_lock: PathBuf,
}

impl Running {
    /// Start a processor and return once its subscriptions are confirmed by the broker, so
    /// that no frame sent after this is missed.
    async fn start(broker: &TestBroker, site: &Segment, data_dir: &Path, cfg: Config) -> Running {
        let health = Health::default();
        // Registered before the processor runs, so readiness cannot be seen before it starts.
        health.check("rms-processor");
        let journal_lock = journal_dir(data_dir, &cfg.instance, &seg("meas")).join("lock");
        let mut service =
            ServiceBuilder::new(broker.bus(USER), site, rms_processor::identity(&cfg))
                .data_dir(data_dir)
                .health(health)
                .start(async move |bus, ctx| {
                    let plan = cfg
                        .resolve(rms_processor::SECTION)
                        .expect("the test's config resolves");
                    rms_processor::run_on(&bus, &plan, &ctx).await
                })
                .await;
        service.wait_ready().await;
        assert!(service.bus().wait_subscribed(Duration::from_secs(10)).await);
        Running {
            service,
            journal_lock,
        }
    }

    /// A clean stop: the final checkpoint runs.
    async fn stop(self) {
        self.service.stop().await;
    }

    /// A crash: processing stops mid-flight with no final checkpoint, the connection drops.
    async fn crash(self) {
        self.service.crash().await;
        // In a real crash the process is gone; here the output journal's task lives on in this
        // process and holds the journal's lock until told to stop (which `crash` did).
        let lock = self.journal_lock;
        assert!(
            wait_for(|| async {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&lock)
                    .is_ok_and(|f| f.try_lock().is_ok())
            })
            .await,
            "the crashed processor's journal was never closed"
        );
    }
}

/// The frame source: a producer whose `raw` stream waits for the processor group, with its
/// journal in memory (serial-ingest's default).
struct Frames {
    producer: Producer,
    bus: Bus,
    bus_task: JoinHandle<()>,
    task: JoinHandle<()>,
    stop: ShutdownTrigger,
}

impl Frames {
    /// A producer of `user` (its client id), whose frames are its own.
    async fn start(broker: &TestBroker, site: &Segment, dir: &Path, user: &str) -> Frames {
        let (bus, bus_task) = broker.connect(site, user).await;
        let cfg = StreamConfig {
            journal: JournalKind::Memory,
            wait_for: vec![seg(USER)],
            ack_timeout_ms: 1000,
            ack_timeout_max_ms: 2000,
            ..StreamConfig::default()
        };
        let (stop, shutdown) = runtime::shutdown::channel();
        let (producer, task) = Producer::open(
            &bus,
            &seg("raw"),
            &Filter::raw(Some(site), None),
            &cfg,
            dir,
            shutdown,
        )
        .unwrap();
        Frames {
            producer,
            bus,
            bus_task,
            task,
            stop,
        }
    }

    async fn send(&self, site: &Segment, f: RawFrame) {
        let device = f.device.clone();
        self.send_on(site, &device, f).await;
    }

    /// Send `f` on the topic of `device`, whatever device the frame names.
    async fn send_on(&self, site: &Segment, device: &Segment, f: RawFrame) {
        self.producer
            .send(&Topic::raw(site, device), f)
            .await
            .unwrap();
    }

    async fn pending(&self) -> u64 {
        self.producer.pending().await
    }

    /// The producer goes away with its journal (in memory): what it held is never replayed.
    async fn lose(self) {
        self.stop.fire();
        self.task.await.unwrap();
        self.bus.close(self.bus_task).await;
    }
}

/// Everything measured, by (instance, device, channel, ts): every copy kept, to compare.
type Seen = BTreeMap<(String, String, String, i64), Vec<BTreeMap<String, f64>>>;

/// The sink group that stores the processor's readings and acknowledges them at once.
async fn sink(broker: &TestBroker, site: &Segment) -> Sink<Measurement> {
    Sink::start(broker, site, SINK, &Filter::measurements(Some(site), None)).await
}

/// Adds what the sink receives to `seen` until `done` holds or `timeout` passes (the
/// assertions after it say what was missing).
async fn collect_until(
    sink: &mut Sink<Measurement>,
    seen: &mut Seen,
    timeout: Duration,
    mut done: impl FnMut(&Seen) -> bool,
) {
    let end = tokio::time::Instant::now() + timeout;
    while !done(seen) {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = sink.next(left).await else {
            break;
        };
        let producer = m
            .origin
            .as_ref()
            .map(|o| o.producer.to_string())
            .unwrap_or_default();
        seen.entry((
            producer,
            m.device.to_string(),
            m.channel.to_string(),
            m.ts_ms,
        ))
        .or_default()
        .push(m.fields);
    }
}

fn windows_of(seen: &Seen, device: &str, channel: &str) -> Vec<i64> {
    let mut ts: Vec<i64> = seen
        .keys()
        .filter(|(_, d, c, _)| d == device && c == channel)
        .map(|k| k.3)
        .collect();
    ts.sort_unstable();
    ts.dedup();
    ts
}

/// Distinct (device, ts) windows of ct1 seen so far.
fn ct1_windows(seen: &Seen) -> usize {
    seen.keys().filter(|k| k.2 == "ct1").count()
}

/// Every ct1 reading of `device`, one per window in time order; copies of a window (a replay,
/// a window computed again after a crash) must be the same reading.
fn ct1_series(seen: &Seen, device: &str) -> Vec<(i64, BTreeMap<String, f64>)> {
    seen.iter()
        .filter(|(k, _)| k.1 == device && k.2 == "ct1")
        .map(|(k, copies)| {
            assert!(
                copies.windows(2).all(|c| c[0] == c[1]),
                "{device} at {}: copies differ: {copies:?}",
                k.3
            );
            (k.3, copies[0].clone())
        })
        .collect()
}

/// Each reading of `device` carries the current of `device` and of no other.
fn assert_own_current(seen: &Seen, device: &str, amps: f64, rel: f64) {
    let series = ct1_series(seen, device);
    assert!(!series.is_empty(), "no reading of {device}");
    for (ts, f) in &series {
        assert!(
            within(f["current_a"], ct_current(amps), rel),
            "{device} at {ts}: {} A, expected {} A: {f:?}",
            f["current_a"],
            ct_current(amps)
        );
    }
}

fn within(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= want.abs() * rel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_become_rms_current_real_power_and_energy_and_every_frame_is_acknowledged() {
    let site = site("rms-basic");
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let proc = Running::start(
        &broker,
        &site,
        dir.path(),
        processor_config("rms-processor-a", &[]),
    )
    .await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    // 10 s of samples in 0.3 s frames (600 samples: windows cut across frame borders).
    for k in 0..(20_000 / 600) {
        frames
            .send(&site, frame(&site, "prime-1", k * 600, 600))
            .await;
    }
    let mut seen = Seen::new();
    collect_until(&mut sink, &mut seen, Duration::from_secs(30), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 9 && windows_of(s, "prime-1", "ct2").len() >= 9
    })
    .await;
    // 33 frames × 600 = 19 800 samples: 9 whole windows (the rest waits for more samples).
    let ts = windows_of(&seen, "prime-1", "ct1");
    assert_eq!(ts.len(), 9, "{ts:?}");
    assert_eq!(
        ts[0],
        T0_US / 1000 + 1000,
        "stamped at the end of its window"
    );
    assert!(ts.windows(2).all(|w| w[1] - w[0] == 1000), "{ts:?}");

    // Analytic values: Irms = 5·√(1 + 0.2²); the 3rd harmonic carries no power against a
    // pure voltage, so P = 5 · 230 · 0.8.
    let irms = 5.0 * (1.0f64 + 0.04).sqrt();
    let p = 5.0 * 230.0 * 0.8;
    for (i, t) in ts.iter().enumerate() {
        let f = &seen[&(
            "rms-processor-a".to_string(),
            "prime-1".into(),
            "ct1".into(),
            *t,
        )][0];
        assert!(within(f["current_a"], irms, 0.005), "{f:?}");
        assert!(within(f["voltage_v"], 230.0, 0.005), "{f:?}");
        assert!(within(f["power_w"], p, 0.01), "{f:?}");
        assert!(within(f["power_factor"], p / (230.0 * irms), 0.01), "{f:?}");
        let wh = p * (i + 1) as f64 / 3600.0;
        assert!(
            within(f["energy_import_wh"], wh, 0.01),
            "window {i}: {f:?} vs {wh}"
        );
        assert_eq!(f["energy_export_wh"], 0.0);
        let f2 = &seen[&(
            "rms-processor-a".to_string(),
            "prime-1".into(),
            "ct2".into(),
            *t,
        )][0];
        assert!(within(f2["current_a"], 2.0, 0.005), "{f2:?}");
        assert!(within(f2["apparent_power_va"], 460.0, 0.005), "{f2:?}");
        assert!(!f2.contains_key("power_w"));
    }
    // Every frame whose samples are all in windows is acknowledged: the three whose samples
    // reach past the last window (18 000..19 800) stay until more samples complete it.
    assert!(
        wait_for(|| async { frames.pending().await == 3 }).await,
        "frames left unacknowledged: {}",
        frames.pending().await
    );
    proc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_processor_replays_without_counting_energy_twice_or_moving_windows() {
    let site = site("rms-crash");
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    let mut seen = Seen::new();

    let first = Running::start(
        &broker,
        &site,
        dir.path(),
        processor_config("rms-processor-a", &[]),
    )
    .await;
    for k in 0..20 {
        frames
            .send(&site, frame(&site, "prime-1", k * 500, 500))
            .await;
    }
    collect_until(&mut sink, &mut seen, Duration::from_secs(20), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 3
    })
    .await;
    first.crash().await;
    for k in 20..40 {
        frames
            .send(&site, frame(&site, "prime-1", k * 500, 500))
            .await;
    }
    let second = Running::start(
        &broker,
        &site,
        dir.path(),
        processor_config("rms-processor-a", &[]),
    )
    .await;
    // 40 frames × 500 = 10 s: windows ending at 1 s … 10 s.
    collect_until(&mut sink, &mut seen, Duration::from_secs(40), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 10
    })
    .await;
    let ts = windows_of(&seen, "prime-1", "ct1");
    assert_eq!(
        ts,
        (1..=10)
            .map(|s| T0_US / 1000 + s * 1000)
            .collect::<Vec<_>>(),
        "every window once, at the same place as before the crash"
    );
    let p = 5.0 * 230.0 * 0.8;
    for (i, t) in ts.iter().enumerate() {
        let copies = &seen[&(
            "rms-processor-a".to_string(),
            "prime-1".into(),
            "ct1".into(),
            *t,
        )];
        // A window computed twice (before and after the crash) is the same reading twice.
        assert!(
            copies.windows(2).all(|c| c[0] == c[1]),
            "window {i}: {copies:?}"
        );
        let wh = p * (i + 1) as f64 / 3600.0;
        assert!(
            within(copies[0]["energy_import_wh"], wh, 0.01),
            "window {i}: {} Wh, expected {wh}",
            copies[0]["energy_import_wh"]
        );
    }
    assert!(wait_for(|| async { frames.pending().await == 0 }).await);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_devices_and_count_each_once() {
    let site = site("rms-two");
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let a = Running::start(
        &broker,
        &site,
        &dir.path().join("a"),
        processor_config("rms-processor-a", &["prime-1"]),
    )
    .await;
    let b = Running::start(
        &broker,
        &site,
        &dir.path().join("b"),
        processor_config("rms-processor-b", &["prime-2"]),
    )
    .await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    for k in 0..12 {
        for dev in ["prime-1", "prime-2"] {
            frames.send(&site, frame(&site, dev, k * 1000, 1000)).await;
        }
    }
    let mut seen = Seen::new();
    collect_until(&mut sink, &mut seen, Duration::from_secs(30), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 6 && windows_of(s, "prime-2", "ct1").len() >= 6
    })
    .await;
    for (dev, owner) in [
        ("prime-1", "rms-processor-a".to_string()),
        ("prime-2", "rms-processor-b".to_string()),
    ] {
        let by: Vec<&String> = seen.keys().filter(|k| k.1 == dev).map(|k| &k.0).collect();
        assert!(!by.is_empty());
        assert!(by.iter().all(|p| **p == owner), "{dev} processed by {by:?}");
        assert_eq!(windows_of(&seen, dev, "ct1").len(), 6);
        let last = windows_of(&seen, dev, "ct1")[5];
        let e = seen[&(owner.to_string(), dev.to_string(), "ct1".to_string(), last)][0]["energy_import_wh"];
        assert!(within(e, 920.0 * 6.0 / 3600.0, 0.01), "{dev}: {e}");
    }
    assert!(wait_for(|| async { frames.pending().await == 0 }).await);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_arrives_late_is_waited_for_not_skipped() {
    // As when the broker drops a frame on its way and the producer replays it later: the
    // frames after it say they continue their run, so the processor waits for the hole to
    // be filled instead of closing the window early and skipping the late frame.
    let site = site("rms-late");
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let proc = Running::start(
        &broker,
        &site,
        dir.path(),
        processor_config("rms-processor-a", &[]),
    )
    .await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    for k in (0..8).chain(9..16) {
        frames
            .send(&site, frame(&site, "prime-1", k * 500, 500))
            .await;
    }
    let mut seen = Seen::new();
    collect_until(&mut sink, &mut seen, Duration::from_secs(2), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 3
    })
    .await;
    assert_eq!(
        windows_of(&seen, "prime-1", "ct1").len(),
        2,
        "windows up to the hole (samples 0..4000), nothing across it"
    );
    frames
        .send(&site, frame(&site, "prime-1", 8 * 500, 500))
        .await;
    collect_until(&mut sink, &mut seen, Duration::from_secs(20), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 4
    })
    .await;
    let ts = windows_of(&seen, "prime-1", "ct1");
    assert_eq!(
        ts,
        (1..=4).map(|s| T0_US / 1000 + s * 1000).collect::<Vec<_>>()
    );
    let last = &seen[&(
        "rms-processor-a".to_string(),
        "prime-1".into(),
        "ct1".into(),
        ts[3],
    )][0];
    let wh = 920.0 * 4.0 / 3600.0;
    assert!(within(last["energy_import_wh"], wh, 0.01), "{last:?}");
    assert!(wait_for(|| async { frames.pending().await == 0 }).await);
    proc.stop().await;
}

/// Frames of `devices` (name, frame size) interleaved by start time: samples `0..total` each.
fn interleaved(
    devices: &[(&'static str, usize)],
    total: usize,
) -> Vec<(&'static str, usize, usize)> {
    let mut plan = Vec::new();
    for (d, size) in devices {
        let mut from = 0;
        while from < total {
            plan.push((*d, from, *size));
            from += size;
        }
    }
    plan.sort_by_key(|(d, from, _)| (*from, *d));
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_many_points_keep_each_reading_with_its_own_device_and_count_energy_once() {
    // Three devices of distinct currents, frames of three sizes (windows are cut across frame
    // borders at different places for each), interleaved. The processor is crashed five times:
    // mid-window, with frames of every device queued behind it, a few windows or one window
    // after it started. The producer keeps its frames and replays whatever was not
    // acknowledged, so every window is computed, once, in the end.
    let site = site("rms-crashes");
    let dir = tempfile::tempdir().unwrap();
    let devices = [("m-1", 1.0), ("m-2", 3.0), ("m-3", 7.0)];
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    let cfg = || Config {
        // No device goes quiet long enough to be flushed early: every window is a whole one.
        idle_flush_ms: 120_000,
        ..config_for("rms-processor-m", &[], &["m-1", "m-2", "m-3"])
    };
    let plan = interleaved(&[("m-1", 300), ("m-2", 700), ("m-3", 1100)], 24_000);
    let amps = |d: &str| devices.iter().find(|x| x.0 == d).unwrap().1;
    let chunks: Vec<_> = plan.chunks(plan.len().div_ceil(6)).collect();
    let mut seen = Seen::new();
    let crash_after = [2, 4, 1, 4, 3];
    let mut queued = 0; // frames of the next chunk already sent before the crash
    for (round, chunk) in chunks.iter().enumerate() {
        let proc = Running::start(&broker, &site, dir.path(), cfg()).await;
        for &(d, from, n) in &chunk[queued..] {
            frames
                .send(&site, ct_frame(&site, d, T0_US, from, n, amps(d)))
                .await;
        }
        let Some(after) = crash_after.get(round) else {
            collect_until(&mut sink, &mut seen, Duration::from_secs(60), |s| {
                devices
                    .iter()
                    .all(|(d, _)| windows_of(s, d, "ct1").len() >= 12)
            })
            .await;
            proc.stop().await;
            break;
        };
        let before = ct1_windows(&seen);
        collect_until(&mut sink, &mut seen, Duration::from_secs(30), |s| {
            ct1_windows(s) >= before + after
        })
        .await;
        assert!(
            ct1_windows(&seen) >= before + after,
            "round {round}: no new windows"
        );
        // Frames of every device sent as it crashes: queued in the processor, on the way,
        // or not yet received.
        queued = 4;
        for &(d, from, n) in &chunks[round + 1][..queued] {
            frames
                .send(&site, ct_frame(&site, d, T0_US, from, n, amps(d)))
                .await;
        }
        proc.crash().await;
    }
    for (d, a) in devices {
        assert_own_current(&seen, d, a, 0.005);
        let series = ct1_series(&seen, d);
        assert_eq!(
            series.iter().map(|(ts, _)| *ts).collect::<Vec<_>>(),
            (1..=12)
                .map(|s| T0_US / 1000 + s * 1000)
                .collect::<Vec<_>>(),
            "{d}: every window once"
        );
        for (k, (ts, f)) in series.iter().enumerate() {
            let wh = ct_power(a) * (k + 1) as f64 / 3600.0;
            assert!(
                within(f["energy_import_wh"], wh, 0.01),
                "{d} at {ts}: {} Wh, expected {wh} (counted once)",
                f["energy_import_wh"]
            );
        }
    }
    assert!(
        seen.keys().all(|k| k.2 == "ct1"),
        "only the ct1 of each device"
    );
}

/// `samples` more of each device's stream, in frames of its own size (400, 600, 900).
async fn send_lossy(
    frames: &Frames,
    site: &Segment,
    devices: &[(&str, f64); 3],
    next: &mut [usize; 3],
    started: &mut [bool; 3],
    samples: usize,
) -> u64 {
    const SIZE: [usize; 3] = [400, 600, 900];
    let mut count = 0;
    for (i, (d, a)) in devices.iter().enumerate() {
        let end = next[i] + samples;
        while next[i] < end {
            let mut f = ct_frame(site, d, T0_US, next[i], SIZE[i], *a);
            f.continues = started[i];
            started[i] = true;
            frames.send(site, f).await;
            next[i] += SIZE[i];
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_lost_its_frames_labels_every_reading_with_its_own_device() {
    // `wattbus demo` killed -9: the processor and the producer go down together, and the
    // producer's raw journal (in memory) with them, so no replay ever fills the hole behind
    // the processor's saved marks. After each restart every device's live frames are held
    // for `reorder_ms`, then the hole is accepted at a checkpoint: the windows that come out
    // there, of every device at once, must each carry their own device.
    let site = site("rms-lost");
    let dir = tempfile::tempdir().unwrap();
    let devices = [("l-1", 2.0), ("l-2", 4.0), ("l-3", 6.0)];
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let cfg = || Config {
        reorder_ms: 1000,
        idle_flush_ms: 120_000,
        ..config_for("rms-processor-l", &[], &["l-1", "l-2", "l-3"])
    };
    let mut seen = Seen::new();
    // Per device: the next sample to send.
    let mut next = [0usize; 3];
    for round in 0..4 {
        // The same producer every round, as a restarted serial-ingest is: a device takes the
        // frames of one producer.
        let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
        let proc = Running::start(&broker, &site, dir.path(), cfg()).await;
        // The first frame of each device after a restart starts a run (serial-ingest opened
        // its port again); the rest continue it.
        let mut started = [false; 3];
        let mut sent = send_lossy(&frames, &site, &devices, &mut next, &mut started, 3600).await;
        if round > 0 {
            // Held behind the hole until the wait runs out at a checkpoint; the frames after
            // that come while the released windows are still about.
            let unfilled = |d: &str| counter("wattbus_rms_unfilled_holes_total", &[("device", d)]);
            assert!(
                wait_for(|| async { devices.iter().all(|(d, _)| unfilled(d) >= round) }).await,
                "round {round}: the holes were never accepted"
            );
        }
        sent += send_lossy(&frames, &site, &devices, &mut next, &mut started, 2400).await;
        let before: Vec<usize> = devices
            .iter()
            .map(|(d, _)| windows_of(&seen, d, "ct1").len())
            .collect();
        collect_until(&mut sink, &mut seen, Duration::from_secs(30), |s| {
            devices
                .iter()
                .zip(&before)
                .all(|((d, _), b)| windows_of(s, d, "ct1").len() >= b + 2)
        })
        .await;
        // Crash once a checkpoint has saved marks (some frames are acknowledged), so that the
        // next start resumes behind a hole.
        assert!(wait_for(|| async { frames.pending().await < sent }).await);
        proc.crash().await;
        frames.lose().await;
        // What the producer held when it went down is gone; the device went on sampling.
        for n in &mut next {
            *n += 1500;
        }
    }
    for (d, a) in devices {
        assert_own_current(&seen, d, a, 0.005);
        // The counter grows by this device's own power over each window and by nothing else.
        // Windows abut, so the time between two readings is the later one's length unless a
        // hole came before it (then the window is at most one interval long). Across a
        // restart it never goes down: no reading is journaled before the counters it shows
        // are saved.
        let series = ct1_series(&seen, d);
        assert!(series.len() >= 8, "{d}: {} windows", series.len());
        for pair in series.windows(2) {
            let ((t0, f0), (t1, f1)) = (&pair[0], &pair[1]);
            let dt_s = (t1 - t0) as f64 / 1000.0;
            let de = f1["energy_import_wh"] - f0["energy_import_wh"];
            let own = ct_power(a) * dt_s.min(1.0) / 3600.0;
            assert!(
                de <= own * 1.01 + 1e-9,
                "{d} at {t1}: +{de} Wh, its own power gives at most {own}"
            );
            if dt_s <= 1.001 {
                assert!(
                    within(de, own, 0.01),
                    "{d} at {t1}: +{de} Wh, expected {own}"
                );
            } else {
                assert!(de > 0.0, "{d} at {t1}: {de} Wh after a restart");
            }
        }
    }
    assert!(
        seen.keys().all(|k| k.2 == "ct1"),
        "only the ct1 of each device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_acknowledged_only_by_a_checkpoint_after_their_readings_are_journaled() {
    // Why the processor does not use `Acker::ack_after_sync`: its checkpoint saves the
    // energy counters, marks and readings (the outbox) together, journals the readings, and
    // only then acknowledges (see `Processor::checkpoint`). Before a checkpoint nothing has left: a
    // crash then loses nothing and counts nothing twice.
    let site = site("rms-ack");
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    let mut acks = Watch::new(
        &broker,
        &site,
        &Filter::<Ack>::acks_for(&site, &seg("frames"), &seg("raw")),
    )
    .await;
    let cfg = Config {
        idle_flush_ms: 120_000,
        ..config_for("rms-processor-k", &[], &["k-1"])
    };
    let energy_file = cfg.energy_path(dir.path());
    let slow = Config {
        // The first checkpoint runs as the processor starts; the next one after the crash.
        checkpoint_interval_ms: 60_000,
        ..cfg.clone()
    };
    let proc = Running::start(&broker, &site, dir.path(), slow).await;
    for k in 0..10 {
        frames
            .send(&site, ct_frame(&site, "k-1", T0_US, k * 500, 500, 3.0))
            .await;
    }
    let windows = || counter("wattbus_rms_windows_total", &[("device", "k-1")]);
    assert!(wait_for(|| async { windows() >= 2 }).await);
    // Two windows computed; no checkpoint yet. Had their frames been acknowledged as they
    // were computed, the acknowledgement would be out within the sink's 200 ms batching.
    assert!(
        acks.next(Duration::from_secs(2)).await.is_none(),
        "a frame was acknowledged before a checkpoint"
    );
    assert!(
        sink.try_next().is_none(),
        "a reading left before a checkpoint"
    );
    assert_eq!(frames.pending().await, 10);
    proc.crash().await;
    let counters = std::fs::read_to_string(&energy_file).unwrap_or_default();
    assert!(
        !counters.contains("k-1"),
        "energy saved before a checkpoint: {counters}"
    );

    // The restart: the frames are replayed, and each window is counted once.
    let again = Running::start(&broker, &site, dir.path(), cfg).await;
    let mut seen = Seen::new();
    collect_until(&mut sink, &mut seen, Duration::from_secs(30), |s| {
        windows_of(s, "k-1", "ct1").len() >= 2
    })
    .await;
    let series = ct1_series(&seen, "k-1");
    assert_eq!(series.len(), 2);
    for (k, (_, f)) in series.iter().enumerate() {
        let wh = ct_power(3.0) * (k + 1) as f64 / 3600.0;
        assert!(within(f["energy_import_wh"], wh, 0.01), "{f:?} vs {wh}");
    }
    // Frames 0..8 are in the two windows, 8 and 9 wait for a third.
    assert!(wait_for(|| async { frames.pending().await == 2 }).await);
    again.stop().await;
    let counters = std::fs::read_to_string(&energy_file).unwrap();
    assert!(counters.contains("\"k-1/ct1\""), "{counters}");
}

/// A frame published by hand, as a broken or hostile producer would, outside any journal.
async fn publish_raw(bus: &Bus, site: &Segment, device: &str, payload: serde_json::Value) {
    bus.publish(
        Topic::raw(site, &seg(device)).as_str(),
        serde_json::to_vec(&payload).unwrap(),
        false,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_frames_are_dead_lettered_and_acknowledged_and_every_device_goes_on() {
    // Device p-2 gets every kind of bad frame between good ones; p-1 and p-3 stream
    // alongside. The stream is dated a minute before now, so "ahead of the clock" is real.
    let site = site("rms-poison");
    let dir = tempfile::tempdir().unwrap();
    let devices = [("p-1", 1.5), ("p-2", 3.5), ("p-3", 5.5)];
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let mut dead: Watch<DeadLetter> =
        Watch::new(&broker, &site, &Filter::dead_letters(Some(&site))).await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    let (hand, _hand_task) = broker.connect(&site, "hand").await;
    let cfg = Config {
        reorder_ms: 1000,
        idle_flush_ms: 500,
        ..config_for("rms-processor-p", &[], &["p-1", "p-2", "p-3"])
    };
    let proc = Running::start(&broker, &site, dir.path(), cfg).await;
    let t0 = (proto::now_ms() / 1000 - 60) * 1_000_000;
    let slots = 48; // 0.25 s frames: 12 s of samples
    let poisoned = |slot: usize| -> Option<&'static str> {
        Some(match slot {
            4 => "2098",
            8 => "2099",
            12 => "a day ahead",
            16 => "rate",
            20 => "channels",
            24 => "identity",
            28 => "overflow",
            32 => "past",
            34 => "zero samples",
            36 => "seq",
            38 => "rate change",
            40 => "continues lies",
            _ => return None,
        })
    };
    for slot in 0..slots {
        let from = slot * 500;
        for (d, a) in devices {
            let good = ct_frame(&site, d, t0, from, 500, a);
            let Some(poison) = poisoned(slot).filter(|_| d == "p-2") else {
                frames.send(&site, good).await;
                continue;
            };
            let mut f = good.clone();
            match poison {
                "2098" => f.start_ts_us = 4_039_372_800_000_000,
                "2099" => f.start_ts_us = 4_102_444_799_900_000,
                "a day ahead" => f.start_ts_us += 86_400_000_000,
                "rate" => f.sample_rate_hz = 1e-3,
                "channels" => f.channels.push(f.channels[0].clone()),
                "identity" => {
                    f.device = seg("p-3");
                    frames.send_on(&site, &seg("p-2"), f).await;
                    frames.send(&site, good).await;
                    continue;
                }
                // Finite samples whose squares overflow: the window's current is not a number.
                "overflow" => f.channels[0].samples = vec![3e38; 500],
                // Long before the mark: a replay of nothing, skipped.
                "past" => f.start_ts_us = 946_684_800_000_000,
                "zero samples" => {
                    let mut j = serde_json::to_value(&f).unwrap();
                    j["channels"][0]["samples"] = serde_json::json!([]);
                    j["channels"][1]["samples"] = serde_json::json!([]);
                    j["origin"] =
                        serde_json::json!({"producer": "hand", "stream": "raw", "seq": 7});
                    publish_raw(&hand, &site, d, j).await;
                }
                // The good frame itself, numbered at the end of the sequence space.
                "seq" => {
                    let mut j = serde_json::to_value(&good).unwrap();
                    j["origin"] = serde_json::to_value(Origin {
                        producer: seg("hand"),
                        stream: seg("raw"),
                        seq: u64::MAX,
                        epoch: None,
                    })
                    .unwrap();
                    publish_raw(&hand, &site, d, j).await;
                    continue;
                }
                // Twice the rate for a quarter of the time, then back.
                "rate change" => {
                    f.sample_rate_hz = 4000.0;
                    let start = f.start_ts_us;
                    f.channels = vec![
                        channel(
                            "ct1",
                            "a",
                            wave_at(4000.0, 0, 1000, a, -(0.8f64).acos(), 0.0, 0.2),
                        ),
                        channel("v1", "v", wave_at(4000.0, 0, 1000, 230.0, 0.0, 0.0, 0.0)),
                    ];
                    f.start_ts_us = start;
                    frames.send(&site, f).await;
                    continue;
                }
                // A sample-less slot, and the next frame says it continues: it is held until
                // the wait runs out, then the run goes on.
                "continues lies" => continue,
                _ => unreachable!(),
            }
            if poison != "zero samples" {
                frames.send(&site, f).await;
            }
            // The good samples of the slot come too: the device has them.
            if poison != "overflow" {
                frames.send(&site, good).await;
            }
        }
    }
    // Every frame acknowledged: the poison once dead-lettered, the rest once in a window
    // (the device's last samples are flushed as it goes quiet).
    assert!(
        eventually(Duration::from_secs(40), async || frames.pending().await
            == 0)
        .await,
        "frames left unacknowledged: {}",
        frames.pending().await
    );
    let mut seen = Seen::new();
    collect_until(&mut sink, &mut seen, Duration::from_secs(10), |s| {
        ["p-1", "p-3"]
            .iter()
            .all(|d| windows_of(s, d, "ct1").len() >= 12)
            && windows_of(s, "p-2", "ct1").last() == Some(&(t0 / 1000 + 12_000))
    })
    .await;
    // The neighbours: every window, whole, their own current, energy counted once.
    for (d, a) in [devices[0], devices[2]] {
        assert_own_current(&seen, d, a, 0.005);
        let series = ct1_series(&seen, d);
        assert_eq!(
            series.iter().map(|(ts, _)| *ts).collect::<Vec<_>>(),
            (1..=12).map(|s| t0 / 1000 + s * 1000).collect::<Vec<_>>(),
            "{d}"
        );
        let last = &series[11].1["energy_import_wh"];
        assert!(
            within(*last, ct_power(a) * 12.0 / 3600.0, 0.01),
            "{d}: {last}"
        );
    }
    // The poisoned device: its own current in every reading, and readings to the end.
    assert_own_current(&seen, "p-2", 3.5, 0.01);
    let p2 = ct1_series(&seen, "p-2");
    assert!(
        p2.last().is_some_and(|(ts, _)| *ts == t0 / 1000 + 12_000),
        "p-2 stopped: {:?}",
        p2.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    let e: Vec<f64> = p2.iter().map(|(_, f)| f["energy_import_wh"]).collect();
    assert!(e.windows(2).all(|w| w[1] >= w[0]), "{e:?}");
    assert!(
        *e.last().unwrap() <= ct_power(3.5) * 12.0 / 3600.0 * 1.01,
        "more energy than 12 s of its power: {e:?}"
    );
    // A dead letter for each frame refused and for the reading that could not be stored, each
    // naming the device and why.
    let mut reasons = Vec::new();
    while let Some(dl) = dead.next(Duration::from_secs(2)).await {
        reasons.push(dl.reason);
    }
    for want in [
        "after this host's clock",
        "sample_rate_hz = 0.001",
        "appears twice",
        "only finite numbers are stored",
    ] {
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("device p-2: ") && r.contains(want)),
            "no dead letter for p-2 saying {want:?}: {reasons:#?}"
        );
    }
    // Refused by the runtime's inbox (payload against topic) before the processor sees it.
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("names device \"p-3\" (topic: \"p-2\")")),
        "no dead letter for the frame naming p-3 on p-2's topic: {reasons:#?}"
    );
    // Refused by the runtime's decoder before the processor sees it.
    assert!(
        reasons.iter().any(|r| r.contains("0 samples per channel")),
        "{reasons:#?}"
    );
    // Three frames dated ahead (a replay of one before its acknowledgement came back would
    // add a copy).
    assert!(
        reasons
            .iter()
            .filter(|r| r.contains("after this host's clock"))
            .count()
            >= 3,
        "{reasons:#?}"
    );
    proc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_producers_frames_for_a_device_neither_silence_it_nor_count() {
    // A producer user without a `devices` list may publish frames for any device. Its frame
    // for f-1 dated 55 s past f-1's real samples once moved f-1's mark there: the real frames
    // of those 55 s were skipped as already counted, acknowledged and lost, and the forged
    // current was stored as f-1's.
    let site = site("rms-forge");
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut sink = sink(&broker, &site).await;
    let proc = Running::start(
        &broker,
        &site,
        dir.path(),
        config_for("rms-processor-f", &[], &["f-1"]),
    )
    .await;
    let frames = Frames::start(&broker, &site, dir.path(), "frames").await;
    let forger = Frames::start(&broker, &site, dir.path(), "forger").await;
    for k in 0..8 {
        frames
            .send(&site, ct_frame(&site, "f-1", T0_US, k * 1000, 1000, 2.0))
            .await;
    }
    // f-1 is the honest producer's once the processor has its frames: the first producer a
    // device gets frames from owns it. (Two connections' publishes reach the processor in no
    // set order: sent at once, the forged frame overtook the real ones under load, the forger
    // owned f-1, and it was the real frames that were refused.)
    let samples = || counter("wattbus_rms_samples_total", &[("device", "f-1")]);
    assert!(
        wait_for(|| async { samples() >= 8000 }).await,
        "the processor did not take f-1's frames: {} samples",
        samples()
    );
    let mut forged = ct_frame(&site, "f-1", T0_US, 8000 + 110_000, 200, 9.0);
    forged.continues = false;
    forger.send(&site, forged).await;
    let refused = || {
        counter(
            "wattbus_rms_other_producer_frames_total",
            &[("device", "f-1"), ("producer", "forger")],
        )
    };
    assert!(
        wait_for(|| async { refused() >= 1 }).await,
        "the forged frame was not refused"
    );
    // The same without an origin (any producer login can publish one; a producer whose
    // journal is full publishes its frames so too): it does not continue f-1's samples.
    let (bare, _bare_task) = broker.connect(&site, "bare").await;
    let no_origin = || {
        counter(
            "wattbus_errors_total",
            &[("service", "rms-processor"), ("kind", "origin")],
        )
    };
    let before = no_origin();
    let mut forged = ct_frame(&site, "f-1", T0_US, 8000 + 110_000, 200, 9.0);
    forged.continues = false;
    publish_raw(&bare, &site, "f-1", serde_json::to_value(&forged).unwrap()).await;
    assert!(
        wait_for(|| async { no_origin() > before }).await,
        "the frame without an origin was not refused"
    );
    // Nor one that continues f-1's samples exactly (a reader sees where they end): a chain of
    // them replaced a device's readings with forged ones.
    let mut next = ct_frame(&site, "f-1", T0_US, 8000, 1000, 9.0);
    next.continues = true;
    publish_raw(&bare, &site, "f-1", serde_json::to_value(&next).unwrap()).await;
    assert!(
        wait_for(|| async { no_origin() >= before + 2 }).await,
        "the continuing frame without an origin was not refused"
    );
    for k in 8..20 {
        frames
            .send(&site, ct_frame(&site, "f-1", T0_US, k * 1000, 1000, 2.0))
            .await;
    }
    let mut seen = Seen::new();
    collect_until(&mut sink, &mut seen, Duration::from_secs(30), |s| {
        windows_of(s, "f-1", "ct1").len() >= 10
    })
    .await;
    // Every second of the real samples, each with f-1's own current; nothing of the forger's.
    let ts = windows_of(&seen, "f-1", "ct1");
    let want: Vec<i64> = (1..=10).map(|s| T0_US / 1000 + s * 1000).collect();
    assert_eq!(ts, want);
    assert_own_current(&seen, "f-1", 2.0, 0.005);
    // The real frames are acknowledged; the forged one is not (its producer keeps it).
    assert!(
        wait_for(|| async { frames.pending().await == 0 }).await,
        "real frames left unacknowledged: {}",
        frames.pending().await
    );
    assert_eq!(forger.pending().await, 1);
    proc.stop().await;
}
