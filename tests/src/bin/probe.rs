//! Test and benchmark probe: a journaled producer and an idempotent, durable consumer, built
//! on the runtime exactly as services are.
//!
//! `probe produce`: send `--count` measurements (reading `i` has `ts_ms = base + i` and field
//! `reading_n = i`, so each has a unique identity), then wait until every one is acknowledged
//! by the sink group, and print `{"sent":…,"secs":…,"rate":…}`.
//!
//! `probe consume`: store each reading once in an append-only file (`<ts_ms> <producer> <seq>`
//! lines, fsynced before acknowledging), acknowledge, run until SIGTERM. On start it reloads
//! the file, so a replayed reading is recognised and not stored twice — the idempotence real
//! sinks (InfluxDB) get from point identity.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proto::{Filter, Measurement, Quality, Segment, Topic};
use runtime::bus::{Bus, Identity};
use runtime::config::{BusConfig, InboxConfig, JournalKind, StreamConfig};
use runtime::delivery::{DeliveryError, Inbox, Producer};
use runtime::{Common, Health, Secret};

#[derive(Parser, Debug)]
struct Cli {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "probe")]
    user: String,
    #[arg(long, default_value = "")]
    password: String,
    #[arg(long)]
    data_dir: PathBuf,
    /// The site readings are published under.
    #[arg(long, default_value = "probe")]
    site: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    Produce {
        #[arg(long)]
        count: u64,
        /// Messages per second; 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value = "probe-producer")]
        instance: String,
        #[arg(long, default_value = "probe-sink")]
        wait_for: String,
        #[arg(long, default_value_t = 1000)]
        ack_timeout_ms: u64,
        #[arg(long, default_value_t = 1000)]
        fsync_interval_ms: u64,
        /// Keep the journal in memory instead of on disk.
        #[arg(long)]
        memory: bool,
        /// Give up waiting for acknowledgements after this long.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
        /// Reading number K goes to measurement `odd` instead of `probe` (for a reading a
        /// database refuses).
        #[arg(long)]
        odd_at: Option<u64>,
        /// Reading number K names device `probe-forged` in its payload while it is published
        /// (and journaled) on `probe-dev`'s topic: a mislabelled or forged reading.
        #[arg(long)]
        mislabel_at: Option<u64>,
        /// Reading number K also carries `power_w = 1e308`, a value no meter can read.
        #[arg(long)]
        implausible_at: Option<u64>,
        /// Reading `i` is stamped `base + i` ms [default: a fixed day in 2025, so stores can
        /// be queried by it; `now` for the time the probe starts].
        #[arg(long)]
        base_ts_ms: Option<String>,
    },
    /// A processor: re-publishes each reading of `probe-dev` as device `probe-relayed` through
    /// its own journal, acknowledging the input only once the output is fsynced.
    Relay {
        #[arg(long, default_value = "probe-relay")]
        instance: String,
        #[arg(long, default_value = "probe-relay")]
        sink: String,
        #[arg(long, default_value = "probe-sink")]
        wait_for: String,
    },
    Consume {
        #[arg(long)]
        store: PathBuf,
        /// Only this device's readings (default: all).
        #[arg(long)]
        device: Option<String>,
        /// Join the sink group as a shared subscription (`$share/<sink>/...`).
        #[arg(long)]
        shared: bool,
        #[arg(long, default_value = "probe-consumer")]
        instance: String,
        #[arg(long, default_value = "probe-sink")]
        sink: String,
    },
}

/// All readings share one base time so a consumer can tell them apart by `ts_ms`.
const BASE_TS_MS: i64 = 1_764_000_000_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::telemetry::init_logging(&runtime::config::LogConfig {
        level: "info".into(),
        ..Default::default()
    })?;
    let common = Common {
        site: Segment::new(cli.site.clone())?,
        data_dir: cli.data_dir.clone(),
        bus: BusConfig {
            port: cli.port,
            username: Some(cli.user.clone()),
            password: Some(Secret::new(cli.password.clone())),
            reconnect_max_ms: 1000,
            ..BusConfig::default()
        },
        ..Common::default()
    };
    let (trigger, shutdown) = runtime::shutdown::channel();
    match cli.mode {
        Mode::Produce {
            count,
            rate,
            instance,
            wait_for,
            ack_timeout_ms,
            fsync_interval_ms,
            memory,
            timeout_s,
            odd_at,
            mislabel_at,
            implausible_at,
            base_ts_ms,
        } => {
            let base = match base_ts_ms.as_deref() {
                None => BASE_TS_MS,
                Some("now") => proto::now_ms(),
                Some(v) => v.parse().context("--base-ts-ms")?,
            };
            let (bus, bus_task) = connect(&common, instance)?;
            // Without a sink group nothing is replayed: readings published before the
            // connection is up would only be held, so wait for it.
            if wait_for.is_empty() {
                anyhow::ensure!(
                    bus.wait_connected(Duration::from_secs(30)).await,
                    "no connection to the broker within 30 s"
                );
            }
            let stream = StreamConfig {
                journal: if memory {
                    JournalKind::Memory
                } else {
                    JournalKind::Disk
                },
                // "" = no configured sink group (benchmarks of consumers that do not
                // acknowledge, and register nothing): the journal holds every reading, and the
                // probe does not wait for it to drain.
                wait_for: if wait_for.is_empty() {
                    Vec::new()
                } else {
                    vec![Segment::new(wait_for)?]
                },
                ack_timeout_ms,
                ack_timeout_max_ms: ack_timeout_ms * 4,
                fsync_interval_ms,
                max_bytes: 256 << 20,
                segment_bytes: 4 << 20,
                ..StreamConfig::default()
            };
            let device = Segment::new("probe-dev")?;
            let (producer, task) = Producer::open(
                &bus,
                &Segment::new("meas")?,
                &Filter::measurements(Some(&common.site), Some(&device)),
                &stream,
                &common.data_dir,
                shutdown.clone(),
            )?;
            let channel = Segment::new("ch")?;
            let topic = Topic::measurement(&common.site, &device, &channel);
            let start = Instant::now();
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            println!("{{\"start\":{unix:.3}}}");
            for i in 0..count {
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut m = Measurement {
                    origin: None,
                    site: common.site.clone(),
                    device: device.clone(),
                    channel: channel.clone(),
                    measurement: Segment::new(if odd_at == Some(i) { "odd" } else { "probe" })?,
                    ts_ms: base + i as i64,
                    quality: Quality::Good,
                    fields: [("reading_n".to_string(), i as f64)].into(),
                    tags: Default::default(),
                };
                if mislabel_at == Some(i) {
                    m.device = Segment::new("probe-forged")?;
                }
                if implausible_at == Some(i) {
                    m.fields.insert("power_w".to_string(), 1e308);
                }
                producer.send(&topic, m).await?;
            }
            let sent_secs = start.elapsed().as_secs_f64();
            // Tests wait for this line to crash the producer with everything journaled.
            println!("{{\"published\":{count}}}");
            std::io::Write::flush(&mut std::io::stdout())?;
            let deadline = Instant::now() + Duration::from_secs(timeout_s);
            while !stream.wait_for.is_empty() && producer.pending().await > 0 {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{} readings still unacknowledged after {timeout_s} s",
                    producer.pending().await
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"sent\":{count},\"publish_secs\":{sent_secs:.3},\"secs\":{secs:.3},\"rate\":{:.0}}}",
                count as f64 / secs
            );
            trigger.fire();
            let _ = task.await;
            bus.close(bus_task).await;
        }
        Mode::Relay {
            instance,
            sink,
            wait_for,
        } => {
            let (bus, bus_task) = connect(&common, instance)?;
            let stream = StreamConfig {
                wait_for: vec![Segment::new(wait_for)?],
                ack_timeout_ms: 1000,
                ack_timeout_max_ms: 4000,
                ..StreamConfig::default()
            };
            let relayed = Segment::new("probe-relayed")?;
            let (producer, ptask) = Producer::open(
                &bus,
                &Segment::new("meas")?,
                &Filter::measurements(Some(&common.site), Some(&relayed)),
                &stream,
                &common.data_dir,
                shutdown.clone(),
            )?;
            let input = Segment::new("probe-dev")?;
            let (mut inbox, ack_task) = Inbox::<Measurement>::subscribe(
                &bus,
                &Filter::measurements(None, Some(&input)),
                &Segment::new(sink)?,
                &InboxConfig {
                    ack_interval_ms: 100,
                    ..Default::default()
                },
            );
            let acker = inbox.acker();
            announce_subscribed(&bus).await?;
            let sig =
                tokio::spawn(async move { runtime::shutdown::fire_on_signal(&trigger).await });
            loop {
                let d = tokio::select! {
                    () = shutdown.wait() => break,
                    d = inbox.recv() => match d { Some(d) => d, None => break },
                };
                let mut m = d.message;
                m.origin = None;
                m.device = relayed.clone();
                let topic = Topic::measurement(&m.site, &relayed, &m.channel);
                // A processor: an output the journal cannot take is waited for, and its input
                // is not acknowledged unless the output is journaled.
                let sent = match producer.send_journaled(&topic, m).await {
                    Ok(sent) => sent,
                    Err(DeliveryError::Stopped) => break,
                    Err(e) => return Err(e.into()),
                };
                if let Some(t) = &d.token {
                    acker.ack_after_sync(t, &producer, sent.seq);
                }
            }
            drop(inbox);
            drop(acker);
            let _ = ack_task.await;
            let _ = ptask.await;
            bus.close(bus_task).await;
            sig.abort();
        }
        Mode::Consume {
            store,
            device,
            shared,
            instance,
            sink,
        } => {
            let device = device.map(Segment::new).transpose()?;
            let (bus, bus_task) = connect(&common, instance)?;
            let mut seen = load_store(&store)?;
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&store)
                .with_context(|| format!("open {}", store.display()))?;
            let (mut inbox, ack_task) = Inbox::<Measurement>::subscribe(
                &bus,
                &Filter::measurements(None, device.as_ref()),
                &Segment::new(sink)?,
                &InboxConfig {
                    ack_interval_ms: 100,
                    shared,
                },
            );
            let acker = inbox.acker();
            announce_subscribed(&bus).await?;
            let mut batch = Vec::new();
            let sig =
                tokio::spawn(async move { runtime::shutdown::fire_on_signal(&trigger).await });
            loop {
                // Take what is there, store it durably, then acknowledge the lot.
                let first = tokio::select! {
                    () = shutdown.wait() => break,
                    d = inbox.recv() => match d { Some(d) => d, None => break },
                };
                batch.push(first);
                while batch.len() < 1000 {
                    match tokio::time::timeout(Duration::from_millis(5), inbox.recv()).await {
                        Ok(Some(d)) => batch.push(d),
                        _ => break,
                    }
                }
                let mut text = String::new();
                for d in &batch {
                    if seen.insert(d.message.ts_ms) {
                        let o = d.message.origin.as_ref();
                        text.push_str(&format!(
                            "{} {} {}\n",
                            d.message.ts_ms,
                            o.map_or("-", |o| o.producer.as_str()),
                            o.map_or(0, |o| o.seq)
                        ));
                    }
                }
                file.write_all(text.as_bytes())?;
                file.sync_data()?;
                for d in batch.drain(..) {
                    if let Some(t) = &d.token {
                        acker.ack(t);
                    }
                }
            }
            drop(inbox);
            drop(acker);
            let _ = ack_task.await;
            bus.close(bus_task).await;
            sig.abort();
        }
    }
    Ok(())
}

fn connect(
    common: &Common,
    instance: String,
) -> anyhow::Result<(Bus, tokio::task::JoinHandle<()>)> {
    let id = Identity {
        service: Segment::new("probe")?,
        instance: Segment::new(instance)?,
    };
    Ok(Bus::connect(
        &common.bus,
        &common.site,
        &id,
        &Health::default(),
    )?)
}

/// Tell the test (on stdout) that the broker has confirmed our subscriptions, so it can start
/// producing without guessing with a sleep.
async fn announce_subscribed(bus: &Bus) -> anyhow::Result<()> {
    anyhow::ensure!(
        bus.wait_subscribed(Duration::from_secs(30)).await,
        "subscriptions not confirmed within 30 s"
    );
    println!("{{\"subscribed\":true}}");
    std::io::Write::flush(&mut std::io::stdout())?;
    Ok(())
}

/// Readings already stored. A torn last line (killed mid-write) is cut off: it was never
/// acknowledged, so it will be delivered again.
fn load_store(path: &PathBuf) -> anyhow::Result<HashSet<i64>> {
    let mut seen = HashSet::new();
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seen),
        Err(e) => return Err(e.into()),
    };
    let mut good = 0usize;
    for line in data.split_inclusive(|b| *b == b'\n') {
        // Only whole lines count: a line without its newline was cut by a kill.
        let Some(body) = line.strip_suffix(b"\n") else {
            break;
        };
        let text = String::from_utf8_lossy(body);
        let parts: Vec<&str> = text.split(' ').collect();
        let Some(ts) = parts
            .first()
            .and_then(|t| t.parse::<i64>().ok())
            .filter(|_| parts.len() == 3)
        else {
            break;
        };
        seen.insert(ts);
        good += line.len();
    }
    if good < data.len() {
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(good as u64)?;
    }
    Ok(seen)
}
