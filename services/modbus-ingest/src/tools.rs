//! Tools for a person at a bus: find the meters on it, read one decoded, and change a WE-515's
//! slave address or baud rate. The `wattbus modbus …` commands are thin wrappers around this.
//!
//! Unlike the service, the tools talk to one link at a time, one request at a time, and give up
//! on the first failure with a sentence that says what to check. They reuse the service's pure
//! core: profiles say where values live and how they decode, the planner coalesces a profile's
//! registers into the fewest reads.
//!
//! - [`scan`]: which slave ids answer, and which profile their values fit. A timeout means
//!   nobody is there; an exception means somebody is (a meter that refuses a read still
//!   answers). A model is guessed from plausible values (mains frequency 45–65 Hz, L1 voltage
//!   80–300 V) at the addresses each profile gives, so the guess names the values behind it.
//! - [`read`]: registers of one profile, decoded (sign, word order, scale, unit), with the raw
//!   words for `--raw`.
//! - [`set_address`] / [`set_baud`]: the ORNO WE-514/515 configuration registers (0x0110 slave
//!   address 1–247, 0x0111 baud code 1–4; FC06), written and then read back.
//!
//! After a timeout the link is reopened: a late answer must not be taken for the answer to the
//! next request (over TCP it would carry the wrong transaction id, on RS485 it would be the
//! previous slave's frame).

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_modbus::client::{Client as _, Context, Reader as _, Writer as _};
use tokio_modbus::prelude::SlaveContext as _;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialPortBuilderExt as _;

use crate::decode::{DecodeError, decode};
use crate::plan::{PlanError, plan};
use crate::profile::{Function, Profile, Profiles, Register};

/// WE-514/515 holding register with the slave address (1–247), writable with FC06.
pub const WE515_ADDRESS_REGISTER: u16 = 0x0110;
/// WE-514/515 holding register with the baud code (see [`baud_code`]), writable with FC06.
pub const WE515_BAUD_REGISTER: u16 = 0x0111;
/// Slave addresses a meter may take: 0 is broadcast, 248–255 are reserved (Modbus over Serial
/// Line v1.02, §2.2).
pub const SLAVE_ADDRESSES: RangeInclusive<u16> = 1..=247;
/// The WE-515's baud codes, from the vendor's register table.
const BAUD_CODES: [(u16, u32); 4] = [(1, 1200), (2, 2400), (3, 4800), (4, 9600)];

/// Serial parity. The WE-515's vendor PDF says 8N1, mbmd's README 8E1: both are common.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// How the tools reach the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// RS485 through a serial port (a USB converter), Modbus RTU framing. 8 data bits.
    Rtu {
        path: String,
        baud: u32,
        parity: Parity,
        stop_bits: u8,
    },
    /// Modbus TCP (MBAP header, unit id = slave id).
    Tcp(String),
    /// RTU frames through a TCP socket: what transparent RS485-to-Ethernet gateways speak.
    RtuOverTcp(String),
}

impl Link {
    const fn is_serial_line(&self) -> bool {
        matches!(self, Link::Rtu { .. } | Link::RtuOverTcp(_))
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Rtu {
                path,
                baud,
                parity,
                stop_bits,
            } => {
                let p = match parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                };
                write!(f, "{path} at {baud} 8{p}{stop_bits}")
            }
            Link::Tcp(addr) => write!(f, "Modbus TCP {addr}"),
            Link::RtuOverTcp(addr) => write!(f, "RTU over TCP {addr}"),
        }
    }
}

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

/// Parses a register address as written in vendor tables: `0x0140`, `0X0140` or `320`.
pub fn parse_register(text: &str) -> Result<u16, InputError> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => t.parse::<u16>(),
    };
    parsed.map_err(|_| {
        InputError::new(
            "--register",
            format!("{text:?} is not a register address (0x0000–0xFFFF or 0–65535)"),
        )
    })
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

async fn open(link: &Link, timeout: Duration) -> Result<Context, ToolError> {
    let err = |source| ToolError::Connect {
        link: link.to_string(),
        source,
    };
    let tcp = |addr: &str| {
        let addr = addr.to_string();
        async move {
            match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
                Ok(stream) => stream,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TCP connection within {} ms", timeout.as_millis()),
                )),
            }
        }
    };
    match link {
        Link::Rtu {
            path,
            baud,
            parity,
            stop_bits,
        } => {
            let parity = match parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            let stop_bits = if *stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            };
            let port = tokio_serial::new(path.as_str(), *baud)
                .data_bits(tokio_serial::DataBits::Eight)
                .parity(parity)
                .stop_bits(stop_bits)
                .flow_control(tokio_serial::FlowControl::None)
                .open_native_async()
                .map_err(|e| err(e.into()))?;
            Ok(tokio_modbus::client::rtu::attach(port))
        }
        Link::Tcp(addr) => {
            let stream = tcp(addr).await.map_err(err)?;
            // Modbus TCP is request/response in small segments: no Nagle delay per request.
            stream.set_nodelay(true).map_err(err)?;
            Ok(tokio_modbus::client::tcp::attach(stream))
        }
        Link::RtuOverTcp(addr) => {
            let stream = tcp(addr).await.map_err(err)?;
            stream.set_nodelay(true).map_err(err)?;
            Ok(tokio_modbus::client::rtu::attach(stream))
        }
    }
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
                    tracing::debug!(error = %e, "Closing the link after a timeout failed.");
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

// ---------------------------------------------------------------------------------------------
// Identification

/// One value a scan reads to test whether a slave fits a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// What it is, for the output: `frequency`, `L1 voltage`, `L2 voltage`.
    pub quantity: &'static str,
    pub register: Register,
    /// Values a working meter on a 50/60 Hz grid reports.
    pub plausible: RangeInclusive<f64>,
}

/// Grid frequency on any public grid (50 or 60 Hz) with generous margins.
const FREQUENCY_HZ: RangeInclusive<f64> = 45.0..=65.0;
/// Phase-to-neutral voltage from 100 V grids to 240 V grids with margins.
const VOLTAGE_V: RangeInclusive<f64> = 80.0..=300.0;

/// The probes for a profile: its frequency and L1 voltage, plus the L2 voltage when it has one,
/// which is what tells a three-phase meter from a single-phase one at the same addresses
/// (SDM630 vs SDM120). `None` for a profile with no frequency or no L1 voltage register.
pub fn probes(profile: &Profile) -> Option<Vec<Probe>> {
    let find = |field: &str, channel: Option<&str>| {
        profile.registers.iter().find(|r| {
            r.field == field && r.tags.is_empty() && channel.is_none_or(|c| r.channel.as_str() == c)
        })
    };
    let frequency = find("frequency_hz", None)?;
    let l1 = find("voltage_v", Some("l1"))?;
    let mut out = vec![
        Probe {
            quantity: "frequency",
            register: frequency.clone(),
            plausible: FREQUENCY_HZ,
        },
        Probe {
            quantity: "L1 voltage",
            register: l1.clone(),
            plausible: VOLTAGE_V,
        },
    ];
    if let Some(l2) = find("voltage_v", Some("l2")) {
        out.push(Probe {
            quantity: "L2 voltage",
            register: l2.clone(),
            plausible: VOLTAGE_V,
        });
    }
    Some(out)
}

/// What one probe read gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub probe: Probe,
    /// The decoded value, or why there is none (timeout, exception, NaN).
    pub value: Result<f64, String>,
}

impl Observation {
    pub fn is_plausible(&self) -> bool {
        self.value
            .as_ref()
            .is_ok_and(|v| self.probe.plausible.contains(v))
    }
}

impl fmt::Display for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.probe.register;
        match &self.value {
            Ok(v) => write!(
                f,
                "{} {}{} at {}{:#06x}",
                self.probe.quantity,
                round(*v, r.scale),
                unit_suffix(&r.unit),
                table_prefix(r.function),
                r.address
            ),
            Err(e) => write!(
                f,
                "{} at {}{:#06x}: {e}",
                self.probe.quantity,
                table_prefix(r.function),
                r.address
            ),
        }
    }
}

fn table_prefix(function: Function) -> &'static str {
    match function {
        Function::Holding => "holding ",
        Function::Input => "input ",
    }
}

fn unit_suffix(unit: &str) -> String {
    if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    }
}

/// A profile's observations during a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub model: String,
    pub observations: Vec<Observation>,
}

impl Candidate {
    /// Every probe gave a plausible value.
    pub fn fits(&self) -> bool {
        !self.observations.is_empty() && self.observations.iter().all(Observation::is_plausible)
    }
}

/// The models that fit best: among the candidates whose every probe is plausible, those with the
/// most probes (a three-phase profile that also found a plausible L2 voltage beats the
/// single-phase profile with the same L1 and frequency addresses). Empty when none fits.
pub fn best_fits(candidates: &[Candidate]) -> Vec<&Candidate> {
    let fitting: Vec<&Candidate> = candidates.iter().filter(|c| c.fits()).collect();
    let most = fitting
        .iter()
        .map(|c| c.observations.len())
        .max()
        .unwrap_or(0);
    fitting
        .into_iter()
        .filter(|c| c.observations.len() == most)
        .collect()
}

/// One slave that answered a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub slave: u8,
    /// The models that fit best (usually one; several when their maps cannot be told apart).
    pub models: Vec<String>,
    /// The observations behind the guess, or, with no guess, every profile's observations.
    pub evidence: Vec<String>,
    /// How the slave first answered (`answered`, or the exception it sent).
    pub first_answer: String,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = if self.models.is_empty() {
            "unknown model".to_string()
        } else {
            self.models.join(" or ")
        };
        write!(f, "slave {:>3}: {model}", self.slave)?;
        if self.evidence.is_empty() {
            write!(f, " ({})", self.first_answer)
        } else {
            write!(f, " ({})", self.evidence.join(", "))
        }
    }
}

/// How one slave id answered the presence read.
enum Presence {
    Nobody,
    Somebody(String),
}

/// Reads one register of a profile and decodes it; the error is a short reason for the output.
async fn observe(
    session: &mut Session,
    slave: u8,
    probe: &Probe,
) -> Result<Observation, ToolError> {
    let r = &probe.register;
    let value = match session.read(slave, r.function, r.address, r.words()).await {
        Ok(words) => decode(r, &words).map_err(|e| e.to_string()),
        Err(ToolError::Exception { code, .. }) => Err(exception_name(code)),
        Err(ToolError::Timeout { .. }) => Err("no answer".to_string()),
        Err(e @ (ToolError::Connect { .. } | ToolError::Transport { .. })) => return Err(e),
        Err(e) => Err(e.to_string()),
    };
    Ok(Observation {
        probe: probe.clone(),
        value,
    })
}

/// Scans slave ids `from..=to` and identifies every slave that answers against `profiles`.
/// `progress` is called once per id before it is tried (for a progress line).
///
/// A slave is present when the first profile's first probe gets any answer (a value or an
/// exception); only then are the other probes read, so an empty id costs one timeout.
pub async fn scan(
    session: &mut Session,
    profiles: &Profiles,
    from: u8,
    to: u8,
    mut progress: impl FnMut(u8),
) -> Result<Vec<Found>, ToolError> {
    let all: Vec<(String, Vec<Probe>)> = profiles
        .iter()
        .filter_map(|p| probes(p).map(|probes| (p.meter.model.clone(), probes)))
        .collect();
    let Some((_, first_probes)) = all.first() else {
        return Ok(Vec::new());
    };
    let Some(presence_probe) = first_probes.first().cloned() else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for slave in from..=to {
        progress(slave);
        let presence = match observe(session, slave, &presence_probe).await {
            Ok(Observation {
                value: Err(reason), ..
            }) if reason == "no answer" => Presence::Nobody,
            Ok(Observation { value: Ok(_), .. }) => Presence::Somebody("answered".to_string()),
            Ok(Observation {
                value: Err(reason), ..
            }) => Presence::Somebody(format!("answered with {reason}")),
            // A garbled or foreign answer still means something is on the line at this id.
            Err(ToolError::Transport { source, .. }) => {
                Presence::Somebody(format!("answered, but not validly: {source}"))
            }
            Err(e) => return Err(e),
        };
        let Presence::Somebody(first_answer) = presence else {
            continue;
        };
        let mut candidates = Vec::with_capacity(all.len());
        for (model, probes) in &all {
            let mut observations = Vec::with_capacity(probes.len());
            for probe in probes {
                let observation = observe(session, slave, probe).await?;
                let plausible = observation.is_plausible();
                observations.push(observation);
                // The rest of this profile cannot make it fit any more.
                if !plausible {
                    break;
                }
            }
            candidates.push(Candidate {
                model: model.clone(),
                observations,
            });
        }
        let best = best_fits(&candidates);
        let models: Vec<String> = best.iter().map(|c| c.model.clone()).collect();
        let evidence = match best.first() {
            Some(c) => c.observations.iter().map(ToString::to_string).collect(),
            None => candidates
                .iter()
                .flat_map(|c| {
                    c.observations
                        .iter()
                        .map(move |o| format!("{}: {o}", c.model))
                })
                .collect(),
        };
        found.push(Found {
            slave,
            models,
            evidence,
            first_answer,
        });
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Which registers of a profile to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    All,
    /// The register that starts at this address (holding or input).
    Address(u16),
    /// Every register with this field name (`power_w` is L1 and total on a WE-515).
    Field(String),
}

/// The registers of `profile` that `select` names, in profile order.
pub fn select(profile: &Profile, select: &Select) -> Result<Vec<Register>, InputError> {
    let chosen: Vec<Register> = profile
        .registers
        .iter()
        .filter(|r| match select {
            Select::All => true,
            Select::Address(a) => r.address == *a,
            Select::Field(f) => r.field == *f,
        })
        .cloned()
        .collect();
    if !chosen.is_empty() {
        return Ok(chosen);
    }
    let model = &profile.meter.model;
    Err(match select {
        Select::All => InputError::new("--profile", format!("{model} has no registers")),
        Select::Address(a) => {
            let near: Vec<String> = profile
                .registers
                .iter()
                .filter(|r| r.address <= *a && *a <= r.last())
                .map(|r| format!("{:#06x} ({})", r.address, r.field))
                .collect();
            let reason = if near.is_empty() {
                format!("no register of {model} starts at {a:#06x}")
            } else {
                format!(
                    "{a:#06x} is inside a wider value of {model}: read {}",
                    near.join(" or ")
                )
            };
            InputError::new("--register", reason)
        }
        Select::Field(f) => {
            let mut fields: Vec<&str> =
                profile.registers.iter().map(|r| r.field.as_str()).collect();
            fields.sort_unstable();
            fields.dedup();
            InputError::new(
                "--field",
                format!("{model} has no field {f:?}; it has {}", fields.join(", ")),
            )
        }
    })
}

/// One register read and decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub register: Register,
    pub words: Vec<u16>,
    pub value: Result<f64, DecodeError>,
}

impl Reading {
    /// `power l1 power_w = -1234 W  (0x0140 i32)`, with the words when `raw`.
    pub fn line(&self, raw: bool) -> String {
        let r = &self.register;
        let mut name = format!("{} {}", r.measurement, r.channel);
        for (k, v) in &r.tags {
            name.push_str(&format!(" {k}={v}"));
        }
        let value = match &self.value {
            Ok(v) => format!("{}{}", round(*v, r.scale), unit_suffix(&r.unit)),
            Err(e) => format!("no value: {e}"),
        };
        let mut line = format!("{:#06x} {:<22} {:<28} {value}", r.address, name, r.field);
        if raw {
            let words: Vec<String> = self.words.iter().map(|w| format!("{w:#06x}")).collect();
            line.push_str(&format!(
                "  [{} {}, {} word order, scale {}: {}]",
                fn_label(r.function),
                r.value_type,
                match r.word_order {
                    crate::profile::WordOrder::Big => "high-first",
                    crate::profile::WordOrder::Little => "low-first",
                },
                r.scale,
                words.join(" ")
            ));
        }
        line
    }
}

fn fn_label(function: Function) -> &'static str {
    match function {
        Function::Holding => "FC03",
        Function::Input => "FC04",
    }
}

/// A scaled value printed with as many decimals as its scale carries (0.001 → 3), so 231.45 V
/// does not print as 231.45000000000002.
pub fn round(value: f64, scale: f64) -> String {
    let decimals = if scale.abs() >= 1.0 || scale == 0.0 {
        0
    } else {
        // 0.01 → 2; capped for odd scales like 1/3.
        ((-scale.abs().log10()).ceil() as usize).min(6)
    };
    // f32 values (scale 1) keep their own precision: print at most 3 decimals, trimmed.
    if scale == 1.0 && value.fract() != 0.0 {
        let s = format!("{value:.3}");
        return s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{value:.decimals$}")
}

/// Reads the selected registers of `profile` from `slave` in the fewest requests the profile's
/// limits allow, and decodes each.
pub async fn read(
    session: &mut Session,
    slave: u8,
    profile: &Profile,
    registers: &[Register],
) -> Result<Vec<Reading>, ToolError> {
    let requests = plan(registers, |_| true, profile.limits)?;
    let mut out: Vec<(usize, Reading)> = Vec::with_capacity(registers.len());
    for request in &requests {
        let words = session
            .read(slave, request.function, request.start, request.count)
            .await?;
        for &index in &request.registers {
            let Some(register) = registers.get(index) else {
                continue;
            };
            let mine = request.words_of(register, &words).unwrap_or_default();
            out.push((
                index,
                Reading {
                    register: register.clone(),
                    words: mine.to_vec(),
                    value: decode(register, mine),
                },
            ));
        }
    }
    // Back to the order the user's profile lists them in.
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, r)| r).collect())
}

// ---------------------------------------------------------------------------------------------
// WE-515 configuration

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

    fn builtin() -> Profiles {
        Profiles::builtin().unwrap()
    }

    fn observe_all(profile: &Profile, value: impl Fn(&Probe) -> Result<f64, String>) -> Candidate {
        let observations = probes(profile)
            .unwrap()
            .into_iter()
            .map(|probe| Observation {
                value: value(&probe),
                probe,
            })
            .collect();
        Candidate {
            model: profile.meter.model.clone(),
            observations,
        }
    }

    /// What each built-in profile would see on a slave whose registers hold `values`
    /// ((function, address) → decoded value); anything else answers IllegalDataAddress.
    fn candidates(values: &[((Function, u16), f64)]) -> Vec<Candidate> {
        builtin()
            .iter()
            .map(|p| {
                observe_all(p, |probe| {
                    let key = (probe.register.function, probe.register.address);
                    values
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, v)| *v)
                        .ok_or_else(|| "IllegalDataAddress".to_string())
                })
            })
            .collect()
    }

    fn models(c: &[Candidate]) -> Vec<String> {
        best_fits(c).iter().map(|c| c.model.clone()).collect()
    }

    #[test]
    fn every_builtin_profile_has_identification_probes() {
        for p in builtin().iter() {
            let probes = probes(p).unwrap_or_else(|| panic!("{} has no probes", p.meter.model));
            assert_eq!(probes[0].quantity, "frequency", "{}", p.meter.model);
        }
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let p = probes(&we515).unwrap();
        let at: Vec<(Function, u16)> = p
            .iter()
            .map(|p| (p.register.function, p.register.address))
            .collect();
        assert_eq!(
            at,
            [(Function::Holding, 0x0130), (Function::Holding, 0x0131)]
        );
        let sdm120 = builtin().get("eastron-sdm120").unwrap().clone();
        let at: Vec<(Function, u16)> = probes(&sdm120)
            .unwrap()
            .iter()
            .map(|p| (p.register.function, p.register.address))
            .collect();
        assert_eq!(at, [(Function::Input, 0x0046), (Function::Input, 0x0000)]);
    }

    #[test]
    fn a_we515_is_identified_by_frequency_and_voltage_in_holding_registers() {
        let c = candidates(&[
            ((Function::Holding, 0x0130), 50.01),
            ((Function::Holding, 0x0131), 231.45),
        ]);
        assert_eq!(models(&c), ["orno-we-515"]);
    }

    #[test]
    fn an_implausible_frequency_rules_a_profile_out() {
        // A WE-515 map, but 0x0130 holds 500 Hz: not a meter on a grid.
        let c = candidates(&[
            ((Function::Holding, 0x0130), 500.0),
            ((Function::Holding, 0x0131), 231.45),
        ]);
        assert!(models(&c).is_empty());
        let c = candidates(&[
            ((Function::Holding, 0x0130), 50.0),
            ((Function::Holding, 0x0131), 12.0),
        ]);
        assert!(models(&c).is_empty());
    }

    #[test]
    fn an_sdm120_is_told_from_an_sdm630_by_the_l2_voltage() {
        let single = candidates(&[
            ((Function::Input, 0x0046), 49.98),
            ((Function::Input, 0x0000), 229.1),
        ]);
        assert_eq!(models(&single), ["eastron-sdm120"]);
        let three = candidates(&[
            ((Function::Input, 0x0046), 49.98),
            ((Function::Input, 0x0000), 229.1),
            ((Function::Input, 0x0002), 231.0),
        ]);
        assert_eq!(models(&three), ["eastron-sdm630"]);
    }

    #[test]
    fn a_we517_is_identified_by_float_registers() {
        let c = candidates(&[
            ((Function::Holding, 0x0014), 50.0),
            ((Function::Holding, 0x000E), 230.0),
            ((Function::Holding, 0x0010), 231.0),
        ]);
        assert_eq!(models(&c), ["orno-we-517"]);
    }

    #[test]
    fn observations_print_the_values_that_convinced() {
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let c = observe_all(&we515, |p| {
            Ok(if p.quantity == "frequency" {
                50.01
            } else {
                231.45
            })
        });
        let text: Vec<String> = c.observations.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "frequency 50.01 Hz at holding 0x0130",
                "L1 voltage 231.45 V at holding 0x0131"
            ]
        );
    }

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

    #[test]
    fn register_addresses_parse_in_hex_and_decimal() {
        assert_eq!(parse_register("0x0140"), Ok(0x0140));
        assert_eq!(parse_register("0XA000"), Ok(0xA000));
        assert_eq!(parse_register("320"), Ok(320));
        assert!(parse_register("0x10000").is_err());
        assert!(parse_register("power").is_err());
    }

    #[test]
    fn select_finds_registers_by_address_or_field_and_explains_misses() {
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let r = select(&we515, &Select::Address(0x0140)).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].field, "power_w");
        let r = select(&we515, &Select::Field("power_w".into())).unwrap();
        let at: Vec<u16> = r.iter().map(|r| r.address).collect();
        assert_eq!(at, [0x0140, 0x0146]);
        assert_eq!(
            select(&we515, &Select::All).unwrap().len(),
            we515.registers.len()
        );

        let e = select(&we515, &Select::Address(0x0141)).unwrap_err();
        assert!(e.reason.contains("inside a wider value"), "{e}");
        assert!(e.reason.contains("0x0140 (power_w)"), "{e}");
        let e = select(&we515, &Select::Address(0x0200)).unwrap_err();
        assert!(
            e.reason
                .contains("no register of orno-we-515 starts at 0x0200"),
            "{e}"
        );
        let e = select(&we515, &Select::Field("power_kw".into())).unwrap_err();
        assert!(e.reason.contains("has no field \"power_kw\""), "{e}");
        assert!(e.reason.contains("power_factor"), "{e}");
    }

    #[test]
    fn readings_print_signed_scaled_values_and_raw_words() {
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let reg = |a| select(&we515, &Select::Address(a)).unwrap().remove(0);
        let power = Reading {
            register: reg(0x0140),
            words: vec![0xFFFF, 0xFB2E],
            value: decode(&reg(0x0140), &[0xFFFF, 0xFB2E]),
        };
        assert_eq!(power.value, Ok(-1234.0));
        let line = power.line(true);
        assert!(line.contains("power_w"), "{line}");
        assert!(line.contains("-1234 W"), "{line}");
        assert!(
            line.contains("FC03 i32, high-first word order, scale 1: 0xffff 0xfb2e"),
            "{line}"
        );
        let pf = decode(&reg(0x0158), &[0xFC9A]).unwrap();
        assert_eq!(round(pf, 0.001), "-0.870");
        let v = decode(&reg(0x0131), &[23145]).unwrap();
        assert_eq!(round(v, 0.01), "231.45");
        assert_eq!(round(230.5, 1.0), "230.5");
        assert_eq!(round(12_345_600.0, 10.0), "12345600");
    }

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
