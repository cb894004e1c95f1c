//! Payloads: what travels on each topic.
//!
//! Rules every payload follows:
//! - Units are in field names (`ts_ms`, `power_w`, `sample_rate_hz`).
//! - Timestamps are the moment a value was read at the device, in Unix time.
//! - Decoding validates: a payload that parses but makes no sense (NaN, a timestamp in 1970, a
//!   site with a `/`) is rejected with a message a person can act on, so a sink never stores it.
//! - Unknown fields are ignored, so a newer producer can add a field without breaking an older
//!   consumer within `v1`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::topic::{Kind, ReadingId, Segment, Topic, check_filter, parse};

/// Largest payload any wattbus consumer decodes. Raw sample frames are the big ones: 3 channels
/// × 4096 samples of JSON floats fit comfortably.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Readings stamped before 2000-01-01 come from a device whose clock was never set (a Pi
/// without an RTC before NTP). Storing them would put them fifty years in the past.
const MIN_TS_MS: i64 = 946_684_800_000;
/// 2100-01-01: anything later is a unit mistake (µs or ns given as ms).
const MAX_TS_MS: i64 = 4_102_444_800_000;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is {0} bytes; at most {MAX_PAYLOAD_BYTES} are accepted")]
    TooLarge(usize),
    #[error("payload is not valid {kind} JSON: {source}")]
    Json {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// Why a payload could not be encoded (it failed validation: we never publish what we would
/// refuse to decode).
#[derive(Debug, thiserror::Error)]
#[error("refusing to encode invalid {kind}: {reason}")]
pub struct EncodeError {
    pub kind: &'static str,
    pub reason: String,
}

/// A payload type: JSON on the wire, validated both ways.
pub trait Payload: Serialize + DeserializeOwned + JsonSchema + Sized {
    /// Name of the type in schemas, logs and `wattbus tail`.
    const NAME: &'static str;

    /// Semantic checks that serde cannot express.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.validate().map_err(|reason| EncodeError {
            kind: Self::NAME,
            reason,
        })?;
        serde_json::to_vec(self).map_err(|e| EncodeError {
            kind: Self::NAME,
            reason: e.to_string(),
        })
    }

    /// Whether this payload belongs on `topic`: a payload that names a site or device (or
    /// channel) must name the one its topic names. The broker decides who may publish on a
    /// topic; this makes the topic the only identity that counts, so a producer allowed on
    /// one device's topic cannot store readings under another's name, and a producer bug that
    /// mislabels a reading is caught before it is stored. Payloads that name no identity
    /// accept every topic.
    fn check_topic(&self, _topic: &str) -> Result<(), String> {
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        // Only the object form. serde also reads a struct from an array of its fields in
        // order, which `Origin::claimed` (and so the broker's check of who may claim an
        // origin) does not see as one: a forged origin in an array got past the broker, and
        // a sink acknowledged another producer's readings for it.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(DecodeError::Invalid {
                kind: Self::NAME,
                reason: "not a JSON object".into(),
            });
        }
        let value: Self = serde_json::from_slice(bytes).map_err(|source| DecodeError::Json {
            kind: Self::NAME,
            source,
        })?;
        value.validate().map_err(|reason| DecodeError::Invalid {
            kind: Self::NAME,
            reason,
        })?;
        Ok(value)
    }
}

/// Where a journaled message came from: the producer instance, its stream and the message's
/// sequence number in that stream. Sinks acknowledge by these numbers (see
/// docs/ARCHITECTURE.md, "Delivery contract").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Origin {
    /// The producing instance, e.g. `modbus-ingest` (its MQTT client id).
    pub producer: Segment,
    /// The producer's stream, e.g. `meas` or `raw`.
    pub stream: Segment,
    /// Strictly increasing within the stream, across restarts. Gaps are allowed.
    pub seq: u64,
    /// The journal's own random id, made when the journal is created: a journal recreated
    /// (its directory or volume lost) numbers from 1 again under a new epoch, so a sink that
    /// remembers what it stored by origin (azure-bridge) does not take its new readings for
    /// replays of old ones. Absent from producers older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Segment>,
}

impl Origin {
    /// The origin `payload` claims, if it has a readable one, whether or not the rest of it
    /// is a valid message: what a sink acknowledges for it (a malformed journaled message is
    /// acknowledged once dead-lettered, invariant 13). The broker reads it the same way, to
    /// refuse a publisher that claims another producer's origin: the sink would acknowledge
    /// that producer's sequence numbers, and the producer delete readings no sink stored.
    ///
    /// Whenever a whole message decodes with an origin, this returns that origin: both read
    /// only a JSON object (`Payload::decode` refuses the array form serde would also take),
    /// the same key with the same type, and a repeated `origin` key fails both.
    pub fn claimed(payload: &[u8]) -> Option<Origin> {
        #[derive(Deserialize)]
        struct OnlyOrigin {
            origin: Origin,
        }
        serde_json::from_slice::<OnlyOrigin>(payload)
            .ok()
            .map(|o| o.origin)
    }
}

/// A payload that goes through a producer's journal and is acknowledged by sinks.
pub trait Sequenced: Payload {
    fn origin(&self) -> Option<&Origin>;
    fn set_origin(&mut self, origin: Origin);
}

/// Quality of a reading. A value is always published with its quality rather than replaced or
/// dropped: a saturated sensor shows up as `out_of_range`, not as a silent zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Good,
    /// Outside what the sensor or meter can plausibly report.
    OutOfRange,
    /// Repeated from an earlier read because the device did not answer in time.
    Stale,
    /// The device answered with an error; fields hold what could still be read.
    Error,
}

impl Quality {
    /// The name used on the wire (and as an InfluxDB tag value).
    pub const fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::OutOfRange => "out_of_range",
            Quality::Stale => "stale",
            Quality::Error => "error",
        }
    }
}

/// One reading of one channel of one device: becomes one InfluxDB point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Measurement {
    /// Set by the producer's journal; absent only on a message that bypassed the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    pub site: Segment,
    pub device: Segment,
    pub channel: Segment,
    /// What is measured, e.g. `power` or `temperature`: the InfluxDB measurement name.
    pub measurement: Segment,
    /// When the value was read at the device (Unix ms).
    pub ts_ms: i64,
    pub quality: Quality,
    /// Values with the unit in the name: `power_w`, `current_a`, `energy_wh`, `temperature_c`.
    pub fields: BTreeMap<String, f64>,
    /// Extra identity for InfluxDB tags (e.g. `phase = "l1"`, `tariff = "t1"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<Segment, Segment>,
}

impl Measurement {
    /// A reading of `id`: its site, device and channel are `id`'s, and so is its
    /// [`topic`](Self::topic). No origin (the producer's journal sets it) and no tags (set
    /// them with `Measurement { tags, ..Measurement::new(..) }`).
    pub fn new(
        id: ReadingId,
        measurement: Segment,
        ts_ms: i64,
        quality: Quality,
        fields: BTreeMap<String, f64>,
    ) -> Self {
        let ReadingId {
            site,
            device,
            channel,
        } = id;
        Self {
            origin: None,
            site,
            device,
            channel,
            measurement,
            ts_ms,
            quality,
            fields,
            tags: BTreeMap::new(),
        }
    }

    /// The topic this reading belongs on, built from the identity it names: what a producer
    /// publishes it on, so the topic and the payload always name the same device (the check
    /// every sink makes, [`Payload::check_topic`]).
    pub fn topic(&self) -> Topic<Measurement> {
        Topic::measurement(&self.site, &self.device, &self.channel)
    }
}

/// Most fields a measurement may carry; a meter profile with more splits them over channels.
const MAX_FIELDS: usize = 64;

/// Most tags a measurement may carry: a few say a reading's identity (`tariff`, `phase`),
/// and every sink repeats them on every row or point.
pub const MAX_TAGS: usize = 32;

/// Names no tag or field of a measurement may have: every sink stores the reading's own
/// identity under the first four, and InfluxDB its timestamp under `time`. A tag of such a
/// name was dropped (InfluxDB kept one of several readings that differ only by it); a field
/// of such a name made InfluxDB's `WHERE device = '…'` and `quality = 'good'` find nothing, for
/// every reading after it, and a field `time` is silently dropped.
pub const RESERVED_NAMES: [&str; 5] = ["site", "device", "channel", "quality", "time"];

/// The measurement services' statuses are stored as (influx-writer, from
/// `wattbus/v1/<site>/status/+`, which only a service's own user may publish). No reading may
/// name it: a producer could otherwise report another service up, or down, on a reading
/// topic the broker lets it publish.
pub const SERVICE_MEASUREMENT: &str = "service";

fn check_ts_ms(name: &str, ts: i64) -> Result<(), String> {
    if (MIN_TS_MS..MAX_TS_MS).contains(&ts) {
        Ok(())
    } else {
        Err(format!(
            "{name} = {ts} is not a plausible Unix time in milliseconds (2000..2100); \
             is the clock set, and is the unit ms?"
        ))
    }
}

/// Field names are lower snake case and end in a unit, so they read the same in JSON, in
/// InfluxDB and in Grafana. Public so that a service checks the field names of its config or
/// profiles at start-up by the very rule a measurement is checked by when published, and a
/// name it accepts is never refused later, reading after reading.
pub fn check_field_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "field name {name:?} must be lower snake case ([a-z][a-z0-9_]*, ≤64)"
        ))
    }
}

/// The `format` of every [`ReadingBatch`].
pub const READING_BATCH_FORMAT: &str = "wattbus.readings.v1";

/// Readings as influx-writer's HTTP output POSTs them (`[influx_writer.http]`,
/// docs/http-output.md). Not a bus message. With `one_per_request` the body is one
/// [`Measurement`] instead.
///
/// A reading may arrive more than once (a retry after a lost answer, a replay after a
/// restart); a receiver keeps one per site, device, channel, measurement and `ts_ms` (or per
/// `origin`, which names the producer's journal record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReadingBatch {
    /// Always `wattbus.readings.v1`.
    pub format: String,
    /// The site every reading is of.
    pub site: Segment,
    /// In the order the writer received them; at most `max_readings`.
    pub readings: Vec<Measurement>,
}

impl Payload for ReadingBatch {
    const NAME: &'static str = "reading_batch";

    fn validate(&self) -> Result<(), String> {
        if self.format != READING_BATCH_FORMAT {
            return Err(format!(
                "format is {:?}, not {READING_BATCH_FORMAT:?}",
                self.format
            ));
        }
        for (i, m) in self.readings.iter().enumerate() {
            m.validate().map_err(|e| format!("readings[{i}]: {e}"))?;
            if m.site != self.site {
                return Err(format!(
                    "readings[{i}] is of site {}, the batch of {}",
                    m.site, self.site
                ));
            }
        }
        Ok(())
    }
}

impl Payload for Measurement {
    const NAME: &'static str = "measurement";

    fn validate(&self) -> Result<(), String> {
        check_ts_ms("ts_ms", self.ts_ms)?;
        if self.measurement.as_str() == SERVICE_MEASUREMENT {
            return Err(format!(
                "measurement {SERVICE_MEASUREMENT:?} is reserved for services' statuses"
            ));
        }
        if self.fields.is_empty() {
            return Err("fields must not be empty".into());
        }
        if self.fields.len() > MAX_FIELDS {
            return Err(format!(
                "{} fields; at most {MAX_FIELDS}",
                self.fields.len()
            ));
        }
        for (name, value) in &self.fields {
            check_field_name(name)?;
            if RESERVED_NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "field {name} is reserved (site, device, channel, quality and time are the reading's own)"
                ));
            }
            if !value.is_finite() {
                return Err(format!(
                    "field {name} is {value}; only finite numbers are stored"
                ));
            }
        }
        if self.tags.len() > MAX_TAGS {
            return Err(format!("{} tags; at most {MAX_TAGS}", self.tags.len()));
        }
        if let Some(k) = self
            .tags
            .keys()
            .find(|k| RESERVED_NAMES.contains(&k.as_str()))
        {
            return Err(format!(
                "tag {k} is reserved (site, device, channel, quality and time are the reading's own)"
            ));
        }
        Ok(())
    }

    /// The site, device and channel must be the topic's.
    ///
    /// ```
    /// use proto::{Measurement, Payload, Topic, Segment};
    /// let seg = |s: &str| Segment::new(s).unwrap();
    /// let m: Measurement = serde_json::from_str(
    ///     r#"{"site":"home","device":"ct-2","channel":"main","measurement":"power",
    ///         "ts_ms":1764000000000,"quality":"good","fields":{"power_w":5.0}}"#,
    /// ).unwrap();
    /// let own = Topic::measurement(&seg("home"), &seg("ct-2"), &seg("main"));
    /// assert!(m.check_topic(own.as_str()).is_ok());
    /// let other = Topic::measurement(&seg("home"), &seg("ct-1"), &seg("main"));
    /// let why = m.check_topic(other.as_str()).unwrap_err();
    /// assert!(why.contains(r#"device "ct-2" (topic: "ct-1")"#), "{why}");
    /// ```
    fn check_topic(&self, topic: &str) -> Result<(), String> {
        check_identity(
            topic,
            Kind::Measurement,
            &[
                ("site", &self.site),
                ("device", &self.device),
                ("channel", &self.channel),
            ],
        )
    }
}

/// Compare the identity a payload names with the one its topic names: `Err` lists every
/// difference, in words a person can act on.
fn check_identity(topic: &str, kind: Kind, named: &[(&str, &Segment)]) -> Result<(), String> {
    let shape = || match kind {
        Kind::Raw => "wattbus/v1/<site>/raw/<device>",
        _ => "wattbus/v1/<site>/meas/<device>/<channel>",
    };
    let Some(parsed) = parse(topic).filter(|p| p.kind == kind) else {
        return Err(format!(
            "the topic {topic:?} is not of the form {}, so it cannot carry this payload",
            shape()
        ));
    };
    let on_topic = std::iter::once(&parsed.site).chain(&parsed.rest);
    let differ: Vec<String> = named
        .iter()
        .zip(on_topic)
        .filter(|((_, payload), topic)| payload != topic)
        .map(|((what, payload), topic)| format!("{what} {payload:?} (topic: {topic:?})"))
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the payload names {} but arrived on {topic}; a reading is stored only under the \
             identity of its topic",
            differ.join(", ")
        ))
    }
}

impl Sequenced for Measurement {
    fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }
    fn set_origin(&mut self, origin: Origin) {
        self.origin = Some(origin);
    }
}

/// A block of consecutive raw samples from a streaming device (e.g. a current transformer
/// sampled at 2 kHz), for `rms-processor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RawFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    pub site: Segment,
    pub device: Segment,
    /// When the first sample of the frame was taken (Unix µs).
    pub start_ts_us: i64,
    pub sample_rate_hz: f64,
    /// All channels hold the same number of samples, taken at the same instants.
    pub channels: Vec<RawChannel>,
    /// The first sample directly follows the last sample of the device's previous frame: no
    /// sample was lost at the device in between. A consumer that sees a hole before such a
    /// frame knows the missing frame was lost in transport and will be replayed; before a
    /// frame with `false` (the start of a run: a lost line, a reopened port) a hole is real.
    #[serde(default)]
    pub continues: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RawChannel {
    pub channel: Segment,
    /// Unit of the samples: `a`, `v`, or `adc` (uncalibrated counts).
    pub unit: Segment,
    pub samples: Vec<f32>,
}

impl RawFrame {
    /// The topic this frame belongs on, built from the site and device it names: what a
    /// producer publishes it on, so the two cannot differ (a processor labels what it
    /// computes from a frame with the frame's device, and refuses a frame whose topic names
    /// another).
    pub fn topic(&self) -> Topic<RawFrame> {
        Topic::raw(&self.site, &self.device)
    }
}

/// Most samples per channel in one frame (a 1 MiB payload bound holds several channels).
const MAX_SAMPLES: usize = 16_384;

impl Payload for RawFrame {
    const NAME: &'static str = "raw_frame";

    fn validate(&self) -> Result<(), String> {
        check_ts_ms("start_ts_us / 1000", self.start_ts_us.div_euclid(1000))?;
        if !(self.sample_rate_hz.is_finite() && self.sample_rate_hz > 0.0) {
            return Err(format!(
                "sample_rate_hz = {} must be a positive number",
                self.sample_rate_hz
            ));
        }
        let Some(first) = self.channels.first() else {
            return Err("channels must not be empty".into());
        };
        let n = first.samples.len();
        if n == 0 || n > MAX_SAMPLES {
            return Err(format!(
                "{n} samples per channel; 1..={MAX_SAMPLES} allowed"
            ));
        }
        for c in &self.channels {
            if c.samples.len() != n {
                return Err(format!(
                    "channel {} has {} samples, channel {} has {n}; all must match",
                    c.channel,
                    c.samples.len(),
                    first.channel
                ));
            }
            if let Some(i) = c.samples.iter().position(|s| !s.is_finite()) {
                return Err(format!(
                    "channel {} sample {i} is not a finite number",
                    c.channel
                ));
            }
        }
        Ok(())
    }

    /// The site and device must be the topic's: a processor labels what it computes from a
    /// frame with the frame's device.
    fn check_topic(&self, topic: &str) -> Result<(), String> {
        check_identity(
            topic,
            Kind::Raw,
            &[("site", &self.site), ("device", &self.device)],
        )
    }
}

impl Sequenced for RawFrame {
    fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }
    fn set_origin(&mut self, origin: Origin) {
        self.origin = Some(origin);
    }
}

/// What a command asks a device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    On,
    Off,
    Toggle,
}

/// A request to a device, e.g. "switch plug `kettle` off" from a Grafana button.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Command {
    /// Chosen by the requester; the result carries it back.
    pub id: Segment,
    pub device: Segment,
    pub action: Action,
    pub issued_ts_ms: i64,
    /// A command not carried out by then is dropped: a plug must not switch minutes late
    /// because the bus was down.
    pub expires_ts_ms: i64,
}

impl Payload for Command {
    const NAME: &'static str = "command";

    fn validate(&self) -> Result<(), String> {
        check_ts_ms("issued_ts_ms", self.issued_ts_ms)?;
        check_ts_ms("expires_ts_ms", self.expires_ts_ms)?;
        if self.expires_ts_ms < self.issued_ts_ms {
            return Err("expires_ts_ms is before issued_ts_ms".into());
        }
        Ok(())
    }
}

/// The outcome of a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandResult {
    pub id: Segment,
    pub device: Segment,
    pub ok: bool,
    /// The relay state the device reported afterwards, if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_on: Option<bool>,
    /// Why it failed, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub ts_ms: i64,
}

impl Payload for CommandResult {
    const NAME: &'static str = "command_result";

    fn validate(&self) -> Result<(), String> {
        check_ts_ms("ts_ms", self.ts_ms)?;
        check_len("message", self.message.as_deref().unwrap_or(""), 4096)
    }
}

fn check_len(name: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        Err(format!("{name} is {} bytes; at most {max}", s.len()))
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    Online,
    /// Published by the broker as the service's last will when its connection drops, or by
    /// the service itself on a clean shutdown.
    Offline,
}

/// A service's liveness, retained so a newcomer sees who is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Status {
    pub service: Segment,
    pub instance: Segment,
    pub state: ServiceState,
    pub version: String,
    /// When the status was set. An `offline` published as the last will carries the time the
    /// connection was made (a will is fixed at CONNECT), not the time it dropped.
    pub ts_ms: i64,
    /// The service's core metrics at `ts_ms` (docs/metrics.md), on the status a running
    /// service publishes every [`STATUS_INTERVAL_S`] seconds: how its health reaches InfluxDB
    /// and Grafana without a scraper. Absent from `offline` and from older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ServiceHealth>,
}

/// How often a running service publishes its [`Status`] with its [`ServiceHealth`].
pub const STATUS_INTERVAL_S: u64 = 10;

/// A service's core metrics (docs/metrics.md), summed over its streams and error kinds.
/// Counters count from the service's start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceHealth {
    /// Seconds since the service started.
    pub uptime_s: u64,
    /// `wattbus_messages_received_total`.
    pub received: u64,
    /// `wattbus_messages_sent_total`.
    pub sent: u64,
    /// `wattbus_errors_total`, every kind.
    pub errors: u64,
    /// `wattbus_dead_letters_total`.
    pub dead_letters: u64,
    /// `wattbus_replayed_records_total`, every stream and sink group.
    pub replayed: u64,
    /// `wattbus_journal_records`, every journal: records not yet acknowledged by every sink.
    pub journal_records: u64,
    /// `wattbus_journal_oldest_seconds`, the oldest of every journal (0 when all are empty).
    pub journal_oldest_s: u64,
}

impl ServiceHealth {
    /// As reading fields (`up` = 1, the rest by name), for storage next to readings.
    pub fn fields(&self) -> BTreeMap<String, f64> {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^53
        let f = |v: u64| v as f64;
        [
            ("up", 1.0),
            ("uptime_s", f(self.uptime_s)),
            ("received", f(self.received)),
            ("sent", f(self.sent)),
            ("errors", f(self.errors)),
            ("dead_letters", f(self.dead_letters)),
            ("replayed", f(self.replayed)),
            ("journal_records", f(self.journal_records)),
            ("journal_oldest_s", f(self.journal_oldest_s)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Payload for Status {
    const NAME: &'static str = "status";

    fn validate(&self) -> Result<(), String> {
        check_ts_ms("ts_ms", self.ts_ms)?;
        check_len("version", &self.version, 64)
    }
}

/// Most ranges in one acknowledgement; a sink with more sends several.
pub const MAX_ACK_RANGES: usize = 512;

/// A sink's acknowledgement: these sequence numbers of one producer stream are durably stored
/// (or, from a processor, their outputs are journaled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ack {
    /// The acknowledging sink group, e.g. `influx-writer`.
    pub sink: Segment,
    /// Inclusive `[first, last]` ranges, ascending, not overlapping.
    pub ranges: Vec<[u64; 2]>,
    pub ts_ms: i64,
}

impl Payload for Ack {
    const NAME: &'static str = "ack";

    fn validate(&self) -> Result<(), String> {
        // `ts_ms` is informational: a sink whose clock is not set yet must still be able to
        // acknowledge, so it is not checked.
        if self.ranges.is_empty() || self.ranges.len() > MAX_ACK_RANGES {
            return Err(format!(
                "{} ranges; 1..={MAX_ACK_RANGES} allowed",
                self.ranges.len()
            ));
        }
        let mut prev_last: Option<u64> = None;
        for [first, last] in &self.ranges {
            if first > last {
                return Err(format!("range [{first}, {last}] is reversed"));
            }
            if prev_last.is_some_and(|p| *first <= p) {
                return Err(format!(
                    "range [{first}, {last}] overlaps or is out of order"
                ));
            }
            prev_last = Some(*last);
        }
        Ok(())
    }
}

/// Most filters one sink group registers; a group that consumes more is misconfigured.
pub const MAX_SINK_FILTERS: usize = 64;

/// A sink group's registration, retained on `wattbus/v1/<site>/sink/<group>`: the topic filters
/// it consumes. Every member publishes it on each connection; producers whose stream overlaps
/// one of the filters wait for the group's acknowledgements before trimming (see
/// docs/ARCHITECTURE.md, "Sink registration").
///
/// A registration with no filters withdraws the group (`wattbus sinks forget`): producers stop
/// waiting for it. It stays retained, so a producer that was stopped at the time forgets the
/// group too when it next connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SinkRegistration {
    /// The sink group, repeated from the topic (a mismatch is refused).
    pub group: Segment,
    /// The plain (not `$share/...`) MQTT filters the group subscribes, e.g.
    /// `wattbus/v1/+/meas/+/+`. Empty: the group is withdrawn.
    #[schemars(length(max = 64))]
    pub filters: Vec<String>,
    /// When it was published; informational (a sink whose clock is not set yet must still be
    /// able to register, so it is not checked).
    pub ts_ms: i64,
}

impl SinkRegistration {
    /// The registration that withdraws `group`.
    pub fn withdrawn(group: Segment) -> Self {
        Self {
            group,
            filters: Vec::new(),
            ts_ms: now_ms(),
        }
    }

    /// Whether this registration withdraws its group.
    pub fn is_withdrawn(&self) -> bool {
        self.filters.is_empty()
    }
}

impl Payload for SinkRegistration {
    const NAME: &'static str = "sink_registration";

    fn validate(&self) -> Result<(), String> {
        if self.filters.len() > MAX_SINK_FILTERS {
            return Err(format!(
                "{} filters; at most {MAX_SINK_FILTERS}",
                self.filters.len()
            ));
        }
        self.filters.iter().try_for_each(|f| check_filter(f))
    }
}

/// A message a service could not use, kept for a person to inspect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    pub service: Segment,
    /// What was wrong, as the service saw it (e.g. InfluxDB's error message).
    pub reason: String,
    /// Topic the message arrived on.
    pub topic: String,
    /// The message itself as text (lossy UTF-8, cut at 64 KiB).
    pub payload: String,
    pub ts_ms: i64,
}

/// Longest dead-letter payload kept.
const MAX_DEAD_PAYLOAD: usize = 64 * 1024;

impl DeadLetter {
    /// Build a dead letter, cutting the payload to a size a person can still read.
    pub fn new(service: Segment, reason: impl Into<String>, topic: &str, payload: &[u8]) -> Self {
        let cut = &payload[..payload.len().min(MAX_DEAD_PAYLOAD)];
        let mut text = String::from_utf8_lossy(cut).into_owned();
        if text.len() > MAX_DEAD_PAYLOAD {
            // Lossy replacement characters can grow the text; cut on a char boundary.
            let mut end = MAX_DEAD_PAYLOAD;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let mut reason = reason.into();
        if reason.len() > 4096 {
            let mut end = 4096;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Self {
            service,
            reason,
            topic: topic.chars().take(1024).collect(),
            payload: text,
            ts_ms: now_ms(),
        }
    }
}

impl Payload for DeadLetter {
    const NAME: &'static str = "dead_letter";

    fn validate(&self) -> Result<(), String> {
        check_ts_ms("ts_ms", self.ts_ms)?;
        check_len("payload", &self.payload, MAX_DEAD_PAYLOAD)?;
        check_len("reason", &self.reason, 4096)?;
        check_len("topic", &self.topic, 4096)
    }
}

/// Now, in Unix milliseconds. A clock before 1970 reads as 0 (and then fails validation).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Topic;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    const TS: i64 = 1_764_000_000_000;

    fn measurement() -> Measurement {
        Measurement {
            origin: Some(Origin {
                producer: seg("modbus-ingest"),
                stream: seg("meas"),
                seq: 42,
                epoch: None,
            }),
            site: seg("home"),
            device: seg("we515-1"),
            channel: seg("main"),
            measurement: seg("power"),
            ts_ms: TS,
            quality: Quality::Good,
            fields: [
                ("power_w".to_string(), -1234.5),
                ("voltage_v".to_string(), 231.2),
            ]
            .into(),
            tags: [(seg("tariff"), seg("t1"))].into(),
        }
    }

    fn round_trip<T: Payload + PartialEq + std::fmt::Debug>(v: &T) {
        let bytes = v.encode().unwrap();
        assert_eq!(&T::decode(&bytes).unwrap(), v);
    }

    #[test]
    fn every_payload_round_trips() {
        round_trip(&measurement());
        round_trip(&RawFrame {
            origin: None,
            site: seg("home"),
            device: seg("prime-1"),
            start_ts_us: TS * 1000 + 17,
            sample_rate_hz: 2000.0,
            continues: true,
            channels: vec![RawChannel {
                channel: seg("ct1"),
                unit: seg("a"),
                samples: vec![0.5, -0.25, 1e-3],
            }],
        });
        round_trip(&Command {
            id: seg("c1"),
            device: seg("kettle"),
            action: Action::Toggle,
            issued_ts_ms: TS,
            expires_ts_ms: TS + 5000,
        });
        round_trip(&CommandResult {
            id: seg("c1"),
            device: seg("kettle"),
            ok: false,
            relay_on: Some(true),
            message: Some("plug answered 500".into()),
            ts_ms: TS,
        });
        round_trip(&Status {
            service: seg("broker"),
            instance: seg("broker"),
            state: ServiceState::Offline,
            version: "0.1.0".into(),
            ts_ms: TS,
            health: None,
        });
        round_trip(&Status {
            service: seg("serial-ingest"),
            instance: seg("serial-ingest-2"),
            state: ServiceState::Online,
            version: "0.1.0".into(),
            ts_ms: TS,
            health: Some(ServiceHealth {
                uptime_s: 3600,
                sent: 7200,
                journal_records: 2,
                ..ServiceHealth::default()
            }),
        });
        round_trip(&Ack {
            sink: seg("influx-writer"),
            ranges: vec![[1, 10], [12, 12]],
            ts_ms: TS,
        });
        round_trip(&SinkRegistration {
            group: seg("influx-writer"),
            filters: vec![
                "wattbus/v1/+/meas/+/+".into(),
                "wattbus/v1/home/raw/#".into(),
            ],
            ts_ms: TS,
        });
        round_trip(&SinkRegistration::withdrawn(seg("influx-writer")));
        let mut dl = DeadLetter::new(seg("influx-writer"), "400: bad", "t", b"\xff\xfeabc");
        dl.ts_ms = TS;
        round_trip(&dl);
    }

    #[test]
    fn quality_names_match_the_wire() {
        for q in [
            Quality::Good,
            Quality::OutOfRange,
            Quality::Stale,
            Quality::Error,
        ] {
            assert_eq!(serde_json::to_value(q).unwrap(), q.as_str());
        }
    }

    /// A tag named like the reading's own identity is dropped or clashes in every sink
    /// (InfluxDB kept one of four readings that differed only by a `device` tag).
    #[test]
    fn reserved_tag_names_and_too_many_tags_are_refused() {
        let seg = |s: &str| Segment::new(s).unwrap();
        for reserved in RESERVED_NAMES {
            let mut m = measurement();
            m.tags.insert(seg(reserved), seg("sub-a"));
            let err = Measurement::decode(&serde_json::to_vec(&m).unwrap()).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("tag {reserved} is reserved")),
                "{err}"
            );
            // As a field, such a name blanked InfluxDB's tag queries for every reading.
            let mut m = measurement();
            m.fields.insert(reserved.to_string(), 1.0);
            let err = Measurement::decode(&serde_json::to_vec(&m).unwrap()).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("field {reserved} is reserved")),
                "{err}"
            );
        }
        let mut m = measurement();
        m.tags = (0..=MAX_TAGS)
            .map(|i| (seg(&format!("t{i}")), seg("v")))
            .collect();
        let err = Measurement::decode(&serde_json::to_vec(&m).unwrap()).unwrap_err();
        assert!(err.to_string().contains("at most 32"), "{err}");
        m.tags.pop_last();
        assert!(Measurement::decode(&serde_json::to_vec(&m).unwrap()).is_ok());
    }

    /// A reading named like a service's status would be stored as that service's health: a
    /// producer allowed to publish readings could report another service up (silencing its
    /// alert) or down. It does not decode, so every sink dead-letters it.
    #[test]
    fn no_reading_may_be_a_service_status() {
        let mut m = measurement();
        m.measurement = Segment::new(SERVICE_MEASUREMENT).unwrap();
        m.fields = BTreeMap::from([("up".to_string(), 1.0)]);
        let err = Measurement::decode(&serde_json::to_vec(&m).unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("reserved for services' statuses"),
            "{err}"
        );
    }

    /// serde reads a struct from an array of its fields too. A measurement in that form,
    /// claiming another producer's origin, decoded at the sink while `Origin::claimed` (the
    /// broker's check) saw no origin: the sink acknowledged another producer's readings.
    #[test]
    fn only_the_object_form_decodes_and_claimed_agrees_with_decode() {
        let array = br#"[{"producer":"simulator","stream":"meas","seq":7},"home","evil-1","x","power",1764000000000,"good",{"power_w":4242.0},{}]"#;
        let err = Measurement::decode(array).unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
        assert_eq!(Origin::claimed(array), None);
        let m = measurement();
        let bytes = m.encode().unwrap();
        let decoded = Measurement::decode(&bytes).unwrap();
        assert_eq!(Origin::claimed(&bytes).as_ref(), decoded.origin.as_ref());
        // Leading whitespace is still an object.
        let mut spaced = b" \n".to_vec();
        spaced.extend_from_slice(&bytes);
        assert!(Measurement::decode(&spaced).is_ok());
    }

    #[test]
    fn measurement_json_reads_like_the_docs() {
        let json: serde_json::Value =
            serde_json::from_slice(&measurement().encode().unwrap()).unwrap();
        assert_eq!(json["fields"]["power_w"], -1234.5);
        assert_eq!(json["quality"], "good");
        assert_eq!(json["origin"]["seq"], 42);
        assert_eq!(json["ts_ms"], TS);
    }

    fn decode_err<T: Payload>(json: &str) -> String {
        match T::decode(json.as_bytes()) {
            Ok(_) => panic!("accepted {json}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn malformed_and_hostile_measurements_are_rejected_with_a_reason() {
        let good = serde_json::to_value(measurement()).unwrap();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            v.to_string()
        };
        let e = decode_err::<Measurement>(&with(&|v| v["ts_ms"] = 5.into()));
        assert!(e.contains("ts_ms = 5"), "{e}");
        let e = decode_err::<Measurement>(&with(&|v| v["ts_ms"] = (TS * 1000).into()));
        assert!(e.contains("is the unit ms"), "{e}");
        let e = decode_err::<Measurement>(&with(&|v| v["site"] = "a/b".into()));
        assert!(e.contains("'/'"), "{e}");
        let e = decode_err::<Measurement>(&with(&|v| v["device"] = "+".into()));
        assert!(e.contains("'+'"), "{e}");
        let e = decode_err::<Measurement>(&with(&|v| v["fields"] = serde_json::json!({})));
        assert!(e.contains("fields must not be empty"), "{e}");
        let e =
            decode_err::<Measurement>(&with(&|v| v["fields"] = serde_json::json!({"Power W": 1})));
        assert!(e.contains("lower snake case"), "{e}");
        let e =
            decode_err::<Measurement>(&with(&|v| v["fields"]["power_w"] = serde_json::Value::Null));
        assert!(e.contains("not valid measurement JSON"), "{e}");
        let e = decode_err::<Measurement>(&with(&|v| v["quality"] = "excellent".into()));
        assert!(e.contains("unknown variant"), "{e}");
        // Not JSON at all, truncated, wrong type, deeply nested, huge.
        decode_err::<Measurement>("\u{0}\u{1}garbage");
        decode_err::<Measurement>(&good.to_string()[..40]);
        decode_err::<Measurement>("[1,2,3]");
        decode_err::<Measurement>(&format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)));
        let huge = format!("\"{}\"", "x".repeat(MAX_PAYLOAD_BYTES + 1));
        assert!(decode_err::<Measurement>(&huge).contains("at most"));
    }

    #[test]
    fn non_finite_values_are_refused_on_both_sides() {
        let mut m = measurement();
        m.fields.insert("power_w".into(), f64::NAN);
        assert!(
            m.encode()
                .unwrap_err()
                .to_string()
                .contains("only finite numbers")
        );
        m.fields.insert("power_w".into(), f64::INFINITY);
        assert!(m.encode().is_err());
        // JSON has no NaN; text that tries is a syntax error.
        let text = serde_json::to_string(&measurement())
            .unwrap()
            .replace("-1234.5", "NaN");
        assert!(Measurement::decode(text.as_bytes()).is_err());
    }

    #[test]
    fn raw_frames_with_ragged_or_empty_channels_are_rejected() {
        let frame = RawFrame {
            origin: None,
            site: seg("home"),
            device: seg("prime-1"),
            start_ts_us: TS * 1000,
            sample_rate_hz: 2000.0,
            continues: false,
            channels: vec![
                RawChannel {
                    channel: seg("a"),
                    unit: seg("a"),
                    samples: vec![1.0, 2.0],
                },
                RawChannel {
                    channel: seg("b"),
                    unit: seg("a"),
                    samples: vec![1.0],
                },
            ],
        };
        assert!(
            frame
                .encode()
                .unwrap_err()
                .to_string()
                .contains("all must match")
        );
        let mut f2 = frame.clone();
        f2.channels.clear();
        assert!(f2.encode().is_err());
        let mut f3 = frame;
        f3.sample_rate_hz = 0.0;
        assert!(f3.encode().is_err());
    }

    #[test]
    fn acks_must_be_ordered_disjoint_ranges() {
        for ranges in [
            vec![],
            vec![[5, 4]],
            vec![[1, 5], [5, 6]],
            vec![[7, 8], [1, 2]],
        ] {
            let a = Ack {
                sink: seg("s"),
                ranges: ranges.clone(),
                ts_ms: TS,
            };
            assert!(a.encode().is_err(), "{ranges:?}");
        }
    }

    #[test]
    fn a_payload_belongs_only_on_the_topic_of_its_own_identity() {
        let m = measurement();
        let own = Topic::measurement(&seg("home"), &seg("we515-1"), &seg("main"));
        assert_eq!(m.check_topic(own.as_str()), Ok(()));
        for (site, device, channel, names) in [
            ("away", "we515-1", "main", "site \"home\" (topic: \"away\")"),
            (
                "home",
                "we515-2",
                "main",
                "device \"we515-1\" (topic: \"we515-2\")",
            ),
            ("home", "we515-1", "l1", "channel \"main\" (topic: \"l1\")"),
        ] {
            let topic = Topic::measurement(&seg(site), &seg(device), &seg(channel));
            let why = m.check_topic(topic.as_str()).unwrap_err();
            assert!(why.contains(names), "{why}");
            assert!(why.contains(topic.as_str()), "{why}");
        }
        // Every difference is named at once.
        let topic = Topic::measurement(&seg("x"), &seg("y"), &seg("main"));
        let why = m.check_topic(topic.as_str()).unwrap_err();
        assert!(why.contains("site") && why.contains("device"), "{why}");
        // A topic of another kind, or none at all, carries no measurement.
        for topic in [
            Topic::raw(&seg("home"), &seg("we515-1"))
                .as_str()
                .to_string(),
            "wattbus/v1/home/meas/we515-1/main/extra".to_string(),
            "wattbus/v1/home/meas/we 515/main".to_string(),
            "elsewhere/home/meas/we515-1/main".to_string(),
        ] {
            let why = m.check_topic(&topic).unwrap_err();
            assert!(why.contains("is not of the form"), "{topic}: {why}");
        }
    }

    #[test]
    fn a_raw_frame_belongs_only_on_its_own_devices_topic() {
        let frame = RawFrame {
            origin: None,
            site: seg("home"),
            device: seg("ct-2"),
            start_ts_us: TS * 1000,
            sample_rate_hz: 2000.0,
            continues: false,
            channels: vec![RawChannel {
                channel: seg("a"),
                unit: seg("a"),
                samples: vec![1.0],
            }],
        };
        assert_eq!(
            frame.check_topic(Topic::raw(&seg("home"), &seg("ct-2")).as_str()),
            Ok(())
        );
        let why = frame
            .check_topic(Topic::raw(&seg("home"), &seg("ct-1")).as_str())
            .unwrap_err();
        assert!(why.contains("device \"ct-2\" (topic: \"ct-1\")"), "{why}");
        // Payloads without an identity accept any topic.
        let ack = Ack {
            sink: seg("s"),
            ranges: vec![[1, 1]],
            ts_ms: TS,
        };
        assert_eq!(ack.check_topic("anything"), Ok(()));
    }

    /// The constructor writes the identity once: the reading names it, its topic is built
    /// from it, and what a sink checks on arrival (decode, topic, claimed origin) agrees.
    #[test]
    fn a_reading_built_from_an_identity_names_it_in_its_topic_and_its_payload() {
        let id = ReadingId::new(seg("home"), seg("we515-1"), seg("main"));
        let fields: BTreeMap<String, f64> = [
            ("power_w".to_string(), -1234.5),
            ("voltage_v".to_string(), 231.2),
        ]
        .into();
        let mut m = Measurement {
            tags: [(seg("tariff"), seg("t1"))].into(),
            ..Measurement::new(id.clone(), seg("power"), TS, Quality::Good, fields)
        };
        assert_eq!(m.topic().as_str(), "wattbus/v1/home/meas/we515-1/main");
        assert_eq!(m.topic().as_str(), id.topic().as_str());
        assert_eq!(
            (&m.site, &m.device, &m.channel),
            (&id.site, &id.device, &id.channel)
        );
        let parsed = parse(m.topic().as_str()).unwrap();
        assert_eq!(
            (parsed.site, parsed.kind, parsed.rest),
            (
                seg("home"),
                Kind::Measurement,
                vec![seg("we515-1"), seg("main")]
            )
        );
        // As the journal sends it: with an origin. The wire form is the one a reading built
        // field by field had, byte for byte.
        m.set_origin(Origin {
            producer: seg("modbus-ingest"),
            stream: seg("meas"),
            seq: 42,
            epoch: None,
        });
        let bytes = m.encode().unwrap();
        assert_eq!(bytes, measurement().encode().unwrap());
        let got = Measurement::decode(&bytes).unwrap();
        assert_eq!(got, m);
        assert_eq!(got.check_topic(m.topic().as_str()), Ok(()));
        assert_eq!(Origin::claimed(&bytes).as_ref(), got.origin.as_ref());
        // A reading of another device is refused on this identity's topic, and its own topic
        // is that device's.
        let other = Measurement::new(
            ReadingId::new(seg("home"), seg("we515-2"), seg("main")),
            seg("power"),
            TS,
            Quality::Good,
            [("power_w".to_string(), 1.0)].into(),
        );
        let why = other.check_topic(id.topic().as_str()).unwrap_err();
        assert!(
            why.contains("device \"we515-2\" (topic: \"we515-1\")"),
            "{why}"
        );
        assert_eq!(other.topic().as_str(), "wattbus/v1/home/meas/we515-2/main");
        assert_eq!(other.origin, None);
        assert!(other.tags.is_empty());
    }

    #[test]
    fn a_raw_frame_is_published_on_the_topic_of_its_own_device() {
        let frame = RawFrame {
            origin: None,
            site: seg("home"),
            device: seg("ct-2"),
            start_ts_us: TS * 1000,
            sample_rate_hz: 2000.0,
            continues: false,
            channels: vec![RawChannel {
                channel: seg("a"),
                unit: seg("a"),
                samples: vec![1.0],
            }],
        };
        assert_eq!(frame.topic().as_str(), "wattbus/v1/home/raw/ct-2");
        let got = RawFrame::decode(&frame.encode().unwrap()).unwrap();
        assert_eq!(got.check_topic(frame.topic().as_str()), Ok(()));
        let mut moved = frame.clone();
        moved.device = seg("ct-1");
        assert!(got.check_topic(moved.topic().as_str()).is_err());
    }

    /// Services check their configured field names with this at start-up; a name it accepts
    /// must never be refused when a reading carries it.
    #[test]
    fn the_field_name_check_is_the_one_measurements_are_decoded_by() {
        for good in ["power_w", "energy_import_wh", "t1_c", &"a".repeat(64)] {
            assert_eq!(check_field_name(good), Ok(()), "{good}");
            let mut m = measurement();
            m.fields = [(good.to_string(), 1.0)].into();
            assert!(Measurement::decode(&m.encode().unwrap()).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Power",
            "power W",
            "1st_w",
            "_w",
            "power-w",
            &"a".repeat(65),
        ] {
            let why = check_field_name(bad).unwrap_err();
            assert!(why.contains("lower snake case"), "{bad:?}: {why}");
            let mut m = measurement();
            m.fields = [(bad.to_string(), 1.0)].into();
            assert!(m.encode().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sink_registrations_refuse_malformed_filters() {
        for bad in [
            "",
            "wattbus/v1/#/meas",
            "$share/g/wattbus/v1/+/meas/+/+",
            "wattbus/v1/ho me/meas/+/+",
            "wattbus//meas",
            "wattbus/v1/h#/meas",
        ] {
            let e = decode_err::<SinkRegistration>(
                &serde_json::json!({"group": "g", "filters": [bad], "ts_ms": TS}).to_string(),
            );
            assert!(e.contains("invalid sink_registration"), "{bad:?}: {e}");
        }
        let many: Vec<String> = (0..=MAX_SINK_FILTERS)
            .map(|i| format!("wattbus/v1/s{i}/meas/+/+"))
            .collect();
        let e = decode_err::<SinkRegistration>(
            &serde_json::json!({"group": "g", "filters": many, "ts_ms": TS}).to_string(),
        );
        assert!(e.contains("at most 64"), "{e}");
        let e = decode_err::<SinkRegistration>(r#"{"group":"a/b","filters":[],"ts_ms":0}"#);
        assert!(e.contains("'/'"), "{e}");
    }

    #[test]
    fn dead_letters_keep_hostile_payloads_readable_and_bounded() {
        let big = vec![0xffu8; 200_000];
        let dl = DeadLetter::new(seg("w"), "r".repeat(10_000), "t", &big);
        assert!(dl.payload.len() <= MAX_DEAD_PAYLOAD);
        assert!(dl.reason.len() <= 4096);
        assert!(dl.encode().is_ok());
    }
}
