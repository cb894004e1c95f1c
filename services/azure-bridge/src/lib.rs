//! azure-bridge: readings to Azure IoT Hub, packed to its 4 KB billing unit, stored and
//! forwarded across outages; commands back from the cloud.
//!
//! ```text
//!  bus (meas/+/+) ──► Packer ──► outbox (fsynced) ──► hub (MQTT/TLS, QoS 1, in order)
//!        ▲ ack once in the outbox      │ trimmed as the hub PUBACKs, expired after ttl_s
//!  bus (cmd, cmd-result) ◄──► cloud: direct methods, cloud-to-device messages
//! ```
//!
//! A sink group (`azure-bridge`): a reading is acknowledged to its producer once the message
//! holding it is fsynced in the outbox, a journal of its own, which holds it until the hub
//! acknowledges it (or it expires, with an ERROR and a counter). So the producers' journals
//! stay small while the hub is away for days, and nothing is lost in between: a reading is
//! always in its producer's journal, or in the outbox, or in the hub.
//!
//! Layout:
//! - `sas`: connection strings and SAS tokens (pure).
//! - `pack`: readings into the documented compact JSON message (pure).
//! - `outbox`: packed messages on disk until the hub has them.
//! - `hub`: the MQTT connection to IoT Hub.
//! - `cloud`: direct methods and cloud-to-device messages as commands on the bus.
//! - `config`, `events`.

pub mod cloud;
pub mod config;
mod events;
pub mod hub;
pub mod outbox;
pub mod pack;
pub mod sas;
pub mod seen;
pub mod ws;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use config::{Config, Plan};
use proto::{Filter, Measurement, Segment};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{AckToken, Delivery, Inbox};
use tokio::sync::{Notify, mpsc};

use crate::events::Events;
use crate::outbox::Outbox;
use crate::pack::{Packer, Refused};
use crate::seen::Verdict;

/// The section name in the config file.
pub const SECTION: &str = "azure_bridge";

pub use events::ERROR_KINDS;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error("cannot open the outbox: {0}")]
    Outbox(#[from] runtime::journal::JournalError),
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct AzureBridge;

impl runtime::Service for AzureBridge {
    const NAME: &'static str = "azure-bridge";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "readings to Azure IoT Hub, packed, stored and forwarded across outages; commands from the cloud";
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

/// Identity of the bridge on the bus.
pub fn identity(plan: &Plan) -> Identity {
    Identity {
        service: Segment::new("azure-bridge").unwrap_or_else(|_| plan.instance.clone()),
        instance: plan.instance.clone(),
    }
}

/// Run until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let events = Arc::new(Events::new());
    let dir = plan.state_dir(&ctx.common.data_dir).join("outbox");
    let (outbox, report, id_problem) = Outbox::open(&dir, plan.outbox_max_bytes)?;
    events.outbox_opened(&dir, &report, id_problem.as_deref());
    events.outbox(outbox.records(), outbox.bytes());
    let outbox = Arc::new(Mutex::new(outbox));
    let appended = Arc::new(Notify::new());
    let ready = ctx.health.check("azure-bridge");
    ready.set(true);

    let last_reading_ms = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (incoming_tx, incoming_rx) = mpsc::channel(16);
    let (outgoing_tx, outgoing_rx) = mpsc::channel(64);
    let hub_task = tokio::spawn(hub::run(
        plan.hub.clone(),
        hub::Link {
            outbox: outbox.clone(),
            appended: appended.clone(),
            incoming: incoming_tx,
            outgoing: outgoing_rx,
            site: ctx.common.site.as_str().to_string(),
            ttl: plan.ttl,
        },
        events.clone(),
        ctx.shutdown.clone(),
    ));
    let cloud_task = tokio::spawn(cloud::run(
        bus.clone(),
        cloud::Settings {
            site: ctx.common.site.clone(),
            device: plan.hub.device.device_id.clone(),
            enabled: plan.commands,
            timeout: plan.command_timeout,
            twin_interval: plan.twin_interval,
            outbox: outbox.clone(),
            last_reading_ms: last_reading_ms.clone(),
        },
        incoming_rx,
        outgoing_tx,
        events.clone(),
        ctx.shutdown.clone(),
    ));

    let group = plan.instance.clone();
    let filter = Filter::measurements(Some(&ctx.common.site), None);
    let (mut inbox, ack_task) = Inbox::<Measurement>::subscribe(bus, &filter, &group, &plan.inbox);
    let mut intake = Intake {
        plan,
        outbox: outbox.clone(),
        packer: Packer::new(ctx.common.site.clone(), plan.max_message_bytes),
        tokens: Vec::new(),
        acker: inbox.acker(),
        appended,
        events: events.clone(),
        last_reading_ms,
    };
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut age_tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let flush = tokio::select! {
            d = inbox.recv() => {
                let Some(d) = d else { break };
                if intake.take(d).await {
                    deadline = None;
                }
                if !intake.packer.is_empty() {
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + plan.max_age);
                }
                false
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => true,
            _ = age_tick.tick() => {
                oldest_age(&outbox, &events).await;
                false
            }
            () = ctx.shutdown.wait() => break,
        };
        if flush {
            intake.store().await;
            deadline = None;
        }
    }
    // What is packed is kept: stored and acknowledged now, sent on the next start.
    intake.store().await;
    let acker = intake.acker.clone();
    drop(intake);
    ready.set(false);
    drop(inbox);
    drop(acker);
    for (name, task) in [("hub", hub_task), ("cloud", cloud_task)] {
        if let Err(e) = task.await {
            events.task_failed(name, &e);
        }
    }
    if let Err(e) = ack_task.await {
        events.task_failed("acknowledgements", &e);
    }
    let saved = tokio::task::spawn_blocking(move || {
        let mut o = outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        o.save_state()
    })
    .await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => events.outbox_failed(&e),
        Err(e) => events.task_failed("outbox save", &e),
    }
    Ok(())
}

/// Is this reading for the cloud (`devices`, `measurements`)?
fn selected(plan: &Plan, m: &Measurement) -> bool {
    plan.devices.as_ref().is_none_or(|d| d.contains(&m.device))
        && plan
            .measurements
            .as_ref()
            .is_none_or(|s| s.contains(&m.measurement))
}

/// Readings from the bus into messages in the outbox.
struct Intake<'a> {
    plan: &'a Plan,
    outbox: Arc<Mutex<Outbox>>,
    packer: Packer,
    /// The readings of the message being packed, acknowledged once it is stored.
    tokens: Vec<AckToken>,
    acker: runtime::delivery::Acker,
    appended: Arc<Notify>,
    events: Arc<Events>,
    /// For the twin: the newest reading's read time.
    last_reading_ms: Arc<std::sync::atomic::AtomicI64>,
}

impl Intake<'_> {
    /// Take a reading; whether a full message was stored to make room for it.
    async fn take(&mut self, d: Delivery<Measurement>) -> bool {
        self.last_reading_ms
            .fetch_max(d.message.ts_ms, std::sync::atomic::Ordering::Relaxed);
        if let Some(o) = &d.message.origin {
            let verdict = self
                .outbox
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .check(o, d.message.ts_ms);
            match verdict {
                // Held or sent already (its acknowledgement was lost: the bridge or the
                // producer was killed before it went out, or the broker restarted):
                // acknowledged again, never sent to the hub twice.
                Verdict::Repeat => {
                    if let Some(t) = &d.token {
                        self.acker.ack(t);
                    }
                    self.events.repeat();
                    return false;
                }
                Verdict::Renumbered => {
                    self.events
                        .renumbered(o.producer.as_str(), o.stream.as_str(), o.seq);
                }
                Verdict::New => {}
            }
            if self.packer.holds(o) {
                // In the message being packed: acknowledged with it.
                self.events.repeat();
                return false;
            }
        }
        if !selected(self.plan, &d.message) {
            // Not for the cloud: stored elsewhere, nothing owed here. Its origin is noted too,
            // so a stream whose readings are only partly selected stays one range in `seen`
            // (every other seq would otherwise be a range of its own, for ever).
            self.settled(&d);
            return false;
        }
        let mut stored = false;
        let pushed = match self.packer.push(&d.message) {
            Err(Refused::Full) => {
                self.store().await;
                stored = true;
                self.packer.push(&d.message)
            }
            other => other,
        };
        match pushed {
            Ok(()) => self.tokens.extend(d.token),
            // A reading no message can hold: dead-lettered by acknowledging it with an
            // ERROR (it is in InfluxDB if influx-writer runs; it can never reach the hub).
            Err(why) => {
                let bytes = match why {
                    Refused::TooLarge(b) => b,
                    // The inbox checks a reading's identity against its topic and the filter
                    // is this site's: another site cannot arrive. Counted if it ever does.
                    Refused::OtherSite | Refused::Full => 0,
                };
                self.events.too_large(bytes, self.plan.max_message_bytes);
                self.settled(&d);
            }
        }
        stored
    }

    /// A reading this bridge is done with without storing it: acknowledged, and its origin
    /// noted.
    fn settled(&mut self, d: &Delivery<Measurement>) {
        if let Some(o) = &d.message.origin {
            self.packer.note(o, d.message.ts_ms);
            self.outbox
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .settled(o, d.message.ts_ms);
        }
        if let Some(t) = &d.token {
            self.acker.ack(t);
        }
    }

    /// Store the packed message (append, fsync) and acknowledge its readings. A message the
    /// outbox cannot take is given up without acknowledging: its readings stay with their
    /// producers, who send them again.
    async fn store(&mut self) {
        if self.packer.is_empty() {
            return;
        }
        let fresh = self.packer.empty_like();
        let mut taken = std::mem::replace(&mut self.packer, fresh);
        let o = self.outbox.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut o = o.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = o.append(&mut taken);
            (r, o.records(), o.bytes())
        })
        .await;
        // Whatever happened, the readings are not held here any more: acknowledged below
        // once stored, or left to their producers to send again.
        let held = std::mem::take(&mut self.tokens);
        match result {
            Ok((Ok((stored, dropped)), records, bytes)) => {
                self.events.packed(
                    usize::try_from(stored.meta.readings).unwrap_or(0),
                    stored.body.len(),
                );
                if let Some(d) = dropped {
                    self.events.outbox_dropped(&d);
                }
                self.events.outbox(records, bytes);
                for t in &held {
                    self.acker.ack(t);
                }
                self.appended.notify_one();
            }
            Ok((Err(e), _, _)) => self.events.outbox_failed(&e),
            Err(e) => self.events.task_failed("outbox append", &e),
        }
    }
}

/// Every 5 s: the outbox's oldest message's age, and its state saved when due (the dedup set
/// and the acknowledged point, at most every 30 s: after a `kill -9` the hub is sent again at
/// most that much of what it already has, each message with the id it had).
async fn oldest_age(outbox: &Arc<Mutex<Outbox>>, events: &Events) {
    let o = outbox.clone();
    let (first, saved, records, bytes) = tokio::task::spawn_blocking(move || {
        let mut o = o.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let saved = o.flush_due();
        let first = o
            .read_after(0, 1, 1)
            .ok()
            .and_then(|v| v.into_iter().next());
        (first, saved, o.records(), o.bytes())
    })
    .await
    .unwrap_or((None, Ok(()), 0, 0));
    if let Err(e) = saved {
        events.outbox_failed(&e);
    }
    events.outbox(records, bytes);
    let age_ms = first.map_or(0, |m| {
        proto::now_ms().saturating_sub(m.meta.oldest_ms).max(0)
    });
    events.outbox_oldest(Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)));
}
