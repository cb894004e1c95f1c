//! The `[serial_ingest]` section and its `[[serial_ingest.ports]]`.
//!
//! A port's settings are read as written ([`PortConfig`], [`ChannelConfig`]) and then resolved
//! into a [`PortPlan`]: defaults applied, every value checked, and only the settings of the
//! port's protocol kept. A setting of another protocol (say `unit` on a `request-response`
//! channel) is an error naming that exact entry, rather than a setting silently ignored.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use proto::Segment;
use runtime::backoff::Backoff;
use runtime::config::{ConfigError, JournalKind, StreamConfig, Variant};
use serde::Deserialize;

use crate::protocol::Calibration;

/// 115200 baud: what the sketches and most USB-serial Arduinos use.
pub const DEFAULT_BAUD: u32 = 115_200;
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 500;
pub const DEFAULT_MAX_SILENT_POLLS: u32 = 5;
pub const DEFAULT_SILENCE_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_SAMPLE_RATE_HZ: f64 = 2000.0;
pub const DEFAULT_FRAME_MS: u64 = 1000;
/// The original PowMon's constants: a 5 V, 10-bit ADC reading an ACS712-30A on 230 V mains.
pub const DEFAULT_CALIBRATION: Calibration = Calibration {
    adc_vref_v: 5.0,
    adc_counts: 1024,
    offset_v: 2.5,
    sensitivity_v_per_a: 0.066,
    supply_v: 230.0,
    max_amps: 10.0,
};
/// Largest frame the bus payload bound accepts per channel (proto's `MAX_SAMPLES`).
const MAX_FRAME_SAMPLES: f64 = 16_384.0;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id and journal name; two instances on one broker need different ones.
    pub instance: Segment,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
    /// Delivery of measurements (`meas/...`): a disk journal, because readings must never be
    /// lost.
    pub meas_stream: StreamConfig,
    /// Delivery of raw sample frames (`raw/...`). In memory by default: frames at kHz rates
    /// would wear an SD card out, and a lost frame costs one second of RMS values, not a
    /// reading the processor cannot recompute later.
    pub raw_stream: StreamConfig,
    /// One entry per serial port (`[[serial_ingest.ports]]`).
    pub ports: Vec<PortConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: seg("serial-ingest"),
            health_listen: Some(([127, 0, 0, 1], 9111).into()),
            meas_stream: StreamConfig::default(),
            // Raw frames exist only for the rms-processor: its group is what they wait for.
            raw_stream: StreamConfig {
                journal: JournalKind::Memory,
                wait_for: vec![seg("rms-processor")],
                ..StreamConfig::default()
            },
            ports: Vec::new(),
        }
    }
}

/// Which wire protocol a port speaks (docs/serial-protocols.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// PowMon: the Pi writes `read \n`, the device answers one line of raw ADC values.
    RequestResponse,
    /// Project Prime: `<seq>:<v>,...*<CS>` lines of samples at a fixed rate.
    Stream,
    /// `key=value` sensor lines whenever the device likes.
    Lines,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::RequestResponse => "request-response",
            Protocol::Stream => "stream",
            Protocol::Lines => "lines",
        }
    }
}

pub use runtime::config::Parity;

/// Unit of a stream channel's samples once multiplied by `scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Amperes.
    A,
    /// Volts.
    V,
    /// Uncalibrated ADC counts (`scale = 1`).
    Adc,
}

impl Unit {
    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::A => "a",
            Unit::V => "v",
            Unit::Adc => "adc",
        }
    }
}

/// One port as written in the file. Settings that belong to one protocol are optional here,
/// so that setting them on a port of another protocol can be refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The device node, e.g. `/dev/ttyUSB0`, or better a stable `/dev/serial/by-id/...` link
    /// (ttyUSB numbers change with the order devices are plugged in); or `tcp://host:port`
    /// for a port behind a serial device server (ser2net raw mode, an ESP-Link).
    pub path: String,
    /// The device name in topics (`meas/<device>/<channel>`); unique across ports.
    pub device: Segment,
    pub protocol: Protocol,
    /// The line of a local port (default 115200 8N1). A `tcp://` port has its line set on
    /// the serial device server, so these are refused there.
    pub baud: Option<u32>,
    pub data_bits: Option<u8>,
    pub parity: Option<Parity>,
    pub stop_bits: Option<u8>,
    /// request-response: one poll this often (default 1000).
    pub poll_interval_ms: Option<u64>,
    /// request-response: an answer later than this is a timeout (default 500).
    pub response_timeout_ms: Option<u64>,
    /// request-response: reopen the port after this many unanswered polls in a row
    /// (default 5): a USB-serial chip that wedged answers again after a reopen.
    pub max_silent_polls: Option<u32>,
    /// stream and lines: reopen the port after this long without a byte (default 5000).
    pub silence_timeout_ms: Option<u64>,
    /// A port that failed is reopened after `reopen_min_ms`, doubling per failure up to
    /// `reopen_max_ms`, with jitter: an unplugged device costs a few opens a minute, not a
    /// busy loop.
    #[serde(default = "default_reopen_min_ms")]
    pub reopen_min_ms: u64,
    #[serde(default = "default_reopen_max_ms")]
    pub reopen_max_ms: u64,
    /// Longest line accepted; a longer one is discarded whole (a wrong baud rate or a
    /// missing newline must not grow memory without bound).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// stream: the device's sampling rate (default 2000); timestamps come from it.
    pub sample_rate_hz: Option<f64>,
    /// stream: length of a published frame (default 1000).
    pub frame_ms: Option<u64>,
    /// The sensors on this port, in the order the device sends them.
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
}

const fn default_reopen_min_ms() -> u64 {
    500
}
const fn default_reopen_max_ms() -> u64 {
    30_000
}
const fn default_max_line_bytes() -> usize {
    4096
}

/// One channel as written. Which keys apply depends on the port's protocol:
///
/// - `request-response`: `name` and the calibration (`adc_vref_v`, `adc_counts`, `offset_v`,
///   `sensitivity_v_per_a`, `supply_v`, `max_amps`).
/// - `stream`: `name`, `unit`, `scale`.
/// - `lines`: `key`, `channel`, `measurement`, `field`, `scale`, `offset`, `min`, `max`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// The channel name in topics (request-response and stream).
    pub name: Option<Segment>,
    /// ADC reference voltage (default 5.0).
    pub adc_vref_v: Option<f64>,
    /// ADC resolution in counts (default 1024: 10 bits); raw values are `0..adc_counts-1`.
    pub adc_counts: Option<u32>,
    /// Sensor output at zero current (default 2.5: half the ACS712's supply).
    pub offset_v: Option<f64>,
    /// Sensor volts per ampere (default 0.066: ACS712-30A; 0.100 for -20A, 0.185 for -5A).
    pub sensitivity_v_per_a: Option<f64>,
    /// Supply voltage of the load, for `power_w` (default 230).
    pub supply_v: Option<f64>,
    /// Beyond this the sensor is saturated: published as read, quality `out_of_range`.
    pub max_amps: Option<f64>,
    /// stream: unit of `sample × scale` (default `adc`).
    pub unit: Option<Unit>,
    /// stream and lines: multiplier applied to each value (default 1).
    pub scale: Option<f64>,
    /// lines: the key on the wire.
    pub key: Option<String>,
    /// lines: the channel name in topics (default: the key).
    pub channel: Option<Segment>,
    /// lines: the measurement name (default `sensor`).
    pub measurement: Option<Segment>,
    /// lines: the field name, lower snake case with its unit (default `value`).
    pub field: Option<String>,
    /// lines: added after `scale` (default 0), e.g. a thermometer's known error.
    pub offset: Option<f64>,
    /// lines: outside `[min, max]` a value is published with quality `out_of_range`.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// A port's settings, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PortPlan {
    pub path: String,
    pub device: Segment,
    pub serial: SerialSettings,
    /// `reopen_min_ms` doubling to `reopen_max_ms`.
    pub reopen: Backoff,
    pub max_line_bytes: usize,
    pub kind: PlanKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialSettings {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PlanKind {
    RequestResponse {
        poll_interval_ms: u64,
        response_timeout_ms: u64,
        max_silent_polls: u32,
        channels: Vec<PowMonChannel>,
    },
    Stream {
        silence_timeout_ms: u64,
        sample_rate_hz: f64,
        frame_ms: u64,
        channels: Vec<StreamChannel>,
    },
    Lines {
        silence_timeout_ms: u64,
        /// Empty: every key is published as channel `<key>`, measurement `sensor`, field
        /// `value`.
        channels: Vec<LineChannel>,
    },
}

impl PlanKind {
    pub const fn protocol(&self) -> Protocol {
        match self {
            PlanKind::RequestResponse { .. } => Protocol::RequestResponse,
            PlanKind::Stream { .. } => Protocol::Stream,
            PlanKind::Lines { .. } => Protocol::Lines,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PowMonChannel {
    pub name: Segment,
    pub calibration: Calibration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamChannel {
    pub name: Segment,
    pub unit: Unit,
    pub scale: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LineChannel {
    pub key: String,
    pub channel: Segment,
    pub measurement: Segment,
    pub field: String,
    pub scale: f64,
    pub offset: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Config {
    /// Every port resolved, or the first problem with its exact key.
    fn port_plans(&self, section: &str) -> Result<Vec<PortPlan>, ConfigError> {
        let mut devices = BTreeSet::new();
        let mut plans = Vec::with_capacity(self.ports.len());
        for (i, port) in self.ports.iter().enumerate() {
            let key = format!("{section}.ports[{i}]");
            let plan = port.plan(&key)?;
            if !devices.insert(plan.device.clone()) {
                return Err(ConfigError::new(
                    format!("{key}.device"),
                    format!(
                        "{:?} is already the device of another port; device names must be unique",
                        plan.device.as_str()
                    ),
                ));
            }
            plans.push(plan);
        }
        Ok(plans)
    }
}

/// The section, checked, with every port resolved: what [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan {
    config: Config,
    ports: Vec<PortPlan>,
}

impl std::ops::Deref for Plan {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl Plan {
    /// Every port, in the order configured.
    pub fn ports(&self) -> &[PortPlan] {
        &self.ports
    }
}

impl Config {
    /// Check the section and resolve every port; errors name the exact key.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        self.meas_stream
            .validate(&format!("{section}.meas_stream"))?;
        self.raw_stream.validate(&format!("{section}.raw_stream"))?;
        let ports = self.port_plans(section)?;
        Ok(Plan {
            config: self,
            ports,
        })
    }
}

fn err(key: &str, leaf: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(format!("{key}.{leaf}"), reason)
}

fn finite_positive(key: &str, leaf: &str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(err(key, leaf, "must be a positive number"))
    }
}

fn finite(key: &str, leaf: &str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(err(key, leaf, "must be a finite number"))
    }
}

/// The key charset of the `lines` protocol: `[A-Za-z0-9._-]{1,64}`.
pub fn is_line_key(key: &str) -> bool {
    (1..=64).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `host:port` of a serial device server: a host name (letters, digits, `.`, `-`, `_`), an
/// IPv4 address or a bracketed IPv6 one, and a port 1-65535 in digits.
fn valid_server(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && !host.starts_with(['-', '.'])
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    port_ok && host_ok
}

impl PortConfig {
    /// Resolve this port (`key` is e.g. `serial_ingest.ports[1]`).
    pub fn plan(&self, key: &str) -> Result<PortPlan, ConfigError> {
        if self.path.trim().is_empty() {
            return Err(err(key, "path", "must not be empty, e.g. \"/dev/ttyUSB0\""));
        }
        if self.path.trim() != self.path {
            return Err(err(key, "path", "has spaces around it"));
        }
        let tcp = self
            .path
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("tcp:"));
        if tcp {
            if crate::port::tcp_address(&self.path).is_none_or(|a| !valid_server(a)) {
                return Err(err(
                    key,
                    "path",
                    "a serial device server is \"tcp://host:port\" (a host name, an IPv4 address or \
                     an [IPv6] one, and a port 1-65535), e.g. \"tcp://192.168.1.50:4001\"",
                ));
            }
            for (leaf, set) in [
                ("baud", self.baud.is_some()),
                ("data_bits", self.data_bits.is_some()),
                ("parity", self.parity.is_some()),
                ("stop_bits", self.stop_bits.is_some()),
            ] {
                if set {
                    return Err(err(
                        key,
                        leaf,
                        "belongs to a local serial port: behind a serial device server (tcp://) the \
                         line is set on the server",
                    ));
                }
            }
        }
        let baud = self.baud.unwrap_or(DEFAULT_BAUD);
        let data_bits = self.data_bits.unwrap_or(8);
        let stop_bits = self.stop_bits.unwrap_or(1);
        if !(50..=4_000_000).contains(&baud) {
            return Err(err(key, "baud", "must be between 50 and 4000000"));
        }
        if !(5..=8).contains(&data_bits) {
            return Err(err(key, "data_bits", "must be 5, 6, 7 or 8"));
        }
        if !(1..=2).contains(&stop_bits) {
            return Err(err(key, "stop_bits", "must be 1 or 2"));
        }
        if self.reopen_min_ms < 10 {
            return Err(err(key, "reopen_min_ms", "must be at least 10"));
        }
        let reopen = Backoff::from_config_ms(
            &format!("{key}.reopen_min_ms"),
            self.reopen_min_ms,
            &format!("{key}.reopen_max_ms"),
            self.reopen_max_ms,
        )?;
        if !(16..=1 << 20).contains(&self.max_line_bytes) {
            return Err(err(key, "max_line_bytes", "must be between 16 and 1048576"));
        }
        let p = self.protocol;
        let protocol = Variant {
            at: key,
            selector: "protocol",
            chosen: p.as_str(),
        };
        const RR: &str = Protocol::RequestResponse.as_str();
        const ST: &str = Protocol::Stream.as_str();
        const LI: &str = Protocol::Lines.as_str();
        let checks: [(&str, bool, &[&str]); 6] = [
            ("poll_interval_ms", self.poll_interval_ms.is_some(), &[RR]),
            (
                "response_timeout_ms",
                self.response_timeout_ms.is_some(),
                &[RR],
            ),
            ("max_silent_polls", self.max_silent_polls.is_some(), &[RR]),
            (
                "silence_timeout_ms",
                self.silence_timeout_ms.is_some(),
                &[ST, LI],
            ),
            ("sample_rate_hz", self.sample_rate_hz.is_some(), &[ST]),
            ("frame_ms", self.frame_ms.is_some(), &[ST]),
        ];
        for (leaf, set, owners) in checks {
            protocol.refuse_unless(leaf, set, owners)?;
        }
        let silence_timeout_ms = self
            .silence_timeout_ms
            .unwrap_or(DEFAULT_SILENCE_TIMEOUT_MS);
        if !(100..=3_600_000).contains(&silence_timeout_ms) {
            return Err(err(
                key,
                "silence_timeout_ms",
                "must be between 100 and 3600000",
            ));
        }
        for (i, c) in self.channels.iter().enumerate() {
            c.check_keys(&format!("channels[{i}]"), &protocol)?;
        }
        let kind = match p {
            Protocol::RequestResponse => self.plan_request_response(key)?,
            Protocol::Stream => self.plan_stream(key, silence_timeout_ms)?,
            Protocol::Lines => self.plan_lines(key, silence_timeout_ms)?,
        };
        Ok(PortPlan {
            path: self.path.clone(),
            device: self.device.clone(),
            serial: SerialSettings {
                baud,
                data_bits,
                parity: self.parity.unwrap_or(Parity::None),
                stop_bits,
            },
            reopen,
            max_line_bytes: self.max_line_bytes,
            kind,
        })
    }

    fn plan_request_response(&self, key: &str) -> Result<PlanKind, ConfigError> {
        let poll_interval_ms = self.poll_interval_ms.unwrap_or(DEFAULT_POLL_INTERVAL_MS);
        if !(10..=3_600_000).contains(&poll_interval_ms) {
            return Err(err(
                key,
                "poll_interval_ms",
                "must be between 10 and 3600000",
            ));
        }
        let response_timeout_ms = self
            .response_timeout_ms
            .unwrap_or(DEFAULT_RESPONSE_TIMEOUT_MS);
        if response_timeout_ms < 5 || response_timeout_ms > poll_interval_ms {
            return Err(err(
                key,
                "response_timeout_ms",
                "must be at least 5 and not above poll_interval_ms (one poll at a time)",
            ));
        }
        let max_silent_polls = self.max_silent_polls.unwrap_or(DEFAULT_MAX_SILENT_POLLS);
        if max_silent_polls == 0 {
            return Err(err(key, "max_silent_polls", "must be at least 1"));
        }
        let mut channels = Vec::new();
        let mut names = BTreeSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let ck = format!("{key}.channels[{i}]");
            let name = c
                .name
                .clone()
                .ok_or_else(|| err(&ck, "name", "is required, e.g. \"ct1\""))?;
            if !names.insert(name.clone()) {
                return Err(err(&ck, "name", "is used by another channel of this port"));
            }
            let d = DEFAULT_CALIBRATION;
            let adc_counts = c.adc_counts.unwrap_or(d.adc_counts);
            if !(2..=1 << 24).contains(&adc_counts) {
                return Err(err(&ck, "adc_counts", "must be between 2 and 16777216"));
            }
            let calibration = Calibration {
                adc_vref_v: finite_positive(
                    &ck,
                    "adc_vref_v",
                    c.adc_vref_v.unwrap_or(d.adc_vref_v),
                )?,
                adc_counts,
                offset_v: finite(&ck, "offset_v", c.offset_v.unwrap_or(d.offset_v))?,
                sensitivity_v_per_a: finite_positive(
                    &ck,
                    "sensitivity_v_per_a",
                    c.sensitivity_v_per_a.unwrap_or(d.sensitivity_v_per_a),
                )?,
                supply_v: finite(&ck, "supply_v", c.supply_v.unwrap_or(d.supply_v))?,
                max_amps: finite_positive(&ck, "max_amps", c.max_amps.unwrap_or(d.max_amps))?,
            };
            channels.push(PowMonChannel { name, calibration });
        }
        if channels.is_empty() {
            channels.push(PowMonChannel {
                name: seg("ct1"),
                calibration: DEFAULT_CALIBRATION,
            });
        }
        Ok(PlanKind::RequestResponse {
            poll_interval_ms,
            response_timeout_ms,
            max_silent_polls,
            channels,
        })
    }

    fn plan_stream(&self, key: &str, silence_timeout_ms: u64) -> Result<PlanKind, ConfigError> {
        let sample_rate_hz = self.sample_rate_hz.unwrap_or(DEFAULT_SAMPLE_RATE_HZ);
        if !(sample_rate_hz.is_finite() && (1.0..=200_000.0).contains(&sample_rate_hz)) {
            return Err(err(key, "sample_rate_hz", "must be between 1 and 200000"));
        }
        let frame_ms = self.frame_ms.unwrap_or(DEFAULT_FRAME_MS);
        let per_frame = sample_rate_hz * frame_ms as f64 / 1000.0;
        if !(10..=60_000).contains(&frame_ms) || !(1.0..=MAX_FRAME_SAMPLES).contains(&per_frame) {
            return Err(err(
                key,
                "frame_ms",
                format!(
                    "must be between 10 and 60000 and hold 1 to {MAX_FRAME_SAMPLES} samples at sample_rate_hz (it holds {per_frame})"
                ),
            ));
        }
        let mut channels = Vec::new();
        let mut names = BTreeSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let ck = format!("{key}.channels[{i}]");
            let name = c
                .name
                .clone()
                .ok_or_else(|| err(&ck, "name", "is required, e.g. \"ct1\""))?;
            if !names.insert(name.clone()) {
                return Err(err(&ck, "name", "is used by another channel of this port"));
            }
            let scale = c.scale.unwrap_or(1.0);
            if !scale.is_finite() || scale == 0.0 {
                return Err(err(&ck, "scale", "must be a finite number other than 0"));
            }
            channels.push(StreamChannel {
                name,
                unit: c.unit.unwrap_or(Unit::Adc),
                scale,
            });
        }
        if channels.is_empty() {
            channels.push(StreamChannel {
                name: seg("ct1"),
                unit: Unit::Adc,
                scale: 1.0,
            });
        }
        Ok(PlanKind::Stream {
            silence_timeout_ms,
            sample_rate_hz,
            frame_ms,
            channels,
        })
    }

    fn plan_lines(&self, key: &str, silence_timeout_ms: u64) -> Result<PlanKind, ConfigError> {
        let mut channels = Vec::new();
        let mut keys = BTreeSet::new();
        let mut targets = BTreeSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let ck = format!("{key}.channels[{i}]");
            let k = c.key.clone().ok_or_else(|| {
                err(
                    &ck,
                    "key",
                    "is required: the key on the wire, e.g. \"fridge\"",
                )
            })?;
            if !is_line_key(&k) {
                return Err(err(
                    &ck,
                    "key",
                    "must be 1 to 64 of letters, digits, '.', '_' and '-'",
                ));
            }
            if !keys.insert(k.clone()) {
                return Err(err(&ck, "key", "is mapped by another channel of this port"));
            }
            let channel = match &c.channel {
                Some(s) => s.clone(),
                // The key charset is the segment charset, so this cannot fail; say so if it does.
                None => Segment::new(k.as_str())
                    .map_err(|e| err(&ck, "key", format!("is not a valid channel name: {e}")))?,
            };
            let field = c.field.clone().unwrap_or_else(|| "value".into());
            if proto::check_field_name(&field).is_err() {
                return Err(err(
                    &ck,
                    "field",
                    format!(
                        "{field:?} must be lower snake case ([a-z][a-z0-9_]*, at most 64), with its unit, e.g. \"temperature_c\""
                    ),
                ));
            }
            let measurement = c.measurement.clone().unwrap_or_else(|| seg("sensor"));
            if !targets.insert((channel.clone(), measurement.clone(), field.clone())) {
                return Err(err(
                    &ck,
                    "field",
                    "another key of this port already fills this channel, measurement and field",
                ));
            }
            let scale = finite(&ck, "scale", c.scale.unwrap_or(1.0))?;
            let offset = finite(&ck, "offset", c.offset.unwrap_or(0.0))?;
            let min = c.min.map(|v| finite(&ck, "min", v)).transpose()?;
            let max = c.max.map(|v| finite(&ck, "max", v)).transpose()?;
            if let (Some(lo), Some(hi)) = (min, max)
                && lo > hi
            {
                return Err(err(&ck, "min", "must not be above max"));
            }
            channels.push(LineChannel {
                key: k,
                channel,
                measurement,
                field,
                scale,
                offset,
                min,
                max,
            });
        }
        Ok(PlanKind::Lines {
            silence_timeout_ms,
            channels,
        })
    }
}

impl ChannelConfig {
    /// Refuses keys of another protocol; `at` is the channel's key under its port
    /// (`channels[0]`), since the port holds the protocol.
    fn check_keys(&self, at: &str, protocol: &Variant<'_>) -> Result<(), ConfigError> {
        const RR: &str = Protocol::RequestResponse.as_str();
        const ST: &str = Protocol::Stream.as_str();
        const LI: &str = Protocol::Lines.as_str();
        let checks: [(&str, bool, &[&str]); 16] = [
            ("name", self.name.is_some(), &[RR, ST]),
            ("adc_vref_v", self.adc_vref_v.is_some(), &[RR]),
            ("adc_counts", self.adc_counts.is_some(), &[RR]),
            ("offset_v", self.offset_v.is_some(), &[RR]),
            (
                "sensitivity_v_per_a",
                self.sensitivity_v_per_a.is_some(),
                &[RR],
            ),
            ("supply_v", self.supply_v.is_some(), &[RR]),
            ("max_amps", self.max_amps.is_some(), &[RR]),
            ("unit", self.unit.is_some(), &[ST]),
            ("scale", self.scale.is_some(), &[ST, LI]),
            ("key", self.key.is_some(), &[LI]),
            ("channel", self.channel.is_some(), &[LI]),
            ("measurement", self.measurement.is_some(), &[LI]),
            ("field", self.field.is_some(), &[LI]),
            ("offset", self.offset.is_some(), &[LI]),
            ("min", self.min.is_some(), &[LI]),
            ("max", self.max.is_some(), &[LI]),
        ];
        for (leaf, set, owners) in checks {
            protocol.refuse_unless(&format!("{at}.{leaf}"), set, owners)?;
        }
        Ok(())
    }
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Plan, ConfigError> {
        let src = runtime::ConfigSource::from_parts(None, Some(toml_text))?;
        src.resolve::<crate::SerialIngest>()
    }

    #[test]
    fn defaults_give_one_channel_per_protocol_with_powmon_constants() {
        let c = parse(
            r#"
[[serial_ingest.ports]]
path = "/dev/ttyUSB0"
device = "powmon"
protocol = "request-response"

[[serial_ingest.ports]]
path = "/dev/ttyACM0"
device = "prime"
protocol = "stream"
"#,
        )
        .unwrap();
        assert_eq!(c.raw_stream.journal, JournalKind::Memory);
        assert_eq!(c.meas_stream.journal, JournalKind::Disk);
        let plans = c.ports().to_vec();
        assert_eq!(plans[0].serial.baud, 115_200);
        match &plans[0].kind {
            PlanKind::RequestResponse {
                poll_interval_ms,
                response_timeout_ms,
                max_silent_polls,
                channels,
            } => {
                assert_eq!(
                    (*poll_interval_ms, *response_timeout_ms, *max_silent_polls),
                    (1000, 500, 5)
                );
                assert_eq!(channels.len(), 1);
                assert_eq!(channels[0].name.as_str(), "ct1");
                assert_eq!(channels[0].calibration, DEFAULT_CALIBRATION);
            }
            other => panic!("{other:?}"),
        }
        match &plans[1].kind {
            PlanKind::Stream {
                sample_rate_hz,
                frame_ms,
                channels,
                ..
            } => {
                assert_eq!((*sample_rate_hz, *frame_ms), (2000.0, 1000));
                assert_eq!(
                    channels,
                    &[StreamChannel {
                        name: seg("ct1"),
                        unit: Unit::Adc,
                        scale: 1.0
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_field_name_is_refused_with_its_exact_key() {
        let e = parse(
            r#"
[[serial_ingest.ports]]
path = "/dev/ttyUSB0"
device = "a"
protocol = "lines"

[[serial_ingest.ports]]
path = "/dev/ttyUSB1"
device = "b"
protocol = "lines"
channels = [{ key = "t1", field = "Temperature" }]
"#,
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[1].channels[0].field");
        assert!(e.reason.contains("lower snake case"), "{e}");
    }

    #[test]
    fn duplicate_devices_across_ports_are_refused() {
        let e = parse(
            r#"
[[serial_ingest.ports]]
path = "/dev/ttyUSB0"
device = "meter"
protocol = "lines"

[[serial_ingest.ports]]
path = "/dev/ttyUSB1"
device = "meter"
protocol = "stream"
"#,
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[1].device");
        assert!(e.reason.contains("unique"), "{e}");
    }

    #[test]
    fn a_setting_of_another_protocol_is_refused_not_ignored() {
        let e = parse(
            r#"
[[serial_ingest.ports]]
path = "/dev/ttyUSB0"
device = "powmon"
protocol = "request-response"
channels = [{ name = "ct1", unit = "a" }]
"#,
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[0].channels[0].unit");
        assert_eq!(
            e.reason,
            "belongs to protocol = \"stream\"; serial_ingest.ports[0].protocol is \"request-response\""
        );
        let e = parse(
            r#"
[[serial_ingest.ports]]
path = "/dev/ttyUSB0"
device = "prime"
protocol = "stream"
poll_interval_ms = 200
"#,
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[0].poll_interval_ms");
        assert_eq!(
            e.reason,
            "belongs to protocol = \"request-response\"; serial_ingest.ports[0].protocol is \"stream\""
        );
    }

    #[test]
    fn serial_settings_and_unknown_keys_are_checked() {
        for (line, key) in [
            ("data_bits = 9", "serial_ingest.ports[0].data_bits"),
            ("stop_bits = 3", "serial_ingest.ports[0].stop_bits"),
            ("parity = \"mark\"", "serial_ingest.ports[0].parity"),
            ("bauds = 9600", "serial_ingest.ports[0].bauds"),
            ("reopen_min_ms = 5", "serial_ingest.ports[0].reopen_min_ms"),
            (
                "reopen_min_ms = 60000",
                "serial_ingest.ports[0].reopen_max_ms",
            ),
        ] {
            let text = format!(
                "[[serial_ingest.ports]]\npath = \"/dev/x\"\ndevice = \"d\"\nprotocol = \"lines\"\n{line}\n"
            );
            let e = parse(&text).unwrap_err();
            // Type errors come from figment, which writes the index as `ports.0`.
            let figment_key = key.replace("ports[0]", "ports.0");
            assert!(
                e.key.starts_with(key) || e.key.starts_with(&figment_key),
                "{line}: {e}"
            );
        }
        // Every entry is named by its place in the list, down to a stream channel's scale.
        let e = parse(
            "[[serial_ingest.ports]]\npath = \"/dev/x\"\ndevice = \"d\"\nprotocol = \"stream\"\nchannels = [{ name = \"i\", unit = \"a\", scale = 0.0 }]\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[0].channels[0].scale");
    }

    #[test]
    fn a_serial_device_server_is_tcp_host_and_port() {
        let port = |path: &str| {
            parse(&format!(
                "[[serial_ingest.ports]]\npath = \"{path}\"\ndevice = \"d\"\nprotocol = \"lines\"\n"
            ))
        };
        for good in [
            "tcp://192.168.1.50:4001",
            "tcp://simulator:4005",
            "tcp://[::1]:23",
            "tcp://serial_sim:4001",
        ] {
            assert!(port(good).is_ok(), "{good}");
        }
        for bad in [
            "tcp://",
            "tcp://host",
            "tcp://:4001",
            "tcp://host:0",
            "tcp://host:99999",
            "tcp://h/x:1",
        ] {
            let e = port(bad).unwrap_err();
            assert_eq!(e.key, "serial_ingest.ports[0].path", "{bad}");
            assert!(e.to_string().contains("tcp://host:port"), "{bad}: {e}");
        }
        assert_eq!(
            port(" tcp://h:1").unwrap_err().key,
            "serial_ingest.ports[0].path"
        );
        // The line is the server's: setting it here is refused, not ignored.
        let e = parse(
            "[[serial_ingest.ports]]\npath = \"tcp://h:1\"\ndevice = \"d\"\nprotocol = \"lines\"\nbaud = 9600\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[0].baud");
        assert!(e.to_string().contains("set on the server"), "{e}");
    }

    #[test]
    fn a_frame_too_long_for_the_bus_is_refused() {
        let e = parse(
            "[[serial_ingest.ports]]\npath = \"/dev/x\"\ndevice = \"d\"\nprotocol = \"stream\"\nsample_rate_hz = 20000\nframe_ms = 1000\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "serial_ingest.ports[0].frame_ms");
    }

    #[test]
    fn lines_channels_default_to_their_key() {
        let c = parse(
            "[[serial_ingest.ports]]\npath = \"/dev/x\"\ndevice = \"d\"\nprotocol = \"lines\"\nchannels = [{ key = \"t1\", measurement = \"temperature\", field = \"temperature_c\", min = -40.0, max = 85.0 }]\n",
        )
        .unwrap();
        let plans = c.ports().to_vec();
        let PlanKind::Lines { channels, .. } = &plans[0].kind else {
            panic!("{:?}", plans[0].kind)
        };
        assert_eq!(channels[0].channel.as_str(), "t1");
        assert_eq!(channels[0].scale, 1.0);
        assert_eq!(channels[0].offset, 0.0);
        assert_eq!(
            (channels[0].min, channels[0].max),
            (Some(-40.0), Some(85.0))
        );
    }
}
