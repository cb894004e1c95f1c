//! `wattbus`: run one service, the whole demo, or a tool. Thin: parsing and exit codes here,
//! everything else in the modules and the service crates.

mod azure;
mod backup;
mod check;
mod demo;
mod energy;
mod health;
mod influx;
mod modbus;
mod services;
mod sinks;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

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
        /// The service (its help lists them from `services::SERVICES`; see `cli`).
        service: String,
        /// Config file [default: $WATTBUS_CONFIG, else /etc/wattbus/wattbus.toml if present].
        /// Given again, each file is layered over the ones before it (a later key wins; a
        /// list such as `[[serial_ingest.ports]]` is replaced whole).
        #[arg(long, short)]
        config: Vec<PathBuf>,
        /// Stop when standard input reaches end of file: how `wattbus demo` keeps its broker
        /// child from outliving it. Not for people.
        #[arg(long, hide = true)]
        stop_on_stdin_eof: bool,
    },
    /// Start the broker, every service and simulated devices in one process, and show what
    /// flows. Needs no hardware, no Docker and no database.
    Demo(demo::DemoOptions),
    /// Print bus traffic readably.
    Tail(tail::TailOptions),
    /// Ask a running service whether it is ready (its /healthz): exit 0 if so, 1 if not. A
    /// container's HEALTHCHECK.
    Health(health::HealthOptions),
    /// rms-processor's and plug-bridge's energy counters: show them, or reset one
    /// (explicitly, visibly).
    Energy {
        #[command(subcommand)]
        command: energy::EnergyCommand,
    },
    /// Sink groups: which are registered and waited for; forget one that is gone for good.
    Sinks {
        #[command(subcommand)]
        command: sinks::SinksCommand,
    },
    /// Modbus tools: scan a bus, read a meter, set a WE-515's address or baud rate.
    Modbus {
        #[command(subcommand)]
        command: modbus::ModbusCommand,
    },
    /// InfluxDB housekeeping: raw readings' retention and 1-minute aggregates kept for ever.
    Influx {
        #[command(subcommand)]
        command: influx::InfluxCommand,
    },
    /// IoT Hub tools: the SAS token azure-bridge uses, for trying another client.
    Azure {
        #[command(subcommand)]
        command: azure::AzureCommand,
    },
    /// backup-rotator's sets: list them, verify them, restore one into InfluxDB.
    Backup {
        #[command(subcommand)]
        command: backup::BackupCommand,
    },
    /// Print the service table as Markdown (docs/services.md holds it).
    #[command(hide = true)]
    Services,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file (and WATTBUS_* overrides); exit 64 with the reason if invalid.
    /// Several files are checked layered, as `wattbus run -c A -c B` reads them.
    Check { files: Vec<PathBuf> },
}

/// The command line, with the help of `run <service>` listing the services from the one table
/// that also starts them.
fn cli() -> clap::Command {
    Cli::command().mut_subcommand("run", |run| {
        run.mut_arg("service", |arg| {
            arg.help(format!("One of: {}.", services::names()))
        })
        .after_help(format!("Services:\n{}", services::listing()))
    })
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&cli().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // One service per process (`run`, and the short-lived commands) runs on one thread: its
    // work is a few wake-ups a second per device, and a second worker thread only adds
    // cross-thread wake-ups (futex, context switches) for every line read: half the CPU of
    // the stack (docs/BENCHMARKS.md). The periodic fsyncs go to tokio's blocking pool; the
    // rare ones in line (a journal segment closed every 4 MiB, a block of 65 536 sequence
    // numbers reserved) hold the thread for as long as the card takes, which delays, never
    // loses, a reading: a poll reads an answer that is there before it judges its deadline.
    // `demo` runs every service in one process and keeps two workers.
    let mut builder = match cli.command {
        Command::Demo(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wattbus: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                service,
                config,
                stop_on_stdin_eof,
            } => services::run(&service, config, stop_on_stdin_eof).await,
            Command::Demo(opts) => demo::run(opts).await,
            Command::Tail(opts) => tail::run(opts).await,
            Command::Health(opts) => health::run(opts),
            Command::Modbus { command } => modbus::run(command).await,
            Command::Influx { command } => influx::run(command).await,
            Command::Backup { command } => backup::run(command).await,
            Command::Energy { command } => energy::run(command),
            Command::Azure { command } => azure::run(command),
            Command::Sinks { command } => sinks::run(command).await,
            Command::Config {
                command: ConfigCommand::Check { files },
            } => check::run(files),
            Command::Services => {
                print!("{}", services::markdown());
                Ok(())
            }
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

#[cfg(test)]
mod tests {
    #[test]
    fn run_help_names_every_service_of_the_table() {
        let help = match super::cli().try_get_matches_from(["wattbus", "run", "--help"]) {
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.to_string(),
            other => panic!("no help: {other:?}"),
        };
        for service in super::services::SERVICES {
            assert!(
                help.contains(service.name()) && help.contains(service.about()),
                "{} missing from: {help}",
                service.name()
            );
        }
    }
}
