//! `wattbus health <service>`: ask a running service's `/healthz`. What a container's
//! HEALTHCHECK or a monitoring script runs: no curl in the image, no HTTP client to install.
//!
//! Exit 0 when the service is ready, 1 when it is not or nothing answers (the message says
//! which checks are not ready, or that the connection was refused), 64 when the config gives
//! the service no health endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use runtime::ConfigSource;
use runtime::health::Probe;

use crate::services::{config_path, find};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// The service whose endpoint to ask (as for `wattbus run`).
    service: String,
    /// Config file, to find the service's `health_listen` [default: as for `wattbus run`].
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Ask this address instead of the configured `health_listen`.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// How long to wait for the connection, and again for the answer.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let service = find(&opts.service)?;
    let addr = match opts.addr {
        Some(addr) => addr,
        None => {
            let src = ConfigSource::load(config_path(opts.config).as_deref())?;
            service.health_listen(&src)?.ok_or_else(|| {
                runtime::ConfigError::new(
                    format!("{}.health_listen", service.section()),
                    "is not set: this service serves no /healthz to ask",
                )
            })?
        }
    };
    let name = service.name();
    match runtime::health::probe(addr, Duration::from_millis(opts.timeout_ms.max(1))) {
        Ok(Probe::Ready(body)) => {
            println!("{name} at {addr} is ready: {body}");
            Ok(())
        }
        Ok(Probe::NotReady(status, body)) => {
            anyhow::bail!("{name} at {addr} is not ready (HTTP {status}): {body}")
        }
        Err(e) => anyhow::bail!("{name}: nothing answers at {addr}: {e}"),
    }
}
