//! The broker's memory stays within its documented bound (docs/broker.md, "Memory bound")
//! under the worst a client can do with subscriptions and messages. A process of its own: it
//! measures the resident set of the whole test process (`VmRSS`), broker and clients alike,
//! so nothing else may run in it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use broker::Config;
use support::*;
use tokio::io::{AsyncWriteExt, BufWriter};

const MIB: u64 = 1 << 20;

/// Resident memory of this process, from /proc/self/status.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The documented worst case (docs/broker.md, "Memory bound") for `config` with `connections`
/// clients whose largest packet is `packet` bytes: all filter logs together (entries twice for
/// their vectors' spare room, one message over), retained messages, the topic cache, each
/// filter's bookkeeping, and per connection its read buffer, what it hands the router, its
/// queue and the write of that queue.
fn documented_bound(config: &Config, connections: u64, packet: u64) -> u64 {
    const FILTER_BOOKKEEPING: u64 = 4 << 10;
    const TOPIC_CACHE: u64 = MIB;
    let logs = 2 * config.max_log_bytes as u64 + packet;
    let filters = config.max_filters as u64 * FILTER_BOOKKEEPING;
    let per_connection = 4 * packet + 2 * config.max_queued_bytes as u64;
    logs + config.max_retained_bytes as u64 + TOPIC_CACHE + filters + connections * per_connection
}

#[tokio::test]
async fn filters_and_messages_stay_within_the_documented_memory_bound() {
    watch_panics();
    // 256 filters (the default before it became 1,024; docs/BENCHMARKS.md measured this), so
    // eight subscribers of 32 fill them; 4 × 32 is half of 256 for the per-user rule.
    let config = Config {
        max_filters: 256,
        max_connections_per_user: 4,
        ..config()
    };
    let _broker = start(&config).await;
    round_trip(config.listen).await;
    let before = rss();

    // One client asks for 50,000 distinct filters, one SUBSCRIBE each, without waiting.
    let mut hog = raw::dial(config.listen).await;
    hog.write_all(&raw::connect("hog", "tools", None))
        .await
        .unwrap();
    assert!(matches!(
        raw::read_packet(&mut hog, WAIT).await,
        Some((0x20, _))
    ));
    let mut writer = BufWriter::new(&mut hog);
    for i in 0..50_000u32 {
        let pkid = (i % 60_000 + 1) as u16;
        writer
            .write_all(&raw::subscribe(pkid, &[&format!("wattbus/hog/{i}")]))
            .await
            .unwrap();
    }
    writer.flush().await.unwrap();
    let (mut granted, mut refused) = (0, 0);
    for _ in 0..50_000 {
        match raw::read_packet(&mut hog, WAIT).await {
            Some((0x90, body)) if body[2] == 0x80 => refused += 1,
            Some((0x90, _)) => granted += 1,
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }
    assert_eq!(granted, config.max_filters_per_client);
    assert_eq!(refused, 50_000 - config.max_filters_per_client);
    let after_hog = rss();
    eprintln!(
        "50,000 SUBSCRIBEs: RSS {:.1} -> {:.1} MiB",
        before as f64 / MIB as f64,
        after_hog as f64 / MIB as f64
    );
    assert!(
        after_hog.saturating_sub(before) <= 32 * MIB,
        "50,000 refused filters cost {:.1} MiB",
        after_hog.saturating_sub(before) as f64 / MIB as f64
    );
    drop(hog);

    // Then max_filters live filters over eight subscribers that never read, and 200 MiB of
    // 64 KiB messages into them: the logs and the queues are what must stay bounded.
    let per_client = config.max_filters / 8;
    let mut subscribers = Vec::new();
    let mut topics = Vec::new();
    for c in 0..8 {
        let mut s = raw::dial(config.listen).await;
        s.write_all(&raw::connect(&format!("stalled-{c}"), "tools", None))
            .await
            .unwrap();
        assert!(matches!(
            raw::read_packet(&mut s, WAIT).await,
            Some((0x20, _))
        ));
        let filters: Vec<String> = (0..per_client)
            .map(|j| format!("wattbus/mem/{c}/{j}"))
            .collect();
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        // The hog's filters may take a moment to be freed after it left.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            s.write_all(&raw::subscribe(1, &refs)).await.unwrap();
            let (_, body) = raw::read_packet(&mut s, WAIT).await.expect("SUBACK");
            if body[2..].iter().all(|&code| code == 0) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "filters of a client that left were not freed"
            );
        }
        topics.extend(filters);
        subscribers.push(s);
    }
    let payload = vec![0x5a; 64 << 10];
    let mut publisher = raw::dial(config.listen).await;
    publisher
        .write_all(&raw::connect("publisher", "tools", None))
        .await
        .unwrap();
    assert!(matches!(
        raw::read_packet(&mut publisher, WAIT).await,
        Some((0x20, _))
    ));
    let mut writer = BufWriter::new(&mut publisher);
    let count = (200 * MIB) / payload.len() as u64;
    for i in 0..count as usize {
        writer
            .write_all(&raw::publish(&topics[i % topics.len()], &payload))
            .await
            .unwrap();
    }
    writer.flush().await.unwrap();
    // A PINGREQ is answered after everything before it was handled.
    publisher.write_all(&[0xc0, 0x00]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match raw::read_packet(&mut publisher, Duration::from_secs(120)).await {
            Some((0xd0, _)) => break,
            Some(_) => {}
            None => panic!("no PINGRESP: the publisher was dropped"),
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    let after = rss();
    // 10 connections; 16 MiB for this process's own share (test clients, allocator, runtime).
    let bound = documented_bound(&config, 10, payload.len() as u64 + 64) + 16 * MIB;
    eprintln!(
        "{count} messages of 64 KiB into {} filters: RSS {:.1} -> {:.1} MiB (bound {:.1} MiB)",
        topics.len(),
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        bound as f64 / MIB as f64
    );
    assert!(
        after.saturating_sub(before) <= bound,
        "RSS grew by {:.1} MiB, past the documented {:.1} MiB",
        after.saturating_sub(before) as f64 / MIB as f64,
        bound as f64 / MIB as f64
    );
    drop(subscribers);
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

/// One login filling the log budget with copies of every message, in many filters it never
/// reads, once made the broker drop the largest log — a service's — with messages not read
/// yet (hostile reviews: raw frames dropped twice, windows never computed). The copies of the
/// client holding many filters go first: a subscriber with one filter gets every message.
#[tokio::test]
async fn a_client_filling_the_log_budget_with_many_filters_costs_others_nothing() {
    watch_panics();
    let config = Config {
        segment_bytes: 16 * 1024,
        segment_count: 4,
        max_log_bytes: 128 * 1024,
        max_queued_bytes: 4096,
        ..config()
    };
    let _broker = start(&config).await;
    // Twelve filters that all match wattbus/t/x; the client never reads again.
    let (hog, mut hog_loop) = connected(config.listen, "tools-hog", "tools").await;
    let filters = [
        "wattbus/t/x",
        "wattbus/t/+",
        "wattbus/+/x",
        "wattbus/+/+",
        "+/t/x",
        "+/+/x",
        "+/t/+",
        "+/+/+",
        "wattbus/t/#",
        "wattbus/+/#",
        "+/t/#",
        "+/+/#",
    ];
    subscribe(&hog, &mut hog_loop, &filters).await;
    // One subscriber of everything, reading as it comes: its log is the largest.
    let (prompt, mut prompt_loop) = connected(config.listen, "tools-prompt", "tools").await;
    subscribe(&prompt, &mut prompt_loop, &["wattbus/#"]).await;
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some((_, payload)) = next_publish(&mut prompt_loop, WAIT).await {
            if got_tx.send(payload).is_err() {
                break;
            }
        }
    });
    let (publisher, mut publisher_loop) = connected(config.listen, "tools-pub", "tools").await;
    let pad = "p".repeat(1000);
    const N: usize = 300;
    for i in 0..N {
        let topic = if i % 2 == 0 {
            "wattbus/t/x"
        } else {
            "wattbus/u/y"
        };
        let payload = format!("{i:05} {pad}");
        assert!(publish_acked(&publisher, &mut publisher_loop, topic, &payload).await);
    }
    let mut seen = std::collections::BTreeSet::new();
    let all = tokio::time::timeout(WAIT, async {
        while seen.len() < N {
            match got_rx.recv().await {
                Some(p) => {
                    seen.insert(String::from_utf8_lossy(&p[..5]).into_owned());
                }
                None => return,
            }
        }
    })
    .await;
    reader.abort();
    assert!(
        all.is_ok() && seen.len() == N,
        "the subscriber of one filter got {} of {N} messages",
        seen.len()
    );
    drop((hog, hog_loop));
    assert_rumqttd_never_panicked();
}
