//! plug-bridge's notable events, each logged and counted here and nowhere else: the log line
//! for the person at the terminal, the counter for the dashboard.
//!
//! One [`Events`] per run, shared by the plug tasks, the command router, the Home Assistant
//! announcer and the HTTP API. Every error event counts in the core
//! `wattbus_errors_total{service="plug-bridge",kind}` ([`ERROR_KINDS`]); floods a client can
//! cause (refused commands, API requests without the token) are logged at most once a minute
//! with the count of the rest.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proto::Segment;
use runtime::telemetry::core::Core;
use runtime::telemetry::{LogLimit, chain};

/// plug-bridge's own kinds of `wattbus_errors_total`, besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A plug that did not answer, or answered something that is not a reading.
    "plug",
    // The energy counters could not be saved.
    "energy_file",
    // A command from the bus that was refused: not a command, retained, mislabelled, or its
    // plug's queue full.
    "command",
    // A command's result, a plug's availability or its Home Assistant config could not be
    // published.
    "publish",
    // The HTTP API refused a request without the right token, or a connection over the
    // per-address limit, or could not accept one.
    "api",
    // A task of the bridge ended abnormally (a bug): its part stops until a restart.
    "task",
];

/// Floods are logged at most this often, with the count of the rest.
const FLOOD_LOG_EVERY: Duration = Duration::from_secs(60);

/// The bridge's events (see the module doc).
#[derive(Debug)]
pub struct Events {
    core: Core,
    commands_log: LogLimit,
    api_log: LogLimit,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            core: Core::of(<crate::PlugBridge as runtime::Service>::NAME),
            commands_log: LogLimit::new(FLOOD_LOG_EVERY),
            api_log: LogLimit::new(FLOOD_LOG_EVERY),
        }
    }

    // --- the bridge as a whole ------------------------------------------------------------

    pub fn no_plugs(&self) {
        tracing::warn!("No plugs configured ([[plug_bridge.plugs]]): nothing to poll.");
    }

    pub fn tasmota_broker(&self, host: &str, port: u16) {
        tracing::info!(host, port, "Tasmota plugs on their own broker.");
    }

    /// A task ended by panicking (a bug).
    pub fn task_failed(&self, task: &str, error: &tokio::task::JoinError) {
        self.core.error("task").inc();
        tracing::error!(task, error = %chain(error), "A task of plug-bridge ended abnormally.");
    }

    pub fn energy_not_saved(&self, plug: Option<&Segment>, error: &dyn std::error::Error) {
        self.core.error("energy_file").inc();
        match plug {
            Some(plug) => {
                tracing::error!(plug = %plug, error = %chain(error), "Cannot save the plug energy counters: readings go on, but after a crash and a plug reboot this counter could continue below a stored one.")
            }
            None => {
                tracing::error!(error = %chain(error), "Cannot save the plug energy counters at stop: after a plug reboot they may continue a little high.")
            }
        }
    }

    // --- one plug -------------------------------------------------------------------------

    pub fn plug_online(&self, plug: &Segment, url: &dyn Display) {
        tracing::info!(plug = %plug, url = %url, "Plug online.");
    }

    /// A read failed; `first` when the plug was online (or unknown) until now.
    pub fn plug_offline(
        &self,
        plug: &Segment,
        url: &dyn Display,
        error: &dyn std::error::Error,
        retry_in: Duration,
        first: bool,
    ) {
        self.core.error("plug").inc();
        if first {
            tracing::warn!(plug = %plug, url = %url, error = %chain(error), retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX), "Plug offline; retrying with backoff.");
        } else {
            tracing::debug!(plug = %plug, error = %chain(error), "Plug still offline.");
        }
    }

    pub fn plug_rebooted(&self, plug: &Segment, energy_wh: f64) {
        tracing::info!(plug = %plug, energy_wh, "The plug rebooted (new boot id): its energy counter continues from where it was.");
    }

    pub fn plug_replaced(&self, plug: &Segment, energy_wh: f64) {
        tracing::warn!(plug = %plug, energy_wh, "Another kind of plug answers under this id (replaced?): the counter continues from where it was, not from the new plug's own total.");
    }

    pub fn plug_counter_fell(&self, plug: &Segment, energy_wh: f64) {
        tracing::warn!(plug = %plug, energy_wh, "The plug's own energy counter fell to well below its last value (reset, or a reboot that lost it): the bridge's counter continues from where it was.");
    }

    pub fn energy_left_out(&self, plug: &Segment, error: &dyn std::error::Error) {
        self.core.error("plug").inc();
        tracing::warn!(plug = %plug, error = %chain(error), "Energy left out of this reading.");
    }

    /// The runtime counts what it could not journal (`wattbus_unjournaled_messages_total`).
    pub fn not_journaled(&self, what: &str, plug: Option<&Segment>, error: &dyn std::error::Error) {
        match plug {
            Some(plug) => {
                tracing::warn!(plug = %plug, error = %chain(error), "Cannot journal a plug's {what}.")
            }
            None => tracing::warn!(error = %chain(error), "Cannot journal a plug's {what}."),
        }
    }

    // --- commands -------------------------------------------------------------------------

    pub fn command_dropped(&self, plug: &Segment, id: &Segment) {
        tracing::debug!(plug = %plug, id = %id, "A command whose requester gave up: dropped.");
    }

    pub fn not_a_command(&self, topic: &str, error: &dyn std::error::Error) {
        self.core.error("command").inc();
        if let Some(skipped) = self.commands_log.allow() {
            tracing::warn!(topic, error = %chain(error), skipped, "A command that is not one: ignored.");
        }
    }

    pub fn command_refused(&self, topic: &str, id: &Segment, why: &str) {
        self.core.error("command").inc();
        if let Some(skipped) = self.commands_log.allow() {
            tracing::warn!(topic, id = %id, skipped, "A command refused: {why}.");
        }
    }

    pub fn queue_full(&self, plug: &Segment, id: &Segment, queue: usize) {
        self.core.error("command").inc();
        if let Some(skipped) = self.commands_log.allow() {
            tracing::warn!(plug = %plug, id = %id, skipped, "A command refused: the plug already has {queue} waiting.");
        }
    }

    pub fn command_done(&self, plug: &Segment, id: &Segment, relay_on: Option<bool>) {
        tracing::info!(plug = %plug, id = %id, relay_on = ?relay_on, "Command carried out and read back.");
    }

    pub fn command_failed(&self, plug: &Segment, id: &Segment, message: &str) {
        tracing::warn!(plug = %plug, id = %id, message, "Command not carried out.");
    }

    pub fn result_not_published(&self, plug: &Segment, error: &dyn std::error::Error) {
        self.core.error("publish").inc();
        tracing::warn!(plug = %plug, error = %chain(error), "Cannot publish a command's result.");
    }

    // --- Home Assistant -------------------------------------------------------------------

    pub fn home_assistant_online(&self) {
        tracing::info!("Home Assistant is online: announcing the plugs again.");
    }

    pub fn announced(&self, configs: usize) {
        tracing::debug!(configs, "Plugs announced to Home Assistant.");
    }

    pub fn not_announced(&self, error: &dyn std::error::Error) {
        self.core.error("publish").inc();
        tracing::warn!(error = %chain(error), "Cannot announce the plugs to Home Assistant.");
    }

    /// After every poll: counted, logged at DEBUG only (the next poll publishes it again).
    pub fn state_not_published(&self, plug: &Segment, error: &dyn std::error::Error) {
        self.core.error("publish").inc();
        tracing::debug!(plug = %plug, error = %chain(error), "Cannot publish a plug's state for Home Assistant.");
    }

    pub fn availability_not_published(&self, plug: &Segment, error: &dyn std::error::Error) {
        self.core.error("publish").inc();
        tracing::warn!(plug = %plug, error = %chain(error), "Cannot publish a plug's availability for Home Assistant.");
    }

    // --- the HTTP API ---------------------------------------------------------------------

    pub fn api_listening(&self, listen: SocketAddr) {
        tracing::info!(listen = %listen, "Plug API listening (bearer token required).");
    }

    pub fn api_accept_failed(&self, error: &std::io::Error) {
        self.core.error("api").inc();
        tracing::warn!(error = %chain(error), "Plug API cannot accept a connection.");
    }

    pub fn api_peer_limit(&self, peer: IpAddr, limit: usize) {
        self.core.error("api").inc();
        if let Some(skipped) = self.api_log.allow() {
            tracing::warn!(peer = %peer, skipped, "Plug API: {limit} connections from this address already; one more closed.");
        }
    }

    pub fn api_connection_ended(&self, peer: IpAddr, error: &dyn std::error::Error) {
        tracing::debug!(peer = %peer, error = %chain(error), "Plug API connection ended.");
    }

    pub fn api_unauthorized(&self, peer: IpAddr, path: &str) {
        self.core.error("api").inc();
        if let Some(skipped) = self.api_log.allow() {
            tracing::warn!(peer = %peer, path, skipped, "Plug API request without the right bearer token refused.");
        }
    }

    pub fn switch_asked(
        &self,
        plug: &Segment,
        action: &str,
        id: &Segment,
        peer: IpAddr,
        user: &str,
    ) {
        tracing::info!(plug = %plug, action, id = %id, peer = %peer, grafana_user = user, "Switch asked over HTTP.");
    }
}
