//! rms-processor throughput through the broker (driven by tests/bench/rms-processor.sh).
//!
//! Publishes raw frames (`--channels` × `--samples` at `--rate-hz`, so one frame is one window
//! of the processor's default 1 s interval) for `--devices` devices, round robin, through a
//! `runtime::delivery::Producer` with a memory journal that waits for the `rms-processor`
//! group, exactly as serial-ingest publishes them. It counts the processor's measurements on
//! `meas/...` and keeps at most `--window` frames published but not yet turned into
//! measurements: the broker buffers only a few MiB per subscription (a processor that falls
//! further behind loses frames and gets them again after the acknowledgement timeout), so
//! "as fast as the path takes them" needs that bound, not an open tap.
//!
//! The clock starts after one warm-up frame per device has come back as measurements (the
//! processor is subscribed and has its state) and stops when every measurement has arrived
//! *and* the producer's journal is empty (every frame acknowledged by the processor, which it
//! does at its checkpoints). Prints one JSON line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use proto::{Filter, Measurement, Payload, RawChannel, RawFrame, Segment, Topic};
use runtime::bus::{Bus, Identity, Overflow, QoS};
use runtime::config::{BusConfig, JournalKind, StreamConfig};
use runtime::delivery::Producer;
use runtime::{Common, Health, Secret};
use tokio::sync::watch;

#[derive(Parser, Debug)]
struct Cli {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "probe")]
    user: String,
    /// File holding the broker password.
    #[arg(long)]
    password_file: std::path::PathBuf,
    #[arg(long)]
    data_dir: std::path::PathBuf,
    #[arg(long, default_value = "bench")]
    site: String,
    /// Devices, frames sent round robin.
    #[arg(long, default_value_t = 4)]
    devices: u64,
    /// Timed frames per device (after one warm-up frame each).
    #[arg(long, default_value_t = 500)]
    frames: u64,
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Samples per channel per frame.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    #[arg(long, default_value_t = 2000.0)]
    rate_hz: f64,
    /// Most frames published but not yet back as measurements.
    #[arg(long, default_value_t = 32)]
    window: u64,
    /// The producer's acknowledgement timeout (replays after it).
    #[arg(long, default_value_t = 10_000)]
    ack_timeout_ms: u64,
    /// The sink group the raw stream waits for.
    #[arg(long, default_value = "rms-processor")]
    wait_for: String,
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::telemetry::init_logging(&runtime::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    })?;
    let password = std::fs::read_to_string(&cli.password_file)
        .with_context(|| format!("read password file {}", cli.password_file.display()))?;
    let site = Segment::new(cli.site.clone())?;
    let common = Common {
        site: site.clone(),
        data_dir: cli.data_dir.clone(),
        bus: BusConfig {
            port: cli.port,
            username: Some(cli.user.clone()),
            password: Some(Secret::new(password.trim_end().to_string())),
            ..BusConfig::default()
        },
        ..Common::default()
    };
    let (trigger, shutdown) = runtime::shutdown::channel();
    let id = Identity {
        service: Segment::new("rms-bench")?,
        instance: Segment::new("rms-bench")?,
    };
    let (bus, bus_task) = Bus::connect(&common.bus, &site, &id, &Health::default())?;

    // The counter only watches: a plain subscription, not an `Inbox`, so it registers no sink
    // group and the processor waits for nobody (its readings stay in its journal).
    let mut watch = bus.subscribe(
        Filter::measurements(Some(&site), None).as_str().to_string(),
        QoS::AtLeastOnce,
        Overflow::Wait,
    );
    anyhow::ensure!(
        bus.wait_subscribed(Duration::from_secs(30)).await,
        "subscription to measurements not confirmed within 30 s"
    );
    let measured = Arc::new(AtomicU64::new(0));
    let (count_tx, mut count_rx) = watch::channel(0u64);
    let counter = {
        let measured = measured.clone();
        tokio::spawn(async move {
            while let Some(msg) = watch.recv().await {
                let Ok(m) = Measurement::decode(&msg.payload) else {
                    continue;
                };
                if m.device.as_str().starts_with("bench-") {
                    let n = measured.fetch_add(1, Ordering::Relaxed) + 1;
                    count_tx.send_replace(n);
                }
            }
        })
    };

    let stream = StreamConfig {
        journal: JournalKind::Memory,
        wait_for: vec![Segment::new(cli.wait_for.clone())?],
        ack_timeout_ms: cli.ack_timeout_ms,
        ack_timeout_max_ms: cli.ack_timeout_ms * 4,
        max_bytes: 512 << 20,
        segment_bytes: 4 << 20,
        ..StreamConfig::default()
    };
    let (producer, producer_task) = Producer::open(
        &bus,
        &Segment::new("raw")?,
        &Filter::raw(Some(&common.site), None),
        &stream,
        &common.data_dir,
        shutdown.clone(),
    )?;

    // One second of a 50 Hz current per channel (a whole number of cycles, so consecutive
    // frames join without a step), different amplitude and phase per channel; values in amps
    // as serial-ingest publishes them after scaling.
    let period_us = 1e6 / cli.rate_hz;
    let frame_us = (cli.samples as f64 * period_us).round() as i64;
    let channels: Vec<RawChannel> = (0..cli.channels)
        .map(|c| {
            let amp = 2.0 + 3.0 * c as f64;
            let samples = (0..cli.samples)
                .map(|i| {
                    let t = i as f64 / cli.rate_hz;
                    (amp * (std::f64::consts::TAU * 50.0 * t + c as f64).sin()
                        + 0.01 * ((i * 7919 % 101) as f64 - 50.0) / 50.0) as f32
                })
                .collect();
            Ok(RawChannel {
                channel: Segment::new(format!("ct{}", c + 1))?,
                unit: Segment::new("a")?,
                samples,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let devices: Vec<Segment> = (0..cli.devices)
        .map(|d| Segment::new(format!("bench-{d}")))
        .collect::<Result<_, _>>()?;
    let topics: Vec<Topic<RawFrame>> = devices.iter().map(|d| Topic::raw(&site, d)).collect();
    // A fixed start, whole seconds: a fresh processor has no mark for these devices.
    let base_us: i64 = 1_764_000_000_000_000;
    let per_frame = cli.channels as u64; // measurements per frame: one per current channel
    let frame = |k: u64, d: usize| RawFrame {
        origin: None,
        site: site.clone(),
        device: devices[d].clone(),
        start_ts_us: base_us + k as i64 * frame_us,
        sample_rate_hz: cli.rate_hz,
        continues: k > 0,
        channels: channels.clone(),
    };

    // Warm-up: frame 0 of every device, until its measurements are back.
    for (d, topic) in topics.iter().enumerate() {
        producer.send(topic, frame(0, d)).await?;
    }
    let warm = cli.devices * per_frame;
    tokio::time::timeout(Duration::from_secs(60), count_rx.wait_for(|n| *n >= warm))
        .await
        .context("warm-up frames not processed within 60 s (is rms-processor running?)")??;
    let cpu0 = self_cpu_s()?;

    let start = Instant::now();
    let mut published: u64 = 0;
    for k in 1..=cli.frames {
        for (d, topic) in topics.iter().enumerate() {
            // Frames published but not yet back as measurements stay within the window.
            let limit = published;
            count_rx
                .wait_for(|n| limit < cli.window || (n - warm) / per_frame > limit - cli.window)
                .await?;
            producer.send(topic, frame(k, d)).await?;
            published += 1;
        }
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let expected = warm + published * per_frame;
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_s);
    let mut processed_secs = None;
    loop {
        let n = measured.load(Ordering::Relaxed);
        if n >= expected && processed_secs.is_none() {
            processed_secs = Some(start.elapsed().as_secs_f64());
        }
        let pending = producer.pending().await;
        if n >= expected && pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "after {} s: {n} of {expected} measurements, {pending} frames unacknowledged",
            cli.timeout_s
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = self_cpu_s()? - cpu0;
    let instants = published * cli.samples as u64;
    let samples = instants * cli.channels as u64;
    println!(
        "{{\"frames\":{published},\"samples\":{samples},\"sample_instants\":{instants},\"measurements\":{},\"publish_secs\":{publish_secs:.3},\"processed_secs\":{:.3},\"secs\":{secs:.3},\"rate\":{:.0},\"instant_rate\":{:.0},\"processed_rate\":{:.0},\"bench_cpu_s\":{cpu:.2}}}",
        measured.load(Ordering::Relaxed) - warm,
        processed_secs.unwrap_or(secs),
        samples as f64 / secs,
        instants as f64 / secs,
        samples as f64 / processed_secs.unwrap_or(secs),
    );
    trigger.fire();
    if let Err(e) = producer_task.await {
        tracing::warn!(error = %e, "Producer task ended abnormally.");
    }
    counter.abort();
    bus.close(bus_task).await;
    Ok(())
}

/// utime + stime of this process, in seconds.
fn self_cpu_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("unexpected /proc/self/stat format")?;
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // USER_HZ, what `getconf CLK_TCK` prints: 100 on every Linux we run on.
    Ok(ticks / 100.0)
}
