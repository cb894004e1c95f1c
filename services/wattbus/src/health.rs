//! `wattbus health <service>`: ask a running service's `/healthz`. What a container's
//! HEALTHCHECK or a monitoring script runs: no curl in the image, no HTTP client to install.
//!
//! Without a service name it asks the service this container runs: the one named by
//! `wattbus run <service> [--config FILE]` as process 1. So the image's one HEALTHCHECK
//! serves every service's container.
//!
//! Exit 0 when the service is ready, 1 when it is not or nothing answers (the message says
//! which checks are not ready, or that the connection was refused), 64 when the config gives
//! the service no health endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use runtime::ConfigSource;
use runtime::health::Probe;

use crate::services::{config_paths, find};

#[derive(clap::Args, Debug)]
pub struct HealthOptions {
    /// The service whose endpoint to ask (as for `wattbus run`) [default: the one process 1
    /// runs, in a container started as `wattbus run <service>`].
    service: Option<String>,
    /// Config file, to find the service's `health_listen` [default: as for `wattbus run`;
    /// given again, layered as there].
    #[arg(long, short)]
    config: Vec<PathBuf>,
    /// Ask this address instead of the configured `health_listen`.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Print the service's metrics (its /metrics, Prometheus text) instead: what a container
    /// counts, with no curl in the image.
    #[arg(long)]
    metrics: bool,
    /// How long to wait for the connection, and again for the answer.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

pub fn run(opts: HealthOptions) -> anyhow::Result<()> {
    let (name, config) = match opts.service {
        Some(name) => (name, opts.config),
        None => {
            let pid1 = std::fs::read("/proc/1/cmdline")
                .map_err(|e| anyhow::anyhow!("cannot read /proc/1/cmdline: {e}"))?;
            let (name, config) = run_args(&pid1).ok_or_else(|| {
                runtime::ConfigError::new(
                    "service",
                    "is not given, and process 1 is not `wattbus run <service>`: name the service",
                )
            })?;
            let config = if opts.config.is_empty() {
                config
            } else {
                opts.config
            };
            (name, config)
        }
    };
    let service = find(&name)?;
    let addr = match opts.addr {
        Some(addr) => addr,
        None => {
            let src = ConfigSource::load_layers(&config_paths(config))?;
            service.health_listen(&src)?.ok_or_else(|| {
                runtime::ConfigError::new(
                    format!("{}.health_listen", service.section()),
                    "is not set: this service serves no /healthz to ask",
                )
            })?
        }
    };
    let name = service.name();
    let timeout = Duration::from_millis(opts.timeout_ms.max(1));
    let path = if opts.metrics { "/metrics" } else { "/healthz" };
    match runtime::health::probe_path(addr, path, timeout) {
        Ok(Probe::Ready(body)) if opts.metrics => println!("{body}"),
        Ok(Probe::Ready(body)) => println!("{name} at {addr} is ready: {body}"),
        Ok(Probe::NotReady(status, body)) if opts.metrics => {
            anyhow::bail!("{name} at {addr}: /metrics answered HTTP {status}: {body}")
        }
        Ok(Probe::NotReady(status, body)) => {
            anyhow::bail!("{name} at {addr} is not ready (HTTP {status}): {body}")
        }
        Err(e) => anyhow::bail!("{name}: nothing answers at {addr}: {e}"),
    }
    Ok(())
}

/// The service and config files of a `wattbus run <service> [-c|--config FILE]…` command
/// line (NUL-separated, as in `/proc/<pid>/cmdline`); `None` for any other command.
fn run_args(cmdline: &[u8]) -> Option<(String, Vec<PathBuf>)> {
    let mut args = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let program = args.next()?;
    if !program.rsplit('/').next()?.starts_with("wattbus") || args.next()? != "run" {
        return None;
    }
    let (mut service, mut config) = (None, Vec::new());
    while let Some(arg) = args.next() {
        if arg == "--config" || arg == "-c" {
            config.push(PathBuf::from(args.next()?));
        } else if let Some(file) = arg.strip_prefix("--config=") {
            config.push(PathBuf::from(file));
        } else if !arg.starts_with('-') && service.is_none() {
            service = Some(arg);
        }
    }
    Some((service?, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_and_config_come_from_a_wattbus_run_command_line() {
        let line = |args: &[&str]| args.join("\0").into_bytes();
        assert_eq!(
            run_args(&line(&["/usr/local/bin/wattbus", "run", "influx-writer"])),
            Some(("influx-writer".into(), vec![]))
        );
        assert_eq!(
            run_args(&line(&[
                "wattbus",
                "run",
                "-c",
                "/etc/w.toml",
                "broker",
                ""
            ])),
            Some(("broker".into(), vec!["/etc/w.toml".into()]))
        );
        assert_eq!(
            run_args(&line(&[
                "wattbus",
                "run",
                "modbus-ingest",
                "--config=/x.toml",
                "-c",
                "/demo.toml"
            ])),
            Some((
                "modbus-ingest".into(),
                vec!["/x.toml".into(), "/demo.toml".into()]
            ))
        );
        assert_eq!(run_args(&line(&["wattbus", "demo"])), None);
        assert_eq!(run_args(&line(&["/sbin/init"])), None);
        assert_eq!(run_args(&line(&["wattbus", "run"])), None);
        assert_eq!(run_args(&line(&["wattbus", "run", "-c"])), None);
        assert_eq!(run_args(b""), None);
    }
}
