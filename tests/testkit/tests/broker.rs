//! The test broker is a deployment's broker: it checks passwords and the grants of each role.
//! Were it open, every service suite on it would pass whatever its clients were allowed to do,
//! and these tests would fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proto::{Filter, Measurement, Origin, Quality, Segment, Topic};
use runtime::Health;
use runtime::Secret;
use runtime::bus::{Bus, Identity};
use runtime::config::BusConfig;
use wattbus_testkit::{Role, TestBroker, Watch, seg, site};

fn reading(site: &Segment, producer: &str, power_w: f64) -> Measurement {
    Measurement {
        origin: Some(Origin {
            producer: seg(producer),
            stream: seg("meas"),
            seq: 1,
            epoch: None,
        }),
        site: site.clone(),
        device: seg("meter"),
        channel: seg("main"),
        measurement: seg("power"),
        ts_ms: 1_764_000_000_000,
        quality: Quality::Good,
        fields: [("power_w".to_string(), power_w)].into(),
        tags: Default::default(),
    }
}

async fn connects(cfg: &BusConfig, site: &Segment, within: Duration) -> bool {
    let id = Identity {
        service: seg("meter"),
        instance: seg("meter"),
    };
    let (bus, task) = Bus::connect(cfg, site, &id, &Health::default()).unwrap();
    let up = bus.wait_connected(within).await;
    task.abort();
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_logs_in_with_its_own_password_only() {
    let site = site("password");
    let broker = TestBroker::start(&[("meter", Role::Producer), ("other", Role::Producer)]).await;
    assert!(connects(&broker.bus("meter"), &site, Duration::from_secs(10)).await);
    let wrong = BusConfig {
        password: Some(Secret::new("not-its-password")),
        ..broker.bus("meter")
    };
    assert!(!connects(&wrong, &site, Duration::from_secs(2)).await);
    // Another user's password is a wrong one too.
    let others = BusConfig {
        username: Some("meter".into()),
        ..broker.bus("other")
    };
    assert!(!connects(&others, &site, Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_may_publish_its_own_readings_but_not_claim_another_producers() {
    let site = site("grants");
    let broker = TestBroker::start(&[("meter", Role::Producer)]).await;
    let mut watch = Watch::new(&broker, &site, &Filter::measurements(Some(&site), None)).await;
    let (bus, _task) = broker.connect(&site, "meter").await;
    let topic = Topic::measurement(&site, &seg("meter"), &seg("main"));
    let mut connection = bus.connection();
    let first = *connection.borrow_and_update();
    // Claims modbus-ingest's origin: the broker refuses it and closes the connection.
    bus.send(&topic, &reading(&site, "modbus-ingest", 1.0), false)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), connection.wait_for(|e| *e > first))
            .await
            .is_ok(),
        "the forged reading did not cost the connection"
    );
    bus.send(&topic, &reading(&site, "meter", 2.0), false)
        .await
        .unwrap();
    // Had the forged one gone through, it would have come first.
    let got = watch.next(Duration::from_secs(10)).await;
    assert_eq!(got, Some(reading(&site, "meter", 2.0)));
}
