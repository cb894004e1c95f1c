//! The narrow runtime every wattbus service shares.
//!
//! What is here and nothing else: configuration loading, the MQTT connection, the delivery
//! contract (journal, acknowledgements, replay), shutdown, health and metrics, logging.
//! Topics and payloads live in `proto`; service logic lives in the services.
//!
//! Layout:
//! - `config`: figment loading, errors that name file and key, secrets, shared sections.
//! - `backoff`: the one retry backoff (doubling, capped, jittered; pure).
//! - `bus`: the MQTT connection (one polling task, backoff, re-subscription, status, routing).
//! - `journal`: a producer stream's journal on disk or in memory (pure: std only, no tokio).
//! - `acks`: acknowledgement ranges to per-group watermarks, learned and forgotten sink groups,
//!   what was published (pure).
//! - `learned`: the sink groups a stream learned, kept beside its journal.
//! - `delivery`: [`delivery::Producer`], [`delivery::Inbox`], [`delivery::Acker`]: the
//!   delivery contract of docs/ARCHITECTURE.md on top of the three above.
//! - `dead_letters`: the dead-letter file (JSON lines, fsynced, rotated once, private).
//! - `events`: every notable event, logged and counted in one place.
//! - `service`: the [`Service`] trait, what the binary's service table lists.
//! - `shutdown`: SIGTERM/SIGINT to a [`Shutdown`] every task can wait on.
//! - `state`: one process per instance's state (a lock), or the first free replica slot.
//! - `telemetry`: logging setup and the Prometheus registry.
//! - `workers`: a service's long-running tasks (per port, per bus) and the one policy that
//!   watches them.
//! - `health`: `/healthz` and `/metrics`.

pub mod acks;
pub mod backoff;
pub mod bus;
pub mod config;
pub mod dead_letters;
pub mod delivery;
pub mod events;
pub mod health;
pub mod journal;
pub mod learned;
pub mod service;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod workers;

pub use config::{Common, ConfigError, ConfigSource, Secret};
pub use health::Health;
pub use service::Service;
pub use shutdown::Shutdown;

/// What every service's `run` receives besides its own section: the shared settings, the
/// process's readiness checks and the shutdown signal. (STYLE.md's `run(config, shutdown)`,
/// with the two other things every service turned out to need.)
#[derive(Clone, Debug)]
pub struct Context {
    pub common: Common,
    pub health: Health,
    pub shutdown: Shutdown,
}

impl Context {
    /// Connect to the broker as `id`, run `f` on the connection, and close it cleanly (offline
    /// status, last acknowledgements out) whatever `f` returned: the `run` of every service,
    /// whose `run_on` does the work on a connection it may also share (the demo).
    pub async fn on_bus<T, E, Fut>(
        &self,
        id: &bus::Identity,
        f: impl FnOnce(bus::Bus) -> Fut,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
        E: From<ConfigError>,
    {
        let (bus, task) = bus::Bus::connect(&self.common.bus, &self.common.site, id, &self.health)?;
        let result = f(bus.clone()).await;
        bus.close(task).await;
        result
    }
}
