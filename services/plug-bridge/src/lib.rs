//! plug-bridge: smart plugs on the bus. Each plug is polled (power, relay, temperature and
//! its energy counter) and published as readings; its energy becomes a counter that never goes
//! backwards, across plug reboots and bridge restarts (`energy`).
//!
//! Topics written: `wattbus/v1/<site>/meas/<plug>/relay` (measurement `plug`: `power_w`,
//! `energy_wh`, `relay_on`, `temperature_c`, and `voltage_v`, `current_a` where the plug
//! measures them) and `wattbus/v1/<site>/meas/<plug>/status` (measurement `plug_status`:
//! `online`), through the `meas` stream of its producer (journal, acknowledgements, replay).
//!
//! Each plug has its own task: a plug that does not answer is retried with backoff and never
//! delays the others.
//!
//! Layout:
//! - `config`: the `[plug_bridge]` section and its plan.
//! - `device`: what myStrom and Shelly plugs answer, read into one shape (pure).
//! - `energy`: the counters and their file (pure but for the file).
//! - `client`: the HTTP requests to each kind of plug.

pub mod client;
pub mod config;
pub mod device;
pub mod energy;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{Filter, Measurement, Quality, ReadingId, Segment};
use runtime::Context;
use runtime::backoff::Retries;
use runtime::bus::{Bus, Identity};
use runtime::delivery::Producer;
use runtime::telemetry::chain;
use runtime::telemetry::core::Core;

use config::Plug;
pub use config::{Config, Plan};
use device::Reading;
use energy::{Energy, EnergyError, Restart};

/// The section name in the config file.
pub const SECTION: &str = "plug_bridge";
/// The measurement of a plug's readings (grafana/'s plugs dashboard reads it).
pub const MEASUREMENT: &str = "plug";
/// The measurement of a plug's availability.
pub const STATUS_MEASUREMENT: &str = "plug_status";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Claim(#[from] runtime::state::ClaimError),
    #[error(transparent)]
    Delivery(#[from] runtime::delivery::DeliveryError),
    #[error(transparent)]
    Energy(#[from] EnergyError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
}

/// Its own kinds of `wattbus_errors_total`.
pub const ERROR_KINDS: &[&str] = &[
    // A plug that did not answer, or answered something that is not a reading.
    "plug",
    // The energy counters could not be saved.
    "energy_file",
];

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct PlugBridge;

impl runtime::Service for PlugBridge {
    const NAME: &'static str = "plug-bridge";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str =
        "smart plugs (myStrom, Shelly) polled: power, relay, energy that never goes backwards";
    const ERROR_KINDS: &'static [&'static str] = ERROR_KINDS;
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

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|_| unreachable!("valid literal segment {s}"))
}

pub fn identity(plan: &Plan) -> Identity {
    Identity {
        service: seg("plug-bridge"),
        instance: plan.instance.clone(),
    }
}

/// Run until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    // One process per energy file: two would each overwrite the other's counters.
    let _claim = runtime::state::Claim::exclusive(
        &ctx.common.data_dir,
        "plug-bridge",
        &plan.instance,
        runtime::state::MUST_NOT_SCALE,
    )?;
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await
}

/// What every plug's task shares.
struct Shared {
    producer: Producer,
    energy: Mutex<Energy>,
    margin_wh: f64,
    site: Segment,
    core: Core,
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let energy = Energy::load(&plan.energy_file(&ctx.common.data_dir))?;
    let http = client::Client::new(plan.timeout)?;
    let (producer, producer_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(&ctx.common.site), None),
        &plan.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;
    let shared = Arc::new(Shared {
        producer,
        energy: Mutex::new(energy),
        margin_wh: plan.energy_margin_wh,
        site: ctx.common.site.clone(),
        core: Core::of("plug-bridge"),
    });
    if plan.plugs.is_empty() {
        tracing::warn!("No plugs configured ([[plug_bridge.plugs]]): nothing to poll.");
    }
    let ready = ctx.health.check("plug-bridge");
    ready.set(true);
    let mut workers = runtime::workers::Workers::new("plug");
    for plug in &plan.plugs {
        workers.spawn(
            plug.id.as_str(),
            poll(
                plug.clone(),
                http.clone(),
                shared.clone(),
                plan.retry,
                ctx.shutdown.clone(),
            ),
        );
    }
    workers.supervise(&ctx.shutdown).await;
    ready.set(false);
    // A clean stop saves each counter exactly: a restart continues from it.
    let saved = match shared.energy.lock() {
        Ok(mut e) => e.save(true),
        Err(poisoned) => poisoned.into_inner().save(true),
    };
    if let Err(e) = saved {
        shared.core.error("energy_file").inc();
        tracing::error!(error = %chain(&e), "Cannot save the plug energy counters at stop: after a plug reboot they may continue a little high.");
    }
    drop(shared);
    if let Err(e) = producer_task.await {
        tracing::warn!(error = %e, "The readings stream's task ended abnormally.");
    }
    Ok(())
}

/// Poll one plug until shutdown.
async fn poll(
    plug: Plug,
    http: client::Client,
    shared: Arc<Shared>,
    retry: runtime::backoff::Backoff,
    shutdown: runtime::Shutdown,
) {
    let reading_id = ReadingId::new(shared.site.clone(), plug.id.clone(), seg("relay"));
    let status_id = ReadingId::new(shared.site.clone(), plug.id.clone(), seg("status"));
    let mut retries = Retries::new(retry);
    let mut online: Option<bool> = None;
    let mut status_at = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(plug.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        let read = tokio::select! {
            () = shutdown.wait() => break,
            r = http.read(&plug) => r,
        };
        match read {
            Ok(r) => {
                retries.succeeded();
                if online != Some(true) {
                    tracing::info!(plug = %plug.id, url = %plug.url, "Plug online.");
                }
                publish_reading(&shared, &plug, &reading_id, r).await;
                if online != Some(true) || status_at.elapsed() >= STATUS_EVERY {
                    online = Some(true);
                    status_at = tokio::time::Instant::now();
                    publish_status(&shared, &status_id, true).await;
                }
            }
            Err(e) => {
                shared.core.error("plug").inc();
                let wait = retries.failed();
                if online != Some(false) {
                    tracing::warn!(plug = %plug.id, url = %plug.url, error = %chain(&e), retry_in_ms = wait.as_millis() as u64, "Plug offline; retrying with backoff.");
                } else {
                    tracing::debug!(plug = %plug.id, error = %chain(&e), "Plug still offline.");
                }
                if online != Some(false) || status_at.elapsed() >= STATUS_EVERY {
                    online = Some(false);
                    status_at = tokio::time::Instant::now();
                    publish_status(&shared, &status_id, false).await;
                }
                tokio::select! {
                    () = shutdown.wait() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// A plug's availability is published on change and this often while unchanged.
const STATUS_EVERY: Duration = Duration::from_secs(60);

async fn publish_reading(shared: &Shared, plug: &Plug, id: &ReadingId, r: Reading) {
    let now = proto::now_ms();
    let mut fields = BTreeMap::from([
        ("power_w".to_string(), r.power_w),
        ("relay_on".to_string(), if r.relay_on { 1.0 } else { 0.0 }),
    ]);
    for (name, v) in [
        ("temperature_c", r.temperature_c),
        ("voltage_v", r.voltage_v),
        ("current_a", r.current_a),
    ] {
        if let Some(v) = v {
            fields.insert(name.into(), v);
        }
    }
    let step = {
        let mut energy = match shared.energy.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        let step = energy.observe(plug.id.as_str(), &r.energy, shared.margin_wh, now);
        if let Ok(s) = &step
            && s.save_first
            && let Err(e) = energy.save(false)
        {
            shared.core.error("energy_file").inc();
            tracing::error!(plug = %plug.id, error = %chain(&e), "Cannot save the plug energy counters: readings go on, but after a crash and a plug reboot this counter could continue below a stored one.");
        }
        step
    };
    match step {
        Ok(s) => {
            fields.insert("energy_wh".into(), s.energy_wh);
            match s.restart {
                Some(Restart::Reboot) => {
                    tracing::info!(plug = %plug.id, energy_wh = s.energy_wh, "The plug rebooted (new boot id): its energy counter continues from where it was.");
                }
                Some(Restart::Decrease) => {
                    tracing::warn!(plug = %plug.id, energy_wh = s.energy_wh, "The plug's own energy counter went down (reset, or a reboot that lost it): the bridge's counter continues from where it was.");
                }
                None => {}
            }
        }
        Err(e) => {
            shared.core.error("plug").inc();
            tracing::warn!(plug = %plug.id, error = %e, "Energy left out of this reading.");
        }
    }
    let m = Measurement::new(id.clone(), seg(MEASUREMENT), now, Quality::Good, fields);
    if let Err(e) = shared.producer.send(&m.topic(), m).await {
        tracing::warn!(plug = %plug.id, error = %chain(&e), "Cannot journal a plug reading.");
    }
}

async fn publish_status(shared: &Shared, id: &ReadingId, online: bool) {
    let fields = BTreeMap::from([("online".to_string(), if online { 1.0 } else { 0.0 })]);
    let m = Measurement::new(
        id.clone(),
        seg(STATUS_MEASUREMENT),
        proto::now_ms(),
        Quality::Good,
        fields,
    );
    if let Err(e) = shared.producer.send(&m.topic(), m).await {
        tracing::warn!(error = %chain(&e), "Cannot journal a plug's availability.");
    }
}
