//! The simulated meters behind a transparent RS485-to-Ethernet gateway ("RTU over TCP"): RTU
//! frames with their CRC on a TCP connection, read by tokio-modbus's RTU client attached to a
//! `TcpStream`, as modbus-ingest's `rtu-over-tcp` transport reads them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use runtime::shutdown;
use simulators::modbus::{Clock, ManualClock, MeterBus, RtuOptions, We515, serve_rtu_over_tcp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_modbus::Slave;
use tokio_modbus::client::{Reader, rtu};
use tokio_modbus::slave::SlaveContext;

/// 2024-06-01 14:00 UTC: the afternoon, solar exporting.
const AFTERNOON: i64 = 1_717_250_400_000;

#[tokio::test]
async fn two_slaves_answer_rtu_frames_over_tcp_and_strangers_get_silence() {
    let clock = ManualClock::new(AFTERNOON);
    let bus = MeterBus::with_clock(Clock::Manual(clock.clone()));
    let one = bus.add(1, We515::new(1, AFTERNOON - 3_600_000));
    let two = bus.add(2, We515::new(2, AFTERNOON - 3_600_000));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(serve_rtu_over_tcp(
        listener,
        RtuOptions::default(),
        bus,
        shutdown,
    ));

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    for (id, handle) in [(1u8, &one), (2, &two)] {
        ctx.set_slave(Slave(id));
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
        let truth = handle.with_meter(|m| m.as_we515_mut().unwrap().values());
        let power = ((u32::from(a[0x10]) << 16) | u32::from(a[0x11])) as i32;
        assert_eq!(f64::from(power), truth.power_w, "slave {id}");
        let energy = (u32::from(b[0]) << 16) | u32::from(b[1]);
        assert_eq!(f64::from(energy) * 10.0, truth.energy_wh, "slave {id}");
        let c = handle.counters();
        assert_eq!((c.requests, c.registers_read), (2, 84), "slave {id}");
    }
    // Slave 3 is nobody: no answer, as on the line.
    ctx.set_slave(Slave(3));
    assert!(
        timeout(
            Duration::from_millis(300),
            ctx.read_holding_registers(0x0130, 1)
        )
        .await
        .is_err()
    );
    drop(ctx);

    // A frame with a bad CRC is dropped; the next good one on a new connection is answered.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut frame = vec![1, 3, 0x01, 0x30, 0, 1];
    let crc = simulators::modbus::crc16(&frame);
    frame.extend(crc.to_le_bytes());
    let mut bad = frame.clone();
    bad[7] ^= 0xFF;
    raw.write_all(&bad).await.unwrap();
    let mut buf = [0u8; 16];
    assert!(
        timeout(Duration::from_millis(300), raw.read(&mut buf))
            .await
            .is_err(),
        "a bad CRC gets no answer"
    );
    raw.write_all(&frame).await.unwrap();
    let n = timeout(Duration::from_secs(2), raw.read_exact(&mut buf[..7]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 7);
    assert_eq!(&buf[..3], [1, 3, 2]);
    assert_eq!(simulators::modbus::crc16(&buf[..7]), 0);
    assert_eq!(one.counters().requests, 3);

    trigger.fire();
    timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
