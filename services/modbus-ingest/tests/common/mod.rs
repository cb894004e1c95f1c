//! What modbus-ingest's service tests share. The broker (wattbus's own, in the test process),
//! the service runner, the watch and the socat PTY pair come from wattbus-testkit; here:
//! modbus-ingest's broker user, the service started from a TOML section, a PTY pair set up
//! for an RTU line, and the measurement helpers the assertions use.
// Each test binary uses its own subset of these.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use proto::{Filter, Measurement, Segment};
use runtime::ConfigSource;
use runtime::config::BusConfig;
use wattbus_testkit::{Role, ServiceBuilder, Socat, TestBroker, TestService, Watch};

/// modbus-ingest's broker user, as a deployment names it (its client id is its `instance`,
/// which is this by default).
pub const USER: &str = "modbus-ingest";

/// A broker of the test's own with modbus-ingest's user (a producer).
pub async fn broker() -> TestBroker {
    TestBroker::start(&[(USER, Role::Producer)]).await
}

/// A PTY pair for an RTU bus: `dev()` for the service, `sim()` for the Modbus peer.
///
/// ignoreeof on the service's end: the service closes and reopens its end to resync after
/// garbage; socat must not take that close for the end of the line.
pub fn rtu_pty(dir: &std::path::Path) -> Socat {
    Socat::builder(dir, "rtu").ignoreeof().start()
}

/// modbus-ingest with the `[modbus_ingest]` section in `toml_text`, on `broker`, once its
/// connection is up.
pub async fn start(
    broker: &TestBroker,
    site: &Segment,
    toml_text: &str,
) -> TestService<modbus_ingest::Error> {
    start_on(broker.bus(USER), site, toml_text, false).await
}

/// modbus-ingest on the broker `bus` describes; with `before_broker`, started at once, as a
/// service on a Pi whose broker comes up later.
pub async fn start_on(
    bus: BusConfig,
    site: &Segment,
    toml_text: &str,
    before_broker: bool,
) -> TestService<modbus_ingest::Error> {
    let plan = ConfigSource::from_parts(None, Some(toml_text))
        .unwrap()
        .resolve::<modbus_ingest::ModbusIngest>()
        .unwrap();
    let mut service = ServiceBuilder::new(bus, site, modbus_ingest::identity(&plan));
    if before_broker {
        service = service.before_broker();
    }
    service
        .start(async move |bus, ctx| modbus_ingest::run_on(&bus, &plan, &ctx).await)
        .await
}

/// Every measurement published for `site`.
pub async fn watch(broker: &TestBroker, site: &Segment) -> Watch<Measurement> {
    Watch::new(broker, site, &Filter::measurements(Some(site), None)).await
}

pub fn is(m: &Measurement, device: &str, measurement: &str, channel: &str) -> bool {
    m.device.as_str() == device
        && m.measurement.as_str() == measurement
        && m.channel.as_str() == channel
        && m.tags.is_empty()
}

pub fn count(got: &[Measurement], device: &str, measurement: &str, channel: &str) -> usize {
    got.iter()
        .filter(|m| is(m, device, measurement, channel))
        .count()
}

pub fn counter(name: &'static str, bus: &str, device: &str) -> u64 {
    wattbus_testkit::counter(name, &[("bus", bus), ("device", device)])
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}
