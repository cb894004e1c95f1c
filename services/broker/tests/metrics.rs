//! The broker's metrics, in a test process of their own: the registry is process-wide, so
//! exact counts need a process where no other broker is publishing or failing logins.

// Helpers outside #[test] fns panic on a failed setup just like the tests themselves;
// clippy's allow-unwrap-in-tests only covers the test functions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use broker::{Config, Role, User};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use runtime::telemetry::Counter;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn free_addr() -> SocketAddr {
    // Never the same port twice in one process, and outside the ephemeral range.
    SocketAddr::from((Ipv4Addr::LOCALHOST, wattbus_testkit::free_port()))
}

async fn broker() -> Config {
    let config = Config {
        listen: free_addr(),
        listen_v5: Some(free_addr()),
        users: vec![User::new("alice", "s3cret", Role::Admin)],
        health_listen: None,
        ..Config::default()
    };
    broker::start(&config)
        .unwrap()
        .wait_ready(WAIT)
        .await
        .unwrap();
    config
}

fn options(addr: SocketAddr, id: &str, user: &str, password: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_credentials(user, password);
    opts
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let waited = timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what} within 5 s");
}

#[tokio::test]
async fn refused_logins_are_counted_per_listener() {
    let config = broker().await;
    let v4 = Counter::new(
        "wattbus_broker_auth_failures_total",
        "",
        &[("listener", broker::V4_LISTENER)],
    );
    let v5 = Counter::new(
        "wattbus_broker_auth_failures_total",
        "",
        &[("listener", broker::V5_LISTENER)],
    );

    for (id, user, password) in [("m1", "alice", "wrong"), ("m2", "mallory", "s3cret")] {
        let (_client, mut eventloop) =
            AsyncClient::new(options(config.listen, id, user, password), 10);
        let first = timeout(WAIT, eventloop.poll()).await.unwrap();
        assert!(first.is_err(), "{first:?}");
    }
    // Without credentials rumqttd refuses before asking us: refused, but not counted.
    let mut anon = MqttOptions::new("m3", config.listen.ip().to_string(), config.listen.port());
    anon.set_keep_alive(Duration::from_secs(5));
    let (_client, mut eventloop) = AsyncClient::new(anon, 10);
    assert!(timeout(WAIT, eventloop.poll()).await.unwrap().is_err());

    let v5_addr = config.listen_v5.unwrap();
    let mut opts = rumqttc::v5::MqttOptions::new("m4", v5_addr.ip().to_string(), v5_addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_credentials("alice", "wrong");
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    assert!(timeout(WAIT, eventloop.poll()).await.unwrap().is_err());

    assert_eq!(v4.get(), 2);
    assert_eq!(v5.get(), 1);
}

#[tokio::test]
async fn router_meters_count_publishes_and_bytes_per_filter() {
    let config = broker().await;
    let filter = "wattbus/test/meters/#";
    // The broker's core counts: publishes accepted, messages queued for subscribers.
    let publishes = Counter::new(
        "wattbus_messages_received_total",
        "",
        &[("service", "broker")],
    );
    let sent = Counter::new("wattbus_messages_sent_total", "", &[("service", "broker")]);
    let messages = Counter::new(
        "wattbus_broker_filter_messages_total",
        "",
        &[("filter", filter)],
    );
    let bytes = Counter::new(
        "wattbus_broker_filter_bytes_total",
        "",
        &[("filter", filter)],
    );

    let (client, mut eventloop) =
        AsyncClient::new(options(config.listen, "meter", "alice", "s3cret"), 10);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    for i in 0..3 {
        client
            .publish(
                "wattbus/test/meters/p",
                QoS::AtLeastOnce,
                false,
                format!("{i}"),
            )
            .await
            .unwrap();
    }
    // Drive the connection until all three come back, so the router has taken them.
    let mut received = 0;
    timeout(WAIT, async {
        while received < 3 {
            if let Event::Incoming(Packet::Publish(_)) = eventloop.poll().await.unwrap() {
                received += 1;
            }
        }
    })
    .await
    .expect("three messages back within 5 s");

    // rumqttd pushes meters once a second; the connection stays open meanwhile (its keep-alive
    // is 5 s), which is fine: nothing else needs polling.
    wait_until("three publishes counted", || publishes.get() == 3).await;
    wait_until("three messages on the filter counted", || {
        messages.get() == 3
    })
    .await;
    wait_until("three messages sent counted", || sent.get() == 3).await;
    // A log entry counts itself (a few hundred bytes: the patched `impl Storage for
    // PublishData`) besides its topic and payload, the same for the three.
    let per_message = bytes.get() / 3;
    assert_eq!(bytes.get(), 3 * per_message);
    let entry = per_message - ("wattbus/test/meters/p".len() as u64 + 1);
    assert!((128..=512).contains(&entry), "entry of {entry} bytes");
}
