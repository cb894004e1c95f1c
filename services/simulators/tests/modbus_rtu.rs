//! The simulated meters over Modbus RTU on real virtual serial ports (a socat PTY pair, as a
//! user would make one, and the in-process pair the demo uses), read by tokio-modbus's RTU
//! client.
//!
//! On the socat pair the simulated meters serve the `sim` end; the client opens the `dev` end,
//! as modbus-ingest would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use runtime::shutdown::{self, ShutdownTrigger};
use simulators::modbus::{
    Clock, ExceptionCode, LineTiming, ManualClock, MeterBus, RtuOptions, SlaveHandle, We515,
    serve_rtu,
};
use simulators::serial::{self, Port};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_modbus::Slave;
use tokio_modbus::client::{Context, Reader, Writer, rtu};
use tokio_modbus::slave::SlaveContext;
use tokio_serial::SerialPortBuilderExt;
use wattbus_testkit::Socat;

/// 2024-06-01 14:00 UTC.
const AFTERNOON: i64 = 1_717_250_400_000;
const NO_ANSWER: Duration = Duration::from_millis(300);

struct Line {
    meters: [SlaveHandle; 2],
    _trigger: ShutdownTrigger,
    _server: JoinHandle<Result<(), serial::DriverError>>,
}

fn bus() -> (MeterBus, [SlaveHandle; 2]) {
    let bus = MeterBus::with_clock(Clock::Manual(ManualClock::new(AFTERNOON)));
    let meters = [
        bus.add(1, We515::new(1, AFTERNOON)),
        bus.add(2, We515::new(2, AFTERNOON)),
    ];
    (bus, meters)
}

fn serve(port: Port, pace: Option<LineTiming>) -> Line {
    let (bus, meters) = bus();
    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(serve_rtu(port, RtuOptions { pace }, bus, shutdown));
    Line {
        meters,
        _trigger: trigger,
        _server: server,
    }
}

fn client(path: &Path, id: u8) -> Context {
    let stream = tokio_serial::new(path.to_string_lossy(), 9600)
        .open_native_async()
        .unwrap();
    rtu::attach_slave(stream, Slave(id))
}

fn power_w(regs: &[u16]) -> f64 {
    f64::from(((u32::from(regs[0x10]) << 16) | u32::from(regs[0x11])) as i32)
}

fn truth_power(h: &SlaveHandle) -> f64 {
    h.with_meter(|m| m.as_we515_mut().unwrap().values().power_w)
}

#[tokio::test]
async fn two_slaves_share_a_socat_line_and_strangers_get_silence() {
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path(), "line");
    let line = serve(
        Port::Path {
            path: socat.sim_str(),
            baud: 9600,
        },
        None,
    );
    let mut ctx = client(socat.dev(), 1);
    for (i, h) in line.meters.iter().enumerate() {
        ctx.set_slave(Slave(i as u8 + 1));
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
        let v = h.with_meter(|m| m.as_we515_mut().unwrap().values());
        assert_eq!(power_w(&a), v.power_w);
        assert!(v.power_w < 0.0, "export at 14:00: {v:?}");
        assert_eq!(f64::from(a[1]) * 0.01, v.voltage_v);
        assert_eq!(f64::from(a[0x28] as i16) * 0.001, v.power_factor);
        assert_eq!(
            f64::from((u32::from(b[0]) << 16) | u32::from(b[1])) * 10.0,
            v.energy_wh
        );
        let c = h.counters();
        assert_eq!((c.requests, c.registers_read), (2, 84));
    }

    ctx.set_slave(Slave(9));
    let r = timeout(NO_ANSWER, ctx.read_holding_registers(0x0130, 44)).await;
    assert!(r.is_err(), "nobody is slave 9: {r:?}");

    line.meters[1].set_powered(false);
    ctx.set_slave(Slave(2));
    let r = timeout(NO_ANSWER, ctx.read_holding_registers(0x0130, 44)).await;
    assert!(r.is_err(), "slave 2 is off: {r:?}");
    assert_eq!(line.meters[1].counters().requests, 2);

    // The line still works after the silences (no stale bytes), and exceptions come through.
    ctx.set_slave(Slave(1));
    line.meters[0].fail_next(1, ExceptionCode::ServerDeviceBusy);
    let r = ctx.read_holding_registers(0x0130, 44).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::ServerDeviceBusy));
    let r = ctx.read_input_registers(0x0000, 2).await.unwrap();
    assert_eq!(r, Err(ExceptionCode::IllegalFunction));
    let a = ctx
        .read_holding_registers(0x0130, 44)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(power_w(&a), truth_power(&line.meters[0]));
}

#[tokio::test]
async fn an_address_write_over_rtu_moves_the_meter() {
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path(), "line");
    let line = serve(
        Port::Path {
            path: socat.sim_str(),
            baud: 9600,
        },
        None,
    );
    let mut ctx = client(socat.dev(), 1);
    let r = ctx.write_multiple_registers(0x0110, &[0, 4]).await.unwrap();
    assert_eq!(
        r,
        Err(ExceptionCode::IllegalDataValue),
        "address 0 is broadcast"
    );
    ctx.write_single_register(0x0110, 42)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.meters[0].address(), 42);
    let r = timeout(NO_ANSWER, ctx.read_holding_registers(0x0110, 2)).await;
    assert!(r.is_err(), "slave 1 is now 42: {r:?}");
    ctx.set_slave(Slave(42));
    let r = ctx
        .read_holding_registers(0x0110, 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, [42, 4]);
}

#[tokio::test]
async fn pacing_makes_a_read_take_as_long_as_a_9600_baud_line() {
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path(), "line");
    let t = LineTiming::RS485_9600_8E1;
    let line = serve(
        Port::Path {
            path: socat.sim_str(),
            baud: 9600,
        },
        Some(t),
    );
    let mut ctx = client(socat.dev(), 1);
    // A first read to have the port open and the line settled.
    ctx.read_holding_registers(0x0110, 2)
        .await
        .unwrap()
        .unwrap();
    let start = Instant::now();
    let a = ctx
        .read_holding_registers(0x0130, 44)
        .await
        .unwrap()
        .unwrap();
    let one = start.elapsed();
    assert_eq!(power_w(&a), truth_power(&line.meters[0]));
    // 8 request + 93 response bytes at 11 bits, plus the silence after the request: ≥ 119 ms.
    // Lower bounds only: a loaded machine may take longer, never less.
    let floor = t.bytes(8 + 93) + t.frame_gap();
    assert!(one >= floor, "{one:?} < {floor:?}");
    // A second block right after waits for the silence behind the first response too.
    let start = Instant::now();
    ctx.read_holding_registers(0x0130, 44)
        .await
        .unwrap()
        .unwrap();
    ctx.read_holding_registers(0xA000, 40)
        .await
        .unwrap()
        .unwrap();
    let two = start.elapsed();
    let floor = t.bytes(8 + 93 + 8 + 85) + t.frame_gap() * 3;
    assert!(two >= floor, "{two:?} < {floor:?}");
}

#[tokio::test]
async fn the_demo_pty_pair_serves_like_a_socat_line() {
    let (device, path) = serial::pty_pair().unwrap();
    let line = serve(device.into(), None);
    let mut ctx = client(Path::new(&path), 2);
    let a = ctx
        .read_holding_registers(0x0130, 44)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(power_w(&a), truth_power(&line.meters[1]));
    assert_eq!(line.meters[1].counters().requests, 1);
}
