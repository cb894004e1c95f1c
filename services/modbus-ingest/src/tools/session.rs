//! A session: one open link, one request at a time, and errors worded for the person at
//! the bus.
//!
//! After a timeout the link is reopened: a late answer must not be taken for the answer to the
//! next request (over TCP it would carry the wrong transaction id, on RS485 it would be the
//! previous slave's frame).

use std::fmt;
use std::time::Duration;

use tokio_modbus::client::{Client as _, Context, Reader as _, Writer as _};
use tokio_modbus::prelude::SlaveContext as _;
use tokio_modbus::{ExceptionCode, Slave};

use crate::link::{self, Link};
use crate::plan::PlanError;
use crate::profile::Function;

/// Why a tool failed, worded for the person at the bus.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot open {link}: {source}")]
    Connect {
        link: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from slave {slave} within {ms} ms: {hint}")]
    Timeout {
        slave: u8,
        ms: u64,
        hint: &'static str,
    },
    #[error("slave {slave} refused {what}: exception {} ({:#04x}): {}",
        exception_name(*code), u8::from(*code), exception_hint(*code))]
    Exception {
        slave: u8,
        what: String,
        code: ExceptionCode,
    },
    /// An answer that is not a valid response to the request: from another slave id, with the
    /// wrong function code, or a link that broke.
    #[error("slave {slave}, {what}: {source}")]
    Transport {
        slave: u8,
        what: String,
        #[source]
        source: tokio_modbus::Error,
    },
    #[error("slave {slave} answered {what} with {got} registers instead of {expected}")]
    ShortAnswer {
        slave: u8,
        what: String,
        expected: u16,
        got: usize,
    },
    #[error("cannot plan the reads: {0}")]
    Plan(#[from] PlanError),
    /// The write was acknowledged but the value read back differs.
    #[error("slave {slave} acknowledged {value} at {address:#06x}, but it reads back {got}")]
    Verify {
        slave: u8,
        address: u16,
        value: u16,
        got: u16,
    },
}

/// The exception's name as the Modbus spec gives it.
pub fn exception_name(code: ExceptionCode) -> String {
    match code {
        ExceptionCode::Custom(c) => format!("Exception{c:02X}"),
        other => format!("{other:?}"),
    }
}

/// What an exception usually means in front of a meter.
pub fn exception_hint(code: ExceptionCode) -> &'static str {
    match code {
        ExceptionCode::IllegalFunction => {
            "the meter does not know this function code: is the profile right (holding vs input \
             registers)?"
        }
        ExceptionCode::IllegalDataAddress => {
            "the register is not in this meter's map: is the profile right?"
        }
        ExceptionCode::IllegalDataValue => {
            "the meter refused the value or the length of the request"
        }
        ExceptionCode::ServerDeviceFailure => "the meter failed while handling the request",
        ExceptionCode::Acknowledge => {
            "the meter accepted the request but needs time: read again later"
        }
        ExceptionCode::ServerDeviceBusy => "the meter is busy: try again",
        ExceptionCode::MemoryParityError => "the meter reports a memory error",
        ExceptionCode::GatewayPathUnavailable => {
            "the gateway has no path to that slave: check the gateway's configuration"
        }
        ExceptionCode::GatewayTargetDevice => {
            "the gateway got no answer from that slave: check the slave id and the RS485 side \
             (A/B swapped?), baud and parity"
        }
        ExceptionCode::Custom(_) => "a vendor-specific exception: see the meter's manual",
    }
}

/// An open link and the timeout for every request on it.
pub struct Session {
    ctx: Context,
    link: Link,
    timeout: Duration,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("link", &self.link)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Opens `link` for a tool: a TCP connect gets the request timeout, and a failure names the
/// link. (The byte count the service uses to tell silence from garbage is not needed here.)
async fn open(link: &Link, timeout: Duration) -> Result<Context, ToolError> {
    link::open(link, timeout, Default::default())
        .await
        .map_err(|source| ToolError::Connect {
            link: link.to_string(),
            source,
        })
}

impl Session {
    pub async fn connect(link: Link, timeout: Duration) -> Result<Session, ToolError> {
        let ctx = open(&link, timeout).await?;
        Ok(Session { ctx, link, timeout })
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn timeout_error(&self, slave: u8) -> ToolError {
        ToolError::Timeout {
            slave,
            ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            hint: if self.link.is_serial_line() {
                "check wiring (A/B swapped?), baud and parity"
            } else {
                "check the address and the slave id (unit id) the server expects"
            },
        }
    }

    /// Sends one request with the session's timeout; reopens the link after a timeout.
    async fn call<T>(
        &mut self,
        slave: u8,
        what: impl Fn() -> String,
        request: impl AsyncFnOnce(&mut Context) -> tokio_modbus::Result<T>,
    ) -> Result<T, ToolError> {
        self.ctx.set_slave(Slave(slave));
        match tokio::time::timeout(self.timeout, request(&mut self.ctx)).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(code))) => Err(ToolError::Exception {
                slave,
                what: what(),
                code,
            }),
            Ok(Err(source)) => Err(ToolError::Transport {
                slave,
                what: what(),
                source,
            }),
            Err(_) => {
                let error = self.timeout_error(slave);
                // Close before reopening: a serial port is opened exclusively (TIOCEXCL), so
                // the new open fails while the old descriptor lives. A failed close changes
                // nothing here; the reopen reports whatever is wrong with the link.
                if let Err(e) = self.ctx.disconnect().await {
                    tracing::debug!(error = %runtime::telemetry::chain(&e), "Closing the link after a timeout failed.");
                }
                self.ctx = open(&self.link, self.timeout).await?;
                Err(error)
            }
        }
    }

    /// Reads `count` registers from `function`'s table.
    pub async fn read(
        &mut self,
        slave: u8,
        function: Function,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, ToolError> {
        let what = || describe_read(function, address, count);
        let words = self
            .call(slave, what, async |ctx: &mut Context| match function {
                Function::Holding => ctx.read_holding_registers(address, count).await,
                Function::Input => ctx.read_input_registers(address, count).await,
            })
            .await?;
        if words.len() != usize::from(count) {
            return Err(ToolError::ShortAnswer {
                slave,
                what: what(),
                expected: count,
                got: words.len(),
            });
        }
        Ok(words)
    }

    /// Writes one holding register with FC06.
    pub async fn write(&mut self, slave: u8, address: u16, value: u16) -> Result<(), ToolError> {
        self.call(
            slave,
            || format!("the write of {value} to holding register {address:#06x} (FC06)"),
            async |ctx: &mut Context| ctx.write_single_register(address, value).await,
        )
        .await
    }
}

/// `a read of holding register 0x0140 (FC03)`, for errors.
fn describe_read(function: Function, address: u16, count: u16) -> String {
    let table = match function {
        Function::Holding => "holding",
        Function::Input => "input",
    };
    if count == 1 {
        format!(
            "a read of {table} register {address:#06x} (FC{:02})",
            function.code()
        )
    } else {
        format!(
            "a read of {count} {table} registers from {address:#06x} (FC{:02})",
            function.code()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_have_names_and_advice() {
        let e = ToolError::Exception {
            slave: 5,
            what: describe_read(Function::Holding, 0x0200, 1),
            code: ExceptionCode::IllegalDataAddress,
        };
        assert_eq!(
            e.to_string(),
            "slave 5 refused a read of holding register 0x0200 (FC03): exception \
             IllegalDataAddress (0x02): the register is not in this meter's map: is the \
             profile right?"
        );
        let t = ToolError::Timeout {
            slave: 5,
            ms: 500,
            hint: "check wiring (A/B swapped?), baud and parity",
        };
        assert_eq!(
            t.to_string(),
            "no answer from slave 5 within 500 ms: check wiring (A/B swapped?), baud and parity"
        );
    }
}
