//! modbus-ingest: energy meters on Modbus RTU (RS485) and Modbus TCP to the bus.
//!
//! **In progress.** The service will read meters described by profiles, one scheduler per
//! physical bus (so several meters share a serial port without conflicts and one silent meter
//! does not stall the others), and publish each reading as a `proto::Measurement` on
//! `wattbus/v1/<site>/meas/<device>/<channel>`. What exists so far is the pure core, with no
//! tokio, no serial port and no MQTT in it; the service around it (`run`, transports with
//! tokio-modbus, the async scheduler, the scan/read/set-address tools and the Modbus server
//! simulator) is **not built yet**, and modbus-ingest is not in `wattbus run`.
//!
//! What the core does:
//! - meter maps are data: a TOML profile per meter, built-ins for ORNO WE-514/515 and
//!   WE-516/517 and Eastron SDM120/SDM630 compiled in, more in a folder, each checked at load
//!   with errors that name the file, the entry and the reason;
//! - the registers due now become the fewest read requests (the WE-515 is two: 0x0130–0x015B
//!   and 0xA000–0xA027), with per-class poll intervals;
//! - register words decode to numbers with signs, word order and scale right, and NaN/∞ are
//!   errors rather than readings;
//! - the line time of a poll plan on a serial bus follows from frame sizes.
//!
//! The profile format, the planner and the utilisation formula are described in
//! `docs/modbus.md`.
//!
//! Layout:
//! - [`profile`]: the profile format, validation, built-in profiles and [`profile::load_dir`].
//! - [`plan`]: coalescing due registers into read requests (hole size, request size).
//! - [`decode`]: register words to scaled `f64` values.
//! - [`timing`]: RTU frame sizes, character and silence times, bus utilisation.

pub mod decode;
pub mod plan;
pub mod profile;
pub mod timing;
pub mod tools;
