// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The delivery contract under faults, with real processes: the broker killed and restarted
//! twice and the consumer killed -9 and restarted once while a producer publishes a long
//! stream. Afterwards the consumer's durable store must hold every reading exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::{BrokerSetup, Proc, wait_subscribed, wait_until};

const COUNT: u64 = 3000;

fn consumer(b: &BrokerSetup, dir: &Path, log: &Path) -> Proc {
    Proc::spawn(
        "consumer",
        probe(b, &dir.join("consumer"))
            .args(["consume", "--store"])
            .arg(dir.join("store.txt")),
        log,
    )
}

fn stored(dir: &Path) -> Vec<i64> {
    let text = std::fs::read_to_string(dir.join("store.txt")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn every_reading_is_stored_exactly_once_through_broker_and_consumer_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = |name: &str| d.join(format!("{name}.log"));
    let b = BrokerSetup::new(d);
    let mut broker = b.start(&log("broker"));
    let mut cons = consumer(&b, d, &log("consumer"));
    let mut producer = Proc::spawn(
        "producer",
        probe(&b, &d.join("producer")).args([
            "produce",
            "--count",
            &COUNT.to_string(),
            "--rate",
            "250",
            "--ack-timeout-ms",
            "1000",
            "--timeout-s",
            "120",
        ]),
        &log("producer"),
    );
    let progress = |n: usize| wait_until(Duration::from_secs(60), || stored(d).len() >= n);
    let dump = || {
        for name in ["broker", "consumer", "producer"] {
            eprintln!(
                "--- {name}.log ---\n{}",
                std::fs::read_to_string(log(name)).unwrap_or_default()
            );
        }
    };

    // Fault 1: the broker dies (everything in flight and every subscription with it).
    assert!(progress(400), "no progress before fault 1");
    broker.kill9();
    // Down for a while: publishes and acknowledgements meanwhile are lost and must be replayed.
    std::thread::sleep(Duration::from_millis(700));
    broker = b.start(&log("broker"));

    // Fault 2: the consumer crashes between storing and acknowledging.
    let before = stored(d).len();
    assert!(progress(before + 300), "no progress after broker restart 1");
    cons.kill9();
    // Down for a while (an outage, not a synchronisation).
    std::thread::sleep(Duration::from_millis(500));
    cons = consumer(&b, d, &log("consumer"));

    // Fault 3: the broker dies again.
    let before = stored(d).len();
    assert!(progress(before + 300), "no progress after consumer restart");
    broker.kill9();
    // Down for a while, again.
    std::thread::sleep(Duration::from_millis(700));
    let _broker = b.start(&log("broker"));

    // The producer exits 0 only once every reading is acknowledged (journal empty).
    let status = producer.wait(Duration::from_secs(150));
    if status.is_none_or(|s| !s.success()) {
        dump();
        panic!("producer did not finish cleanly: {status:?}");
    }
    let out = std::fs::read_to_string(log("producer")).unwrap();
    assert!(out.contains(&format!("\"sent\":{COUNT}")), "{out}");
    assert_eq!(
        cons.terminate(Duration::from_secs(10)).map(|s| s.success()),
        Some(true),
        "consumer did not stop on SIGTERM"
    );

    let readings = stored(d);
    let mut counts: HashMap<i64, u32> = HashMap::new();
    for ts in &readings {
        *counts.entry(*ts).or_default() += 1;
    }
    let base = 1_764_000_000_000i64;
    let missing: Vec<i64> = (0..COUNT as i64)
        .filter(|i| !counts.contains_key(&(base + i)))
        .collect();
    let doubled: Vec<(&i64, &u32)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    if !missing.is_empty() || !doubled.is_empty() {
        dump();
    }
    assert!(
        missing.is_empty(),
        "{} readings lost, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(doubled.is_empty(), "readings stored twice: {doubled:?}");
    assert_eq!(readings.len() as u64, COUNT);
    // The faults really cost deliveries: some readings had to be published again.
    let plog = std::fs::read_to_string(log("producer")).unwrap();
    assert!(
        plog.contains("publishing unacknowledged records again"),
        "no replay happened; the test did not exercise the contract"
    );
}

fn probe(b: &BrokerSetup, data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_probe"));
    c.args([
        "--port",
        &b.port.to_string(),
        "--password",
        &b.password,
        "--data-dir",
    ])
    .arg(data);
    c
}

fn assert_exactly_once(readings: &[i64], count: u64, logs: &Path) {
    let mut sorted = readings.to_vec();
    sorted.sort_unstable();
    let base = 1_764_000_000_000i64;
    let expected: Vec<i64> = (0..count as i64).map(|i| base + i).collect();
    if sorted != expected {
        for entry in std::fs::read_dir(logs).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                eprintln!(
                    "--- {} ---\n{}",
                    entry.path().display(),
                    std::fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
        }
    }
    let missing = expected
        .iter()
        .filter(|t| sorted.binary_search(t).is_err())
        .count();
    assert_eq!(missing, 0, "{missing} readings lost");
    assert_eq!(sorted.len() as u64, count, "readings stored more than once");
}

#[test]
fn a_crashed_producer_replays_its_journal_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    // No sink is running: every reading stays in the producer's journal, unacknowledged.
    let mut producer = Proc::spawn(
        "producer",
        probe(&b, &d.join("producer")).args([
            "produce",
            "--count",
            "800",
            "--ack-timeout-ms",
            "1000",
        ]),
        &d.join("producer.log"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(
            d.join("producer.log")
        )
        .unwrap_or_default()
        .contains("{\"published\":800}")),
        "producer did not publish 800 readings"
    );
    producer.kill9();
    // And the crash tore the last write: the start of a record's head (its marker and three
    // bytes) at the end of the newest segment.
    let journal = d.join("producer/journal/probe-producer/meas");
    let newest = std::fs::read_dir(&journal)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a journal segment");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0xFF, 0xFE, b'W', b'R', 0xde, 0xad, 0xbe]).unwrap();
    drop(f);
    let _consumer = Proc::spawn(
        "consumer",
        probe(&b, &d.join("consumer"))
            .args(["consume", "--store"])
            .arg(d.join("store.txt")),
        &d.join("consumer.log"),
    );
    // The restarted producer publishes nothing new: whatever reaches the store comes from the
    // journal the crashed one left behind.
    let mut again = Proc::spawn(
        "producer-again",
        probe(&b, &d.join("producer")).args([
            "produce",
            "--count",
            "0",
            "--ack-timeout-ms",
            "1000",
            "--timeout-s",
            "60",
        ]),
        &d.join("producer-again.log"),
    );
    let status = again.wait(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "restarted producer did not drain its journal: {}",
        std::fs::read_to_string(d.join("producer-again.log")).unwrap_or_default()
    );
    assert!(wait_until(Duration::from_secs(5), || stored(d).len() >= 800));
    assert_exactly_once(&stored(d), 800, d);
    let log = std::fs::read_to_string(d.join("producer-again.log")).unwrap();
    assert!(
        log.contains("torn tail"),
        "the damaged tail was not reported: {log}"
    );
}

#[test]
fn a_processor_chain_loses_nothing_when_the_processor_and_the_sink_crash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let consumer = |log: &str| {
        Proc::spawn(
            "consumer",
            probe(&b, &d.join("consumer"))
                .args(["consume", "--device", "probe-relayed", "--store"])
                .arg(d.join("store.txt")),
            &d.join(log),
        )
    };
    let relay = |log: &str| {
        Proc::spawn(
            "relay",
            probe(&b, &d.join("relay")).args(["relay"]),
            &d.join(log),
        )
    };
    let mut cons = consumer("consumer.log");
    let mut rel = relay("relay.log");
    let count = 2000u64;
    let mut producer = Proc::spawn(
        "producer",
        probe(&b, &d.join("producer")).args([
            "produce",
            "--count",
            &count.to_string(),
            "--rate",
            "250",
            "--wait-for",
            "probe-relay",
            "--timeout-s",
            "120",
        ]),
        &d.join("producer.log"),
    );
    let progress = |n: usize| wait_until(Duration::from_secs(60), || stored(d).len() >= n);
    assert!(progress(300), "no progress through the chain");
    rel.kill9();
    // The processor stays down for a while (an outage, not a synchronisation).
    std::thread::sleep(Duration::from_millis(500));
    let _rel = relay("relay-2.log");
    let before = stored(d).len();
    assert!(
        progress(before + 300),
        "no progress after the processor restart"
    );
    cons.kill9();
    // Down for a while.
    std::thread::sleep(Duration::from_millis(500));
    let _cons = consumer("consumer-2.log");
    // The source is done when the processor has journaled (and acknowledged) everything; the
    // processor's own journal then drains to the sink.
    let status = producer.wait(Duration::from_secs(150));
    assert!(
        status.is_some_and(|s| s.success()),
        "source producer did not finish: {status:?}"
    );
    wait_until(Duration::from_secs(60), || stored(d).len() as u64 >= count);
    assert_exactly_once(&stored(d), count, d);
}

#[test]
fn two_sink_instances_sharing_a_group_split_the_stream_and_together_acknowledge_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let member = |n: u32| {
        Proc::spawn(
            "member",
            probe(&b, &d.join(format!("m{n}")))
                .args([
                    "consume",
                    "--shared",
                    "--instance",
                    &format!("member-{n}"),
                    "--store",
                ])
                .arg(d.join(format!("store-{n}.txt"))),
            &d.join(format!("member-{n}.log")),
        )
    };
    let (_m1, _m2) = (member(1), member(2));
    assert!(wait_subscribed(&d.join("member-1.log")) && wait_subscribed(&d.join("member-2.log")));
    let count = 2000u64;
    let mut producer = Proc::spawn(
        "producer",
        probe(&b, &d.join("p")).args([
            "produce",
            "--count",
            &count.to_string(),
            "--timeout-s",
            "60",
        ]),
        &d.join("producer.log"),
    );
    let status = producer.wait(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "producer did not get every reading acknowledged by the group"
    );
    let read = |n: u32| -> Vec<i64> {
        std::fs::read_to_string(d.join(format!("store-{n}.txt")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect()
    };
    let (a, b2) = (read(1), read(2));
    // Both members did real work: the broker split the stream between them.
    assert!(
        a.len() > 100 && b2.len() > 100,
        "uneven split: {} and {}",
        a.len(),
        b2.len()
    );
    let mut all: Vec<i64> = a.into_iter().chain(b2).collect();
    all.sort_unstable();
    all.dedup();
    assert_exactly_once(&all, count, d);
}
