//! The services this binary can run: one table, from which `wattbus run`, its help, `wattbus
//! config check`, the demo and docs/services.md's list come.
//!
//! Each entry is a service crate's [`runtime::Service`] type. Adding a service is its crate
//! and one line in [`SERVICES`] (docs/adding-a-service.md).

use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use runtime::{ConfigError, ConfigSource, Context, Health, Service};

/// Every service `wattbus run` knows, in the order `--help` lists them.
pub static SERVICES: &[&dyn Entry] = &[
    &Of::<broker::Broker>(PhantomData),
    &Of::<simulators::Simulator>(PhantomData),
    &Of::<serial_ingest::SerialIngest>(PhantomData),
    &Of::<modbus_ingest::ModbusIngest>(PhantomData),
    &Of::<rms_processor::RmsProcessor>(PhantomData),
    &Of::<influx_writer::InfluxWriter>(PhantomData),
    &Of::<backup_rotator::BackupRotator>(PhantomData),
    &Of::<plug_bridge::PlugBridge>(PhantomData),
    &Of::<azure_bridge::AzureBridge>(PhantomData),
    &Of::<node_health::NodeHealth>(PhantomData),
];

/// A [`Service`] as the binary uses it: its types erased, so that one list holds them all.
pub trait Entry: Sync {
    /// As on the command line, in compose and on the bus.
    fn name(&self) -> &'static str;
    /// Its config section.
    fn section(&self) -> &'static str;
    /// One line for help and docs.
    fn about(&self) -> &'static str;
    /// Its kinds of `wattbus_errors_total`, besides the runtime's.
    fn error_kinds(&self) -> &'static [&'static str];
    /// Resolve its section as `run` would, and drop the plan: `config check`.
    fn check(&self, src: &ConfigSource) -> Result<(), ConfigError>;
    /// Where its section says it serves `/healthz`, if anywhere.
    fn health_listen(
        &self,
        src: &ConfigSource,
    ) -> Result<Option<std::net::SocketAddr>, ConfigError>;
    /// Resolve its section, and return the future that serves its health endpoint and runs it.
    fn start(&self, src: &ConfigSource, ctx: Context) -> Result<ServiceFuture, ConfigError>;
    /// Resolve its section, and return the future that runs it beside others in one process
    /// (the demo): no health endpoint of its own, its checks join the process's.
    fn embedded(&self, src: &ConfigSource, ctx: Context) -> Result<ServiceFuture, ConfigError>;
}

pub type ServiceFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// The [`Entry`] of service `S`.
pub struct Of<S>(PhantomData<fn() -> S>);

impl<S: Service> Entry for Of<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn section(&self) -> &'static str {
        S::SECTION
    }

    fn about(&self) -> &'static str {
        S::ABOUT
    }

    fn error_kinds(&self) -> &'static [&'static str] {
        S::ERROR_KINDS
    }

    fn check(&self, src: &ConfigSource) -> Result<(), ConfigError> {
        src.resolve::<S>().map(drop)
    }

    fn health_listen(
        &self,
        src: &ConfigSource,
    ) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        src.resolve::<S>().map(|plan| S::health_listen(&plan))
    }

    fn start(&self, src: &ConfigSource, ctx: Context) -> Result<ServiceFuture, ConfigError> {
        let plan = src.resolve::<S>()?;
        Ok(Box::pin(async move {
            serve_health(S::health_listen(&plan), &ctx).await?;
            runtime::service::run::<S>(plan, ctx)
                .await
                .map_err(anyhow::Error::from)
        }))
    }

    fn embedded(&self, src: &ConfigSource, ctx: Context) -> Result<ServiceFuture, ConfigError> {
        let plan = src.resolve::<S>()?;
        Ok(Box::pin(async move {
            runtime::service::run::<S>(plan, ctx)
                .await
                .map_err(anyhow::Error::from)
        }))
    }
}

/// The service called `name`.
pub fn find(name: &str) -> Result<&'static dyn Entry, ConfigError> {
    SERVICES
        .iter()
        .copied()
        .find(|s| s.name() == name)
        .ok_or_else(|| {
            ConfigError::new(
                "(service)",
                format!("unknown service {name:?}; known: {}", names()),
            )
        })
}

/// `broker, simulator, …`, for help and errors.
pub fn names() -> String {
    SERVICES
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per service, `name  about`, for `wattbus run --help`.
pub fn listing() -> String {
    let width = SERVICES.iter().map(|s| s.name().len()).max().unwrap_or(0);
    SERVICES
        .iter()
        .map(|s| format!("  {:width$}  {}", s.name(), s.about()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The table as Markdown, one row per service: `wattbus services` prints it, and
/// docs/services.md holds it (a test keeps them equal).
pub fn markdown() -> String {
    let mut out = String::from(
        "| service | config section | what it does | its `wattbus_errors_total` kinds |\n|---|---|---|---|\n",
    );
    for s in SERVICES {
        let kinds = if s.error_kinds().is_empty() {
            "—".to_string()
        } else {
            s.error_kinds()
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | `[{}]` | {} | {} |\n",
            s.name(),
            s.section(),
            s.about(),
            kinds
        ));
    }
    out
}

/// The config file to use: `--config`, else `$WATTBUS_CONFIG`, else the default path.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("WATTBUS_CONFIG").map(PathBuf::from))
}

/// The config files to layer: every `--config` given, else as [`config_path`].
pub fn config_paths(flags: Vec<PathBuf>) -> Vec<PathBuf> {
    if flags.is_empty() {
        config_path(None).into_iter().collect()
    } else {
        flags
    }
}

/// Check the whole configuration: shared keys, every section present, nothing unknown.
/// A section that is absent is resolved (with its defaults) only by `wattbus run` of that
/// service: a Pi that runs only a simulator needs no `[broker]` users.
pub fn check_all(src: &ConfigSource) -> Result<(), ConfigError> {
    let sections: Vec<&str> = SERVICES.iter().map(|s| s.section()).collect();
    src.check_sections(&sections)?;
    src.common()?;
    for service in SERVICES {
        if src.has_key(service.section()) {
            service.check(src)?;
        }
    }
    Ok(())
}

pub async fn run(
    service: &str,
    config: Vec<PathBuf>,
    stop_on_stdin_eof: bool,
) -> anyhow::Result<()> {
    let entry = find(service)?;
    let src = ConfigSource::load_layers(&config_paths(config))?;
    // No unknown section, the shared keys, and this service's own section (resolved by
    // `start`); the others are `wattbus config check`'s business. Each container holds only
    // its own secrets, so reading another section's password files here would fail.
    let sections: Vec<&str> = SERVICES.iter().map(|s| s.section()).collect();
    src.check_sections(&sections)?;
    let common = src.common()?;
    runtime::telemetry::init_logging(&common.log)?;
    let (trigger, shutdown) = runtime::shutdown::channel();
    let ctx = Context {
        common: common.clone(),
        health: Health::default(),
        shutdown,
    };
    let grace = Duration::from_millis(common.shutdown_grace_ms);
    let service_future = entry.start(&src, ctx)?;
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
        // Not a clean stop: a supervisor (systemd, Docker) sees a failure, not success.
        Err(_) => anyhow::bail!(
            "{} did not stop within the grace period ({} ms); exiting anyway",
            entry.name(),
            grace.as_millis()
        ),
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
                        tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot read standard input; taking it as closed.");
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
            tracing::error!(error = %runtime::telemetry::chain(&e), "Cannot watch standard input; stopping.");
        }
    }
}

fn flatten(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.context("service task failed")?
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

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::telemetry::core::{self, RUNTIME_ERROR_KINDS};
    use std::time::Instant;

    /// docs/services.md shows the table as it is (`wattbus services` prints it).
    #[test]
    fn the_docs_list_every_service_of_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/services.md");
        let docs = std::fs::read_to_string(path).unwrap();
        assert!(
            docs.contains(&markdown()),
            "docs/services.md is out of date; its table should be what `wattbus services` prints:\n{}",
            markdown()
        );
        let core = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
        let core = std::fs::read_to_string(core).unwrap();
        for name in runtime::telemetry::core::NAMES {
            assert!(
                core.contains(&format!("| `{name}` |")),
                "docs/metrics.md lacks {name}"
            );
        }
        for kind in runtime::telemetry::core::RUNTIME_ERROR_KINDS {
            assert!(
                core.contains(&format!("`{kind}`")),
                "docs/metrics.md lacks kind {kind}"
            );
        }
    }

    /// Two distinct free loopback ports: both held while read (one freed port asked for again
    /// can come back the same).
    fn free_ports() -> (u16, u16) {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = (bind(), bind());
        (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        )
    }

    /// Every service of the table, run together on a real broker (the table's own), shows
    /// every core metric under its name, its error kinds at 0 from the start, and readings
    /// flowing counted in and out: one Grafana panel can show the health of all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_service_of_the_table_emits_the_core_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let (mqtt, mqtt_v5) = free_ports();
        let toml = format!(
            "site = \"lab\"\ndata_dir = \"{data}\"\n\
             [bus]\nport = {mqtt}\nusername = \"admin\"\npassword = \"telemetry-test\"\nreconnect_min_ms = 50\n\
             [broker]\nlisten = \"127.0.0.1:{mqtt}\"\nlisten_v5 = \"127.0.0.1:{mqtt_v5}\"\n\
             [[broker.users]]\nusername = \"admin\"\npassword = \"telemetry-test\"\nrole = \"admin\"\n\
             [simulator]\ninterval_ms = 50\n\
             [azure_bridge]\nconnection_string = \"HostName=hub.example;DeviceId=lab;SharedAccessKey=c2VjcmV0\"\nendpoint = \"127.0.0.1:1\"\n",
            data = dir.path().display(),
        );
        let src = ConfigSource::from_parts(None, Some(&toml)).unwrap();
        check_all(&src).unwrap();
        let (trigger, shutdown) = runtime::shutdown::channel();
        let ctx = Context {
            common: src.common().unwrap(),
            health: Health::default(),
            shutdown,
        };
        let mut tasks = Vec::new();
        for service in SERVICES {
            let run = service.embedded(&src, ctx.clone()).unwrap();
            tasks.push((service.name(), tokio::spawn(run)));
        }

        let text = runtime::telemetry::render;
        let value = |name: &str, labels: &str| -> Option<f64> {
            text()
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{{labels}}} ")))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        };
        let service = |s: &str| format!("service=\"{s}\"");
        // Readings flow: the simulator's go out through its journal, the writer takes them in.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(value(core::SENT, &service("simulator")).is_some_and(|n| n > 0.0)
            && value(core::RECEIVED, &service("influx-writer")).is_some_and(|n| n > 0.0))
        {
            assert!(
                Instant::now() < deadline,
                "no readings flowed between the simulator and influx-writer:\n{}",
                text()
            );
            for (name, task) in &tasks {
                assert!(!task.is_finished(), "{name} stopped:\n{}", text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let metrics = text();
        for name in core::NAMES {
            assert!(
                metrics.contains(&format!("# TYPE {name} ")),
                "{name} is not declared"
            );
        }
        for entry in SERVICES {
            let s = service(entry.name());
            assert_eq!(value(core::UP, &s), Some(1.0), "{s}: up");
            for name in [core::RECEIVED, core::SENT, core::DEAD_LETTERS] {
                assert!(value(name, &s).is_some(), "{s}: {name} missing:\n{metrics}");
            }
            for kind in RUNTIME_ERROR_KINDS.iter().chain(entry.error_kinds()) {
                let labels = format!("{s},kind=\"{kind}\"");
                assert!(
                    value(core::ERRORS, &labels).is_some(),
                    "{labels}: {} missing:\n{metrics}",
                    core::ERRORS
                );
            }
        }
        // A producer's journal shows its depth and age.
        assert!(
            value(
                core::JOURNAL_RECORDS,
                "service=\"simulator\",stream=\"meas\""
            )
            .is_some()
        );
        assert!(
            value(
                core::JOURNAL_OLDEST,
                "service=\"simulator\",stream=\"meas\""
            )
            .is_some()
        );

        trigger.fire();
        for (name, task) in tasks {
            let ended = tokio::time::timeout(Duration::from_secs(30), task).await;
            assert!(
                matches!(ended, Ok(Ok(Ok(())))),
                "{name} did not stop cleanly: {ended:?}"
            );
            assert_eq!(
                value(core::UP, &service(name)),
                Some(0.0),
                "{name}: up after stop"
            );
        }
    }
}
