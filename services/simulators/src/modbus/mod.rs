//! Simulated Modbus meters and the servers that put them on a line, for `wattbus demo` and
//! for `modbus-ingest`'s tests (which compare what they decode against each model's truth).
//!
//! Layout:
//! - `we515`, `sdm120`: pure meter models (no tokio): register maps taken from the vendors'
//!   tables (cited in each), values computed from time, energy counters that only grow, and
//!   `values_at(now_ms)`, the truth a decoder must reproduce.
//! - `grid`: the household both models measure: import at night, solar export in the
//!   afternoon, a leading power factor whenever the fridge is off.
//! - `bus`: [`MeterBus`]: slaves by id, with power switches, injected exceptions, response
//!   delays and per-slave request counters that tests read while a server runs.
//! - `tcp`: [`serve_tcp`], a TCP gateway in front of the bus (tokio-modbus's server).
//! - `rtu`: [`serve_rtu`], the bus on a serial line with hand-rolled RTU framing (so unknown
//!   and unpowered slaves stay silent, several ids share one port, and responses can be paced
//!   at the line rate), and [`crc16`]; [`serve_rtu_over_tcp`], the same framing over TCP
//!   connections (a transparent RS485-to-Ethernet gateway).
//!
//! Typical test:
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use simulators::modbus::{Clock, ManualClock, MeterBus, We515, serve_tcp};
//! let clock = ManualClock::new(1_717_250_400_000);
//! let bus = MeterBus::with_clock(Clock::Manual(clock.clone()));
//! let one = bus.add(1, We515::new(1, clock.now_ms()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(serve_tcp(listener, bus.clone(), runtime::Shutdown::never()));
//! // … poll `addr` at slave 1, then compare with
//! let truth = one.with_meter(|m| m.as_we515_mut().map(|w| w.values()));
//! # Ok(()) }
//! ```

mod bus;
mod grid;
mod rtu;
mod sdm120;
mod tcp;
mod we515;

pub use bus::{Clock, ManualClock, MeterBus, RequestCounts, SimulatedMeter, SlaveHandle};
pub use rtu::{LineTiming, RtuOptions, crc16, serve_rtu, serve_rtu_over_tcp};
pub use sdm120::{Sdm120, Sdm120Values};
pub use tcp::serve_tcp;
pub(crate) use we515::tariff as we515_tariff;
pub use we515::{COUNTERS as WE515_COUNTERS, We515, We515Values};

/// The exception codes the models and [`SlaveHandle::fail_next`] use.
pub use tokio_modbus::ExceptionCode;
