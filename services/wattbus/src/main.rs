//! `wattbus`: run one service, the whole demo, or a tool. Thin: parsing and exit codes here,
//! everything else in the modules and the service crates.

mod check;
mod demo;
mod energy;
mod modbus;
mod services;
mod sinks;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "wattbus",
    version,
    about = "Edge energy monitoring: meters and sensors to MQTT, InfluxDB and the cloud."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one service (how each container starts).
    Run {
        /// One of: broker, simulator, influx-writer, serial-ingest, rms-processor.
        service: String,
        /// Config file [default: $WATTBUS_CONFIG, else /etc/wattbus/wattbus.toml if present].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Start the broker, every service and simulated devices in one process, and show what
    /// flows. Needs no hardware, no Docker and no database.
    Demo(demo::Options),
    /// Print bus traffic readably.
    Tail(tail::Options),
    /// rms-processor's energy counters: show them, or reset one (explicitly, visibly).
    Energy {
        #[command(subcommand)]
        command: energy::Command,
    },
    /// Sink groups: which are registered and waited for; forget one that is gone for good.
    Sinks {
        #[command(subcommand)]
        command: sinks::Command,
    },
    /// Modbus tools: scan a bus, read a meter, set a WE-515's address or baud rate.
    Modbus {
        #[command(subcommand)]
        command: modbus::Command,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file (and WATTBUS_* overrides); exit 64 with the reason if invalid.
    Check { file: Option<PathBuf> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wattbus: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { service, config } => services::run(&service, config).await,
            Command::Demo(opts) => demo::run(opts).await,
            Command::Tail(opts) => tail::run(opts).await,
            Command::Modbus { command } => modbus::run(command).await,
            Command::Energy { command } => energy::run(command),
            Command::Sinks { command } => sinks::run(command).await,
            Command::Config {
                command: ConfigCommand::Check { file },
            } => check::run(file),
        }
    });
    // Tasks left behind (the broker's listener threads) must not hold the exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wattbus: {e:#}");
            match e.downcast_ref::<runtime::ConfigError>() {
                Some(_) => ExitCode::from(runtime::config::EXIT_CONFIG as u8),
                None => ExitCode::FAILURE,
            }
        }
    }
}
