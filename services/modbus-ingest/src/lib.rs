//! modbus-ingest: energy meters on Modbus RTU (RS485), Modbus TCP and RTU-over-TCP gateways
//! to the bus.
//!
//! Meters are described by profiles (TOML data: built-ins for ORNO WE-514/515 and WE-516/517
//! and Eastron SDM120/SDM630, more in `profiles_dir`). Each configured physical bus runs one
//! task with one scheduler, so several meters share a serial port without conflicts: one
//! request in flight at a time, the 3.5-character silence kept between frames, reads
//! coalesced into the fewest requests (a WE-515 is two: 0x0130–0x015B and 0xA000–0xA027),
//! per-class poll rates (power every second, energy every minute). A meter that stops
//! answering is backed off (degraded) so the others keep their rates; a link that drops is
//! reopened with backoff.
//!
//! Topics written, through the delivery contract (stream `meas`, disk journal by default):
//! - `wattbus/v1/<site>/meas/<device>/<channel>` ([`proto::Measurement`]): one per
//!   (measurement, channel, tags) of the profile per poll, stamped when the answer arrived,
//!   quality `good`, or `error` when some of its registers could not be read (those fields are
//!   left out; values are never invented).
//! - `wattbus/v1/<site>/meas/<bus>/health`, measurement `modbus_bus`: latency, requests,
//!   retries, errors, error rate and line utilisation, every `health_interval_ms`.
//! - `wattbus/v1/<site>/meas/<device>/health`, measurement `modbus_device`: requests,
//!   retries, timeouts, exceptions, CRC errors, wrong-slave answers, degraded 0/1.
//!
//! Nothing is read from the bus. The profile format, bus settings and failure handling are
//! described in `docs/modbus.md`.
//!
//! Layout:
//! - [`config`]: the `[modbus_ingest]` section, resolved once into the [`Plan`] that [`run`]
//!   runs (checked [`config::BusSpec`]s).
//! - [`link`]: how a bus is reached ([`link::Link`]) and opened, for the service and the tools.
//! - [`profile`]: the profile format, validation, built-in profiles and [`profile::load_dir`].
//! - [`plan`]: coalescing due registers into read requests (hole size, request size).
//! - [`decode`]: register words to scaled `f64` values.
//! - [`timing`]: RTU frame sizes, character and silence times, bus utilisation.
//! - [`scheduler`]: what is due on a bus and in which order; backoff of failing devices (pure).
//! - [`bus`]: one bus's task: link, requests, retries, resync, publishing.
//! - [`events`]: every notable event of a bus or device, logged and counted (its error kinds too).
//! - [`tools`]: `wattbus modbus scan | read | set-address | set-baud` (one request at a time,
//!   errors worded for the person at the bus), by job: session, scan, read, configure.

pub mod bus;
pub mod config;
pub mod decode;
pub mod events;
pub mod link;
pub mod plan;
pub mod profile;
pub mod scheduler;
pub mod timing;
pub mod tools;

pub use config::{Config, Plan};

use proto::{Filter, Segment};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{DeliveryError, Producer};
use runtime::workers::Workers;

/// The section name in the config file.
pub const SECTION: &str = "modbus_ingest";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Claim(#[from] runtime::state::ClaimError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct ModbusIngest;

impl runtime::Service for ModbusIngest {
    const NAME: &'static str = "modbus-ingest";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "Modbus RTU/TCP meters (e.g. ORNO WE-515) polled into readings";
    const ERROR_KINDS: &'static [&'static str] = events::ERROR_KINDS;
    type Config = Config;
    type Plan = Plan;
    type Error = Error;

    fn resolve(config: Config, section: &str) -> Result<Plan, runtime::ConfigError> {
        config.resolve(section)
    }

    fn health_listen(plan: &Plan) -> Option<std::net::SocketAddr> {
        plan.health_listen
    }

    fn run(
        plan: Plan,
        ctx: Context,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send {
        run(plan, ctx)
    }
}

/// Identity of the service on the bus.
pub fn identity(plan: &Plan) -> Identity {
    Identity {
        service: seg("modbus-ingest"),
        instance: plan.instance.clone(),
    }
}

/// Run every configured bus until shutdown. The caller resolves the section once
/// ([`Config::resolve`]), so a config error is reported before anything starts.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    // One process per journal: a second copy on the same data directory refuses to start.
    let _claim = runtime::state::Claim::exclusive(
        &ctx.common.data_dir,
        "modbus-ingest",
        &plan.instance,
        runtime::state::MUST_NOT_SCALE,
    )?;
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let (meas, meas_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(&ctx.common.site), None),
        &plan.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;
    if plan.buses.is_empty() {
        tracing::warn!("No [[modbus_ingest.buses]] configured; modbus-ingest has nothing to read.");
    }
    let ready = ctx.health.check("modbus-ingest");
    let health_interval = plan.health_interval;
    let mut buses = Workers::new("bus");
    for spec in plan.buses.iter().cloned() {
        tracing::debug!(bus = %spec.name, devices = spec.devices.len(), "Starting bus.");
        buses.spawn(
            spec.name.as_str().to_string(),
            bus::run(
                spec,
                ctx.common.site.clone(),
                meas.clone(),
                health_interval,
                ctx.shutdown.clone(),
            ),
        );
    }
    ready.set(true);
    // A reading the journal refuses (disk full) does not end a bus task: the producer logs,
    // counts and reports it, and the next reading tries the journal again.
    buses.supervise(&ctx.shutdown).await;
    drop(meas);
    if let Err(e) = meas_task.await {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "Producer task ended abnormally.");
    }
    ready.set(false);
    Ok(())
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
