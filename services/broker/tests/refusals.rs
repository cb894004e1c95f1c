//! What the broker's ACL and limits refuse is counted, per kind. A process of its own: the
//! counters are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use broker::Config;
use runtime::telemetry::Counter;

const WAIT: Duration = Duration::from_secs(10);

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

    assert_eq!(denied("publish").get(), 1);
    assert_eq!(denied("subscribe").get(), 1);
    assert_eq!(denied("client_id").get(), 1);
    assert_eq!(refused("per_client").get(), 1);
    assert_eq!(refused("total").get(), 0);
}
