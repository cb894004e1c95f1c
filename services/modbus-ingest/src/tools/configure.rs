//! `set-address` and `set-baud`: the ORNO WE-514/515 configuration registers (0x0110 slave
//! address 1–247, 0x0111 baud code 1–4; FC06), written and then read back.

use super::InputError;
use super::session::{Session, ToolError};
use crate::profile::Function;

/// WE-514/515 holding register with the slave address (1–247), writable with FC06.
pub const WE515_ADDRESS_REGISTER: u16 = 0x0110;
/// WE-514/515 holding register with the baud code (see [`baud_code`]), writable with FC06.
pub const WE515_BAUD_REGISTER: u16 = 0x0111;
/// The WE-515's baud codes, from the vendor's register table.
const BAUD_CODES: [(u16, u32); 4] = [(1, 1200), (2, 2400), (3, 4800), (4, 9600)];

/// The WE-515 baud code for a baud rate.
pub fn baud_code(baud: u32) -> Result<u16, InputError> {
    BAUD_CODES
        .iter()
        .find(|(_, b)| *b == baud)
        .map(|(code, _)| *code)
        .ok_or_else(|| {
            InputError::new(
                "--baud",
                format!("the WE-515 supports 1200, 2400, 4800 and 9600 baud, not {baud}"),
            )
        })
}

/// The baud rate of a WE-515 baud code, if it is one.
pub fn baud_of_code(code: u16) -> Option<u32> {
    BAUD_CODES.iter().find(|(c, _)| *c == code).map(|(_, b)| *b)
}

/// Why a configuration write did not verify, split by whether the meter took the write: after
/// an acknowledged write the person must look at the meter under its new setting.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("the write failed, so the meter should keep its setting: {0}")]
    Write(#[source] ToolError),
    #[error("the meter acknowledged the write, but the read-back failed: {0}")]
    ReadBack(#[source] ToolError),
}

/// The result of [`set_address`]: the new address answered and holds itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressChanged {
    pub old: u8,
    pub new: u8,
}

/// Writes `new` into register 0x0110 of the WE-515 at `old`, then reads 0x0110 from `new` and
/// checks it holds `new`. The meter answers the write from its old address and takes the new
/// one at once.
pub async fn set_address(
    session: &mut Session,
    old: u8,
    new: u8,
) -> Result<AddressChanged, SetError> {
    session
        .write(old, WE515_ADDRESS_REGISTER, u16::from(new))
        .await
        .map_err(SetError::Write)?;
    let words = session
        .read(new, Function::Holding, WE515_ADDRESS_REGISTER, 1)
        .await
        .map_err(SetError::ReadBack)?;
    let got = words.first().copied().unwrap_or_default();
    if got != u16::from(new) {
        return Err(SetError::ReadBack(ToolError::Verify {
            slave: new,
            address: WE515_ADDRESS_REGISTER,
            value: u16::from(new),
            got,
        }));
    }
    Ok(AddressChanged { old, new })
}

/// What the read-back after a baud change showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaudChanged {
    /// The meter still answered at the old baud and its register holds the new code: it
    /// switches later (typically at its next power-up, or after it finished the answer).
    Confirmed { code: u16 },
    /// The meter did not answer at the old baud after the write: it has most likely switched.
    Switched,
}

/// Writes `code` into register 0x0111 of the WE-515 at `slave`, then tries to read it back at
/// the current baud. A meter that switches at once does not answer that read; that is reported
/// as [`BaudChanged::Switched`], not as an error.
pub async fn set_baud(
    session: &mut Session,
    slave: u8,
    code: u16,
) -> Result<BaudChanged, SetError> {
    session
        .write(slave, WE515_BAUD_REGISTER, code)
        .await
        .map_err(SetError::Write)?;
    match session
        .read(slave, Function::Holding, WE515_BAUD_REGISTER, 1)
        .await
    {
        Ok(words) => {
            let got = words.first().copied().unwrap_or_default();
            if got == code {
                Ok(BaudChanged::Confirmed { code })
            } else {
                Err(SetError::ReadBack(ToolError::Verify {
                    slave,
                    address: WE515_BAUD_REGISTER,
                    value: code,
                    got,
                }))
            }
        }
        Err(ToolError::Timeout { .. }) => Ok(BaudChanged::Switched),
        Err(e) => Err(SetError::ReadBack(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baud_codes_follow_the_vendor_table() {
        assert_eq!(baud_code(1200), Ok(1));
        assert_eq!(baud_code(2400), Ok(2));
        assert_eq!(baud_code(4800), Ok(3));
        assert_eq!(baud_code(9600), Ok(4));
        let e = baud_code(19200).unwrap_err();
        assert_eq!(e.what, "--baud");
        assert!(e.reason.contains("not 19200"), "{e}");
        assert_eq!(baud_of_code(4), Some(9600));
        assert_eq!(baud_of_code(5), None);
    }
}
