//! The wattbus MQTT broker: rumqttd embedded as a library.
//!
//! Every wattbus service talks to the others only through this broker. It listens for
//! MQTT 3.1.1 on `listen` (`127.0.0.1:1883` by default) and, if configured, MQTT 5 on
//! `listen_v5` (a rumqttd listener speaks one version) and MQTT 3.1.1 over TLS. It reads and
//! writes no topics itself.
//!
//! rumqttd is vendored and patched (`vendor/rumqttd/PATCHES.md`): clients could crash it, it had
//! no topic ACLs, and its memory had no bound.
//!
//! **Nothing is persisted on disk, and no session outlives its connection.** Retained messages
//! live in memory only, and that is deliberate: delivery is the runtime's job, not the broker's.
//! Producers journal what they publish and replay it until the sinks acknowledge it, so a broker
//! restart costs a replay, not data, and the SD card is not written twice for every reading.
//!
//! **Authentication and authorization** are on by default: every client logs in as one of
//! `[[broker.users]]`, and the user's role (`acl`) decides what it may publish and subscribe,
//! checked by the router on every publish, will and subscription through rumqttd's `Policy`
//! hook. A failed login just closes the TCP connection (rumqttd sends no CONNACK code); a
//! refused publish closes it too; a refused subscription gets SUBACK 0x80.
//!
//! **Memory bound.** Every store a client can grow is bounded by a key of `[broker]`: all
//! filter logs together (`max_log_bytes`, 32 MiB; one filter's `segment_bytes` ×
//! `segment_count`, each entry counted with its own size), live filters (`max_filters` 1,024,
//! `max_filters_per_client` 32; a filter's log is freed when its last subscriber leaves),
//! retained messages (`max_retained_bytes`, 4 MiB), what is queued for one connection
//! (`max_queued_bytes`, 1 MiB), connections (`max_connections`, 32) and packets
//! (`max_payload_bytes`, 1 MiB). With the defaults the worst case is about 276 MiB:
//!
//! ```text
//!   logs        2 × max_log_bytes + max_payload_bytes        65 MiB  (entries' spare room)
//!   retained    max_retained_bytes                            4 MiB
//!   topic cache (inside rumqttd)                              1 MiB
//!   filters     max_filters × 4 KiB                           4 MiB
//!   connections max_connections × (4 P + 2 Q)               192 MiB  (P = max_payload_bytes,
//!                                                                     Q = max_queued_bytes)
//!   process     runtime, threads                            ~10 MiB
//! ```
//!
//! docs/broker.md says why each term, and `tests/memory.rs` checks it.
//!
//! **Lifetime.** rumqttd has no stop API. [`start`] runs it on plain threads (the router, one
//! per listener, one recording its meters) that live until the process exits; [`run`] returns
//! when shutdown is requested, and the listeners keep serving until then, which lets services
//! in the same process flush through the broker during the shutdown grace period.
//!
//! Layout:
//! - `config`: the `[broker]` section, its validation, and [`Config::to_rumqttd`].
//! - `acl`: who may publish and subscribe where, by role (pure functions).
//! - `auth`: the login check rumqttd calls (password, client id) and the `Policy` the router asks.
//! - `events`: what is logged and counted (refused logins, publishes, subscriptions; limits;
//!   subscriber skips; router meters), the core metrics among them, with the error kinds.
//! - here: [`start`], the readiness probe, and [`run`].

pub mod acl;
mod auth;
mod config;
mod events;

use std::net::SocketAddr;
use std::time::Duration;

use runtime::{ConfigError, Context};
use tokio::sync::watch;

pub use acl::Role;
pub use config::{Config, Plan, SECTION, TLS_LISTENER, TlsConfig, User, V4_LISTENER, V5_LISTENER};

/// How long [`run`] waits for every listener to accept a TCP connection.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between readiness probes of a listener that is not accepting yet.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (broker listener {listener})")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a broker thread")]
    Thread(#[source] std::io::Error),
    /// Boxed: rumqttd's link errors carry a whole router event (800 bytes).
    #[error("cannot attach to the broker's meters")]
    Meters(#[source] Box<rumqttd::meters::LinkError>),
    #[error("cannot attach to the broker's alerts")]
    Alerts(#[source] Box<rumqttd::alerts::LinkError>),
    #[error("broker listener {listener} on {addr} accepted no connection within {waited:?}")]
    NotListening {
        listener: &'static str,
        addr: SocketAddr,
        waited: Duration,
    },
    #[error("the broker stopped: {0}")]
    Stopped(String),
}

/// A broker running on its own threads (see the crate doc: it cannot be stopped).
#[derive(Debug)]
pub struct Started {
    listeners: Vec<(&'static str, SocketAddr)>,
    /// Set once, by the broker thread, when rumqttd's `start` returns.
    exit: watch::Receiver<Option<String>>,
}

/// Start the broker on its own threads and return at once; the listeners may not accept
/// connections yet ([`Started::wait_ready`]).
///
/// Validates `config` and checks that every listener's address can be bound, so the usual
/// mistakes (a port in use, an unreadable password file) are errors here rather than lines
/// in rumqttd's log from a thread that then quietly ends.
pub fn start(config: &Config) -> Result<Started, Error> {
    let rumqttd_config = config.to_rumqttd()?;
    let listeners = config.listeners();
    for &(listener, addr) in &listeners {
        // Bound and released at once: rumqttd binds it again on its own thread, and only
        // logs if that fails. (std sets SO_REUSEADDR, so this leaves nothing behind.)
        std::net::TcpListener::bind(addr).map_err(|source| Error::Bind {
            listener,
            addr,
            source,
        })?;
    }
    if config.allow_anonymous && !config.users.is_empty() {
        tracing::warn!(
            users = config.users.len(),
            "Broker allows anonymous clients, so broker.users are not checked: any username and \
             password is accepted."
        );
    } else if config.allow_anonymous {
        tracing::info!("Broker allows anonymous clients.");
    }

    let mut broker = rumqttd::Broker::new(rumqttd_config);
    let meters = broker.meters().map_err(|e| Error::Meters(Box::new(e)))?;
    let alerts = broker.alerts().map_err(|e| Error::Alerts(Box::new(e)))?;
    std::thread::Builder::new()
        .name("broker-meters".into())
        .spawn(
            move || match tokio::runtime::Builder::new_current_thread().build() {
                Ok(rt) => rt.block_on(events::record(meters, alerts)),
                Err(e) => tracing::error!(error = %runtime::telemetry::chain(&e), "Cannot record broker metrics: no runtime."),
            },
        )
        .map_err(Error::Thread)?;

    let (exit_tx, exit) = watch::channel(None);
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            // Blocks for as long as any listener runs, which is normally the whole process.
            let reason = match broker.start() {
                Ok(()) => "every listener stopped (rumqttd logged why)".to_string(),
                Err(e) => e.to_string(),
            };
            exit_tx.send_replace(Some(reason));
        })
        .map_err(Error::Thread)?;
    Ok(Started { listeners, exit })
}

impl Started {
    /// Every listener's name and configured address.
    pub fn listeners(&self) -> &[(&'static str, SocketAddr)] {
        &self.listeners
    }

    /// Wait until every listener accepts a TCP connection. The probe connects and closes
    /// without sending CONNECT (rumqttd logs that as a failed connection, as it logs most
    /// disconnects). Fails as soon as the broker thread ends, or after `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let probe = probe_all(&self.listeners, timeout);
        tokio::select! {
            ready = probe => ready,
            stopped = stopped(&mut self.exit) => Err(stopped),
        }
    }

    /// Resolves if the broker stops: never, unless every listener failed.
    pub async fn stopped(&mut self) -> Error {
        stopped(&mut self.exit).await
    }
}

async fn stopped(exit: &mut watch::Receiver<Option<String>>) -> Error {
    match exit.wait_for(Option::is_some).await {
        Ok(reason) => Error::Stopped(reason.clone().unwrap_or_default()),
        // The sender is dropped without a value only if the thread panicked.
        Err(_) => Error::Stopped("the broker thread panicked".into()),
    }
}

async fn probe_all(
    listeners: &[(&'static str, SocketAddr)],
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    for &(listener, addr) in listeners {
        let target = runtime::health::probe_target(addr);
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(target)).await;
            match attempt {
                // Dropping the stream closes it.
                Ok(Ok(_stream)) => break,
                Ok(Err(_not_yet)) if tokio::time::Instant::now() + PROBE_INTERVAL < deadline => {
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
                _ => {
                    return Err(Error::NotListening {
                        listener,
                        addr,
                        waited: timeout,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct Broker;

impl runtime::Service for Broker {
    const NAME: &'static str = "broker";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str =
        "the MQTT broker every service talks through (authentication and topic ACLs on)";
    const ERROR_KINDS: &'static [&'static str] = events::ERROR_KINDS;
    type Config = Config;
    type Plan = Plan;
    type Error = Error;

    fn resolve(config: Config, section: &str) -> Result<Plan, runtime::ConfigError> {
        config.resolve(section)
    }

    fn health_listen(plan: &Plan) -> Option<SocketAddr> {
        plan.health_listen
    }

    fn run(
        plan: Plan,
        ctx: Context,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send {
        run(plan, ctx)
    }
}

/// Run the broker until shutdown is requested.
///
/// Readiness check `broker` turns true once every listener accepts connections, and false
/// again when this returns. Returns an error if the broker cannot start, is not listening
/// within [`READY_TIMEOUT`], or stops on its own. On shutdown it returns `Ok` while the
/// listeners go on serving until the process exits (rumqttd has no stop API).
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    let ready = ctx.health.check("broker");
    let mut started = start(&plan)?;
    started.wait_ready(READY_TIMEOUT).await?;
    ready.set(true);
    let addrs: Vec<String> = started
        .listeners()
        .iter()
        .map(|(name, addr)| format!("{name}={addr}"))
        .collect();
    tracing::info!(listeners = %addrs.join(" "), "Broker is accepting connections.");

    let result = tokio::select! {
        () = ctx.shutdown.wait() => Ok(()),
        stopped = started.stopped() => Err(stopped),
    };
    ready.set(false);
    result
}
