//! Tools for a person at a bus: find the meters on it, read one decoded, and change a WE-515's
//! slave address or baud rate. The `wattbus modbus …` commands are thin wrappers around this.
//!
//! Unlike the service, the tools talk to one link at a time, one request at a time, and give up
//! on the first failure with a sentence that says what to check. They reuse the service's pure
//! core: profiles say where values live and how they decode, the planner coalesces a profile's
//! registers into the fewest reads.
//!
//! - [`scan()`]: which slave ids answer, and which profile their values fit. A timeout means
//!   nobody is there; an exception means somebody is (a meter that refuses a read still
//!   answers). A model is guessed from plausible values (mains frequency 45–65 Hz, L1 voltage
//!   80–300 V) at the addresses each profile gives, so the guess names the values behind it.
//! - [`read()`]: registers of one profile, decoded (sign, word order, scale, unit), with the raw
//!   words for `--raw`.
//! - [`set_address`] / [`set_baud`]: the ORNO WE-514/515 configuration registers (0x0110 slave
//!   address 1–247, 0x0111 baud code 1–4; FC06), written and then read back.
//!
//! Layout, by job: `session` (a [`Session`] on a [`crate::link::Link`], opened with the
//! service's own [`crate::link::open`]; [`ToolError`]), `scan`, `read` and `configure`.

use std::ops::RangeInclusive;

mod configure;
mod read;
mod scan;
mod session;

pub use configure::{
    AddressChanged, BaudChanged, SetError, WE515_ADDRESS_REGISTER, WE515_BAUD_REGISTER, baud_code,
    baud_of_code, set_address, set_baud,
};
pub use read::{RegisterReading, Select, parse_register, read, round, select};
pub use scan::{Candidate, Found, Observation, ScanProbe, best_fits, probes, scan};
pub use session::{Session, ToolError, exception_hint, exception_name};

/// Slave addresses a meter may take: 0 is broadcast, 248–255 are reserved (Modbus over Serial
/// Line v1.02, §2.2).
pub const SLAVE_ADDRESSES: RangeInclusive<u16> = 1..=247;

/// A value the user gave that cannot work, found before anything is sent. Callers treat it as a
/// usage error (exit 64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct InputError {
    /// The argument, e.g. `--to`.
    pub what: String,
    pub reason: String,
}

impl InputError {
    fn new(what: &str, reason: impl Into<String>) -> InputError {
        InputError {
            what: what.to_string(),
            reason: reason.into(),
        }
    }
}

/// Checks a slave address for a write or a scan bound (1..=247).
pub fn slave_address(what: &str, value: u16) -> Result<u8, InputError> {
    if SLAVE_ADDRESSES.contains(&value) {
        u8::try_from(value).map_err(|_| InputError::new(what, "out of range"))
    } else {
        Err(InputError::new(
            what,
            format!(
                "slave address must be 1 to 247, got {value} (0 is broadcast, 248–255 reserved)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slave_addresses_are_1_to_247() {
        assert_eq!(slave_address("--to", 1), Ok(1));
        assert_eq!(slave_address("--to", 247), Ok(247));
        for bad in [0, 248, 255, 1000] {
            let e = slave_address("--to", bad).unwrap_err();
            assert_eq!(e.what, "--to");
            assert!(e.reason.contains(&format!("got {bad}")), "{e}");
        }
    }
}
