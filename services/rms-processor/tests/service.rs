//! rms-processor's `run` against a real broker (mosquitto, started by tests/run.sh:
//! MOSQUITTO_TEST_BROKER=host:port:user:password): frames in through a producer's journal,
//! measurements out through the processor's, as in production.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::Path;
use std::time::Duration;

use proto::{Filter, Measurement, RawChannel, RawFrame, Segment, Topic};
use runtime::bus::{Bus, Identity};
use runtime::config::{InboxConfig, JournalKind, StreamConfig};
use runtime::delivery::{Inbox, Producer};
use runtime::{Common, Context, Health, Shutdown};
use wattbus_testkit::{mosquitto, seg, site};

use rms_processor::config::{ChannelConfig, Config};

const T0_US: i64 = 1_764_000_000_000_000;
const RATE: f64 = 2000.0;

async fn connect(site: &Segment, name: &str) -> (Bus, tokio::task::JoinHandle<()>) {
    let id = Identity {
        service: seg("test"),
        instance: seg(&format!("{name}-{site}")),
    };
    let (bus, task) = Bus::connect(&mosquitto(), site, &id, &Health::default()).unwrap();
    assert!(bus.wait_connected(Duration::from_secs(10)).await);
    (bus, task)
}

/// `rms` × √2 × sin at 50 Hz plus a 3rd harmonic of 20% and an offset, sampled at 2 kHz from
/// sample index `from`.
fn wave(from: usize, n: usize, rms_fund: f64, phase: f64, offset: f64, h3: f64) -> Vec<f32> {
    (from..from + n)
        .map(|i| {
            let t = i as f64 / RATE;
            let a = rms_fund * 2f64.sqrt();
            (a * (2.0 * PI * 50.0 * t + phase).sin()
                + h3 * a * (3.0 * 2.0 * PI * 50.0 * t + phase).sin()
                + offset) as f32
        })
        .collect()
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
            RawChannel {
                channel: seg("ct1"),
                unit: seg("a"),
                samples: wave(from, n, 5.0, phi, 0.0, 0.2),
            },
            RawChannel {
                channel: seg("ct2"),
                unit: seg("adc"),
                samples: wave(from, n, 20.0, 0.0, 512.0, 0.0),
            },
            RawChannel {
                channel: seg("v1"),
                unit: seg("v"),
                samples: wave(from, n, 230.0, 0.0, 0.0, 0.0),
            },
        ],
    }
}

/// `instance` is made unique per test: tests share one broker, and a client id in use by
/// another test would take over its connection.
fn processor_config(site: &Segment, instance: &str, devices: &[&str]) -> Config {
    let instance = &format!("{instance}-{site}");
    let mut channels = Vec::new();
    for d in devices
        .iter()
        .copied()
        .chain(devices.is_empty().then_some("prime-1"))
    {
        channels.push(ChannelConfig {
            device: seg(d),
            channel: seg("ct1"),
            scale: 1.0,
            voltage: Some(seg("v1")),
            phase_shift: 0.0,
            nominal_voltage_v: None,
        });
        channels.push(ChannelConfig {
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
        group: seg("rms-processor"),
        devices: devices.iter().map(|d| seg(d)).collect(),
        checkpoint_interval_ms: 300,
        channels,
        stream: StreamConfig {
            wait_for: vec![seg("test-sink")],
            ack_timeout_ms: 1000,
            ..StreamConfig::default()
        },
        health_listen: None,
        ..Config::default()
    }
}

fn context(site: &Segment, data_dir: &Path, shutdown: Shutdown) -> Context {
    if let Ok(level) = std::env::var("TEST_LOG") {
        let _ = runtime::telemetry::init_logging(&runtime::config::LogConfig {
            level,
            ..Default::default()
        });
    }
    Context {
        common: Common {
            site: site.clone(),
            data_dir: data_dir.to_path_buf(),
            bus: mosquitto(),
            ..Common::default()
        },
        health: Health::default(),
        shutdown,
    }
}

/// The frame source: a producer whose `raw` stream waits for the processor group.
async fn frame_producer(site: &Segment, dir: &Path) -> (Bus, Producer) {
    let (bus, _task) = connect(site, "frames").await;
    let cfg = StreamConfig {
        journal: JournalKind::Memory,
        wait_for: vec![seg("rms-processor")],
        ack_timeout_ms: 1000,
        ack_timeout_max_ms: 2000,
        ..StreamConfig::default()
    };
    let (p, _t) = Producer::open(
        &bus,
        &seg("raw"),
        &Filter::raw(Some(site), None),
        &cfg,
        dir,
        Shutdown::never(),
    )
    .unwrap();
    (bus, p)
}

/// Everything measured, by (instance, device, channel, ts): every copy kept, to compare.
type Seen = BTreeMap<(String, String, String, i64), Vec<BTreeMap<String, f64>>>;

async fn sink(site: &Segment) -> (tokio::sync::mpsc::UnboundedReceiver<Measurement>, Bus) {
    let (bus, _task) = connect(site, "sink").await;
    let (mut inbox, _acks) = Inbox::<Measurement>::subscribe(
        &bus,
        &Filter::measurements(Some(site), None),
        &seg("test-sink"),
        &InboxConfig::default(),
    );
    assert!(bus.wait_subscribed(Duration::from_secs(10)).await);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let acker = inbox.acker();
        while let Some(d) = inbox.recv().await {
            if let Some(t) = &d.token {
                acker.ack(t);
            }
            if tx.send(d.message).is_err() {
                break;
            }
        }
    });
    (rx, bus)
}

async fn collect_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Measurement>,
    seen: &mut Seen,
    timeout: Duration,
    mut done: impl FnMut(&Seen) -> bool,
) {
    let end = tokio::time::Instant::now() + timeout;
    while !done(seen) {
        let Ok(Some(m)) = tokio::time::timeout_at(end, rx.recv()).await else {
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

fn within(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= want.abs() * rel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_become_rms_current_real_power_and_energy_and_every_frame_is_acknowledged() {
    let site = site("rms-basic");
    let dir = tempfile::tempdir().unwrap();
    let (mut rx, _sink_bus) = sink(&site).await;
    let (trigger, shutdown) = runtime::shutdown::channel();
    let ctx = context(&site, dir.path(), shutdown);
    let proc = tokio::spawn(rms_processor::run(
        processor_config(&site, "rms-a", &[]),
        ctx,
    ));
    // A head start so that the processor's subscription is in place: frames published before
    // it would only come back as a replay, after later ones (and be skipped as late).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_fbus, frames) = frame_producer(&site, dir.path()).await;
    // 10 s of samples in 0.3 s frames (600 samples: windows cut across frame borders).
    for k in 0..(20_000 / 600) {
        frames
            .send(
                &Topic::raw(&site, &seg("prime-1")),
                frame(&site, "prime-1", k * 600, 600),
            )
            .await
            .unwrap();
    }
    let mut seen = Seen::new();
    collect_until(&mut rx, &mut seen, Duration::from_secs(30), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 9 && windows_of(s, "prime-1", "ct2").len() >= 9
    })
    .await;
    // 33 frames × 600 = 19 800 samples: 9 whole windows (the rest waits for more samples).
    let ts = windows_of(&seen, "prime-1", "ct1");
    if ts.is_empty() && proc.is_finished() {
        panic!("processor ended: {:?}", proc.await);
    }
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
        let f = &seen[&(format!("rms-a-{site}"), "prime-1".into(), "ct1".into(), *t)][0];
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
        let f2 = &seen[&(format!("rms-a-{site}"), "prime-1".into(), "ct2".into(), *t)][0];
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
    trigger.fire();
    proc.await.unwrap().unwrap();
}

async fn wait_for<F, Fut>(mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_processor_replays_without_counting_energy_twice_or_moving_windows() {
    let site = site("rms-crash");
    let dir = tempfile::tempdir().unwrap();
    let (mut rx, _sink_bus) = sink(&site).await;
    let (_fbus, frames) = frame_producer(&site, dir.path()).await;
    let topic = Topic::raw(&site, &seg("prime-1"));
    let mut seen = Seen::new();

    // The first processor runs on a connection of its own that the test can cut, as a
    // crash would (aborting `run` alone would leave its MQTT connection up).
    let cfg = processor_config(&site, "rms-a", &[]);
    let id = rms_processor::identity(&cfg);
    let (bus1, bus1_task) = Bus::connect(&mosquitto(), &site, &id, &Health::default()).unwrap();
    let (stop1, shutdown1) = runtime::shutdown::channel();
    let ctx1 = context(&site, dir.path(), shutdown1);
    let first = tokio::spawn(async move {
        rms_processor::run_on(&bus1, &cfg, &ctx1)
            .await
            .map(|()| bus1)
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // subscribed before the frames
    for k in 0..20 {
        frames
            .send(&topic, frame(&site, "prime-1", k * 500, 500))
            .await
            .unwrap();
    }
    collect_until(&mut rx, &mut seen, Duration::from_secs(20), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 3
    })
    .await;
    // The crash: processing stops mid-flight with no final checkpoint, the connection drops.
    first.abort();
    let _ = first.await;
    bus1_task.abort();
    let _ = bus1_task.await;
    // In a real crash the process is gone; here the first journal's task lives on in this
    // process and holds the journal's lock until told to stop.
    stop1.fire();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for k in 20..40 {
        frames
            .send(&topic, frame(&site, "prime-1", k * 500, 500))
            .await
            .unwrap();
    }
    let (t2, shutdown2) = runtime::shutdown::channel();
    let second = tokio::spawn(rms_processor::run(
        processor_config(&site, "rms-a", &[]),
        context(&site, dir.path(), shutdown2),
    ));
    // 40 frames × 500 = 10 s: windows ending at 1 s … 10 s.
    collect_until(&mut rx, &mut seen, Duration::from_secs(40), |s| {
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
        let copies = &seen[&(format!("rms-a-{site}"), "prime-1".into(), "ct1".into(), *t)];
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
    t2.fire();
    second.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_devices_and_count_each_once() {
    let site = site("rms-two");
    let dir = tempfile::tempdir().unwrap();
    let (mut rx, _sink_bus) = sink(&site).await;
    let (trigger, shutdown) = runtime::shutdown::channel();
    let a = tokio::spawn(rms_processor::run(
        processor_config(&site, "rms-a", &["prime-1"]),
        context(&site, &dir.path().join("a"), shutdown.clone()),
    ));
    let b = tokio::spawn(rms_processor::run(
        processor_config(&site, "rms-b", &["prime-2"]),
        context(&site, &dir.path().join("b"), shutdown),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await; // head start; replay covers a miss
    let (_fbus, frames) = frame_producer(&site, dir.path()).await;
    for k in 0..12 {
        for dev in ["prime-1", "prime-2"] {
            frames
                .send(
                    &Topic::raw(&site, &seg(dev)),
                    frame(&site, dev, k * 1000, 1000),
                )
                .await
                .unwrap();
        }
    }
    let mut seen = Seen::new();
    collect_until(&mut rx, &mut seen, Duration::from_secs(30), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 6 && windows_of(s, "prime-2", "ct1").len() >= 6
    })
    .await;
    for (dev, owner) in [
        ("prime-1", format!("rms-a-{site}")),
        ("prime-2", format!("rms-b-{site}")),
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
    trigger.fire();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_arrives_late_is_waited_for_not_skipped() {
    // As when the broker drops a frame on its way and the producer replays it later: the
    // frames after it say they continue their run, so the processor waits for the hole to
    // be filled instead of closing the window early and skipping the late frame.
    let site = site("rms-late");
    let dir = tempfile::tempdir().unwrap();
    let (mut rx, _sink_bus) = sink(&site).await;
    let (trigger, shutdown) = runtime::shutdown::channel();
    let proc = tokio::spawn(rms_processor::run(
        processor_config(&site, "rms-a", &[]),
        context(&site, dir.path(), shutdown),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_fbus, frames) = frame_producer(&site, dir.path()).await;
    let topic = Topic::raw(&site, &seg("prime-1"));
    for k in (0..8).chain(9..16) {
        frames
            .send(&topic, frame(&site, "prime-1", k * 500, 500))
            .await
            .unwrap();
    }
    let mut seen = Seen::new();
    collect_until(&mut rx, &mut seen, Duration::from_secs(2), |s| {
        !windows_of(s, "prime-1", "ct1").is_empty() && windows_of(s, "prime-1", "ct1").len() >= 3
    })
    .await;
    assert_eq!(
        windows_of(&seen, "prime-1", "ct1").len(),
        2,
        "windows up to the hole (samples 0..4000), nothing across it"
    );
    frames
        .send(&topic, frame(&site, "prime-1", 8 * 500, 500))
        .await
        .unwrap();
    collect_until(&mut rx, &mut seen, Duration::from_secs(20), |s| {
        windows_of(s, "prime-1", "ct1").len() >= 4
    })
    .await;
    let ts = windows_of(&seen, "prime-1", "ct1");
    assert_eq!(
        ts,
        (1..=4).map(|s| T0_US / 1000 + s * 1000).collect::<Vec<_>>()
    );
    let last = &seen[&(
        format!("rms-a-{site}"),
        "prime-1".into(),
        "ct1".into(),
        ts[3],
    )][0];
    let wh = 920.0 * 4.0 / 3600.0;
    assert!(within(last["energy_import_wh"], wh, 0.01), "{last:?}");
    assert!(wait_for(|| async { frames.pending().await == 0 }).await);
    trigger.fire();
    proc.await.unwrap().unwrap();
}
