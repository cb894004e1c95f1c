//! Simulated devices, so wattbus runs and can be tried with no hardware.
//!
//! `wattbus demo` starts these in place of real meters and sensors, and `wattbus run
//! simulator` runs them as a service of their own (e.g. in compose on a laptop). Later issues
//! add their device-level simulators here (serial PTY devices, a Modbus server); this crate
//! starts with a household mains meter that publishes measurements through the delivery
//! contract exactly as an ingest service does, and simulated serial devices (the Arduino
//! sketches of `docs/serial-protocols.md`) that talk to `serial-ingest` over a PTY.
//!
//! Topics written: `wattbus/v1/<site>/meas/<device>/main` ([`proto::Measurement`]) via the
//! `meas` stream of the `simulator` producer.
//!
//! Layout:
//! - `config`: the `[simulator]` section.
//! - `household`: the pure load model (no tokio): a fridge that cycles, a kettle now and
//!   then, a base load, mains voltage that wanders.
//! - `serial`: PowMon, Prime and sensor-line devices: pure models plus tokio drivers that run
//!   them on a serial port or an in-process PTY pair.
//! - `modbus`: simulated Modbus meters (ORNO WE-515, Eastron SDM120) on a bus of slave ids,
//!   served over Modbus TCP or RTU (a PTY, optionally paced at the line rate).
//! - `hardware`: the demo's devices (two WE-515, three CT sensors, a PowMon, a fridge
//!   monitor) served over TCP for ingest services in other processes (`[simulator.hardware]`,
//!   compose's demo profile).

mod config;
pub mod hardware;
mod household;
pub mod modbus;
pub mod plugs;
mod register;
pub mod serial;
pub mod tasmota;

pub use config::{Config, Plan};
pub use household::{Household, HouseholdReading};
pub use register::{RegisterError, Registers};

use std::time::Duration;

use proto::{Filter, Measurement, Quality, ReadingId, Segment};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{DeliveryError, Producer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    Claim(#[from] runtime::state::ClaimError),
    #[error(transparent)]
    Hardware(#[from] hardware::HardwareError),
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct Simulator;

impl runtime::Service for Simulator {
    const NAME: &'static str = "simulator";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str =
        "simulated household meters publishing readings, to try wattbus without hardware";
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

/// The config section.
pub const SECTION: &str = "simulator";

/// Identity of the simulator on the bus.
pub fn identity(config: &Config) -> Identity {
    Identity {
        service: seg("simulator"),
        instance: config.instance.clone(),
    }
}

/// Run the simulated devices until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    let _claim = runtime::state::Claim::exclusive(
        &ctx.common.data_dir,
        "simulator",
        &plan.instance,
        runtime::state::MUST_NOT_SCALE,
    )?;
    // The hardware stops when the service is told to (so its registers are saved within the
    // grace period, whatever the bus's flush takes), or when the bus part ends by itself (an
    // error ends `on_bus` without a shutdown).
    let (stop_hardware, hardware_shutdown) = runtime::shutdown::channel();
    let (bus_ended, bus_ended_rx) = runtime::shutdown::channel();
    let forward = {
        let told = ctx.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = told.wait() => {}
                () = bus_ended_rx.wait() => {}
            }
            stop_hardware.fire();
        })
    };
    let hardware = match &plan.hardware {
        Some(h) => Some(
            hardware::start(
                h,
                &ctx.common
                    .data_dir
                    .join(plan.instance.as_str())
                    .join("meter-registers"),
                hardware_shutdown,
            )
            .await?,
        ),
        None => None,
    };
    let result = ctx
        .clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await;
    bus_ended.fire();
    if let Err(e) = forward.await {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "The simulated hardware's stop signal ended abnormally.");
    }
    if let Some(h) = hardware
        && let Err(e) = h.await
    {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "The simulated hardware ended abnormally.");
    }
    result
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, config: &Plan, ctx: &Context) -> Result<(), Error> {
    let stream = seg("meas");
    let (producer, producer_task) = Producer::open(
        bus,
        &stream,
        &Filter::measurements(Some(&ctx.common.site), None),
        &config.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;
    let core = runtime::telemetry::core::Core::of(bus.service().as_str());
    let mut registers = Registers::open(
        &ctx.common
            .data_dir
            .join(config.instance.as_str())
            .join("registers"),
    )?;
    // Each meter's identity, once: its readings and their topics are built from it.
    let mut houses: Vec<(ReadingId, Household)> = (0..config.devices)
        .map(|i| {
            let id = ReadingId::new(
                ctx.common.site.clone(),
                seg(&format!("{}-{}", config.device_prefix, i + 1)),
                seg("main"),
            );
            let start = registers.start(id.device.as_str());
            (id, Household::with_energy(u64::from(i) + 1, start))
        })
        .collect();
    let measurement = seg("power");
    // A simulated meter has nothing to read before the broker is there: its first readings
    // would only be journaled and replayed a few seconds later, which is the contract working
    // but looks like a fault in a demo. (A real ingest service reads at once: its journal keeps
    // what the broker cannot take yet.)
    bus.wait_connected(Duration::from_secs(5)).await;
    // Readings on a grid of the interval, like a meter polled on schedule: ticks a busy
    // machine held back are caught up with their own times, so one reading per device per
    // interval exists, and a missing one in storage is a lost one.
    let interval = i64::try_from(config.interval_ms).unwrap_or(i64::MAX);
    let mut at_ms = proto::now_ms() / interval * interval;
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut register_failed = false;
    loop {
        tokio::select! {
            () = ctx.shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        at_ms += interval;
        let now_ms = at_ms;
        for (id, house) in &mut houses {
            let r = house.step(now_ms);
            match registers.cover(id.device.as_str(), r.energy_wh) {
                Ok(()) => register_failed = false,
                Err(e) if !register_failed => {
                    register_failed = true;
                    tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot save the simulated energy registers: after a crash they may restart below the last reading.");
                }
                Err(_) => {}
            }
            let m = Measurement::new(
                id.clone(),
                measurement.clone(),
                now_ms,
                Quality::Good,
                [
                    ("power_w".to_string(), r.power_w),
                    ("voltage_v".to_string(), r.voltage_v),
                    ("current_a".to_string(), r.current_a),
                    ("frequency_hz".to_string(), r.frequency_hz),
                    ("energy_wh".to_string(), r.energy_wh),
                ]
                .into(),
            );
            // A meter goes on being read whatever happens to one reading: a journal that
            // refuses it (disk full) is logged once per episode, counted and reported on
            // /healthz by the producer, which tries again with the next reading.
            if let Err(e) = producer.send(&m.topic(), m).await {
                runtime::events::reading_not_sent(&core, id.device.as_str(), &e);
            }
        }
    }
    let exact = houses
        .iter_mut()
        .map(|(id, house)| (id.device.to_string(), house.energy_wh()));
    if let Err(e) = registers.save_exact(exact) {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot save the simulated energy registers at stop.");
    }
    if let Err(e) = producer_task.await {
        tracing::warn!(error = %runtime::telemetry::chain(&e), "Producer task ended abnormally.");
    }
    Ok(())
}

fn seg(s: &str) -> Segment {
    // Only called with names built from validated config parts and literals.
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
