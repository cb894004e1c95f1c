//! What a wattbus service is, to the binary that runs it.
//!
//! Each service crate names itself with a unit type implementing [`Service`]; the `wattbus`
//! binary lists those types once, and `wattbus run`, `wattbus config check`, `--help`, the demo
//! and the docs' service list all come from that list. Adding a service is its crate and one
//! line there (docs/adding-a-service.md).
//!
//! Parse, don't validate: a section is read into the service's [`Service::Config`] (what the
//! user wrote, with defaults) and resolved once by [`Service::resolve`] into its
//! [`Service::Plan`] (what `run` uses: checked, with secrets read, profiles loaded and keys of
//! another variant refused). `config check` is that same resolution, so a config that passes
//! the check is one the service starts with, and `run` never checks again.

use std::future::Future;
use std::net::SocketAddr;

use serde::de::DeserializeOwned;

use crate::telemetry::core::Core;
use crate::{ConfigError, Context};

/// A service `wattbus run <NAME>` starts.
pub trait Service: 'static {
    /// As on the command line, in compose, in client ids and in metrics.
    const NAME: &'static str;
    /// Its config section. TOML keys and environment variables cannot both use a `-`, so
    /// `influx-writer` is configured in `[influx_writer]`.
    const SECTION: &'static str;
    /// One line for `wattbus run --help` and the docs.
    const ABOUT: &'static str;
    /// The kinds of `wattbus_errors_total` this service reports besides the runtime's
    /// ([`crate::telemetry::core::RUNTIME_ERROR_KINDS`]); all are shown from the start at 0.
    const ERROR_KINDS: &'static [&'static str] = &[];

    /// The section as written; an absent section is `Default`.
    type Config: DeserializeOwned + Default + Send;
    /// The section resolved: all `run` needs, and proof that it was checked.
    type Plan: Send + 'static;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Check the section and turn it into the plan. Errors name the key (`section.key`) and
    /// what is wrong with it; the caller adds the file.
    fn resolve(config: Self::Config, section: &str) -> Result<Self::Plan, ConfigError>;

    /// Where to serve `/healthz` and `/metrics`, if anywhere.
    fn health_listen(plan: &Self::Plan) -> Option<SocketAddr>;

    /// Run until `ctx.shutdown` fires or a fatal error.
    fn run(plan: Self::Plan, ctx: Context) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Run service `S` on `plan`: its core metrics registered (every family and error kind at
/// 0, so dashboards see them before anything happens), `wattbus_up` 1 while it runs.
pub async fn run<S: Service>(plan: S::Plan, ctx: Context) -> Result<(), S::Error> {
    let core = Core::register(S::NAME, S::ERROR_KINDS);
    core.up.set(1.0);
    let result = S::run(plan, ctx).await;
    core.up.set(0.0);
    result
}
