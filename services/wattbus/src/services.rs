//! The services this binary can run, and how `wattbus run <service>` starts one.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use runtime::{ConfigError, ConfigSource, Context, Health, config::Validate};
use serde::de::DeserializeOwned;

/// A service `wattbus run` can start.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// As on the command line, in compose and on the bus.
    pub name: &'static str,
    /// Its config section (TOML keys and environment variables cannot both use a `-`, so
    /// `influx-writer` is configured in `[influx_writer]`).
    pub section: &'static str,
}

/// Every service `wattbus run` knows: the one table the command line, its help and the config
/// check are derived from.
pub const SERVICES: &[Service] = &[
    Service {
        name: "broker",
        section: broker::SECTION,
    },
    Service {
        name: "simulator",
        section: "simulator",
    },
    Service {
        name: "influx-writer",
        section: influx_writer::SECTION,
    },
    Service {
        name: "serial-ingest",
        section: serial_ingest::SECTION,
    },
    Service {
        name: "rms-processor",
        section: rms_processor::SECTION,
    },
    Service {
        name: "modbus-ingest",
        section: modbus_ingest::SECTION,
    },
];

/// `broker, simulator, …`, for help and errors.
pub fn names() -> String {
    SERVICES
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The config file to use: `--config`, else `$WATTBUS_CONFIG`, else the default path.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("WATTBUS_CONFIG").map(PathBuf::from))
}

/// Validate the whole configuration: shared keys, every section present, nothing unknown.
/// A section that is absent is validated (with its defaults) only by `wattbus run` of that
/// service: a Pi that runs only a simulator needs no `[broker]` users.
pub fn check_all(src: &ConfigSource) -> Result<(), ConfigError> {
    let sections: Vec<&str> = SERVICES.iter().map(|s| s.section).collect();
    src.check_sections(&sections)?;
    src.common()?;
    if src.has_key("broker") {
        src.section::<broker::Config>("broker")?;
    }
    if src.has_key("simulator") {
        src.section::<simulators::Config>("simulator")?;
    }
    if src.has_key(influx_writer::SECTION) {
        src.section::<influx_writer::Config>(influx_writer::SECTION)?;
    }
    if src.has_key(serial_ingest::SECTION) {
        src.section::<serial_ingest::Config>(serial_ingest::SECTION)?;
    }
    if src.has_key(rms_processor::SECTION) {
        src.section::<rms_processor::Config>(rms_processor::SECTION)?;
    }
    if src.has_key(modbus_ingest::SECTION) {
        src.section::<modbus_ingest::Config>(modbus_ingest::SECTION)?;
    }
    Ok(())
}

pub async fn run(
    service: &str,
    config: Option<PathBuf>,
    stop_on_stdin_eof: bool,
) -> anyhow::Result<()> {
    if !SERVICES.iter().any(|s| s.name == service) {
        return Err(ConfigError::new(
            "(service)",
            format!("unknown service {service:?}; known: {}", names()),
        )
        .into());
    }
    let src = ConfigSource::load(config_path(config).as_deref())?;
    check_all(&src)?;
    let common = src.common()?;
    runtime::telemetry::init_logging(&common.log)?;
    let (trigger, shutdown) = runtime::shutdown::channel();
    let ctx = Context {
        common: common.clone(),
        health: Health::default(),
        shutdown,
    };
    let grace = Duration::from_millis(common.shutdown_grace_ms);
    let service_future = start(service, &src, ctx)?;
    let mut task = tokio::spawn(service_future);
    tokio::select! {
        res = &mut task => return flatten(res),
        _signal = runtime::shutdown::fire_on_signal(&trigger) => {}
        () = stdin_closed(stop_on_stdin_eof) => {
            tracing::info!("Standard input closed; shutting down.");
            trigger.fire();
        }
    }
    match tokio::time::timeout(grace, task).await {
        Ok(res) => flatten(res),
        Err(_) => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "Service did not stop within the grace period; exiting anyway."
            );
            Ok(())
        }
    }
}

/// Resolves once standard input reaches end of file (or fails), if `watch`; else never.
///
/// How a parent makes sure its child never outlives it, however the parent ends: the child's
/// stdin is a pipe whose only write end the parent holds, and the kernel closes that end when
/// the parent exits, `kill -9` included. (`PR_SET_PDEATHSIG` would need `unsafe`, which the
/// workspace forbids.) The read blocks a thread of its own, which the process leaves behind
/// when it exits.
async fn stdin_closed(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot read standard input; taking it as closed.");
                        break;
                    }
                }
            }
            // The receiver is gone only if the service already stopped.
            let _ = tx.send(());
        });
    match spawned {
        // Err: the sender was dropped, which happens only once the thread ended too.
        Ok(_thread) => {
            let _ = rx.await;
        }
        Err(e) => {
            // Without the watch the child could outlive its parent: stop now rather than risk it.
            tracing::error!(error = %e, "Cannot watch standard input; stopping.");
        }
    }
}

fn flatten(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.context("service task failed")?
}

type ServiceFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Load the service's section, serve its health endpoint, and return its `run` future.
fn start(service: &str, src: &ConfigSource, ctx: Context) -> anyhow::Result<ServiceFuture> {
    Ok(match service {
        "broker" => {
            let cfg: broker::Config = section(src, "broker")?;
            let health = cfg.health_listen;
            Box::pin(async move {
                serve_health(health, &ctx).await?;
                broker::run(cfg, ctx).await.map_err(anyhow::Error::from)
            })
        }
        "simulator" => {
            let cfg: simulators::Config = section(src, "simulator")?;
            let health = cfg.health_listen;
            Box::pin(async move {
                serve_health(health, &ctx).await?;
                simulators::run(cfg, ctx).await.map_err(anyhow::Error::from)
            })
        }
        "influx-writer" => {
            let cfg: influx_writer::Config = section(src, influx_writer::SECTION)?;
            let health = cfg.health_listen;
            Box::pin(async move {
                serve_health(health, &ctx).await?;
                influx_writer::run(cfg, ctx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        "serial-ingest" => {
            let cfg: serial_ingest::Config = section(src, serial_ingest::SECTION)?;
            let health = cfg.health_listen;
            Box::pin(async move {
                serve_health(health, &ctx).await?;
                serial_ingest::run(cfg, ctx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        "rms-processor" => {
            let cfg: rms_processor::Config = section(src, rms_processor::SECTION)?;
            let health = cfg.health_listen;
            Box::pin(async move {
                serve_health(health, &ctx).await?;
                rms_processor::run(cfg, ctx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        "modbus-ingest" => {
            let cfg: modbus_ingest::Config = section(src, modbus_ingest::SECTION)?;
            let health = cfg.health_listen;
            let plan = cfg.resolve(modbus_ingest::SECTION)?;
            Box::pin(async move {
                serve_health(health, &ctx).await?;
                modbus_ingest::run(plan, ctx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        other => {
            return Err(ConfigError::new(
                "(service)",
                format!("{other:?} is in SERVICES but cannot be started; a bug"),
            )
            .into());
        }
    })
}

fn section<T: DeserializeOwned + Default + Validate>(
    src: &ConfigSource,
    name: &str,
) -> Result<T, ConfigError> {
    src.section(name)
}

async fn serve_health(addr: Option<std::net::SocketAddr>, ctx: &Context) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let (bound, _task) = runtime::health::serve(addr, ctx.health.clone(), ctx.shutdown.clone())
            .await
            .with_context(|| format!("cannot serve /healthz on {addr}"))?;
        tracing::info!(addr = %bound, "Serving /healthz and /metrics.");
    }
    Ok(())
}
