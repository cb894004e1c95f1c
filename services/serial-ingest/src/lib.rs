//! serial-ingest: Arduino current sensors and sensor lines over USB serial to the bus.
//!
//! Each configured port speaks one of the three line protocols of docs/serial-protocols.md:
//! `request-response` (PowMon: the Pi polls with `read \n`, the Arduino answers raw ADC
//! values, converted here to amps and watts), `stream` (Project Prime: numbered, checksummed
//! blocks of samples at a fixed rate, gathered into frames for the rms-processor) and `lines`
//! (`key=value` sensor lines). Every value is stamped with the time its line was read.
//!
//! Topics written, through the delivery contract (journal, acknowledgements, replay):
//! - `wattbus/v1/<site>/meas/<device>/<channel>` ([`proto::Measurement`]), stream `meas`
//!   (disk journal by default): request-response and lines readings.
//! - `wattbus/v1/<site>/raw/<device>` ([`proto::RawFrame`]), stream `raw` (memory journal by
//!   default): stream ports' sample frames.
//!
//! Every port runs in its own task: a port that is unplugged, garbled or silent is logged,
//! counted, closed and reopened with backoff, and never delays another port's readings.
//!
//! Layout:
//! - `config`: the `[serial_ingest]` section and its ports, resolved into checked plans.
//! - `line`: the bounded line framer (pure).
//! - `protocol`: PowMon conversion and the three protocols' line parsers (pure).
//! - `frame`: the stream frame assembler and its sample clock (pure).
//! - `port`: one port's task: open, read, parse, publish, reopen.
//! - `events`: every notable event of a port, logged and counted (its error kinds too).

pub mod config;
pub mod events;
pub mod frame;
pub mod line;
pub mod port;
pub mod protocol;

pub use config::{Config, Plan};

use proto::{Filter, Segment};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{DeliveryError, Producer};
use runtime::workers::Workers;

/// The section name in the config file.
pub const SECTION: &str = "serial_ingest";

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
pub struct SerialIngest;

impl runtime::Service for SerialIngest {
    const NAME: &'static str = "serial-ingest";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "Arduino CT sensors and other serial devices: lines and sample streams to readings and raw frames";
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
pub fn identity(config: &Config) -> Identity {
    Identity {
        service: seg("serial-ingest"),
        instance: config.instance.clone(),
    }
}

/// Run every configured port until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    // One process per journal: a second copy on the same data directory refuses to start.
    let _claim = runtime::state::Claim::exclusive(
        &ctx.common.data_dir,
        "serial-ingest",
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
pub async fn run_on(bus: &Bus, config: &Plan, ctx: &Context) -> Result<(), Error> {
    let plans = config.ports().to_vec();
    let data_dir = &ctx.common.data_dir;
    let site = &ctx.common.site;
    let (meas, meas_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(site), None),
        &config.meas_stream,
        data_dir,
        ctx.shutdown.clone(),
    )?;
    let has_stream = plans
        .iter()
        .any(|p| p.kind.protocol() == config::Protocol::Stream);
    let (raw, raw_task) = if has_stream {
        let (p, t) = Producer::open(
            bus,
            &seg("raw"),
            &Filter::raw(Some(site), None),
            &config.raw_stream,
            data_dir,
            ctx.shutdown.clone(),
        )?;
        (Some(p), Some(t))
    } else {
        (None, None)
    };
    if plans.is_empty() {
        tracing::warn!("No [[serial_ingest.ports]] configured; serial-ingest has nothing to read.");
    }
    let ready = ctx.health.check("serial-ingest");
    let mut ports = Workers::new("serial port");
    for plan in plans {
        tracing::debug!(port = %plan.path, device = %plan.device, protocol = plan.kind.protocol().as_str(), "Starting port.");
        ports.spawn(
            plan.path.clone(),
            port::run(
                plan,
                ctx.common.site.clone(),
                meas.clone(),
                raw.clone(),
                ctx.shutdown.clone(),
            ),
        );
    }
    ready.set(true);
    ports.supervise(&ctx.shutdown).await;
    drop(meas);
    drop(raw);
    for task in std::iter::once(meas_task).chain(raw_task) {
        if let Err(e) = task.await {
            tracing::warn!(error = %runtime::telemetry::chain(&e), "Producer task ended abnormally.");
        }
    }
    ready.set(false);
    Ok(())
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
