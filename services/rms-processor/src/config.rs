//! The `[rms_processor]` section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use proto::Segment;
use runtime::config::{ConfigError, InboxConfig, StreamConfig};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id, journal and state name; two processors need different ones.
    pub instance: Segment,
    /// Sink group on the raw frames, registered on every connection (and the name
    /// serial-ingest's `raw_stream.wait_for` lists by default).
    /// Instances that share the work keep the same group.
    pub group: Segment,
    /// The devices this instance processes; empty = every device. Two instances share the
    /// work by listing disjoint devices, so every device's windows and energy counters live
    /// in exactly one place (see docs/rms-processor.md, "Two instances").
    pub devices: Vec<Segment>,
    /// Mains frequency: sizes the first DC estimate and the cycle search (50 or 60).
    pub mains_hz: f64,
    /// One measurement per channel per interval.
    pub interval_ms: u64,
    /// Without a paired voltage channel, apparent power is `Irms × nominal_voltage_v` and is
    /// labelled so (tag `power_basis = nominal_voltage`).
    pub nominal_voltage_v: f64,
    /// How often the energy counters are saved (with the readings since the last time), the
    /// readings journaled and the input acknowledged. Shorter wears the SD card more; longer
    /// makes readings leave later and the producer keep more frames. Must stay well under the
    /// producer's `ack_timeout_ms` (10 s by default).
    pub checkpoint_interval_ms: u64,
    /// A device that sent nothing for this long has its held samples closed as a partial
    /// window, rather than kept until it comes back.
    pub idle_flush_ms: u64,
    /// Frames after a hole that a replay will fill (a frame lost in transport, or the frames
    /// behind the saved mark after a restart) wait this long for it: above the producer's
    /// `ack_timeout_ms` (10 s by default), when it publishes unacknowledged frames again.
    pub reorder_ms: u64,
    /// A frame whose last sample is stamped more than this after this host's clock is
    /// dead-lettered, not used. Samples move the device's mark forward and samples behind the
    /// mark are skipped as already counted, so one frame dated in the future (2098, say)
    /// would otherwise silence its device until that date. serial-ingest stamps frames within
    /// 50 ms of its own clock; the margin is for a producer on another host.
    pub max_ahead_ms: u64,
    /// Energy counters and marks; default `<data_dir>/rms-processor/<instance>/energy.json`.
    pub energy_file: Option<PathBuf>,
    pub channels: Vec<RmsChannelConfig>,
    /// Delivery of the measurements (`meas` stream).
    pub stream: StreamConfig,
    pub inbox: InboxConfig,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
}

/// Calibration of one channel of one device. Channels not listed use scale 1 and no
/// voltage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmsChannelConfig {
    pub device: Segment,
    pub channel: Segment,
    /// Amps (or volts, for a voltage channel) per sample unit, applied after the producer's
    /// own scale: the place to correct a CT's ratio or a burden resistor's tolerance.
    #[serde(default = "one")]
    pub scale: f64,
    /// The voltage channel of the same device to pair with: enables real power and power
    /// factor.
    #[serde(default)]
    pub voltage: Option<Segment>,
    /// Voltage shift in samples (-1..=1; positive delays the voltage), correcting the phase
    /// error of the sensors and of sampling channels one after the other.
    #[serde(default)]
    pub phase_shift: f32,
    /// Overrides the section's `nominal_voltage_v` for this channel.
    #[serde(default)]
    pub nominal_voltage_v: Option<f64>,
}

/// Largest `max_ahead_ms`: a year. Frames dated further ahead are a clock or unit mistake
/// whatever the set-up.
const MAX_AHEAD_LIMIT_MS: u64 = 365 * 24 * 3600 * 1000;

const fn one() -> f64 {
    1.0
}

impl Default for Config {
    fn default() -> Self {
        let name = Segment::new("rms-processor").unwrap_or_else(|_| unreachable!("valid literal"));
        Self {
            instance: name.clone(),
            group: name,
            devices: Vec::new(),
            mains_hz: 50.0,
            interval_ms: 1000,
            nominal_voltage_v: 230.0,
            checkpoint_interval_ms: 2000,
            idle_flush_ms: 5000,
            reorder_ms: 15_000,
            max_ahead_ms: 60_000,
            energy_file: None,
            channels: Vec::new(),
            stream: StreamConfig::default(),
            inbox: InboxConfig::default(),
            health_listen: Some(([127, 0, 0, 1], 9112).into()),
        }
    }
}

impl Config {
    pub fn energy_path(&self, data_dir: &Path) -> PathBuf {
        self.energy_file.clone().unwrap_or_else(|| {
            data_dir
                .join("rms-processor")
                .join(self.instance.as_str())
                .join("energy.json")
        })
    }

    pub fn channel(&self, device: &str, channel: &str) -> Option<&RmsChannelConfig> {
        self.channels
            .iter()
            .find(|c| c.device.as_str() == device && c.channel.as_str() == channel)
    }

    /// Does this instance process `device`?
    pub fn handles(&self, device: &str) -> bool {
        self.devices.is_empty() || self.devices.iter().any(|d| d.as_str() == device)
    }
}

/// The section, checked: what [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan(Config);

impl std::ops::Deref for Plan {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

impl Config {
    /// Check the section; errors name `section.key`.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        self.check(section)?;
        Ok(Plan(self))
    }

    fn check(&self, section: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        if !(40.0..=70.0).contains(&self.mains_hz) {
            return Err(ConfigError::new(
                key("mains_hz"),
                format!("is {}; mains is 50 or 60 Hz", self.mains_hz),
            ));
        }
        if !(100..=60_000).contains(&self.interval_ms) {
            return Err(ConfigError::new(
                key("interval_ms"),
                "must be between 100 and 60000",
            ));
        }
        if !(self.nominal_voltage_v.is_finite() && self.nominal_voltage_v > 0.0) {
            return Err(ConfigError::new(
                key("nominal_voltage_v"),
                "must be a positive number of volts",
            ));
        }
        if !(100..=60_000).contains(&self.checkpoint_interval_ms) {
            return Err(ConfigError::new(
                key("checkpoint_interval_ms"),
                "must be between 100 and 60000",
            ));
        }
        if self.idle_flush_ms < 100 {
            return Err(ConfigError::new(
                key("idle_flush_ms"),
                "must be at least 100",
            ));
        }
        if !(1_000..=MAX_AHEAD_LIMIT_MS).contains(&self.max_ahead_ms) {
            return Err(ConfigError::new(
                key("max_ahead_ms"),
                "must be between 1000 and 31536000000 (a year)",
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices[..i].contains(d) {
                return Err(ConfigError::new(
                    format!("{section}.devices[{i}]"),
                    format!("{d} is listed twice"),
                ));
            }
        }
        for (i, c) in self.channels.iter().enumerate() {
            let k = |f: &str| format!("{section}.channels[{i}].{f}");
            if self.channels[..i]
                .iter()
                .any(|o| o.device == c.device && o.channel == c.channel)
            {
                return Err(ConfigError::new(
                    k("channel"),
                    format!("{}/{} is configured twice", c.device, c.channel),
                ));
            }
            if !(c.scale.is_finite() && c.scale != 0.0) {
                return Err(ConfigError::new(
                    k("scale"),
                    "must be a finite, non-zero number",
                ));
            }
            if !(-1.0..=1.0).contains(&c.phase_shift) {
                return Err(ConfigError::new(
                    k("phase_shift"),
                    "must be between -1 and 1 (samples)",
                ));
            }
            if c.voltage.as_ref() == Some(&c.channel) {
                return Err(ConfigError::new(
                    k("voltage"),
                    "a channel cannot be its own voltage",
                ));
            }
            if let Some(v) = c.nominal_voltage_v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(ConfigError::new(
                    k("nominal_voltage_v"),
                    "must be a positive number of volts",
                ));
            }
            if !self.handles(c.device.as_str()) {
                return Err(ConfigError::new(
                    k("device"),
                    format!(
                        "{} is not in `devices`, so this instance never sees it",
                        c.device
                    ),
                ));
            }
        }
        self.stream.validate(&key("stream"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::ConfigSource;

    fn load(text: &str) -> Result<Plan, ConfigError> {
        ConfigSource::from_parts(None, Some(text))?.resolve::<crate::RmsProcessor>()
    }

    #[test]
    fn a_full_section_parses() {
        let c = load(
            r#"
[rms_processor]
devices = ["prime-1"]
mains_hz = 60
[[rms_processor.channels]]
device = "prime-1"
channel = "ct1"
scale = 0.0293
voltage = "v1"
phase_shift = 0.4
"#,
        )
        .unwrap();
        assert_eq!(c.mains_hz, 60.0);
        let ch = c.channel("prime-1", "ct1").unwrap();
        assert_eq!(ch.voltage.as_ref().map(Segment::as_str), Some("v1"));
        assert_eq!(ch.nominal_voltage_v, None);
    }

    #[test]
    fn errors_name_the_entry_and_the_reason() {
        let e = load("[rms_processor]\nmains_hz = 500\n").unwrap_err();
        assert_eq!(e.key, "rms_processor.mains_hz");
        let e = load(
            "[rms_processor]\n[[rms_processor.channels]]\ndevice = \"d\"\nchannel = \"c\"\nphase_shift = 3\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "rms_processor.channels[0].phase_shift");
        let e = load(
            "[rms_processor]\ndevices = [\"a\"]\n[[rms_processor.channels]]\ndevice = \"b\"\nchannel = \"c\"\n",
        )
        .unwrap_err();
        assert!(e.reason.contains("not in `devices`"), "{e}");
        let e =
            load("[rms_processor]\n[[rms_processor.channels]]\ndevice = \"d\"\nchanel = \"c\"\n")
                .unwrap_err();
        assert!(e.reason.contains("unknown field"), "{e}");
    }
}
