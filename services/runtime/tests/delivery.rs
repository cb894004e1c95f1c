//! The runtime against a real broker nobody here wrote: mosquitto, started by tests/run.sh
//! (MOSQUITTO_TEST_BROKER=host:port:user:password). Each test uses its own site, so tests
//! sharing the broker cannot see each other's messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proto::{DeadLetter, Filter, Measurement, Payload, Quality, Segment, Topic};
use runtime::bus::{Bus, Identity, Overflow, QoS};
use runtime::config::{InboxConfig, StreamConfig};
use runtime::delivery::{Inbox, Producer};
use runtime::{Health, Shutdown};
use wattbus_testkit::{mosquitto, seg, site};

async fn connect(site: &Segment, name: &str) -> (Bus, tokio::task::JoinHandle<()>) {
    let id = Identity {
        service: seg("test"),
        instance: seg(&format!("{name}-{site}")),
    };
    let (bus, task) = Bus::connect(&mosquitto(), site, &id, &Health::default()).unwrap();
    assert!(
        bus.wait_connected(Duration::from_secs(10)).await,
        "cannot reach mosquitto"
    );
    (bus, task)
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
    let (producer, _ptask) = Producer::open(
        &bus,
        &seg("meas"),
        &Filter::measurements(Some(&site), None),
        &cfg,
        dir.path(),
        Shutdown::never(),
    )
    .unwrap();
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
    let (producer, _ptask) = Producer::open(
        &pbus,
        &seg("meas"),
        &Filter::measurements(Some(&site), None),
        &cfg,
        dir.path(),
        Shutdown::never(),
    )
    .unwrap();
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
