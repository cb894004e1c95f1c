//! The `[simulator]` section.

use proto::Segment;
use runtime::config::{ConfigError, StreamConfig};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id and journal name; two simulators on one broker need different ones.
    pub instance: Segment,
    /// How many simulated households (one meter each).
    pub devices: u32,
    /// Device names are `<prefix>-1`, `<prefix>-2`, …
    pub device_prefix: String,
    /// One reading per device per interval, like a meter polled every second.
    pub interval_ms: u64,
    /// Delivery settings of the `meas` stream.
    pub stream: StreamConfig,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Simulated hardware for modbus-ingest and serial-ingest over TCP; absent: none.
    pub hardware: Option<crate::hardware::HardwareConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: Segment::new("simulator").unwrap_or_else(|_| unreachable!("valid literal")),
            devices: 1,
            device_prefix: "sim-meter".into(),
            interval_ms: 1000,
            stream: StreamConfig::default(),
            health_listen: Some(([127, 0, 0, 1], 9109).into()),
            hardware: None,
        }
    }
}

/// The section, checked: what [`crate::run`] takes.
#[derive(Debug, Clone, PartialEq)]
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
        if !(1..=1000).contains(&self.devices) {
            return Err(ConfigError::new(
                format!("{section}.devices"),
                "must be between 1 and 1000",
            ));
        }
        if let Err(e) = Segment::new(format!("{}-{}", self.device_prefix, self.devices)) {
            return Err(ConfigError::new(
                format!("{section}.device_prefix"),
                format!("does not make a valid device name: {e}"),
            ));
        }
        if self.interval_ms < 10 {
            return Err(ConfigError::new(
                format!("{section}.interval_ms"),
                "must be at least 10",
            ));
        }
        if let Some(h) = &self.hardware {
            h.check(&format!("{section}.hardware"))?;
        }
        self.stream.validate(&format!("{section}.stream"))
    }
}
