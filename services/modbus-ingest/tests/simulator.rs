//! modbus-ingest against the shared Modbus simulator (`simulators::modbus`) on every transport
//! it has: Modbus TCP (a gateway with two meters behind it), RTU on a socat PTY pair, and RTU
//! over TCP. The simulator counts every request it serves, by function code, so "two requests
//! per WE-515 poll" is counted where a meter would see it; and its meters say what their
//! registers mean (`values()`), so every published value is compared with that truth.
//!
//! The meters run on a manual clock fixed at an instant the test picks (export and a leading
//! power factor), so what the server answered is known exactly whenever the service polls.
//! Readings go through wattbus's broker, started in the test, to a reader or a sink.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{USER, broker, count, is, rtu_pty, start, start_on, watch};
use proto::{Filter, Measurement, Quality, Segment};
use runtime::shutdown::{self, ShutdownTrigger};
use simulators::modbus::{
    Clock, ManualClock, MeterBus, RtuOptions, SlaveHandle, We515, We515Values, serve_rtu,
    serve_rtu_over_tcp, serve_tcp,
};
use simulators::serial::Port;
use tokio::task::JoinHandle;
use wattbus_testkit::{Role, Sink, TestBroker, eventually, seg, site};

/// 2024-06-01 12:00 UTC: midday, when the simulated household exports.
const NOON: i64 = 1_717_243_200_000;
const HOUR: i64 = 3_600_000;

/// The first minute from `NOON` on where meter `seed` exports at a leading power factor, so
/// both signs are exercised.
fn export_leading(seed: u64) -> i64 {
    let mut probe = We515::new(seed, NOON - HOUR);
    (0..12 * 60)
        .map(|m| NOON + m * 60_000)
        .find(|&t| {
            let v = probe.values_at(t);
            v.power_w < 0.0 && v.power_factor < 0.0
        })
        .expect("the household exports at a leading PF some time in the afternoon")
}

/// Two WE-515 at slaves 1 and 2 on a bus whose clock stands still at `now`.
struct Meters {
    bus: MeterBus,
    house: SlaveHandle,
    garage: SlaveHandle,
    trigger: ShutdownTrigger,
}

impl Meters {
    fn new() -> Meters {
        let now = export_leading(1);
        let bus = MeterBus::with_clock(Clock::Manual(ManualClock::new(now)));
        let house = bus.add(1, We515::new(1, now - HOUR));
        let garage = bus.add(2, We515::new(2, now - HOUR));
        let (trigger, _) = shutdown::channel();
        Meters {
            bus,
            house,
            garage,
            trigger,
        }
    }

    fn shutdown(&self) -> runtime::Shutdown {
        self.trigger.subscribe()
    }
}

impl Drop for Meters {
    fn drop(&mut self) {
        self.trigger.fire();
    }
}

fn truth(h: &SlaveHandle) -> We515Values {
    h.with_meter(|m| m.as_we515_mut().unwrap().values())
}

/// Equal up to float rounding of register × scale.
fn same(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-9 * want.abs().max(1.0)
}

fn field(m: &Measurement, name: &str) -> f64 {
    *m.fields
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing in {m:?}"))
}

fn tariff<'a>(got: &'a [Measurement], device: &str, t: &str) -> &'a Measurement {
    got.iter()
        .find(|m| {
            m.device.as_str() == device
                && m.measurement.as_str() == "energy"
                && m.tags.get(&seg("tariff")).map(Segment::as_str) == Some(t)
        })
        .unwrap_or_else(|| panic!("no {t} energy of {device}"))
}

/// Every published value of `device` equals the meter's truth; the signs included.
fn assert_matches_truth(got: &[Measurement], device: &str, want: &We515Values) {
    let one = |measurement: &str, channel: &str| {
        got.iter()
            .find(|m| is(m, device, measurement, channel))
            .unwrap_or_else(|| panic!("no {measurement}/{channel} of {device}"))
    };
    let checks: [(&Measurement, &str, f64); 12] = [
        (one("power", "l1"), "power_w", want.power_w),
        (one("power", "l1"), "power_factor", want.power_factor),
        (one("power", "l1"), "voltage_v", want.voltage_v),
        (one("power", "l1"), "current_a", want.current_a),
        (
            one("power", "l1"),
            "reactive_power_var",
            want.reactive_power_var,
        ),
        (
            one("power", "l1"),
            "apparent_power_va",
            want.apparent_power_va,
        ),
        (one("power", "total"), "frequency_hz", want.frequency_hz),
        (one("power", "total"), "power_w", want.power_w),
        (one("energy", "total"), "energy_wh", want.energy_wh),
        (
            one("energy", "total"),
            "reactive_energy_varh",
            want.reactive_energy_varh,
        ),
        (
            tariff(got, device, "t1"),
            "energy_wh",
            want.energy_tariff_wh[0],
        ),
        (
            tariff(got, device, "t2"),
            "energy_wh",
            want.energy_tariff_wh[1],
        ),
    ];
    for (m, name, want) in checks {
        assert!(
            same(field(m, name), want),
            "{device} {}/{} {name}: published {}, the meter holds {want}",
            m.measurement,
            m.channel,
            field(m, name)
        );
    }
    for m in got.iter().filter(|m| m.device.as_str() == device) {
        if m.measurement.as_str() != "modbus_device" {
            assert_eq!(m.quality, Quality::Good, "{m:?}");
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The bus section for two WE-515 (`house` at 1, `garage` at 2) polled whole every second.
fn two_meter_config(bus: &str, link: &str) -> String {
    format!(
        r#"
[modbus_ingest]
health_interval_ms = 1000
[[modbus_ingest.buses]]
name = "{bus}"
{link}
[[modbus_ingest.buses.devices]]
name = "house"
slave = 1
profile = "orno-we-515"
poll = {{ fast = 1000, slow = 1000 }}
[[modbus_ingest.buses.devices]]
name = "garage"
slave = 2
profile = "orno-we-515"
poll = {{ fast = 1000, slow = 1000 }}
"#
    )
}

/// Runs the service on `link` for about 4 s against `meters` and checks what users care
/// about: each poll of a WE-515 is two FC03 requests (84 registers) on the server's own
/// counters, the rate is about 1 s, and the values published are the meters' truth.
async fn two_meters_two_requests_per_poll_and_the_truth(name: &str, meters: &Meters, link: &str) {
    let site = site(name);
    let broker = broker().await;
    let mut watch = watch(&broker, &site).await;
    let started = now_ms();
    let svc = start(&broker, &site, &two_meter_config(name, link)).await;
    let mut got = watch.during(Duration::from_secs(4)).await;
    svc.stop().await;
    // What was in flight at the stop has arrived by now.
    got.extend(watch.during(Duration::from_millis(500)).await);
    let stopped = now_ms();

    for (device, handle) in [("house", &meters.house), ("garage", &meters.garage)] {
        assert_matches_truth(&got, device, &truth(handle));
        // A poll reads 0x0130.. (power) then 0xA000.. (energy); a stop can cut the last poll
        // after its first request, never anything else.
        let power = count(&got, device, "power", "l1") as u64;
        let energy = count(&got, device, "energy", "total") as u64;
        assert!(
            (3..=6).contains(&power),
            "{device}: {power} polls in about 4 s at 1 s"
        );
        assert!(
            energy == power || energy + 1 == power,
            "{device}: {power} power, {energy} energy readings"
        );
        let c = handle.counters();
        assert_eq!(
            c.by_function.get(&3).copied(),
            Some(power + energy),
            "{device}: FC03 requests for {energy} whole polls (+{} cut): {c:?}",
            power - energy
        );
        assert_eq!(c.requests, power + energy, "{device}: only FC03: {c:?}");
        assert_eq!(
            c.registers_read,
            44 * power + 40 * energy,
            "{device}: 84 registers per poll: {c:?}"
        );
        assert_eq!(c.exceptions, 0, "{device}");
        for m in got.iter().filter(|m| is(m, device, "power", "l1")) {
            assert!(
                (started..=stopped).contains(&m.ts_ms),
                "stamped when read: {m:?}"
            );
        }
    }
    // The leading PF and the export really were negative (not a vacuous comparison).
    let house = got.iter().find(|m| is(m, "house", "power", "l1")).unwrap();
    assert!(house.fields["power_w"] < 0.0 && house.fields["power_factor"] < 0.0);
}

async fn tcp_gateway(meters: &Meters) -> (u16, JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(serve_tcp(listener, meters.bus.clone(), meters.shutdown()));
    (port, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_we515_behind_a_tcp_gateway_take_two_requests_per_poll_and_publish_the_truth() {
    let meters = Meters::new();
    let (port, _server) = tcp_gateway(&meters).await;
    two_meters_two_requests_per_poll_and_the_truth(
        "sim-tcp",
        &meters,
        &format!("transport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_we515_on_an_rtu_line_take_two_requests_per_poll_and_publish_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let socat = rtu_pty(dir.path());
    let meters = Meters::new();
    let port = Port::Path {
        path: socat.sim_str(),
        baud: 9600,
    };
    let _server = tokio::spawn(serve_rtu(
        port,
        RtuOptions::default(),
        meters.bus.clone(),
        meters.shutdown(),
    ));
    two_meters_two_requests_per_poll_and_the_truth(
        "sim-rtu",
        &meters,
        &format!("transport = \"rtu\"\npath = \"{}\"", socat.dev().display()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_we515_behind_an_rtu_over_tcp_gateway_take_two_requests_per_poll_and_publish_the_truth()
{
    let meters = Meters::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = tokio::spawn(serve_rtu_over_tcp(
        listener,
        RtuOptions::default(),
        meters.bus.clone(),
        meters.shutdown(),
    ));
    two_meters_two_requests_per_poll_and_the_truth(
        "sim-rtu-tcp",
        &meters,
        &format!("transport = \"rtu-over-tcp\"\nhost = \"127.0.0.1\"\nport = {port}"),
    )
    .await;
}

/// A meter switched off behind `link`: the other keeps its 1 s rate, the silent one is
/// reported degraded, and it is read again (and not degraded) once switched on.
async fn one_off_the_other_keeps_its_rate(name: &str, meters: &Meters, link: &str) {
    let site = site(name);
    let broker = broker().await;
    let mut watch = watch(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[modbus_ingest]
health_interval_ms = 1000
[[modbus_ingest.buses]]
name = "{name}"
{link}
timeout_ms = 300
[[modbus_ingest.buses.devices]]
name = "keeps"
slave = 1
profile = "orno-we-515"
[[modbus_ingest.buses.devices]]
name = "goes-off"
slave = 2
profile = "orno-we-515"
"#
        ),
    )
    .await;
    watch
        .until(Duration::from_secs(10), |g| {
            count(g, "goes-off", "power", "l1") >= 1 && count(g, "keeps", "power", "l1") >= 1
        })
        .await;
    meters.garage.set_powered(false);
    // Let the switch take effect (a poll in flight), then count over 5 s.
    watch.during(Duration::from_millis(1200)).await;
    let window = watch.during(Duration::from_secs(5)).await;
    let kept = count(&window, "keeps", "power", "l1");
    assert!(
        (4..=6).contains(&kept),
        "the answering meter was read {kept} times in 5 s at 1 s"
    );
    assert_eq!(count(&window, "goes-off", "power", "l1"), 0);
    let health = window
        .iter()
        .rfind(|m| is(m, "goes-off", "modbus_device", "health"))
        .expect("device health every second");
    assert_eq!(health.fields["degraded"], 1.0, "{health:?}");
    assert!(health.fields["timeouts"] >= 1.0, "{health:?}");
    assert!(
        window
            .iter()
            .filter(|m| is(m, "keeps", "modbus_device", "health"))
            .all(|m| m.fields["degraded"] == 0.0)
    );

    meters.garage.set_powered(true);
    let back = watch
        .until(Duration::from_secs(15), |g| {
            count(g, "goes-off", "power", "l1") >= 1
                && g.iter().any(|m| {
                    is(m, "goes-off", "modbus_device", "health") && m.fields["degraded"] == 0.0
                })
        })
        .await;
    let reading = back
        .iter()
        .find(|m| is(m, "goes-off", "power", "l1"))
        .unwrap();
    assert!(same(
        reading.fields["power_w"],
        truth(&meters.garage).power_w
    ));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_switched_off_behind_a_tcp_gateway_leaves_the_other_at_1_s_and_recovers() {
    let meters = Meters::new();
    let (port, _server) = tcp_gateway(&meters).await;
    one_off_the_other_keeps_its_rate(
        "sim-off-tcp",
        &meters,
        &format!("transport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_switched_off_on_an_rtu_line_leaves_the_other_at_1_s_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let socat = rtu_pty(dir.path());
    let meters = Meters::new();
    let port = Port::Path {
        path: socat.sim_str(),
        baud: 9600,
    };
    let _server = tokio::spawn(serve_rtu(
        port,
        RtuOptions::default(),
        meters.bus.clone(),
        meters.shutdown(),
    ));
    one_off_the_other_keeps_its_rate(
        "sim-off-rtu",
        &meters,
        &format!("transport = \"rtu\"\npath = \"{}\"", socat.dev().display()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_gateway_that_goes_away_is_reconnected_and_readings_resume() {
    let name = "sim-tcp-restart";
    let meters = Meters::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, down) = shutdown::channel();
    let first = tokio::spawn(serve_tcp(listener, meters.bus.clone(), down));
    let site = site(name);
    let broker = broker().await;
    let mut watch = watch(&broker, &site).await;
    let svc = start(
        &broker,
        &site,
        &format!(
            r#"
[modbus_ingest]
health_interval_ms = 1000
[[modbus_ingest.buses]]
name = "{name}"
transport = "tcp"
host = "127.0.0.1"
port = {port}
timeout_ms = 300
reconnect_min_ms = 200
reconnect_max_ms = 1000
[[modbus_ingest.buses.devices]]
name = "house"
slave = 1
profile = "orno-we-515"
"#
        ),
    )
    .await;
    watch
        .until(Duration::from_secs(10), |g| {
            count(g, "house", "power", "l1") >= 2
        })
        .await;

    // The gateway goes away (every connection dropped, nothing listening).
    stop.fire();
    tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    watch.during(Duration::from_millis(500)).await;
    let gap = watch.during(Duration::from_secs(2)).await;
    assert_eq!(
        count(&gap, "house", "power", "l1"),
        0,
        "no readings without a gateway"
    );

    // It comes back on the same port: the service reconnects by itself.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let _second = tokio::spawn(serve_tcp(listener, meters.bus.clone(), meters.shutdown()));
    let back = watch
        .until(Duration::from_secs(15), |g| {
            count(g, "house", "power", "l1") >= 2
        })
        .await;
    let reading = back.iter().find(|m| is(m, "house", "power", "l1")).unwrap();
    assert!(same(
        reading.fields["power_w"],
        truth(&meters.house).power_w
    ));
    let health = watch
        .until(Duration::from_secs(5), |g| {
            g.iter().any(|m| is(m, name, "modbus_bus", "health"))
        })
        .await;
    let health = health
        .iter()
        .rfind(|m| is(m, name, "modbus_bus", "health"))
        .unwrap();
    assert!(health.fields["reconnects"] >= 1.0, "{health:?}");
    svc.stop().await;
}

/// A service that polls before its broker is up keeps those readings for the first sink that
/// registers, with built-in delivery defaults (issue 10: a start without the broker lost the
/// first poll's readings, 1 start in 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_polled_before_the_broker_is_up_reach_a_sink_that_comes_later() {
    let meters = Meters::new();
    let (gateway, _server) = tcp_gateway(&meters).await;
    let site = site("late-broker");
    // A sink group `store` comes with the broker, as influx-writer would.
    let broker = TestBroker::plan(&[(USER, Role::Producer), ("store", Role::Sink)]);
    let svc = start_on(
        broker.bus(USER),
        &site,
        &two_meter_config(
            "late-broker",
            &format!("transport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {gateway}"),
        ),
        true,
    )
    .await;
    // Both meters answered a whole poll (power and energy) while nothing could take it. A
    // meter's second request only says its first poll is on the wire; the third says the bus
    // has moved on to the next poll, so the first poll's readings are stamped and journaled
    // (under load the reply to request 2 can be read after `broker_up` is taken).
    let polled = eventually(Duration::from_secs(15), async || {
        meters.house.counters().requests >= 3 && meters.garage.counters().requests >= 3
    })
    .await;
    assert!(polled, "no poll within 15 s");
    let broker_up = now_ms();
    let broker = broker.start().await;
    let mut store = Sink::start(
        &broker,
        &site,
        "store",
        &Filter::measurements(Some(&site), None),
    )
    .await;
    let before_broker = |got: &[Measurement], device: &str, measurement: &str, channel: &str| {
        got.iter()
            .any(|m| is(m, device, measurement, channel) && m.ts_ms < broker_up)
    };
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while !["house", "garage"]
        .iter()
        .all(|d| before_broker(&got, d, "power", "l1") && before_broker(&got, d, "energy", "total"))
    {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = store.next(left).await else {
            panic!(
                "the readings polled before the broker was up never arrived; got {:#?}",
                got.iter()
                    .filter(|m: &&Measurement| m.ts_ms < broker_up)
                    .collect::<Vec<_>>()
            );
        };
        got.push(m);
    }
    svc.stop().await;
    store.close().await;
}
