//! azure-bridge's notable events, each logged and counted here and nowhere else: the log line
//! for the person at the terminal, the counter for the dashboard.
//!
//! Every error event counts in the core `wattbus_errors_total{service="azure-bridge",kind}`
//! ([`ERROR_KINDS`]); the outbox is the core `wattbus_journal_records` /
//! `wattbus_journal_oldest_seconds{stream="azure-outbox"}`; the bridge's own series are
//! `wattbus_azure_*` (docs/azure-bridge.md).

use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnectReturnCode, SubscribeReasonCode};
use runtime::journal::{Dropped, JournalError, OpenReport};
use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, Gauge, LogLimit, chain};

use crate::config::HubPlan;
use crate::outbox::Stored;

/// azure-bridge's own kinds of `wattbus_errors_total`, besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // The hub refused the device's credentials (CONNACK 4/5) or its client id (2).
    "hub_refused",
    // The connection to the hub failed or was lost (network, TLS, timeouts).
    "hub_connection",
    // Readings dropped because the hub had not taken them within ttl_s: **lost**.
    "expired",
    // Readings dropped from a full outbox (outbox_max_bytes): **lost**.
    "outbox_dropped",
    // The outbox could not take, read or trim a message (a full or failing disk): the
    // readings stay with their producers.
    "outbox",
    // A reading larger than a whole message (max_message_bytes): dead-lettered.
    "too_large",
    // Something the hub sent that the bridge could not use (a bad command, an unknown packet).
    "cloud",
    // A task ended abnormally (a bug).
    "task",
];

/// The outbox's stream name in the core journal metrics.
pub const OUTBOX_STREAM: &str = "azure-outbox";

const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Events {
    core: Core,
    readings_sent: Counter,
    messages_sent: Counter,
    expired: Counter,
    repeats: Counter,
    connected: Gauge,
    outbox_records: Gauge,
    outbox_oldest: Gauge,
    outbox_bytes: Gauge,
    lost_log: LogLimit,
    cloud_log: LogLimit,
}

impl Events {
    pub(crate) fn new() -> Self {
        let core = Core::of(<crate::AzureBridge as runtime::Service>::NAME);
        let (outbox_records, outbox_oldest) = core.journal(OUTBOX_STREAM);
        Self {
            readings_sent: Counter::new(
                "wattbus_azure_readings_sent_total",
                "Readings sent to IoT Hub (a message sent again counts again).",
                &[],
            ),
            messages_sent: Counter::new(
                "wattbus_azure_messages_sent_total",
                "Messages sent to IoT Hub, each billed in 4 KB units.",
                &[],
            ),
            expired: Counter::new(
                "wattbus_azure_expired_readings_total",
                "Readings dropped because IoT Hub had not taken them within ttl_s.",
                &[],
            ),
            repeats: Counter::new(
                "wattbus_azure_repeated_readings_total",
                "Readings a producer sent again that the outbox already held: not sent twice.",
                &[],
            ),
            connected: Gauge::new(
                "wattbus_azure_connected",
                "1 while connected to IoT Hub.",
                &[],
            ),
            outbox_bytes: Gauge::new(
                "wattbus_azure_outbox_bytes",
                "Bytes of the outbox's files: messages IoT Hub has not acknowledged.",
                &[],
            ),
            outbox_records,
            outbox_oldest,
            core,
            lost_log: LogLimit::new(LOG_EVERY),
            cloud_log: LogLimit::new(LOG_EVERY),
        }
    }

    // --- the outbox -----------------------------------------------------------------------

    pub fn outbox_opened(
        &self,
        dir: &std::path::Path,
        report: &OpenReport,
        id_problem: Option<&str>,
    ) {
        if let Some(p) = id_problem {
            self.core.error("outbox").inc();
            tracing::warn!(
                problem = p,
                "The outbox's message-id prefix was not readable: new messages get a new prefix (no id is reused)."
            );
        }
        for d in &report.damaged {
            self.core.error("outbox").inc();
            tracing::error!(dir = %dir.display(), damage = ?d, "Damaged bytes in the outbox were skipped and moved aside: the messages in them are lost.");
        }
        for u in &report.untrusted {
            tracing::error!(file = u.file, reason = %u.reason, action = %u.action, "An outbox state file was not trusted.");
        }
        tracing::info!(dir = %dir.display(), messages = report.records, "Outbox opened.");
    }

    /// The outbox as it stands.
    pub fn outbox(&self, records: u64, bytes: u64) {
        #[allow(clippy::cast_precision_loss)]
        {
            self.outbox_records.set(records as f64);
            self.outbox_bytes.set(bytes as f64);
        }
    }

    pub fn outbox_oldest(&self, age: Duration) {
        self.outbox_oldest.set(age.as_secs_f64());
    }

    pub fn outbox_failed(&self, error: &JournalError) {
        self.core.error("outbox").inc();
        if let Some(skipped) = self.lost_log.allow_key("outbox") {
            tracing::error!(error = %chain(error), skipped, "The outbox failed: the readings stay with their producers and are sent later.");
        }
    }

    pub fn outbox_dropped(&self, d: &Dropped) {
        self.core.error("outbox_dropped").inc();
        tracing::error!(
            messages = d.records,
            first_seq = d.first_seq,
            last_seq = d.last_seq,
            "The outbox is full (outbox_max_bytes): its oldest messages were dropped. Their readings are lost to IoT Hub."
        );
    }

    /// A replayed reading the outbox already holds: acknowledged again, not sent twice.
    pub fn repeat(&self) {
        self.repeats.inc();
    }

    /// A producer's journal numbers from 1 again (recreated): its old numbers are forgotten.
    pub fn renumbered(&self, producer: &str, stream: &str, seq: u64) {
        tracing::warn!(
            producer,
            stream,
            seq,
            "A producer numbers its readings anew (its journal was recreated): its earlier numbers are forgotten, its readings are taken."
        );
    }

    pub fn packed(&self, readings: usize, bytes: usize) {
        tracing::debug!(readings, bytes, "Message packed.");
    }

    pub fn too_large(&self, bytes: usize, max: usize) {
        self.core.error("too_large").inc();
        tracing::error!(
            bytes,
            max,
            "A reading larger than max_message_bytes on its own: dead-lettered."
        );
    }

    // --- the hub --------------------------------------------------------------------------

    pub fn tls_unusable(&self, why: &str) {
        self.core.error("hub_connection").inc();
        tracing::error!(
            problem = why,
            "Cannot set up TLS for IoT Hub: nothing is sent until this is fixed (the readings stay in the outbox)."
        );
    }

    pub fn connected(&self, plan: &HubPlan, session_present: bool, expiry_s: u64) {
        self.connected.set(1.0);
        tracing::info!(host = %plan.host, port = plan.port, device = %plan.device.device_id, session_present, token_expires_s = expiry_s, "Connected to IoT Hub.");
    }

    pub fn token_renewed(&self) {
        self.connected.set(0.0);
        tracing::info!(
            "Reconnecting to IoT Hub with a new SAS token (80 % of the last one's lifetime)."
        );
    }

    pub fn refused(&self, plan: &HubPlan, code: ConnectReturnCode, retry_in: Duration) {
        self.connected.set(0.0);
        self.core.error("hub_refused").inc();
        let what = match code {
            ConnectReturnCode::BadClientId => "the device id",
            _ => "the credentials",
        };
        let retry_in_s = retry_in.as_secs();
        tracing::error!(
            host = %plan.host,
            device = %plan.device.device_id,
            code = ?code,
            retry_in_s,
            "IoT Hub refused {what}. Check: the connection string (HostName, DeviceId and SharedAccessKey as the portal shows them; a regenerated key invalidates the old one), that the device exists and is enabled in the hub, for X.509 that the certificate's thumbprint or CA is registered, and this Pi's clock (a SAS token is valid only until its expiry). Trying again later, not in a loop."
        );
    }

    pub fn connection_lost(&self, plan: &HubPlan, why: &str, retry_in: Duration) {
        self.connected.set(0.0);
        self.core.error("hub_connection").inc();
        let retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
        if let Some(skipped) = self.lost_log.allow_key("connection") {
            tracing::warn!(host = %plan.host, port = plan.port, problem = why, retry_in_ms, skipped, "IoT Hub connection failed; readings wait in the outbox.");
        } else {
            tracing::debug!(
                problem = why,
                retry_in_ms,
                "IoT Hub connection failed again."
            );
        }
    }

    pub fn sent(&self, readings: u64) {
        self.messages_sent.inc();
        self.readings_sent.add(readings);
    }

    pub fn expired(&self, m: &Stored) {
        self.expired.add(m.meta.readings);
        self.core.error("expired").inc();
        tracing::error!(id = %m.id, readings = m.meta.readings, newest_ms = m.meta.newest_ms, "Readings older than ttl_s dropped without reaching IoT Hub: they are lost to it (still in InfluxDB if it runs).");
    }

    pub fn unknown_ack(&self, pkid: u16) {
        tracing::debug!(
            pkid,
            "IoT Hub acknowledged a packet this connection did not send (a repeat)."
        );
    }

    pub fn subscription_refused(&self, codes: &[SubscribeReasonCode]) {
        self.core.error("cloud").inc();
        tracing::error!(codes = ?codes, "IoT Hub refused a subscription: cloud-to-device messages or direct methods will not arrive.");
    }

    pub fn incoming_dropped(&self) {
        self.core.error("cloud").inc();
        if let Some(skipped) = self.cloud_log.allow_key("dropped") {
            tracing::warn!(
                skipped,
                "A message from the cloud arrived while the last ones are still being carried out: not acknowledged, the hub sends it again."
            );
        }
    }

    pub fn unexpected_packet(&self, what: &str) {
        self.core.error("cloud").inc();
        if let Some(skipped) = self.cloud_log.allow_key("packet") {
            tracing::warn!(
                packet = what,
                skipped,
                "IoT Hub sent a packet a device does not expect: ignored."
            );
        }
    }

    pub fn task_failed(&self, task: &str, error: &tokio::task::JoinError) {
        self.core.error("task").inc();
        tracing::error!(task, error = %chain(error), "A task of azure-bridge ended abnormally.");
    }

    // --- the cloud's commands --------------------------------------------------------------

    pub fn bad_cloud_message(&self, what: &str, why: &str) {
        self.core.error("cloud").inc();
        if let Some(skipped) = self.cloud_log.allow_key("bad") {
            tracing::warn!(
                what,
                problem = why,
                skipped,
                "A message from the cloud could not be used."
            );
        }
    }

    pub fn command(&self, from: &str, device: &str, action: &str, id: &str) {
        tracing::info!(from, device, action, id, "Command from the cloud.");
    }
}
