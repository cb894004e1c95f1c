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
//! - `api`: the HTTP API (switch and read plugs with a bearer token; Grafana's button).

pub mod api;
pub mod client;
pub mod config;
pub mod device;
pub mod digest;
pub mod energy;
mod events;
pub mod ha;
pub mod tasmota;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{
    Action, Command, CommandResult, Filter, Measurement, Payload as _, Quality, ReadingId, Segment,
    Topic,
};
use runtime::Context;
use runtime::backoff::Retries;
use runtime::bus::{Bus, Identity, Message, Overflow, QoS};
use runtime::delivery::Producer;
use runtime::telemetry::chain;

use config::Plug;
pub use config::{Config, Plan};
use device::PlugReading;
use energy::{PlugEnergy, PlugEnergyError, Restart};
use events::Events;

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
    Energy(#[from] PlugEnergyError),
    #[error(transparent)]
    PlugClient(#[from] client::PlugClientError),
    #[error("cannot listen for the plug API on {listen}: {source}")]
    Api {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Its own kinds of `wattbus_errors_total`.
pub use events::ERROR_KINDS;

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct PlugBridge;

impl runtime::Service for PlugBridge {
    const NAME: &'static str = "plug-bridge";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "smart plugs (myStrom, Shelly, Tasmota): power, relay, energy that never goes backwards, switching";
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
    bus: Bus,
    producer: Producer,
    energy: Mutex<PlugEnergy>,
    margin_wh: f64,
    site: Segment,
    events: Arc<Events>,
    views: Arc<api::Views>,
    /// Announce plugs to Home Assistant (and publish their availability for it).
    home_assistant: bool,
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let energy = PlugEnergy::load(&plan.energy_file(&ctx.common.data_dir))?;
    let events = Arc::new(Events::new());
    let mut http = client::PlugClient::new(plan.timeout)?;
    let topics: Vec<Segment> = plan.plugs.iter().filter_map(|p| p.topic.clone()).collect();
    // The Tasmota plugs: on wattbus's broker, or on the one named in `tasmota_broker` (a
    // connection of its own, which publishes no status there).
    let mut tasmota_bus = None;
    let tasmota_router = if topics.is_empty() {
        None
    } else {
        let on = match &plan.tasmota_broker {
            None => bus.clone(),
            Some(cfg) => {
                let id = Identity {
                    service: seg("plug-bridge"),
                    // The site in it: two sites' bridges on one broker must not take over
                    // each other's connection.
                    instance: Segment::new(format!(
                        "{}-{}-tasmota",
                        plan.instance.as_str(),
                        ctx.common.site.as_str()
                    ))
                    .unwrap_or_else(|_| plan.instance.clone()),
                };
                let (b, task) = Bus::observe(cfg, &ctx.common.site, &id, &ctx.health)?;
                events.tasmota_broker(&cfg.host, cfg.port);
                tasmota_bus = Some((b.clone(), task));
                b
            }
        };
        let (hub, router) = tasmota::Hub::start(&on, &topics);
        http = http.with_tasmota(hub);
        Some(router)
    };
    let (producer, producer_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(&ctx.common.site), None),
        &plan.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;
    let shared = Arc::new(Shared {
        bus: bus.clone(),
        producer,
        energy: Mutex::new(energy),
        margin_wh: plan.energy_margin_wh,
        site: ctx.common.site.clone(),
        events: events.clone(),
        views: Arc::new(api::Views::default()),
        home_assistant: plan.home_assistant,
    });
    if plan.plugs.is_empty() {
        shared.events.no_plugs();
    }
    let ready = ctx.health.check("plug-bridge");
    ready.set(true);
    let mut workers = runtime::workers::Workers::new("plug");
    let mut queues = HashMap::new();
    for plug in &plan.plugs {
        let (tx, rx) = tokio::sync::mpsc::channel(COMMAND_QUEUE);
        queues.insert(plug.id.clone(), tx);
        workers.spawn(
            plug.id.as_str(),
            poll(
                plug.clone(),
                http.clone(),
                shared.clone(),
                plan.retry,
                rx,
                ctx.shutdown.clone(),
            ),
        );
    }
    let commands = bus.subscribe(
        Filter::<Command>::commands(Some(&ctx.common.site), None).as_str(),
        QoS::AtLeastOnce,
        Overflow::Drop,
    );
    let api_task = match &plan.api {
        None => None,
        Some(a) => {
            let state = api::ApiState::new(
                a,
                plan.timeout,
                plan.plugs.iter().map(|p| (p.id.clone(), p.kind)).collect(),
                queues.clone(),
                shared.views.clone(),
                shared.events.clone(),
            );
            // At shutdown a switch under way takes at most three requests to the plug (the
            // one in flight, the read-back, one more read if that failed), and its answer is
            // sent: 7 s by default, within the 8 s of shutdown_grace_ms.
            let drain = plan.timeout * 3 + Duration::from_secs(1);
            let (_, task) = api::serve(a.listen, Arc::new(state), ctx.shutdown.clone(), drain)
                .await
                .map_err(|source| Error::Api {
                    listen: a.listen,
                    source,
                })?;
            Some(task)
        }
    };
    let router = tokio::spawn(route_commands(
        commands,
        queues,
        events.clone(),
        ctx.shutdown.clone(),
    ));
    let announcer = plan.home_assistant.then(|| {
        let plugs = plan.plugs.iter().map(|p| (p.id.clone(), p.kind)).collect();
        tokio::spawn(home_assistant(
            shared.clone(),
            plugs,
            plan.instance.clone(),
            ctx.shutdown.clone(),
        ))
    });
    workers.supervise(&ctx.shutdown).await;
    router.abort();
    if let Some(r) = tasmota_router {
        r.abort();
    }
    if let Some((b, task)) = tasmota_bus {
        b.close(task).await;
    }
    if let Some(a) = announcer {
        a.abort();
    }
    if let Some(t) = api_task
        && let Err(e) = t.await
    {
        shared.events.task_failed("api", &e);
    }
    ready.set(false);
    // A clean stop saves each counter exactly: a restart continues from it.
    let saved = match shared.energy.lock() {
        Ok(mut e) => e.save(true),
        Err(poisoned) => poisoned.into_inner().save(true),
    };
    if let Err(e) = saved {
        shared.events.energy_not_saved(None, &e);
    }
    drop(shared);
    if let Err(e) = producer_task.await {
        events.task_failed("readings stream", &e);
    }
    Ok(())
}

/// Poll one plug until shutdown.
async fn poll(
    plug: Plug,
    http: client::PlugClient,
    shared: Arc<Shared>,
    retry: runtime::backoff::Backoff,
    mut commands: tokio::sync::mpsc::Receiver<api::Job>,
    shutdown: runtime::Shutdown,
) {
    let mut done = Done::default();
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
            Some(job) = commands.recv() => {
                // An HTTP request that gave up waiting (it answered 504) is not carried out.
                if job.reply.as_ref().is_some_and(tokio::sync::oneshot::Sender::is_closed) {
                    shared.events.command_dropped(&plug.id, &job.command.id);
                    continue;
                }
                // Not cut short by shutdown: the in-flight request to the plug finishes (it
                // is bounded), nothing more is sent, and the result is still told.
                let (result, outcome) =
                    carry_out(&http, &plug, &job.command, job.deadline, &mut done, &shutdown).await;
                if let Some(on) = result.relay_on {
                    shared.views.update(&plug.id, |v| v.relay_on = Some(on));
                    publish_ha_state(&shared, &plug.id).await;
                }
                if let Some(reply) = job.reply {
                    let _ = reply.send((result.clone(), outcome));
                }
                answer(&shared, &plug, result).await;
                continue;
            }
        }
        let read = tokio::select! {
            () = shutdown.wait() => break,
            r = http.read(&plug) => r,
        };
        match read {
            Ok(r) => {
                retries.succeeded();
                if online != Some(true) {
                    shared.events.plug_online(&plug.id, &plug.url);
                }
                let read_ts_ms = proto::now_ms();
                let (relay_on, power_w, temperature_c) = (r.relay_on, r.power_w, r.temperature_c);
                let (voltage_v, current_a) = (r.voltage_v, r.current_a);
                let energy_wh = publish_reading(&shared, &plug, &reading_id, r).await;
                shared.views.update(&plug.id, |v| {
                    *v = api::View {
                        online: Some(true),
                        relay_on: Some(relay_on),
                        power_w: Some(power_w),
                        energy_wh: energy_wh.or(v.energy_wh),
                        temperature_c,
                        voltage_v,
                        current_a,
                        read_ts_ms: Some(read_ts_ms),
                    };
                });
                publish_ha_state(&shared, &plug.id).await;
                if online != Some(true) {
                    announce_availability(&shared, &plug.id, true).await;
                }
                if online != Some(true) || status_at.elapsed() >= STATUS_EVERY {
                    online = Some(true);
                    status_at = tokio::time::Instant::now();
                    publish_status(&shared, &status_id, true).await;
                }
            }
            Err(e) => {
                shared.views.update(&plug.id, |v| v.online = Some(false));
                let wait = retries.failed();
                shared
                    .events
                    .plug_offline(&plug.id, &plug.url, &e, wait, online != Some(false));
                if online != Some(false) {
                    announce_availability(&shared, &plug.id, false).await;
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

/// Commands waiting for one plug; more are refused (answered as such) rather than queued to
/// fire late.
const COMMAND_QUEUE: usize = 8;

/// Commands remembered per plug, so a repeated one (the same id, a resend) is answered again
/// without switching again.
const REMEMBERED: usize = 64;

/// Commands from the bus, each to its plug's task.
async fn route_commands(
    mut rx: tokio::sync::mpsc::Receiver<Message>,
    queues: HashMap<Segment, tokio::sync::mpsc::Sender<api::Job>>,
    events: Arc<Events>,
    shutdown: runtime::Shutdown,
) {
    loop {
        let msg = tokio::select! {
            () = shutdown.wait() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        let device = msg.topic.rsplit('/').next().unwrap_or_default();
        let command = match Command::decode(&msg.payload) {
            Ok(c) => c,
            Err(e) => {
                events.not_a_command(&msg.topic, &e);
                continue;
            }
        };
        // A retained command would switch the plug again at every reconnect; one whose
        // payload names another device than its topic is forged or broken.
        let why = if msg.retain {
            Some("it is retained (it would fire again at every reconnect)")
        } else if command.device.as_str() != device {
            Some("its payload names another device than its topic")
        } else {
            None
        };
        if let Some(why) = why {
            events.command_refused(&msg.topic, &command.id, why);
            continue;
        }
        let Some(queue) = queues.get(&command.device) else {
            continue;
        };
        let job = api::Job {
            deadline: deadline(&command),
            command,
            reply: None,
        };
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(j)) = queue.try_send(job) {
            events.queue_full(&j.command.device, &j.command.id, COMMAND_QUEUE);
        }
    }
}

/// What became of a command, for the HTTP API's status code (the bus gets the
/// [`CommandResult`] alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchOutcome {
    /// Switched, and the plug reads as asked.
    Done,
    /// The plug answered, but reads otherwise than asked.
    Mismatch,
    /// Not started: it expired first (or waited behind others until then). Nothing was sent.
    NotStarted,
    /// Sent, but not confirmed before it expired: the plug may have switched (the result
    /// says what it read afterwards, if it could be read). It is not sent again.
    Unconfirmed,
    /// Its id was used before for another command: not carried out.
    Conflict,
    /// plug-bridge is stopping: not started.
    Stopping,
}

/// The longest a command may wait to be carried out, whatever its `expires_ts_ms` says: a
/// plug must not switch minutes after the request, nor go unpolled that long.
pub const MAX_COMMAND_LIFETIME: Duration = Duration::from_secs(30);

/// A command's deadline on the monotonic clock, taken when it arrives: a wall clock stepped
/// back (a Pi has no RTC; NTP corrects it) neither revives an expired command nor extends one.
pub fn deadline(c: &Command) -> tokio::time::Instant {
    let left = u64::try_from(c.expires_ts_ms.saturating_sub(proto::now_ms())).unwrap_or(0);
    tokio::time::Instant::now() + Duration::from_millis(left).min(MAX_COMMAND_LIFETIME)
}

/// Results of the commands a plug carried out lately, by id.
#[derive(Default)]
struct Done {
    results: VecDeque<(Action, CommandResult, SwitchOutcome)>,
}

impl Done {
    /// The earlier result of `c`'s id: the same again if it asked the same, a conflict if not.
    fn get(&self, c: &Command) -> Option<(CommandResult, SwitchOutcome)> {
        let (action, r, outcome) = self.results.iter().find(|(_, r, _)| r.id == c.id)?;
        if *action == c.action {
            return Some((r.clone(), *outcome));
        }
        let conflict = CommandResult {
            id: c.id.clone(),
            device: c.device.clone(),
            ok: false,
            relay_on: None,
            message: Some(format!(
                "the id {} was used for another command to this plug: not carried out (give each command its own id)",
                c.id
            )),
            ts_ms: proto::now_ms(),
        };
        Some((conflict, SwitchOutcome::Conflict))
    }

    fn remember(&mut self, action: Action, r: &CommandResult, outcome: SwitchOutcome) {
        if self.results.len() >= REMEMBERED {
            self.results.pop_front();
        }
        self.results.push_back((action, r.clone(), outcome));
    }
}

/// Carry a command out by `deadline`: unless its id was seen, set the relay (a toggle becomes
/// the state opposite to the one read first), then read the plug back; `Done` only when the
/// plug says the relay is as asked. Retried until the deadline; from then, or from shutdown,
/// nothing more is sent (a request open then is dropped), and a command that was sent is
/// read back once more, so the result says what the plug reads.
async fn carry_out(
    http: &client::PlugClient,
    plug: &Plug,
    c: &Command,
    deadline: tokio::time::Instant,
    done: &mut Done,
    shutdown: &runtime::Shutdown,
) -> (CommandResult, SwitchOutcome) {
    if let Some(earlier) = done.get(c) {
        return earlier;
    }
    let result = |ok: bool, relay_on: Option<bool>, message: Option<String>| CommandResult {
        id: c.id.clone(),
        device: c.device.clone(),
        ok,
        relay_on,
        message,
        ts_ms: proto::now_ms(),
    };
    let mut last_error = String::new();
    let mut wanted = match c.action {
        Action::On => Some(true),
        Action::Off => Some(false),
        Action::Toggle => None,
    };
    let mut sent = false;
    let mut attempt = 0u32;
    let stopping = loop {
        if attempt > 0 {
            let pause = Duration::from_millis(200u64 << attempt.min(4));
            let until = deadline.min(tokio::time::Instant::now() + pause);
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = shutdown.wait() => {}
            }
        }
        // Never started after the deadline: a plug must not switch late.
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        if shutdown.is_requested() {
            break true;
        }
        attempt += 1;
        let on = match wanted {
            Some(on) => on,
            None => match by_deadline(deadline, http.read(plug)).await {
                Ok(r) => {
                    wanted = Some(!r.relay_on);
                    !r.relay_on
                }
                Err(e) => {
                    last_error = e;
                    continue;
                }
            },
        };
        sent = true;
        if let Err(e) = by_deadline(deadline, http.switch(plug, on)).await {
            last_error = e;
            continue;
        }
        match by_deadline(deadline, http.read(plug)).await {
            Ok(r) if r.relay_on == on => {
                let r = result(true, Some(r.relay_on), None);
                done.remember(c.action, &r, SwitchOutcome::Done);
                return (r, SwitchOutcome::Done);
            }
            Ok(r) => {
                let r = result(
                    false,
                    Some(r.relay_on),
                    Some(format!(
                        "the plug reads {} after being switched {}",
                        state(r.relay_on),
                        state(on)
                    )),
                );
                done.remember(c.action, &r, SwitchOutcome::Mismatch);
                return (r, SwitchOutcome::Mismatch);
            }
            Err(e) => last_error = e,
        }
    };
    if !sent {
        let (message, outcome) = if stopping {
            (
                "plug-bridge is stopping: not done".to_string(),
                SwitchOutcome::Stopping,
            )
        } else if last_error.is_empty() {
            (
                "expired before it could be carried out: not done".to_string(),
                SwitchOutcome::NotStarted,
            )
        } else {
            (
                format!(
                    "the plug did not answer before the command expired; nothing was sent to switch it: {last_error}"
                ),
                SwitchOutcome::NotStarted,
            )
        };
        let r = result(false, None, Some(message));
        if outcome != SwitchOutcome::Stopping {
            done.remember(c.action, &r, outcome);
        }
        return (r, outcome);
    }
    // Sent, not confirmed: what does the plug read now? (Reading switches nothing.)
    let now = http.read(plug).await.ok().map(|r| r.relay_on);
    if let (Some(on), Some(wanted)) = (now, wanted)
        && on == wanted
    {
        let r = result(true, Some(on), None);
        done.remember(c.action, &r, SwitchOutcome::Done);
        return (r, SwitchOutcome::Done);
    }
    let reads = match now {
        Some(on) => format!("it now reads {}", state(on)),
        None => "it cannot be read now".to_string(),
    };
    let why = if stopping {
        "plug-bridge is stopping"
    } else {
        "the plug did not confirm before the command expired"
    };
    let r = result(
        false,
        now,
        Some(format!(
            "{why} ({last_error}); the switch may or may not have reached the plug: {reads}; it is not sent again"
        )),
    );
    done.remember(c.action, &r, SwitchOutcome::Unconfirmed);
    (r, SwitchOutcome::Unconfirmed)
}

/// `request`, given up at `deadline`: a request still open then is dropped (its connection
/// closed), and nothing of the command is sent again.
async fn by_deadline<T>(
    deadline: tokio::time::Instant,
    request: impl std::future::Future<Output = Result<T, client::PlugError>>,
) -> Result<T, String> {
    match tokio::time::timeout_at(deadline, request).await {
        Ok(r) => r.map_err(|e| chain(&e)),
        Err(_) => Err("no answer before the command expired".into()),
    }
}

fn state(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// Publish a command's result (not journaled: a result nobody hears now is of no use later;
/// the plug's readings show its state).
async fn answer(shared: &Shared, plug: &Plug, r: CommandResult) {
    if r.ok {
        shared.events.command_done(&plug.id, &r.id, r.relay_on);
    } else {
        shared
            .events
            .command_failed(&plug.id, &r.id, r.message.as_deref().unwrap_or(""));
    }
    let topic = Topic::<CommandResult>::command_result(&shared.site, &plug.id);
    if let Err(e) = shared.bus.send(&topic, &r, false).await {
        shared.events.result_not_published(&plug.id, &e);
    }
}

/// Home Assistant discovery (`ha`): every plug announced on every connection to the broker
/// (whose retained messages may be gone: wattbus's broker keeps them in memory) and whenever
/// Home Assistant says it is `online`.
async fn home_assistant(
    shared: Arc<Shared>,
    plugs: Vec<(Segment, config::PlugKind)>,
    instance: Segment,
    shutdown: runtime::Shutdown,
) {
    let mut connection = shared.bus.connection();
    let mut ha_status = shared
        .bus
        .subscribe(ha::STATUS_TOPIC, QoS::AtLeastOnce, Overflow::Drop);
    // Announcements are at least ANNOUNCE_GAP apart: a flood of `online` (or of reconnects)
    // costs one announcement per gap, not one per message.
    let mut due = *connection.borrow_and_update() > 0;
    let mut last: Option<tokio::time::Instant> = None;
    let mut asked_by_ha = false;
    loop {
        let wait = last.map_or(Duration::ZERO, |t| ANNOUNCE_GAP.saturating_sub(t.elapsed()));
        if due && wait.is_zero() {
            if asked_by_ha {
                shared.events.home_assistant_online();
            }
            announce(&shared, &plugs, &instance).await;
            last = Some(tokio::time::Instant::now());
            (due, asked_by_ha) = (false, false);
            continue;
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(wait), if due => {}
            r = connection.changed() => {
                if r.is_err() {
                    return;
                }
                due = true;
            }
            Some(m) = ha_status.recv() => {
                if m.payload.as_ref() == b"online" {
                    due = true;
                    asked_by_ha = true;
                }
            }
        }
    }
}

/// The least time between two announcements to Home Assistant.
const ANNOUNCE_GAP: Duration = Duration::from_secs(5);

async fn announce(shared: &Shared, plugs: &[(Segment, config::PlugKind)], instance: &Segment) {
    let mut sent = 0;
    for (plug, kind) in plugs {
        for (topic, payload) in ha::announcements(
            &shared.site,
            plug,
            *kind,
            instance,
            env!("CARGO_PKG_VERSION"),
        ) {
            match shared.bus.publish(&topic, payload.to_string(), true).await {
                Ok(()) => sent += 1,
                Err(e) => {
                    shared.events.not_announced(&e);
                    return;
                }
            }
        }
        if let Some(online) = shared.views.get(plug).online {
            announce_availability(shared, plug, online).await;
        }
        publish_ha_state(shared, plug).await;
    }
    shared.events.announced(sent);
}

/// The plug's latest state for Home Assistant, retained and never replayed (see `ha`).
async fn publish_ha_state(shared: &Shared, plug: &Segment) {
    if !shared.home_assistant {
        return;
    }
    let v = shared.views.get(plug);
    let state = (|| {
        Some(ha::HaState {
            relay_on: v.relay_on?,
            power_w: v.power_w?,
            energy_wh: v.energy_wh,
            temperature_c: v.temperature_c,
            voltage_v: v.voltage_v,
            current_a: v.current_a,
            ts_ms: v.read_ts_ms?,
        })
    })();
    let Some(state) = state else {
        return;
    };
    let payload = match serde_json::to_vec(&state) {
        Ok(p) => p,
        Err(_) => return,
    };
    if let Err(e) = shared
        .bus
        .publish(&ha::state_topic(&shared.site, plug), payload, true)
        .await
    {
        shared.events.state_not_published(plug, &e);
    }
}

/// The plug's availability for Home Assistant, retained.
async fn announce_availability(shared: &Shared, plug: &Segment, online: bool) {
    if !shared.home_assistant {
        return;
    }
    let payload = if online { "online" } else { "offline" };
    let topic = ha::availability_topic(&shared.site, plug);
    if let Err(e) = shared.bus.publish(&topic, payload, true).await {
        shared.events.availability_not_published(plug, &e);
    }
}

/// A plug's availability is published on change and this often while unchanged.
const STATUS_EVERY: Duration = Duration::from_secs(60);

/// Journal a reading; its energy counter, if it has one.
async fn publish_reading(
    shared: &Shared,
    plug: &Plug,
    id: &ReadingId,
    r: PlugReading,
) -> Option<f64> {
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
        let step = energy
            .observe(plug.id.as_str(), &r.energy, shared.margin_wh, now)
            .map(|s| {
                let resets = energy.counter(plug.id.as_str()).map_or(0, |c| c.resets);
                (s, resets)
            });
        if let Ok((s, _)) = &step
            && s.save_first
            && let Err(e) = energy.save(false)
        {
            shared.events.energy_not_saved(Some(&plug.id), &e);
        }
        step
    };
    let energy_wh = step.as_ref().ok().map(|(s, _)| s.energy_wh);
    match step {
        Ok((s, resets)) => {
            fields.insert("energy_wh".into(), s.energy_wh);
            // A reset (`wattbus energy reset-plug`) is the one way down: every reading after
            // it says how many there were.
            if resets > 0 {
                fields.insert("energy_resets".into(), f64::from(resets));
            }
            match s.restart {
                Some(Restart::Reboot) => shared.events.plug_rebooted(&plug.id, s.energy_wh),
                Some(Restart::Replaced) => shared.events.plug_replaced(&plug.id, s.energy_wh),
                Some(Restart::Decrease) => shared.events.plug_counter_fell(&plug.id, s.energy_wh),
                None => {}
            }
        }
        Err(e) => {
            shared.events.energy_left_out(&plug.id, &e);
        }
    }
    let m = Measurement::new(id.clone(), seg(MEASUREMENT), now, Quality::Good, fields);
    if let Err(e) = shared.producer.send(&m.topic(), m).await {
        shared.events.not_journaled("reading", Some(&plug.id), &e);
    }
    energy_wh
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
        shared.events.not_journaled("availability", None, &e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(id: &str, action: Action, expires_in_ms: i64) -> Command {
        let now = proto::now_ms();
        Command {
            id: seg(id),
            device: seg("lamp"),
            action,
            issued_ts_ms: now,
            expires_ts_ms: now + expires_in_ms,
        }
    }

    #[tokio::test]
    async fn a_deadline_is_capped_and_taken_on_the_monotonic_clock() {
        let now = tokio::time::Instant::now();
        // An hour asked: at most MAX_COMMAND_LIFETIME given.
        let d = deadline(&command("a", Action::On, 3_600_000));
        assert!(d <= tokio::time::Instant::now() + MAX_COMMAND_LIFETIME);
        assert!(d >= now + MAX_COMMAND_LIFETIME - Duration::from_secs(1));
        // Already expired: due now, never later.
        assert!(deadline(&command("b", Action::On, -5000)) <= tokio::time::Instant::now());
    }

    #[test]
    fn an_id_used_again_for_another_action_is_a_conflict() {
        let mut done = Done::default();
        let c = command("x", Action::Off, 1000);
        let r = CommandResult {
            id: c.id.clone(),
            device: c.device.clone(),
            ok: true,
            relay_on: Some(false),
            message: None,
            ts_ms: 0,
        };
        done.remember(c.action, &r, SwitchOutcome::Done);
        assert_eq!(done.get(&c), Some((r, SwitchOutcome::Done)));
        let (again, outcome) = done.get(&command("x", Action::On, 1000)).unwrap();
        assert_eq!(
            (again.ok, again.relay_on, outcome),
            (false, None, SwitchOutcome::Conflict)
        );
        assert!(done.get(&command("y", Action::Off, 1000)).is_none());
    }
}
