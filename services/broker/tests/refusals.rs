//! What the broker's ACL and limits refuse is counted, per kind. A process of its own: the
//! counters are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use broker::Config;
use runtime::telemetry::Counter;

const WAIT: Duration = Duration::from_secs(10);

/// The counters are process-wide: one test at a time, each counting from its own baseline.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

mod support;

#[tokio::test]
async fn acl_and_limit_refusals_are_counted_by_kind() {
    use support::{connected, publish_acked, raw, subscribe, topic};
    let denied = |action: &'static str| {
        Counter::new("wattbus_broker_denied_total", "", &[("action", action)])
    };
    let refused = |limit: &'static str| {
        Counter::new(
            "wattbus_broker_subscriptions_refused_total",
            "",
            &[("limit", limit)],
        )
    };
    let _serial = SERIAL.lock().await;
    let baseline = [
        denied("publish").get(),
        denied("subscribe").get(),
        denied("client_id").get(),
        refused("per_client").get(),
        refused("total").get(),
    ];
    let config = Config {
        max_filters_per_client: 2,
        ..support::config()
    };
    broker::start(&config)
        .unwrap()
        .wait_ready(WAIT)
        .await
        .unwrap();

    let (grafana, mut grafana_loop) = connected(config.listen, "grafana", "grafana").await;
    assert!(!publish_acked(&grafana, &mut grafana_loop, &topic("meas/x/y"), "1").await);
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    subscribe(&producer, &mut producer_loop, &["wattbus/#"]).await;
    let (_stream, code) =
        raw::connack(config.listen, &raw::connect("influx-writer", "tools", None)).await;
    assert_eq!(code, None);
    let (tools, mut tools_loop) = connected(config.listen, "tools-1", "tools").await;
    subscribe(&tools, &mut tools_loop, &["a/1", "a/2", "a/3"]).await;

    let now = [
        denied("publish").get(),
        denied("subscribe").get(),
        denied("client_id").get(),
        refused("per_client").get(),
        refused("total").get(),
    ];
    let counted: Vec<u64> = now.iter().zip(baseline).map(|(n, b)| n - b).collect();
    // publish, subscribe, client id; per client, total
    assert_eq!(counted, [1, 1, 1, 1, 0]);
}

/// A wattbus service (runtime::bus) on the wrong user: its refused subscription and its refused
/// publish are counted on its side too (and logged as ERRORs naming the filter and the topic).
#[tokio::test]
async fn a_service_counts_its_refused_subscription_and_the_disconnect_after_a_refused_publish() {
    use runtime::bus::{Overflow, QoS};
    let _serial = SERIAL.lock().await;

    let config = support::config();
    broker::start(&config)
        .unwrap()
        .wait_ready(WAIT)
        .await
        .unwrap();
    let (bus, _health) = service_bus(&config, "csv-writer").await;
    let client = [("client", "csv-writer")];
    let refused = Counter::new("wattbus_bus_subscriptions_refused_total", "", &client);
    let disconnected = Counter::new("wattbus_bus_disconnected_by_broker_total", "", &client);

    // A sink may not read acknowledgements.
    let _acks = bus.subscribe("wattbus/v1/+/ack/#", QoS::AtLeastOnce, Overflow::Drop);
    support_wait("the refused subscription counted", || refused.get() >= 1).await;
    // Nor publish a reading.
    bus.publish(
        "wattbus/v1/site-a/meas/we515-1/power_w",
        b"1".to_vec(),
        false,
    )
    .await
    .unwrap();
    support_wait("the disconnect counted", || disconnected.get() >= 1).await;
}

/// A wattbus service's bus (runtime::bus) logged in as `user` (client id and instance too),
/// connected; and its readiness checks.
async fn service_bus(config: &Config, user: &str) -> (runtime::bus::Bus, runtime::Health) {
    use proto::Segment;
    let bus_config = runtime::config::BusConfig {
        host: config.listen.ip().to_string(),
        port: config.listen.port(),
        username: Some(user.into()),
        password: Some(runtime::Secret::new(support::PASSWORD)),
        ..runtime::config::BusConfig::default()
    };
    let id = runtime::bus::Identity {
        service: Segment::new(user).unwrap(),
        instance: Segment::new(user).unwrap(),
    };
    let health = runtime::Health::default();
    let (bus, _task) =
        runtime::bus::Bus::connect(&bus_config, &Segment::new("site-a").unwrap(), &id, &health)
            .unwrap();
    assert!(bus.wait_connected(WAIT).await);
    (bus, health)
}

async fn support_wait(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what} within {WAIT:?}");
}

/// A service whose subscription the broker refused because its filters were all taken (a
/// reader holding every slot while the service restarted) is not ready, asks again, and gets
/// its input once a slot is free: it once stayed unsubscribed, and ready, until restarted.
#[tokio::test]
async fn a_subscription_refused_for_a_full_broker_is_asked_for_again_and_gets_its_input() {
    use runtime::bus::{Overflow, QoS};
    use support::{connected, publish_acked, subscribe};
    let _serial = SERIAL.lock().await;

    let config = Config {
        max_filters: 4,
        max_filters_per_client: 2,
        max_connections_per_user: 1,
        ..support::config()
    };
    broker::start(&config)
        .unwrap()
        .wait_ready(WAIT)
        .await
        .unwrap();
    // Every filter slot taken (an admin, on two connections).
    let mut hogs = Vec::new();
    for c in 0..2 {
        let (hog, mut hog_loop) = connected(config.listen, &format!("tools-hog{c}"), "tools").await;
        let filters = [format!("wattbus/hog/{c}/a"), format!("wattbus/hog/{c}/b")];
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        subscribe(&hog, &mut hog_loop, &refs).await;
        hogs.push((hog, hog_loop));
    }

    let (bus, health) = service_bus(&config, "influx-writer").await;
    let refused = Counter::new(
        "wattbus_bus_subscriptions_refused_total",
        "",
        &[("client", "influx-writer")],
    );
    let before = refused.get();
    let mut readings = bus.subscribe("wattbus/v1/+/meas/+/+", QoS::AtLeastOnce, Overflow::Wait);
    // Refused, and asked for again (and refused again while the slots stay taken).
    support_wait("two refusals", || refused.get() >= before + 2).await;
    assert!(!health.is_ready(), "ready without its input");

    drop(hogs);
    support_wait("subscribed once a slot was free", || health.is_ready()).await;
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    let topic = support::topic("meas/ct-1/a");
    assert!(publish_acked(&producer, &mut producer_loop, &topic, "7").await);
    let got = tokio::time::timeout(WAIT, readings.recv())
        .await
        .expect("the reading within 10 s")
        .expect("the route is open");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (topic.as_str(), &b"7"[..])
    );
}
