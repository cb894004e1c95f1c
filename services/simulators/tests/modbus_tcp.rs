//! The simulated meters over real Modbus TCP, read by tokio-modbus's client as modbus-ingest
//! reads them: two coalesced requests per WE-515 poll.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use runtime::shutdown;
use simulators::modbus::{
    Clock, ExceptionCode, ManualClock, MeterBus, SlaveHandle, We515, We515Values, serve_tcp,
};
use tokio::time::timeout;
use tokio_modbus::Slave;
use tokio_modbus::client::{Context, Reader, Writer, tcp};

/// 2024-06-01 14:00 UTC: the afternoon, solar exporting.
const AFTERNOON: i64 = 1_717_250_400_000;

struct Gateway {
    addr: SocketAddr,
    clock: ManualClock,
    meters: [SlaveHandle; 2],
    trigger: shutdown::ShutdownTrigger,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn gateway() -> Gateway {
    let clock = ManualClock::new(AFTERNOON);
    let bus = MeterBus::with_clock(Clock::Manual(clock.clone()));
    let meters = [
        bus.add(1, We515::new(1, AFTERNOON - 3_600_000)),
        bus.add(2, We515::new(2, AFTERNOON - 3_600_000)),
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(serve_tcp(listener, bus, shutdown));
    Gateway {
        addr,
        clock,
        meters,
        trigger,
        server,
    }
}

async fn connect(addr: SocketAddr, id: u8) -> Context {
    tcp::connect_slave(addr, Slave(id)).await.unwrap()
}

/// Poll as modbus-ingest does and decode by the vendor table.
async fn poll(ctx: &mut Context) -> We515Values {
    let a = ctx
        .read_holding_registers(0x0130, 44)
        .await
        .unwrap()
        .unwrap();
    let b = ctx
        .read_holding_registers(0xA000, 40)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.len(), b.len()), (44, 40));
    let u32_at = |r: &[u16], i: usize| (u32::from(r[i]) << 16) | u32::from(r[i + 1]);
    let e = |i: usize| f64::from(u32_at(&b, i)) * 10.0;
    We515Values {
        frequency_hz: f64::from(a[0x00]) * 0.01,
        voltage_v: f64::from(a[0x01]) * 0.01,
        current_a: f64::from(u32_at(&a, 0x09)) * 0.001,
        power_w: f64::from(u32_at(&a, 0x10) as i32),
        reactive_power_var: f64::from(u32_at(&a, 0x18) as i32),
        apparent_power_va: f64::from(u32_at(&a, 0x20) as i32),
        power_factor: f64::from(a[0x28] as i16) * 0.001,
        energy_wh: e(0x00),
        energy_tariff_wh: [e(0x02), e(0x04), e(0x06), e(0x08)],
        reactive_energy_varh: e(0x1E),
        reactive_energy_tariff_varh: [e(0x20), e(0x22), e(0x24), e(0x26)],
    }
}

fn truth(h: &SlaveHandle) -> We515Values {
    h.with_meter(|m| m.as_we515_mut().unwrap().values())
}

#[tokio::test]
async fn two_meters_read_over_tcp_match_their_truth_with_two_requests_each() {
    let gw = gateway().await;
    for (i, h) in gw.meters.iter().enumerate() {
        let mut ctx = connect(gw.addr, i as u8 + 1).await;
        let got = poll(&mut ctx).await;
        assert_eq!(got, truth(h), "slave {}", i + 1);
        assert!(got.power_w < 0.0, "14:00 is export: {got:?}");
        let c = h.counters();
        assert_eq!(c.requests, 2);
        assert_eq!(c.by_function, BTreeMap::from([(3, 2)]));
        assert_eq!(c.registers_read, 84);
        assert_eq!(c.exceptions, 0);
    }
    // The two households differ (different seeds), so slave ids are not mixed up.
    assert_ne!(truth(&gw.meters[0]).power_w, truth(&gw.meters[1]).power_w);

    // An hour later the counters have grown by what the meter says.
    let before = truth(&gw.meters[0]);
    gw.clock.advance(Duration::from_secs(3600));
    let mut ctx = connect(gw.addr, 1).await;
    let after = poll(&mut ctx).await;
    assert_eq!(after, truth(&gw.meters[0]));
    assert!(
        after.energy_wh - before.energy_wh > 500.0,
        "{before:?} → {after:?}"
    );
}

#[tokio::test]
async fn a_switched_off_meter_times_out_while_the_other_answers() {
    let gw = gateway().await;
    gw.meters[0].set_powered(false);
    let mut one = connect(gw.addr, 1).await;
    let r = timeout(
        Duration::from_millis(300),
        one.read_holding_registers(0x0130, 44),
    )
    .await;
    assert!(r.is_err(), "an unpowered meter answers nothing: {r:?}");
    let mut two = connect(gw.addr, 2).await;
    assert_eq!(poll(&mut two).await, truth(&gw.meters[1]));
    assert_eq!(gw.meters[0].counters().requests, 0);

    // Nobody at id 9 either.
    let mut nine = connect(gw.addr, 9).await;
    let r = timeout(
        Duration::from_millis(300),
        nine.read_holding_registers(0x0130, 1),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn exceptions_reach_the_client() {
    let gw = gateway().await;
    let mut ctx = connect(gw.addr, 1).await;
    gw.meters[0].fail_next(1, ExceptionCode::ServerDeviceBusy);
    let r = ctx.read_holding_registers(0x0130, 44).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::ServerDeviceBusy));
    // FC04 is not a WE-515 function; 0x0000 is outside its blocks.
    let r = ctx.read_input_registers(0x0130, 2).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::IllegalFunction));
    let r = ctx.read_holding_registers(0x0000, 2).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::IllegalDataAddress));
    // Baud code 5 does not exist; 3 does and reads back.
    let r = ctx.write_single_register(0x0111, 5).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::IllegalDataValue));
    ctx.write_multiple_registers(0x0111, &[3])
        .await
        .unwrap()
        .unwrap();
    let r = ctx
        .read_holding_registers(0x0110, 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, [1, 3]);
    let c = gw.meters[0].counters();
    assert_eq!(
        c.by_function,
        BTreeMap::from([(3, 3), (4, 1), (6, 1), (16, 1)])
    );
    assert_eq!(c.exceptions, 4);
    assert_eq!(c.registers_written, 1);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let gw = gateway().await;
    drop(gw.trigger);
    let r = timeout(Duration::from_secs(2), gw.server)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
}
