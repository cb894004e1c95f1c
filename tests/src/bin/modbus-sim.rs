//! Simulated ORNO WE-515 meters for modbus-ingest benchmarks (tests/bench/modbus-ingest.sh):
//! `--meters N` meters at slave ids `--first-slave`.. on one bus, served over Modbus TCP
//! (`--tcp ADDR`) or Modbus RTU on a serial path (`--rtu PATH`, a socat PTY end), optionally
//! paced at a real line's rate (`--pace`, with `--baud` and `--framing`), until SIGTERM or
//! SIGINT.
//!
//! Every `--report-ms` and once on exit it prints one JSON line of the server-side counters:
//! `t_s` (seconds since start, monotonic), totals, per-slave counters, and — when the line is
//! known (`--baud`/`--framing` on RTU) — `line_s`, the line time of the reads answered so far
//! from their frame sizes (`modbus_ingest::timing`). A benchmark takes rates from the
//! difference of two lines, so the time base is the simulator's own clock, not the script's.
//!
//! `--budget` prints, instead of serving, the share of the line `--meters` WE-515 take when
//! polled every `--fast-ms` (power block, 44 registers) and `--slow-ms` (energy block, 40
//! registers), and exits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use modbus_ingest::timing::{Framing, Line, ReadRate, utilisation};
use serde::Serialize;
use simulators::modbus::{
    LineTiming, MeterBus, RtuOptions, SlaveHandle, We515, serve_rtu, serve_tcp,
};
use simulators::serial::Port;

/// Registers of the WE-515's two reads (0x0130–0x015B, 0xA000–0xA027), as the planner
/// coalesces them (services/modbus-ingest/profiles/orno-we-515.toml).
const POWER_BLOCK: u16 = 44;
const ENERGY_BLOCK: u16 = 40;

#[derive(Parser, Debug)]
struct Cli {
    /// Serve Modbus TCP on this address (127.0.0.1:PORT).
    #[arg(long, conflicts_with = "rtu")]
    tcp: Option<String>,
    /// Serve Modbus RTU on this serial path (the device end of a socat PTY pair).
    #[arg(long)]
    rtu: Option<String>,
    #[arg(long, default_value_t = 8)]
    meters: u8,
    #[arg(long, default_value_t = 1)]
    first_slave: u8,
    /// RTU: answer no earlier than a real line of `--baud` and `--framing` would.
    #[arg(long, requires = "rtu")]
    pace: bool,
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// 8E1, 8O1, 8N2 (11 bits per character) or 8N1 (10).
    #[arg(long, default_value = "8E1", value_parser = parse_framing)]
    framing: Framing,
    /// Print the counters every this many ms (0: only on exit).
    #[arg(long, default_value_t = 1000)]
    report_ms: u64,
    /// Print the line share of `--meters` WE-515 at `--fast-ms`/`--slow-ms` and exit.
    #[arg(long)]
    budget: bool,
    #[arg(long, default_value_t = 1000)]
    fast_ms: u64,
    #[arg(long, default_value_t = 60_000)]
    slow_ms: u64,
}

fn parse_framing(s: &str) -> Result<Framing, String> {
    match s.to_ascii_uppercase().as_str() {
        "8N1" => Ok(Framing::N1),
        "8E1" => Ok(Framing::E1),
        "8O1" => Ok(Framing::O1),
        "8N2" => Ok(Framing::N2),
        _ => Err(format!("{s:?}: expected 8N1, 8E1, 8O1 or 8N2")),
    }
}

#[derive(Serialize)]
struct SlaveReport {
    id: u8,
    requests: u64,
    registers_read: u64,
    exceptions: u64,
}

#[derive(Serialize)]
struct Report {
    t_s: f64,
    requests: u64,
    registers_read: u64,
    exceptions: u64,
    /// Line time of the answered reads (request + response + a silence after each), if the
    /// line is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    line_s: Option<f64>,
    slaves: Vec<SlaveReport>,
}

fn report(started: Instant, handles: &[SlaveHandle], line: Option<Line>) -> String {
    let slaves: Vec<SlaveReport> = handles
        .iter()
        .map(|h| {
            let c = h.counters();
            SlaveReport {
                id: h.address(),
                requests: c.requests,
                registers_read: c.registers_read,
                exceptions: c.exceptions,
            }
        })
        .collect();
    let requests = slaves.iter().map(|s| s.requests).sum();
    let registers_read = slaves.iter().map(|s| s.registers_read).sum();
    let exceptions = slaves.iter().map(|s| s.exceptions).sum();
    // A read's line time is linear in its register count (`read_s(n) = read_s(0) + n ·
    // (read_s(1) − read_s(0))`), so the totals give the sum over every read exactly. Only
    // reads count here: the bench polls nothing else, and `exceptions` shows if one failed.
    let line_s = line.map(|l| {
        let per_read = l.read_s(0);
        let per_register = l.read_s(1) - per_read;
        (requests - exceptions) as f64 * per_read + registers_read as f64 * per_register
    });
    let r = Report {
        t_s: started.elapsed().as_secs_f64(),
        requests,
        registers_read,
        exceptions,
        line_s,
        slaves,
    };
    serde_json::to_string(&r).expect("a report serialises")
}

fn budget(cli: &Cli) -> anyhow::Result<()> {
    // A common period of one slow interval: fast reads `slow / fast` times, slow reads once.
    let period = Duration::from_millis(cli.slow_ms.max(cli.fast_ms));
    let times = |every: u64| (period.as_millis() as u64 / every.max(1)) as u32;
    let n = u32::from(cli.meters);
    let polls = [
        ReadRate {
            registers: POWER_BLOCK,
            times: n * times(cli.fast_ms),
        },
        ReadRate {
            registers: ENERGY_BLOCK,
            times: n * times(cli.slow_ms),
        },
    ];
    let u = utilisation(&polls, cli.baud, cli.framing, period)?;
    let line = Line::new(cli.baud, cli.framing)?;
    println!(
        "{{\"meters\":{},\"baud\":{},\"read_s_{POWER_BLOCK}\":{:.6},\"read_s_{ENERGY_BLOCK}\":{:.6},\"utilisation\":{u:.4}}}",
        cli.meters,
        cli.baud,
        line.read_s(POWER_BLOCK),
        line.read_s(ENERGY_BLOCK),
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.budget {
        return budget(&cli);
    }
    runtime::telemetry::init_logging(&runtime::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    })?;
    anyhow::ensure!(
        u16::from(cli.first_slave) + u16::from(cli.meters) <= 248 && cli.first_slave >= 1,
        "slave ids {}..{} do not fit in 1..=247",
        cli.first_slave,
        u16::from(cli.first_slave) + u16::from(cli.meters)
    );
    let now = proto::now_ms();
    let bus = MeterBus::new();
    let handles: Vec<SlaveHandle> = (0..cli.meters)
        .map(|i| {
            let id = cli.first_slave + i;
            bus.add(id, We515::new(u64::from(id), now))
        })
        .collect();
    let (trigger, shutdown) = runtime::shutdown::channel();
    let line = match cli.rtu {
        Some(_) => Some(Line::new(cli.baud, cli.framing)?),
        None => None,
    };
    let mut server = match (&cli.tcp, &cli.rtu) {
        (Some(addr), _) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let shutdown = shutdown.clone();
            let bus = bus.clone();
            tokio::spawn(async move {
                serve_tcp(listener, bus, shutdown)
                    .await
                    .context("TCP server")
            })
        }
        (None, Some(path)) => {
            let options = RtuOptions {
                pace: cli.pace.then_some(LineTiming {
                    baud: cli.baud,
                    bits_per_char: cli.framing.bits_per_char(),
                }),
            };
            let port = Port::Path {
                path: path.clone(),
                baud: cli.baud,
            };
            let shutdown = shutdown.clone();
            let bus = bus.clone();
            let path = path.clone();
            tokio::spawn(async move {
                serve_rtu(port, options, bus, shutdown)
                    .await
                    .with_context(|| format!("RTU server on {path}"))
            })
        }
        (None, None) => anyhow::bail!("give --tcp ADDR or --rtu PATH"),
    };
    let started = Instant::now();
    let every = Duration::from_millis(cli.report_ms.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let periodic = cli.report_ms > 0;
    loop {
        tokio::select! {
            _ = runtime::shutdown::fire_on_signal(&trigger) => break,
            done = &mut server => {
                // A server that ends before we are asked to stop is a broken bench.
                println!("{}", report(started, &handles, line));
                done??;
                anyhow::bail!("the simulator's server ended before shutdown");
            }
            _ = tick.tick(), if periodic => println!("{}", report(started, &handles, line)),
        }
    }
    server.await??;
    println!("{}", report(started, &handles, line));
    Ok(())
}
