//! `wattbus modbus …`: tools for a person at a Modbus bus. Argument handling, confirmation and
//! printing live here; talking to meters lives in `modbus_ingest::tools`.
//!
//! A value that cannot work (a slave address of 300, a baud rate the WE-515 does not know, no
//! link given, a write without confirmation) is a usage error and exits 64 before anything is
//! sent. A meter that does not answer or refuses is an ordinary failure (exit 1) with a sentence
//! that says what to check.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use modbus_ingest::link::{Link, Parity};
use modbus_ingest::profile::{Profiles, load_dir};
use modbus_ingest::tools::{
    self, BaudChanged, InputError, Select, Session, WE515_ADDRESS_REGISTER, WE515_BAUD_REGISTER,
};
use runtime::ConfigError;

#[derive(Subcommand, Debug)]
pub enum ModbusCommand {
    /// Find the slave ids that answer on a bus and guess each meter's model from its values.
    Scan {
        #[command(flatten)]
        link: LinkArgs,
        /// First slave id to try.
        #[arg(long, default_value_t = 1)]
        from: u16,
        /// Last slave id to try (an empty id costs one timeout).
        #[arg(long, default_value_t = 247)]
        to: u16,
        /// Folder of extra profiles (*.toml) to identify against, besides the built-in ones.
        #[arg(long, value_name = "DIR")]
        profiles: Option<PathBuf>,
    },
    /// Read one register, one field or all registers of a profile, decoded.
    Read {
        #[command(flatten)]
        link: LinkArgs,
        #[arg(long)]
        slave: u16,
        /// Profile model, e.g. orno-we-515, eastron-sdm120.
        #[arg(long)]
        profile: String,
        /// Register address, e.g. 0x0140 (the start of a value in the profile).
        #[arg(long, conflicts_with = "field")]
        register: Option<String>,
        /// Field name, e.g. power_w (every register with that field).
        #[arg(long)]
        field: Option<String>,
        /// Also print the register words, type, word order and scale.
        #[arg(long)]
        raw: bool,
        /// Folder of extra profiles (*.toml), besides the built-in ones.
        #[arg(long, value_name = "DIR")]
        profiles: Option<PathBuf>,
    },
    /// Give an ORNO WE-514/515 a new slave address (register 0x0110) and check it answers there.
    SetAddress {
        #[command(flatten)]
        link: LinkArgs,
        /// The meter's current address.
        #[arg(long)]
        slave: u16,
        /// The new address, 1 to 247.
        #[arg(long)]
        to: u16,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
    /// Set an ORNO WE-514/515's baud rate (register 0x0111). `--baud` stays the speed the
    /// meter talks now; `--to` is the new one.
    SetBaud {
        #[command(flatten)]
        link: LinkArgs,
        #[arg(long)]
        slave: u16,
        /// The new baud rate: 1200, 2400, 4800 or 9600.
        #[arg(long)]
        to: u32,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ParityArg {
    None,
    Even,
    Odd,
}

/// Where the bus is: exactly one of `--rtu`, `--tcp`, `--rtu-over-tcp`.
#[derive(Args, Debug)]
pub struct LinkArgs {
    /// Serial port of an RS485 converter (Modbus RTU), e.g. /dev/ttyUSB0.
    #[arg(long, value_name = "PATH")]
    rtu: Option<String>,
    /// Line speed of --rtu.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Parity of --rtu (the WE-515's manual says none, mbmd says even: try both).
    #[arg(long, value_enum, default_value_t = ParityArg::None)]
    parity: ParityArg,
    /// Stop bits of --rtu: 1 or 2.
    #[arg(long, default_value_t = 1)]
    stop_bits: u8,
    /// Modbus TCP server or gateway.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
    /// Transparent RS485-to-TCP gateway (RTU frames over TCP).
    #[arg(long, value_name = "HOST:PORT")]
    rtu_over_tcp: Option<String>,
    /// How long to wait for each answer.
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
}

fn usage(key: &str, reason: impl Into<String>) -> anyhow::Error {
    ConfigError::new(key, reason).into()
}

fn input(e: InputError) -> anyhow::Error {
    usage(&e.what, e.reason)
}

impl LinkArgs {
    fn link(&self) -> anyhow::Result<(Link, Duration)> {
        let given = [
            self.rtu.is_some(),
            self.tcp.is_some(),
            self.rtu_over_tcp.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(usage(
                "--rtu/--tcp/--rtu-over-tcp",
                "give exactly one link: --rtu PATH, --tcp HOST:PORT or --rtu-over-tcp HOST:PORT",
            ));
        }
        if self.timeout_ms == 0 {
            return Err(usage("--timeout-ms", "must be at least 1"));
        }
        let link = if let Some(path) = &self.rtu {
            if self.baud == 0 {
                return Err(usage("--baud", "must be a baud rate such as 9600"));
            }
            if !matches!(self.stop_bits, 1 | 2) {
                return Err(usage(
                    "--stop-bits",
                    format!("must be 1 or 2, got {}", self.stop_bits),
                ));
            }
            Link::Rtu {
                path: path.clone(),
                baud: self.baud,
                parity: match self.parity {
                    ParityArg::None => Parity::None,
                    ParityArg::Even => Parity::Even,
                    ParityArg::Odd => Parity::Odd,
                },
                stop_bits: self.stop_bits,
            }
        } else if let Some(addr) = &self.tcp {
            let (host, port) = host_port("--tcp", addr)?;
            Link::Tcp { host, port }
        } else if let Some(addr) = &self.rtu_over_tcp {
            let (host, port) = host_port("--rtu-over-tcp", addr)?;
            Link::RtuOverTcp { host, port }
        } else {
            unreachable!("exactly one link was checked above")
        };
        Ok((link, Duration::from_millis(self.timeout_ms)))
    }
}

/// `HOST:PORT` split; an IPv6 address is written in brackets (`[::1]:502`).
fn host_port(key: &str, addr: &str) -> anyhow::Result<(String, u16)> {
    let split = addr.rsplit_once(':').and_then(|(host, port)| {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
        (!host.is_empty()).then(|| (host.to_string(), port))
    });
    match split {
        Some(host_port) => Ok(host_port),
        None => Err(usage(
            key,
            format!("{addr:?} is not HOST:PORT (e.g. 192.168.1.50:502)"),
        )),
    }
}

fn profile_set(dir: Option<&PathBuf>) -> anyhow::Result<Profiles> {
    Ok(match dir {
        Some(dir) => load_dir(dir)?,
        None => Profiles::builtin()?,
    })
}

pub async fn run(command: ModbusCommand) -> anyhow::Result<()> {
    match command {
        ModbusCommand::Scan {
            link,
            from,
            to,
            profiles,
        } => scan(link, from, to, profiles).await,
        ModbusCommand::Read {
            link,
            slave,
            profile,
            register,
            field,
            raw,
            profiles,
        } => read(link, slave, &profile, register, field, raw, profiles).await,
        ModbusCommand::SetAddress {
            link,
            slave,
            to,
            yes,
        } => set_address(link, slave, to, yes).await,
        ModbusCommand::SetBaud {
            link,
            slave,
            to,
            yes,
        } => set_baud(link, slave, to, yes).await,
    }
}

async fn scan(args: LinkArgs, from: u16, to: u16, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (link, timeout) = args.link()?;
    let from = tools::slave_address("--from", from).map_err(input)?;
    let to = tools::slave_address("--to", to).map_err(input)?;
    if from > to {
        return Err(usage("--from", format!("--from {from} is after --to {to}")));
    }
    let profiles = profile_set(dir.as_ref())?;
    let ids = u64::from(to - from) + 1;
    eprintln!(
        "Scanning slaves {from}..={to} on {link}, up to {} ms per id that does not answer \
         (at most ~{} s).",
        timeout.as_millis(),
        (ids * u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)).div_ceil(1000)
    );
    let mut session = Session::connect(link.clone(), timeout).await?;
    let found = tools::scan(&mut session, &profiles, from, to, |_| {}).await?;
    for f in &found {
        println!("{f}");
    }
    if found.is_empty() {
        bail!(
            "no slave answered between {from} and {to} on {link}: check wiring (A/B swapped?), \
             baud and parity"
        );
    }
    eprintln!("{} slave(s) found.", found.len());
    Ok(())
}

async fn read(
    args: LinkArgs,
    slave: u16,
    model: &str,
    register: Option<String>,
    field: Option<String>,
    raw: bool,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (link, timeout) = args.link()?;
    let slave = tools::slave_address("--slave", slave).map_err(input)?;
    let profiles = profile_set(dir.as_ref())?;
    // `we-515` for `orno-we-515`: a unique model or alias ending in `-<what was typed>`.
    let by_suffix = || {
        let suffix = format!("-{model}");
        let mut hits = profiles
            .iter()
            .filter(|p| p.names().any(|n| n.ends_with(&suffix)));
        match (hits.next(), hits.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    };
    let Some(profile) = profiles.get(model).or_else(by_suffix) else {
        let mut names: Vec<String> = profiles
            .iter()
            .flat_map(|p| p.names().map(str::to_string).collect::<Vec<_>>())
            .collect();
        names.sort();
        return Err(usage(
            "--profile",
            format!("no profile {model:?}; known: {}", names.join(", ")),
        ));
    };
    let selection = match (register, field) {
        (Some(r), _) => Select::Address(tools::parse_register(&r).map_err(input)?),
        (None, Some(f)) => Select::Field(f),
        (None, None) => Select::All,
    };
    let registers = tools::select(profile, &selection).map_err(input)?;
    let mut session = Session::connect(link.clone(), timeout).await?;
    let readings = tools::read(&mut session, slave, profile, &registers).await?;
    println!(
        "slave {slave}, {} ({}), {link}:",
        profile.meter.model, profile.meter.name
    );
    for reading in &readings {
        println!("{}", reading.line(raw));
    }
    Ok(())
}

/// Asks the person to type `yes`, unless `--yes` was given. Refuses when nobody can answer.
fn confirm(yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(usage(
            "--yes",
            "stdin is not a terminal, so nobody can confirm: add --yes to write from a script",
        ));
    }
    print!("Type yes to write: ");
    std::io::stdout()
        .flush()
        .context("cannot write to stdout")?;
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("cannot read the confirmation")?;
    if answer.trim() != "yes" {
        bail!("not confirmed: nothing was written");
    }
    Ok(())
}

async fn set_address(args: LinkArgs, slave: u16, to: u16, yes: bool) -> anyhow::Result<()> {
    let (link, timeout) = args.link()?;
    let old = tools::slave_address("--slave", slave).map_err(input)?;
    let new = tools::slave_address("--to", to).map_err(input)?;
    if old == new {
        return Err(usage(
            "--to",
            format!("slave {old} already has address {new}"),
        ));
    }
    println!(
        "Will write {new} to holding register {WE515_ADDRESS_REGISTER:#06x} (slave address) of \
         slave {old} on {link} with FC06. The meter then answers at address {new} only."
    );
    confirm(yes)?;
    let mut session = Session::connect(link, timeout).await?;
    match tools::set_address(&mut session, old, new).await {
        Ok(changed) => {
            println!(
                "OK: slave {} now answers at address {}: register {WE515_ADDRESS_REGISTER:#06x} \
                 reads {} there.",
                changed.old, changed.new, changed.new
            );
            Ok(())
        }
        Err(e @ tools::SetError::ReadBack(_)) => Err(anyhow::Error::new(e).context(format!(
            "slave {old} may now be at address {new}: run `wattbus modbus scan` to find it"
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn set_baud(args: LinkArgs, slave: u16, to: u32, yes: bool) -> anyhow::Result<()> {
    let (link, timeout) = args.link()?;
    let slave = tools::slave_address("--slave", slave).map_err(input)?;
    let code = tools::baud_code(to).map_err(|e| usage("--to", e.reason))?;
    let current = match &link {
        Link::Rtu { baud, .. } => format!("{baud} baud"),
        _ => "its current speed (behind the gateway)".to_string(),
    };
    println!(
        "Will write baud code {code} ({to} baud) to holding register \
         {WE515_BAUD_REGISTER:#06x} of slave {slave} on {link} with FC06. The meter then talks \
         at {to} baud instead of {current}: every client on this bus must follow."
    );
    confirm(yes)?;
    let mut session = Session::connect(link.clone(), timeout).await?;
    let again = match &link {
        Link::Rtu {
            path,
            parity,
            stop_bits,
            ..
        } => {
            let parity = parity.as_str();
            format!(
                "wattbus modbus read --rtu {path} --baud {to} --parity {parity} --stop-bits \
                 {stop_bits} --slave {slave} --profile orno-we-515 --field frequency_hz"
            )
        }
        _ => format!(
            "set the gateway's serial side to {to} baud, then run wattbus modbus read … \
             --slave {slave} --profile orno-we-515 --field frequency_hz"
        ),
    };
    match tools::set_baud(&mut session, slave, code).await? {
        BaudChanged::Confirmed { code } => println!(
            "OK: slave {slave} stores baud code {code} ({to} baud); it read back at the old \
             speed, so the meter switches when it applies the setting (at once after this \
             answer, or at its next power-up). Then check with: {again}"
        ),
        BaudChanged::Switched => println!(
            "Written: slave {slave} acknowledged baud code {code} and no longer answers at the \
             old speed, so it has most likely switched to {to} baud. Check with: {again}"
        ),
    }
    Ok(())
}
