//! Simulated serial devices: the three Arduino sketches of `docs/serial-protocols.md`,
//! byte for byte, so `serial-ingest` can be run and tested with no hardware.
//!
//! Layout:
//! - `powmon`, `prime`, `sensor`: pure device models (no tokio, no ports), one per protocol
//!   (`request-response`, `stream`, `lines`). Deterministic for a seed and a start time.
//! - `driver`: runs a model on a serial port until shutdown: a path (a socat PTY end, a real
//!   adapter looped back) or an open stream, or the device end of an in-process PTY pair from
//!   [`pty_pair`].
//!
//! PTY pairs: [`pty_pair`] keeps the master as the device end and hands out the slave's path
//! (`/dev/pts/N`) for the service to open, closing its own slave descriptor. While no one has
//! the slave open, Linux fails reads on the master with EIO; the drivers treat that as "host
//! not listening" (as a real device whose USB port is closed: answers nothing, streams into
//! the void) rather than as the device being gone. A master cannot be unplugged; the service
//! sees an unplug when the driver ends and drops the master.

mod driver;
mod powmon;
mod prime;
mod sensor;

pub(crate) use driver::OpenPort;
pub use driver::{DriverError, Port, PtyDevice, pty_pair, run_powmon, run_prime, run_sensor};
pub use powmon::{Load, PowMon, PowMonConfig, PowMonConfigError, PowMonFault, is_request};
pub use prime::{
    Prime, PrimeConfig, PrimeConfigError, PrimeFault, SampleBlock, Waveform, checksum, encode_line,
};
pub use sensor::{Sensor, SensorChannel, SensorConfig, SensorConfigError, SensorFault};
