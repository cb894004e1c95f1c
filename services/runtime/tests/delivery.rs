//! The runtime against a real broker nobody here wrote: mosquitto, started by tests/run.sh
//! (MOSQUITTO_TEST_BROKER=host:port:user:password). Each test uses its own site, so tests
//! sharing the broker cannot see each other's messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proto::{DeadLetter, Filter, Measurement, Payload, Quality, Segment, Topic};
use runtime::bus::{Bus, Identity, Overflow, QoS};
use runtime::config::{InboxConfig, StreamConfig};
use runtime::delivery::{Inbox, Producer};
use runtime::{Health, Shutdown};
use wattbus_testkit::{mosquitto_client, seg, site};

async fn connect(site: &Segment, name: &str) -> (Bus, tokio::task::JoinHandle<()>) {
    mosquitto_client(site, "test", name).await
}

fn reading(site: &Segment, i: i64) -> Measurement {
    Measurement {
        origin: None,
        site: site.clone(),
        device: seg("d"),
        channel: seg("c"),
        measurement: seg("power"),
        ts_ms: 1_764_000_000_000 + i,
        quality: Quality::Good,
        fields: [("power_w".to_string(), i as f64)].into(),
        tags: Default::default(),
    }
}

#[tokio::test]
async fn a_full_journal_drops_the_oldest_and_counts_them() {
    let site = site("full");
    let (bus, _task) = connect(&site, "producer").await;
    let dir = tempfile::tempdir().unwrap();
    // Waits for a sink that never comes; the journal holds at most 64 KiB.
    let cfg = StreamConfig {
        max_bytes: 64 * 1024,
        segment_bytes: 8 * 1024,
        wait_for: vec![seg("absent")],
        ..StreamConfig::default()
    };
    let (producer, _ptask) = open_meas(&bus, &site, "meas", &cfg, dir.path(), Shutdown::never());
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    for i in 0..3000 {
        producer.send(&topic, reading(&site, i)).await.unwrap();
    }
    let held = producer.pending().await;
    assert!(held > 0 && held < 3000, "journal holds {held} records");
    let metrics = runtime::telemetry::render();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("wattbus_journal_dropped_records_total{stream=\"meas\"}"))
        .unwrap_or_else(|| panic!("no drop counter in:\n{metrics}"));
    let dropped: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        dropped + held,
        3000,
        "every record is either held or counted as dropped"
    );
}

#[tokio::test]
async fn malformed_messages_go_to_the_dead_letter_topic_and_valid_ones_still_arrive() {
    let site = site("dead");
    let (bus, _task) = connect(&site, "sink").await;
    let mut dead = bus.subscribe(
        Filter::<DeadLetter>::dead_letters(Some(&site))
            .as_str()
            .to_string(),
        QoS::AtLeastOnce,
        Overflow::Wait,
    );
    let (mut inbox, _acks) = Inbox::<Measurement>::subscribe(
        &bus,
        &Filter::measurements(Some(&site), None),
        &seg("sink"),
        &InboxConfig::default(),
    );
    assert!(bus.wait_subscribed(Duration::from_secs(10)).await);
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    bus.publish(topic.as_str(), b"{\"power_w\": NaN}".to_vec(), false)
        .await
        .unwrap();
    bus.send(&topic, &reading(&site, 1), false).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.message.fields["power_w"], 1.0,
        "the valid reading after the bad one arrives"
    );
    let msg = tokio::time::timeout(Duration::from_secs(10), dead.recv())
        .await
        .unwrap()
        .unwrap();
    let dl = DeadLetter::decode(&msg.payload).unwrap();
    assert_eq!(dl.topic, topic.as_str());
    assert_eq!(dl.payload, "{\"power_w\": NaN}");
    assert!(
        dl.reason.contains("not valid measurement JSON"),
        "{}",
        dl.reason
    );

    // A journaled message (it has an origin) that cannot be read is dead-lettered *and*
    // acknowledged, so it cannot pin its producer's journal.
    let ack_filter =
        proto::Filter::<proto::Ack>::acks_for(&site, &seg("old-producer"), &seg("meas"));
    let mut acks = bus.subscribe(
        ack_filter.as_str().to_string(),
        QoS::AtLeastOnce,
        Overflow::Wait,
    );
    assert!(bus.wait_subscribed(Duration::from_secs(10)).await);
    let poison = format!(
        "{{\"origin\":{{\"producer\":\"old-producer\",\"stream\":\"meas\",\"seq\":77}},\"site\":\"{site}\",\"quality\":\"superb\"}}"
    );
    bus.publish(topic.as_str(), poison.into_bytes(), false)
        .await
        .unwrap();
    bus.send(&topic, &reading(&site, 2), false).await.unwrap();
    // The sink reads on; the poison is handled on the way.
    let next = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.message.fields["power_w"], 2.0);
    let msg = tokio::time::timeout(Duration::from_secs(10), dead.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        DeadLetter::decode(&msg.payload)
            .unwrap()
            .payload
            .contains("superb")
    );
    let ack = tokio::time::timeout(Duration::from_secs(10), acks.recv())
        .await
        .expect("the poison record was never acknowledged")
        .unwrap();
    let ack = proto::Ack::decode(&ack.payload).unwrap();
    assert_eq!(ack.ranges, vec![[77, 77]]);
    assert_eq!(ack.sink.as_str(), "sink");
}

#[tokio::test]
async fn acknowledged_records_are_trimmed_from_the_journal() {
    let site = site("trim");
    let (pbus, _pt) = connect(&site, "producer").await;
    let (sbus, _st) = connect(&site, "sink").await;
    let (mut inbox, _acks) = Inbox::<Measurement>::subscribe(
        &sbus,
        &Filter::measurements(Some(&site), None),
        &seg("store"),
        &InboxConfig {
            ack_interval_ms: 50,
            ..InboxConfig::default()
        },
    );
    assert!(sbus.wait_subscribed(Duration::from_secs(10)).await);
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so 100 readings fill several that must be deleted once acknowledged.
    let cfg = StreamConfig {
        wait_for: vec![seg("store")],
        segment_bytes: 4096,
        ..StreamConfig::default()
    };
    let (producer, _ptask) = open_meas(&pbus, &site, "meas", &cfg, dir.path(), Shutdown::never());
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    for i in 0..100 {
        producer.send(&topic, reading(&site, i)).await.unwrap();
    }
    let acker = inbox.acker();
    for _ in 0..100 {
        let d = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        acker.ack(d.token.as_ref().unwrap());
    }
    let drained = async {
        while producer.pending().await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("journal not trimmed after every record was acknowledged");
    // Closed segments are deleted from disk; only the active one (acknowledged, kept to be
    // written on) may remain, so a 1 Hz stream does not create and delete a file per reading.
    let segs = walk(dir.path());
    assert!(segs <= 1, "{segs} segment files left behind");
}

fn walk(p: &std::path::Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        walk(&path)
                    } else {
                        usize::from(path.extension().is_some_and(|x| x == "seg"))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The stream `stream` of the producer on `bus`, publishing readings of `site`.
fn fsyncs(stream: &str) -> u64 {
    runtime::telemetry::Counter::new(
        "wattbus_journal_fsyncs_total",
        "test",
        &[("service", "test"), ("stream", stream)],
    )
    .get()
}

/// SD-card wear: a journal whose every record a sink stores within `fsync_interval_ms` is
/// not fsynced (the records are durable where they were stored, and written to the kernel
/// before they were published, so a killed process loses nothing either way). Once no sink
/// stores them, the records that waited that long are fsynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stored_in_time_are_never_fsynced_and_the_others_are() {
    let site = site("fsync");
    let (pbus, _pt) = connect(&site, "producer").await;
    let mut sink = Sink::start(&site, "store").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = StreamConfig {
        wait_for: vec![seg("store")],
        // Far above how long the sink takes even on a loaded machine.
        fsync_interval_ms: 5000,
        ..StreamConfig::default()
    };
    let (producer, _ptask) =
        open_meas(&pbus, &site, "fsynced", &cfg, dir.path(), Shutdown::never());
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    // Longer than the interval: a journal fsynced on a timer would have been by now.
    for i in 0..60 {
        producer.send(&topic, reading(&site, i)).await.unwrap();
        sink.store_until(i as usize + 1, Duration::from_secs(10))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            producer.pending().await == 0
        })
        .await,
        "the sink did not store every record"
    );
    assert_eq!(fsyncs("fsynced"), 0, "records the sink stored were fsynced");
    // What a processor's checkpoint asks for: nothing is owed.
    producer.sync_unstored().await.unwrap();
    assert_eq!(
        fsyncs("fsynced"),
        0,
        "sync_unstored fsynced what the sink stored"
    );
    // The sink goes away: what it no longer stores is fsynced once it has waited.
    sink.stop().await;
    for i in 60..65 {
        producer.send(&topic, reading(&site, i)).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || async { fsyncs("fsynced") > 0 }).await,
        "records no sink stored were never fsynced"
    );
    assert_eq!(producer.pending().await, 5);
    // One more, unstored: a checkpoint fsyncs it at once.
    let before = fsyncs("fsynced");
    producer.send(&topic, reading(&site, 65)).await.unwrap();
    producer.sync_unstored().await.unwrap();
    assert_eq!(fsyncs("fsynced"), before + 1);
}

fn open_meas(
    bus: &Bus,
    site: &Segment,
    stream: &str,
    cfg: &StreamConfig,
    dir: &std::path::Path,
    shutdown: Shutdown,
) -> (Producer, tokio::task::JoinHandle<()>) {
    Producer::open(
        bus,
        &seg(stream),
        &Filter::measurements(Some(site), None),
        cfg,
        dir,
        shutdown,
    )
    .unwrap()
}

/// A sink group `group` on its own connection: stores (here: keeps in memory) and acknowledges
/// every reading of `site`, and registers the group (retained) as every `Inbox` owner does.
struct Sink {
    bus: Bus,
    bus_task: tokio::task::JoinHandle<()>,
    inbox: Inbox<Measurement>,
    ack_task: tokio::task::JoinHandle<()>,
    /// `ts_ms` of every reading stored.
    stored: std::collections::BTreeSet<i64>,
}

impl Sink {
    async fn start(site: &Segment, group: &str) -> Sink {
        let (bus, bus_task) = connect(site, group).await;
        let (inbox, ack_task) = Inbox::<Measurement>::subscribe(
            &bus,
            &Filter::measurements(Some(site), None),
            &seg(group),
            &InboxConfig {
                ack_interval_ms: 50,
                ..InboxConfig::default()
            },
        );
        assert!(bus.wait_subscribed(Duration::from_secs(10)).await);
        Sink {
            bus,
            bus_task,
            inbox,
            ack_task,
            stored: Default::default(),
        }
    }

    /// Stores and acknowledges until `n` distinct readings are stored, or fails after `wait`.
    async fn store_until(&mut self, n: usize, wait: Duration) {
        let end = tokio::time::Instant::now() + wait;
        let acker = self.inbox.acker();
        while self.stored.len() < n {
            let d = tokio::time::timeout_at(end, self.inbox.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {n} readings stored within {wait:?}",
                        self.stored.len()
                    )
                })
                .expect("the sink's bus closed");
            self.stored.insert(d.message.ts_ms);
            acker.ack(d.token.as_ref().expect("a journaled reading has an origin"));
        }
    }

    /// Stops the way a stopped container does: last acknowledgements out, offline, gone.
    async fn stop(self) {
        drop(self.inbox);
        self.ack_task.await.unwrap();
        self.bus.close(self.bus_task).await;
    }
}

/// A producer stream `stream` of instance `name` on its own connection, journal in `dir`.
struct Stream {
    bus: Bus,
    bus_task: tokio::task::JoinHandle<()>,
    p: Producer,
    trigger: runtime::shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    async fn open(
        site: &Segment,
        name: &str,
        stream: &str,
        cfg: &StreamConfig,
        dir: &std::path::Path,
    ) -> Stream {
        let (bus, bus_task) = connect(site, name).await;
        let (trigger, shutdown) = runtime::shutdown::channel();
        let (p, task) = open_meas(&bus, site, stream, cfg, dir, shutdown);
        Stream {
            bus,
            bus_task,
            p,
            trigger,
            task,
        }
    }

    /// [`Stream::open`] as instance `p`; then sink group `store` registers, the stream learns
    /// it, and the sink stops: the writer is down, and its readings must wait for it.
    async fn with_store_gone(
        site: &Segment,
        stream: &str,
        cfg: &StreamConfig,
        dir: &std::path::Path,
    ) -> Stream {
        let s = Stream::open(site, "p", stream, cfg, dir).await;
        let store = Sink::start(site, "store").await;
        assert!(
            learns(dir, site, "p", stream, &["store"]).await,
            "the producer did not learn the group that registered"
        );
        store.stop().await;
        s
    }

    /// A clean stop: the journal is closed (and unlocked) once this returns.
    async fn stop(self) {
        self.trigger.fire();
        self.task.await.unwrap();
        drop(self.p);
        self.bus.close(self.bus_task).await;
    }
}

/// Polls `cond` every 20 ms until it holds, at most `wait`.
async fn eventually<F, Fut>(wait: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + wait;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The groups a journal learned, as its file says.
fn learned(dir: &std::path::Path, site: &Segment, name: &str, stream: &str) -> Vec<String> {
    let jdir = runtime::delivery::journal_dir(dir, &seg(&format!("{name}-{site}")), &seg(stream));
    runtime::learned::load(&jdir)
        .unwrap()
        .groups
        .into_iter()
        .map(String::from)
        .collect()
}

/// Waits until the producer of `stream` has handled everything published on its
/// acknowledgement `topic` so far: a malformed acknowledgement sent after them is counted once
/// they are all handled (one publisher, one subscription: in order).
async fn handled(forger: &Bus, topic: &str, stream: &str) {
    let malformed = || {
        runtime::telemetry::Counter::new(
            "wattbus_malformed_acks_total",
            "test",
            &[("stream", stream)],
        )
        .get()
    };
    let before = malformed();
    forger
        .publish(topic, b"not an acknowledgement".to_vec(), false)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { malformed() > before }).await,
        "the producer did not handle what was published on {topic}"
    );
}

fn replays(stream: &str, sink: &str) -> u64 {
    runtime::telemetry::Counter::new(
        "wattbus_replayed_records_total",
        "test",
        &[("service", "test"), ("stream", stream), ("sink", sink)],
    )
    .get()
}

/// Waits (up to 10 s) until the journal of `name`'s `stream` has learned exactly `groups`.
async fn learns(
    dir: &std::path::Path,
    site: &Segment,
    name: &str,
    stream: &str,
    groups: &[&str],
) -> bool {
    eventually(Duration::from_secs(10), || async {
        learned(dir, site, name, stream) == groups
    })
    .await
}

fn refused(stream: &str, reason: &str) -> u64 {
    runtime::telemetry::Counter::new(
        "wattbus_refused_acks_total",
        "test",
        &[("stream", stream), ("reason", reason)],
    )
    .get()
}

/// A fast replay for tests: due 500 ms after publishing, never waiting more than 2 s.
fn quick() -> StreamConfig {
    StreamConfig {
        ack_timeout_ms: 500,
        ack_timeout_max_ms: 2000,
        ..StreamConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_built_in_defaults_readings_wait_for_a_sink_that_registers_later_and_all_reach_it() {
    let site = site("held");
    let dir = tempfile::tempdir().unwrap();
    // Built-in defaults: no `wait_for`, and no sink group has ever registered.
    let s = Stream::open(&site, "p", "held", &quick(), dir.path()).await;
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    for i in 0..200 {
        s.p.send(&topic, reading(&site, i)).await.unwrap();
    }
    assert_eq!(
        s.p.pending().await,
        200,
        "a reading no sink has stored stays journaled"
    );
    assert!(learned(dir.path(), &site, "p", "held").is_empty());

    let mut sink = Sink::start(&site, "store").await;
    sink.store_until(200, Duration::from_secs(30)).await;
    assert_eq!(
        sink.stored,
        (0..200).map(|i| 1_764_000_000_000 + i).collect(),
        "the sink that came later got every reading held for it"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.p.pending().await == 0
        })
        .await,
        "the journal drains once the sink has stored everything ({} left)",
        s.p.pending().await
    );
    assert_eq!(learned(dir.path(), &site, "p", "held"), vec!["store"]);
    sink.stop().await;
}

/// The broker restarted without its retained messages (nothing tells of `store` any more);
/// the producer of `stream` restarts, and the sink group `fast` (in its `wait_for`) stores
/// `n` new readings. Returns an admin connection, the stream and `fast`.
async fn restart_with_store_forgotten(
    site: &Segment,
    stream: &str,
    cfg: &StreamConfig,
    dir: &std::path::Path,
    n: i64,
) -> (Bus, Stream, Sink) {
    let (admin, _at) = connect(site, "admin").await;
    let gone = proto::Topic::<proto::SinkRegistration>::sink_registration(site, &seg("store"));
    admin
        .publish(gone.as_str(), Vec::new(), true)
        .await
        .unwrap();
    let s = Stream::open(site, "p", stream, cfg, dir).await;
    let mut fast = Sink::start(site, "fast").await;
    let topic = Topic::measurement(site, &seg("d"), &seg("c"));
    for i in 0..n {
        s.p.send(&topic, reading(site, i)).await.unwrap();
    }
    fast.store_until(n as usize, Duration::from_secs(10)).await;
    (admin, s, fast)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_group_is_still_waited_for_after_a_restart_when_the_broker_forgot_it() {
    let site = site("relearn");
    let dir = tempfile::tempdir().unwrap();
    let cfg = StreamConfig {
        wait_for: vec![seg("fast")],
        ..quick()
    };
    Stream::with_store_gone(&site, "relearn", &cfg, dir.path())
        .await
        .stop()
        .await;
    let (_admin, s, fast) =
        restart_with_store_forgotten(&site, "relearn", &cfg, dir.path(), 50).await;
    // `store` is overdue: the producer replays to it, so it still waits for it.
    assert!(
        eventually(Duration::from_secs(15), || async {
            replays("relearn", "store") > 0
        })
        .await,
        "the restarted producer forgot the group it had learned"
    );
    assert_eq!(
        s.p.pending().await,
        50,
        "held for `store`, which has stored none of them"
    );
    fast.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acknowledgements_trim_nothing_and_the_real_sink_still_gets_every_reading() {
    let site = site("forged");
    let dir = tempfile::tempdir().unwrap();
    // The writer registered and is stopped; readings keep coming.
    let s = Stream::with_store_gone(&site, "forged", &quick(), dir.path()).await;
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    for i in 0..100 {
        s.p.send(&topic, reading(&site, i)).await.unwrap();
    }
    let (forger, _ft) = connect(&site, "forger").await;
    let everything = |sink: &str| {
        format!(r#"{{"sink":"{sink}","ranges":[[1,18446744073709551615]],"ts_ms":0}}"#).into_bytes()
    };
    let ack_topic = |sink: &str| {
        proto::Topic::<proto::Ack>::ack(
            &site,
            &seg(&format!("p-{site}")),
            &seg("forged"),
            &seg(sink),
        )
    };
    // On the writer's topic, naming another group; and as a group this stream does not wait for.
    forger
        .publish(ack_topic("store").as_str(), everything("evil"), false)
        .await
        .unwrap();
    forger
        .publish(ack_topic("evil").as_str(), everything("evil"), false)
        .await
        .unwrap();
    handled(&forger, ack_topic("store").as_str(), "forged").await;
    handled(&forger, ack_topic("evil").as_str(), "forged").await;
    assert_eq!(
        s.p.pending().await,
        100,
        "a forged acknowledgement trimmed readings"
    );
    assert_eq!(refused("forged", "sink_mismatch"), 1);
    assert_eq!(refused("forged", "not_waited_for"), 1);

    let mut store = Sink::start(&site, "store").await;
    store.store_until(100, Duration::from_secs(30)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.p.pending().await == 0
        })
        .await,
        "the journal drains once the real sink has stored everything"
    );
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_acknowledgement_is_refused_after_a_restart_and_a_reconnect() {
    let site = site("retained");
    let dir = tempfile::tempdir().unwrap();
    let cfg = StreamConfig {
        wait_for: vec![seg("store")],
        ..quick()
    };
    {
        // 100 readings journaled for `store`, which is stopped; then the producer stops too.
        let s = Stream::open(&site, "p", "retained", &cfg, dir.path()).await;
        let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
        for i in 0..100 {
            s.p.send(&topic, reading(&site, i)).await.unwrap();
        }
        s.stop().await;
    }
    // A forged acknowledgement of everything, retained: the broker hands it to every
    // subscriber of the producer's acknowledgements from now on.
    let (forger, _ft) = connect(&site, "forger").await;
    let ack = proto::Topic::<proto::Ack>::ack(
        &site,
        &seg(&format!("p-{site}")),
        &seg("retained"),
        &seg("store"),
    );
    forger
        .publish(
            ack.as_str(),
            br#"{"sink":"store","ranges":[[1,18446744073709551615]],"ts_ms":0}"#.to_vec(),
            true,
        )
        .await
        .unwrap();
    let s = Stream::open(&site, "p", "retained", &cfg, dir.path()).await;
    assert!(s.bus.wait_subscribed(Duration::from_secs(10)).await);
    handled(&forger, ack.as_str(), "retained").await;
    assert_eq!(
        s.p.pending().await,
        100,
        "a retained acknowledgement trimmed readings"
    );
    // Past the restart grace the producer has replayed everything on this connection; a
    // reconnect (here: another client taking its client id for a moment) delivers the
    // retained acknowledgement again, now for records it has published.
    assert!(
        eventually(Duration::from_secs(15), || async {
            replays("retained", "store") >= 100
        })
        .await
    );
    let (thief, tt) = connect(&site, "p").await;
    thief.close(tt).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            *s.bus.connection().borrow() >= 2
        })
        .await,
        "the producer did not reconnect"
    );
    assert!(s.bus.wait_subscribed(Duration::from_secs(10)).await);
    handled(&forger, ack.as_str(), "retained").await;
    assert_eq!(
        s.p.pending().await,
        100,
        "a retained acknowledgement trimmed readings"
    );
    assert_eq!(
        refused("retained", "retained"),
        2,
        "refused on each subscription"
    );
    forger
        .publish(ack.as_str(), Vec::new(), true)
        .await
        .unwrap();
    let mut store = Sink::start(&site, "store").await;
    store.store_until(100, Duration::from_secs(30)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.p.pending().await == 0
        })
        .await
    );
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_group_is_forgotten_even_by_a_producer_that_was_stopped_at_the_time() {
    let site = site("withdrawn");
    let dir = tempfile::tempdir().unwrap();
    let cfg = StreamConfig {
        wait_for: vec![seg("fast")],
        ..quick()
    };
    let s = Stream::with_store_gone(&site, "withdrawn", &cfg, dir.path()).await;
    // A second producer, stopped, that learned `store` too.
    let other =
        runtime::delivery::journal_dir(dir.path(), &seg(&format!("q-{site}")), &seg("withdrawn"));
    std::fs::create_dir_all(&other).unwrap();
    runtime::learned::save(&other, ["store"]).unwrap();

    let mut fast = Sink::start(&site, "fast").await;
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    for i in 0..20 {
        s.p.send(&topic, reading(&site, i)).await.unwrap();
    }
    fast.store_until(20, Duration::from_secs(10)).await;
    assert_eq!(s.p.pending().await, 20, "held for `store`");

    // `wattbus sinks forget store`: a retained withdrawal.
    let (admin, _at) = connect(&site, "admin").await;
    admin
        .send(
            &proto::Topic::sink_registration(&site, &seg("store")),
            &proto::SinkRegistration::withdrawn(seg("store")),
            true,
        )
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.p.pending().await == 0
        })
        .await,
        "the stream still waits for a withdrawn group"
    );
    assert!(
        learns(dir.path(), &site, "p", "withdrawn", &["fast"]).await,
        "the file should hold only `fast` (configured, and registered): {:?}",
        learned(dir.path(), &site, "p", "withdrawn")
    );
    let _q = Stream::open(&site, "q", "withdrawn", &cfg, dir.path()).await;
    assert!(
        learns(dir.path(), &site, "q", "withdrawn", &["fast"]).await,
        "a producer that was stopped at the time still waits for the withdrawn group"
    );
    fast.stop().await;
}

/// One flipped byte in the `sinks` file must not cost a reading: the group on the damaged
/// line may be the one that is down, and the broker may have forgotten its registration. The
/// producer waits for a stand-in until a person withdraws it (hostile review: a damaged line
/// was skipped, the other group's acknowledgements trimmed everything, and the lost group
/// never got 192 readings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_line_in_the_sinks_file_holds_readings_until_its_stand_in_is_withdrawn() {
    let site = site("damaged-sinks");
    let dir = tempfile::tempdir().unwrap();
    let cfg = StreamConfig {
        wait_for: vec![seg("fast")],
        ..quick()
    };
    Stream::with_store_gone(&site, "damaged", &cfg, dir.path())
        .await
        .stop()
        .await;
    let journal =
        runtime::delivery::journal_dir(dir.path(), &seg(&format!("p-{site}")), &seg("damaged"));
    let file = runtime::learned::path(&journal);
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text.lines().position(|l| l.starts_with("store ")).unwrap() + 1;
    // One bit: `store` becomes `stose`, a valid name; only its checksum tells.
    std::fs::write(&file, text.replace("store ", "stose ")).unwrap();
    let (admin, s, fast) =
        restart_with_store_forgotten(&site, "damaged", &cfg, dir.path(), 30).await;
    let stand_in = format!("unreadable-{line}");
    assert!(
        eventually(Duration::from_secs(15), || async {
            replays("damaged", &stand_in) > 0
        })
        .await,
        "the producer does not wait for a stand-in of the damaged line"
    );
    assert_eq!(
        s.p.pending().await,
        30,
        "held for the group whose name was damaged"
    );

    // A person checked that every real group is back and withdraws the stand-in.
    admin
        .send(
            &proto::Topic::sink_registration(&site, &seg(&stand_in)),
            &proto::SinkRegistration::withdrawn(seg(&stand_in)),
            true,
        )
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.p.pending().await == 0
        })
        .await,
        "the withdrawn stand-in is still waited for"
    );
    fast.stop().await;
}

/// A `sinks` file that could not be written when a group registered (a full disk) must be
/// written once it can: registrations come again only on a change, and a file that never
/// caught up forgot the group at the next restart (second hostile review: 200 readings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sinks_file_that_could_not_be_written_is_written_once_it_can() {
    let site = site("unsaved-sinks");
    let dir = tempfile::tempdir().unwrap();
    let s = Stream::open(&site, "p", "unsaved", &quick(), dir.path()).await;
    let journal =
        runtime::delivery::journal_dir(dir.path(), &seg(&format!("p-{site}")), &seg("unsaved"));
    // Where the file is written first: a directory there makes every write fail.
    let blocker = journal.join("sinks.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let store = Sink::start(&site, "store").await;
    let producer = format!("p-{site}");
    let groups = runtime::telemetry::Gauge::new(
        "wattbus_sink_groups",
        "test",
        &[("producer", producer.as_str()), ("stream", "unsaved")],
    );
    assert!(
        eventually(Duration::from_secs(10), || async { groups.get() >= 1.0 }).await,
        "the producer did not learn the group"
    );
    assert!(learned(dir.path(), &site, "p", "unsaved").is_empty());
    std::fs::remove_dir(&blocker).unwrap();
    assert!(
        learns(dir.path(), &site, "p", "unsaved", &["store"]).await,
        "the sinks file was never written after the failure"
    );
    store.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_first_connection_a_producer_replays_only_what_it_could_not_publish() {
    let site = site("first");
    let dir = tempfile::tempdir().unwrap();
    let port = wattbus_testkit::LateBroker::port();
    let id = Identity {
        service: seg("test"),
        instance: seg(&format!("p-{site}")),
    };
    // The broker is not up yet when the producer starts.
    let (bus, _bt) = Bus::connect(
        &wattbus_testkit::LateBroker::bus(port),
        &site,
        &id,
        &Health::default(),
    )
    .unwrap();
    // Nothing is acknowledged, and the only replay round in this test is the one after the
    // connection comes up (the next would be a minute later).
    let cfg = StreamConfig {
        wait_for: vec![seg("store")],
        ack_timeout_ms: 60_000,
        ..StreamConfig::default()
    };
    let (p, _task) = open_meas(&bus, &site, "first", &cfg, dir.path(), Shutdown::never());
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    for i in 0..10 {
        p.send(&topic, reading(&site, i)).await.unwrap();
    }
    let _broker = wattbus_testkit::LateBroker::start(port);
    assert!(bus.wait_connected(Duration::from_secs(10)).await);
    for i in 10..50 {
        p.send(&topic, reading(&site, i)).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(15), || async {
            replays("first", "store") > 0
        })
        .await,
        "the readings journaled before the broker was up were never published"
    );
    assert_eq!(
        replays("first", "store"),
        10,
        "only the 10 readings the broker never got are published again, not the 40 it just got"
    );
    assert_eq!(p.pending().await, 50);
}

/// Everything logged by this test binary from the first call on, as text.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct Writer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Writer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_no_sink_has_registered_for_says_so_once() {
    let logs = captured_logs();
    let site = site("unheard");
    let dir = tempfile::tempdir().unwrap();
    let s = Stream::open(&site, "p", "unheard", &quick(), dir.path()).await;
    let topic = Topic::measurement(&site, &seg("d"), &seg("c"));
    s.p.send(&topic, reading(&site, 1)).await.unwrap();
    let warnings = || {
        String::from_utf8_lossy(&logs.lock().unwrap())
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    && l.contains(&format!("producer=\"p-{site}\""))
                    && l.contains("stream=\"unheard\"")
                    && l.contains("No sink group has registered for this stream; its readings are held until one does")
            })
            .count()
    };
    assert!(
        eventually(Duration::from_secs(20), || async { warnings() > 0 }).await,
        "no WARN about a stream nobody stores"
    );
    // A sink comes: the readings reach it; no second WARN on the way.
    let mut sink = Sink::start(&site, "store").await;
    sink.store_until(1, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.p.pending().await == 0
        })
        .await
    );
    assert_eq!(warnings(), 1);
    sink.stop().await;
}
