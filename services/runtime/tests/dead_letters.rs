//! A sink's inbox against a real broker (mosquitto, from MOSQUITTO_TEST_BROKER): a reading whose
//! payload names another identity than its topic never reaches the sink; it is dead-lettered
//! on the topic and in the file, and acknowledged so it cannot pin its producer's journal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use proto::{Ack, DeadLetter, Filter, Measurement, Origin, Payload, Quality, Segment, Topic};
use runtime::bus::{Bus, Overflow, QoS};
use runtime::config::InboxConfig;
use runtime::dead_letters::DeadLetterFile;
use runtime::delivery::Inbox;
use wattbus_testkit::{mosquitto_client, seg, site};

async fn connect(site: &Segment, name: &str) -> (Bus, tokio::task::JoinHandle<()>) {
    mosquitto_client(site, "sink", name).await
}

fn reading(site: &Segment, device: &str, seq: u64) -> Measurement {
    Measurement {
        origin: Some(Origin {
            producer: seg("meter-reader"),
            stream: seg("meas"),
            seq,
            epoch: None,
        }),
        site: site.clone(),
        device: seg(device),
        channel: seg("main"),
        measurement: seg("power"),
        ts_ms: 1_764_000_000_000 + seq as i64,
        quality: Quality::Good,
        fields: [("power_w".to_string(), seq as f64)].into(),
        tags: Default::default(),
    }
}

#[tokio::test]
async fn a_reading_naming_another_device_than_its_topic_is_dead_lettered_acknowledged_and_never_delivered()
 {
    let site = site("mislabel");
    let (bus, _task) = connect(&site, "sink").await;
    let mut dead = bus.subscribe(
        Filter::<DeadLetter>::dead_letters(Some(&site))
            .as_str()
            .to_string(),
        QoS::AtLeastOnce,
        Overflow::Wait,
    );
    let mut acks = bus.subscribe(
        Filter::<Ack>::acks_for(&site, &seg("meter-reader"), &seg("meas"))
            .as_str()
            .to_string(),
        QoS::AtLeastOnce,
        Overflow::Wait,
    );
    let (mut inbox, _acks) = Inbox::<Measurement>::subscribe(
        &bus,
        &Filter::measurements(Some(&site), None),
        &seg("sink"),
        &InboxConfig {
            ack_interval_ms: 20,
            ..InboxConfig::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("dead-letters.jsonl");
    inbox.keep_dead_letters(Arc::new(DeadLetterFile::new(file_path.clone(), 1 << 20)));
    assert!(bus.wait_subscribed(Duration::from_secs(10)).await);

    // Published on meter-1's topic, the payload says meter-2: stored, it would become a
    // meter-2 reading that meter-2's producer never made.
    let topic = Topic::measurement(&site, &seg("meter-1"), &seg("main"));
    bus.send(&topic, &reading(&site, "meter-2", 7), false)
        .await
        .unwrap();
    bus.send(&topic, &reading(&site, "meter-1", 8), false)
        .await
        .unwrap();

    let got = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message.device.as_str(), "meter-1");
    assert_eq!(
        got.message.origin.as_ref().map(|o| o.seq),
        Some(8),
        "the mislabelled reading never reaches the sink"
    );
    // The sink stores it and acknowledges.
    inbox.acker().ack(got.token.as_ref().unwrap());

    let msg = tokio::time::timeout(Duration::from_secs(10), dead.recv())
        .await
        .expect("no dead letter published")
        .unwrap();
    let dl = DeadLetter::decode(&msg.payload).unwrap();
    assert_eq!(dl.topic, topic.as_str());
    assert!(
        dl.reason
            .contains("device \"meter-2\" (topic: \"meter-1\")"),
        "{}",
        dl.reason
    );
    let kept = std::fs::read_to_string(&file_path).expect("dead-letter file");
    let kept: Vec<DeadLetter> = kept
        .lines()
        .map(|l| DeadLetter::decode(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].reason, dl.reason);
    assert!(
        kept[0].payload.contains("\"meter-2\""),
        "{}",
        kept[0].payload
    );

    // Both are acknowledged: the stored one, and the dead-lettered one (a poison message must
    // not pin the journal that holds it).
    let mut acked = Vec::new();
    while !(acked.contains(&7) && acked.contains(&8)) {
        let msg = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .unwrap_or_else(|_| panic!("acknowledged only {acked:?}"))
            .unwrap();
        let ack = Ack::decode(&msg.payload).unwrap();
        assert_eq!(ack.sink.as_str(), "sink");
        for [first, last] in ack.ranges {
            acked.extend(first..=last);
        }
    }
}

/// With a dead-letter file, the file is a dead letter's copy: when it cannot take one (a full
/// disk; here `/dev/full`), the message is not acknowledged, though it went out on the
/// dead-letter topic, where nobody may be listening (third hostile review).
#[tokio::test]
async fn a_dead_letter_the_file_cannot_take_is_not_acknowledged() {
    let site = site("dead-full");
    let (bus, _task) = connect(&site, "sink").await;
    let mut acks = bus.subscribe(
        Filter::<Ack>::acks_for(&site, &seg("meter-reader"), &seg("meas"))
            .as_str()
            .to_string(),
        QoS::AtLeastOnce,
        Overflow::Wait,
    );
    let (mut inbox, _acks) = Inbox::<Measurement>::subscribe(
        &bus,
        &Filter::measurements(Some(&site), None),
        &seg("sink"),
        &InboxConfig {
            ack_interval_ms: 20,
            ..InboxConfig::default()
        },
    );
    inbox.keep_dead_letters(Arc::new(DeadLetterFile::new("/dev/full".into(), 1 << 20)));
    assert!(bus.wait_subscribed(Duration::from_secs(10)).await);
    let topic = Topic::measurement(&site, &seg("meter-1"), &seg("main"));
    bus.send(&topic, &reading(&site, "meter-2", 7), false)
        .await
        .unwrap();
    bus.send(&topic, &reading(&site, "meter-1", 8), false)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message.origin.as_ref().map(|o| o.seq), Some(8));
    inbox.acker().ack(got.token.as_ref().unwrap());
    // Seq 7 was decided before 8 arrived: an acknowledgement of it would come with 8's or
    // before.
    let mut acked = Vec::new();
    while !acked.contains(&8) {
        let msg = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .unwrap_or_else(|_| panic!("acknowledged only {acked:?}"))
            .unwrap();
        for [first, last] in Ack::decode(&msg.payload).unwrap().ranges {
            acked.extend(first..=last);
        }
    }
    assert!(
        !acked.contains(&7),
        "a dead letter kept nowhere was acknowledged: {acked:?}"
    );
}
