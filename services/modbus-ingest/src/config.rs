//! The `[modbus_ingest]` section: buses, their transports and the devices on them.
//!
//! [`Config::resolve`] turns the parsed section into the [`Plan`] that [`crate::run`] runs,
//! once: every bus's [`Link`] and line timing settled, every device's profile found (built-in
//! or from `profiles_dir`), its poll classes merged with the device's overrides, and its
//! request plan limits settled. `validate` (and so `wattbus config check`) calls the same
//! resolver, so what the check accepts is exactly what runs.
//!
//! Every error names the key and the entry (`modbus_ingest.buses[0].devices[1].profile`), so a
//! person can fix the file in one look. A key the bus's transport does not use (`host` on an
//! `rtu` bus, `baud` on a `tcp` one) is refused, not ignored: see [`runtime::config::Variant`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::Segment;
use runtime::backoff::Backoff;
use runtime::config::{ConfigError, StreamConfig, Variant};
use serde::Deserialize;

use crate::link::{Link, Parity};
use crate::plan::{Limits, MAX_READ_REGISTERS};
use crate::profile::{Profile, Profiles, load_dir};
use crate::timing::{Framing, Line};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id and journal name; two modbus-ingest processes need different ones.
    pub instance: Segment,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
    /// User profiles (`*.toml`); a file there replaces the built-in profile of its model.
    pub profiles_dir: Option<PathBuf>,
    /// How often bus and device health (`modbus_bus`, `modbus_device`) is published.
    pub health_interval_ms: u64,
    /// Delivery of the readings (`meas` stream): a disk journal, so readings survive a broker
    /// outage and a restart.
    pub stream: StreamConfig,
    pub buses: Vec<BusSection>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: Segment::new("modbus-ingest")
                .unwrap_or_else(|_| unreachable!("valid literal")),
            health_listen: Some(([127, 0, 0, 1], 9113).into()),
            profiles_dir: None,
            health_interval_ms: 10_000,
            stream: StreamConfig::default(),
            buses: Vec::new(),
        }
    }
}

/// How a bus is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Modbus RTU on a local serial port (an RS485 USB adapter).
    Rtu,
    /// Modbus TCP (MBAP header, unit id = slave).
    Tcp,
    /// RTU frames (with CRC) carried over a TCP connection: transparent RS485-to-Ethernet
    /// gateways. The RS485 side still needs the inter-frame silence, so it is kept.
    RtuOverTcp,
}

impl Transport {
    /// As written in the file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Rtu => "rtu",
            Transport::Tcp => "tcp",
            Transport::RtuOverTcp => "rtu-over-tcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSection {
    /// Names the bus in health measurements (`modbus_bus/<name>/health`), logs and metrics.
    pub name: Segment,
    pub transport: Transport,
    // The keys of one transport are optional here, defaults applied in `resolve`, so that one
    // set on a bus of another transport can be told from one left out, and refused.
    /// Serial device (`/dev/ttyUSB0`, or a stable `/dev/serial/by-id/...` link); rtu only.
    #[serde(default)]
    pub path: Option<String>,
    /// Line speed (default 9600); rtu, and rtu-over-tcp for the timing of the gateway's RS485
    /// side. Likewise `parity`, `data_bits` and `stop_bits`.
    #[serde(default)]
    pub baud: Option<u32>,
    /// Default `none`.
    #[serde(default)]
    pub parity: Option<Parity>,
    /// Modbus RTU always uses 8 data bits; the key exists so a config that says so is accepted.
    #[serde(default)]
    pub data_bits: Option<u8>,
    /// 1 (default) or 2.
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// tcp and rtu-over-tcp.
    #[serde(default)]
    pub host: Option<String>,
    /// tcp and rtu-over-tcp (default 502).
    #[serde(default)]
    pub port: Option<u16>,
    /// How long one request may take before it counts as unanswered.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Further attempts of a request that was not answered or answered garbled.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Overrides the 3.5-character inter-frame silence computed from baud and framing, for
    /// adapters or meters that need more time between frames; rtu and rtu-over-tcp (Modbus
    /// TCP keeps no silence).
    #[serde(default)]
    pub silence_ms: Option<f64>,
    /// Overrides every profile's `limits.max_hole` on this bus.
    #[serde(default)]
    pub max_hole: Option<u16>,
    /// Overrides every profile's `limits.max_registers` on this bus (a gateway may cap it).
    #[serde(default)]
    pub max_registers: Option<u16>,
    /// Backoff between attempts to open the port or connect, doubling up to the maximum.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Backoff of a device that stopped answering, doubling up to the maximum; its polls are
    /// skipped meanwhile so it does not take line time from the others.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device segment of its topics; unique across all buses.
    pub name: Segment,
    /// Modbus slave address (unit id on TCP), 1..=247.
    pub slave: u8,
    /// Profile model or alias (`orno-we-515`).
    pub profile: String,
    /// Poll interval per class in ms, overriding the profile's `poll_ms`.
    #[serde(default)]
    pub poll: BTreeMap<String, u64>,
}

const fn default_baud() -> u32 {
    9600
}
const fn default_parity() -> Parity {
    Parity::None
}
const fn default_data_bits() -> u8 {
    8
}
const fn default_stop_bits() -> u8 {
    1
}
const fn default_port() -> u16 {
    502
}
const fn default_timeout_ms() -> u64 {
    500
}
const fn default_retries() -> u32 {
    1
}
const fn default_reconnect_min_ms() -> u64 {
    1000
}
const fn default_reconnect_max_ms() -> u64 {
    30_000
}
const fn default_backoff_min_ms() -> u64 {
    1000
}
const fn default_backoff_max_ms() -> u64 {
    60_000
}

/// The section resolved: everything [`crate::run`] needs, checked.
///
/// Not to be confused with [`crate::plan`], which plans the read requests of a poll.
#[derive(Debug, Clone)]
pub struct Plan {
    /// MQTT client id and journal name.
    pub instance: Segment,
    pub stream: StreamConfig,
    pub health_interval: Duration,
    pub buses: Vec<BusSpec>,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
}

/// One device, resolved against its profile.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub name: Segment,
    pub slave: u8,
    pub profile: Arc<Profile>,
    /// Interval per poll class: the profile's, with the device's overrides.
    pub poll_ms: BTreeMap<String, u64>,
    /// Profile limits with the bus's overrides.
    pub limits: Limits,
}

/// One bus, resolved and checked.
#[derive(Debug, Clone)]
pub struct BusSpec {
    pub name: Segment,
    pub link: Link,
    /// Line speed and framing for the silence and the utilisation figure; `None` on Modbus
    /// TCP, where there is no serial line.
    pub line: Option<Line>,
    /// Silence kept between the end of one frame and the start of the next (RTU only).
    pub silence: Duration,
    pub timeout: Duration,
    pub retries: u32,
    /// Between attempts to open the link: `reconnect_min_ms` doubling to `reconnect_max_ms`.
    pub reconnect: Backoff,
    /// Of a device that stopped answering: `backoff_min_ms` doubling to `backoff_max_ms`.
    pub device_backoff: Backoff,
    pub devices: Vec<DeviceSpec>,
}

impl Config {
    /// Checks the section, loads the profiles and resolves every bus: the one resolver, used
    /// by `config check` and by `run` (through [`crate::ModbusIngest`]). Errors name the key
    /// and the entry.
    pub fn resolve(&self, section: &str) -> Result<Plan, ConfigError> {
        if !(1000..=3_600_000).contains(&self.health_interval_ms) {
            return Err(ConfigError::new(
                format!("{section}.health_interval_ms"),
                "must be between 1000 and 3600000",
            ));
        }
        self.stream.validate(&format!("{section}.stream"))?;
        let profiles = match &self.profiles_dir {
            Some(dir) => load_dir(dir),
            None => Profiles::builtin(),
        }
        .map_err(|e| ConfigError::new(format!("{section}.profiles_dir"), e.to_string()))?;
        let mut out = Vec::with_capacity(self.buses.len());
        let mut names: BTreeMap<&str, String> = BTreeMap::new();
        for (b, bus) in self.buses.iter().enumerate() {
            let at = format!("{section}.buses[{b}]");
            if let Some(i) = self.buses[..b].iter().position(|o| o.name == bus.name) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!("bus {} is already buses[{i}]", bus.name),
                ));
            }
            out.push(resolve_bus(bus, &at, &profiles, &mut names)?);
        }
        Ok(Plan {
            instance: self.instance.clone(),
            stream: self.stream.clone(),
            health_interval: Duration::from_millis(self.health_interval_ms),
            buses: out,
            health_listen: self.health_listen,
        })
    }
}

fn resolve_bus<'a>(
    bus: &'a BusSection,
    at: &str,
    profiles: &Profiles,
    names: &mut BTreeMap<&'a str, String>,
) -> Result<BusSpec, ConfigError> {
    let key = |k: &str| format!("{at}.{k}");
    let need = |v: &Option<String>, k: &str, what: &str| -> Result<String, ConfigError> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s.clone()),
            _ => Err(ConfigError::new(key(k), format!("is required for {what}"))),
        }
    };
    const RTU: &str = Transport::Rtu.as_str();
    const TCP: &str = Transport::Tcp.as_str();
    const GATEWAY: &str = Transport::RtuOverTcp.as_str();
    let transport = Variant {
        at,
        selector: "transport",
        chosen: bus.transport.as_str(),
    };
    let checks: [(&str, bool, &[&str]); 8] = [
        ("path", bus.path.is_some(), &[RTU]),
        ("baud", bus.baud.is_some(), &[RTU, GATEWAY]),
        ("parity", bus.parity.is_some(), &[RTU, GATEWAY]),
        ("data_bits", bus.data_bits.is_some(), &[RTU, GATEWAY]),
        ("stop_bits", bus.stop_bits.is_some(), &[RTU, GATEWAY]),
        ("silence_ms", bus.silence_ms.is_some(), &[RTU, GATEWAY]),
        ("host", bus.host.is_some(), &[TCP, GATEWAY]),
        ("port", bus.port.is_some(), &[TCP, GATEWAY]),
    ];
    for (leaf, set, owners) in checks {
        transport.refuse_unless(leaf, set, owners)?;
    }
    let baud = bus.baud.unwrap_or(default_baud());
    let parity = bus.parity.unwrap_or(default_parity());
    let data_bits = bus.data_bits.unwrap_or(default_data_bits());
    let stop_bits = bus.stop_bits.unwrap_or(default_stop_bits());
    let port = bus.port.unwrap_or(default_port());
    let framing = match (data_bits, parity, stop_bits) {
        (8, Parity::None, 1) => Framing::N1,
        (8, Parity::Even, 1) => Framing::E1,
        (8, Parity::Odd, 1) => Framing::O1,
        (8, Parity::None, 2) => Framing::N2,
        (8, _, 2) => {
            return Err(ConfigError::new(
                key("stop_bits"),
                "2 stop bits go with parity \"none\" (8N2); with parity use 1 stop bit",
            ));
        }
        (8, _, s) => {
            return Err(ConfigError::new(
                key("stop_bits"),
                format!("is {s}; must be 1 or 2"),
            ));
        }
        (d, _, _) => {
            return Err(ConfigError::new(
                key("data_bits"),
                format!("is {d}; Modbus RTU uses 8 data bits"),
            ));
        }
    };
    let link = match bus.transport {
        Transport::Rtu => Link::Rtu {
            path: need(&bus.path, "path", "transport \"rtu\"")?,
            baud,
            parity,
            stop_bits,
        },
        Transport::Tcp => Link::Tcp {
            host: need(&bus.host, "host", "transport \"tcp\"")?,
            port,
        },
        Transport::RtuOverTcp => Link::RtuOverTcp {
            host: need(&bus.host, "host", "transport \"rtu-over-tcp\"")?,
            port,
        },
    };
    if port == 0 {
        return Err(ConfigError::new(key("port"), "must be 1..=65535"));
    }
    let line = match bus.transport {
        Transport::Tcp => None,
        Transport::Rtu | Transport::RtuOverTcp => Some(
            Line::new(baud, framing).map_err(|e| ConfigError::new(key("baud"), e.to_string()))?,
        ),
    };
    let silence = match (bus.silence_ms, line) {
        (Some(ms), _) if !(ms.is_finite() && (0.0..=1000.0).contains(&ms)) => {
            return Err(ConfigError::new(
                key("silence_ms"),
                format!("is {ms}; must be between 0 and 1000"),
            ));
        }
        (Some(ms), _) => Duration::from_secs_f64(ms / 1000.0),
        (None, Some(line)) => Duration::from_secs_f64(line.silence_s()),
        (None, None) => Duration::ZERO,
    };
    if !(10..=60_000).contains(&bus.timeout_ms) {
        return Err(ConfigError::new(
            key("timeout_ms"),
            "must be between 10 and 60000",
        ));
    }
    if bus.retries > 10 {
        return Err(ConfigError::new(key("retries"), "must be at most 10"));
    }
    let reconnect = Backoff::from_config_ms(
        &key("reconnect_min_ms"),
        bus.reconnect_min_ms,
        &key("reconnect_max_ms"),
        bus.reconnect_max_ms,
    )?;
    let device_backoff = Backoff::from_config_ms(
        &key("backoff_min_ms"),
        bus.backoff_min_ms,
        &key("backoff_max_ms"),
        bus.backoff_max_ms,
    )?;
    if let Some(m) = bus.max_registers
        && !(1..=MAX_READ_REGISTERS).contains(&m)
    {
        return Err(ConfigError::new(
            key("max_registers"),
            format!("is {m}; a Modbus read carries 1 to {MAX_READ_REGISTERS} registers"),
        ));
    }
    let mut devices = Vec::with_capacity(bus.devices.len());
    for (d, dev) in bus.devices.iter().enumerate() {
        let at = format!("{at}.devices[{d}]");
        let key = |k: &str| format!("{at}.{k}");
        if let Some(other) = names.get(dev.name.as_str()) {
            return Err(ConfigError::new(
                key("name"),
                format!("device {} is already {other}", dev.name),
            ));
        }
        names.insert(dev.name.as_str(), at.clone());
        if !(1..=247).contains(&dev.slave) {
            return Err(ConfigError::new(
                key("slave"),
                format!(
                    "is {}; a Modbus slave address is 1..=247 (0 is broadcast)",
                    dev.slave
                ),
            ));
        }
        if let Some(d2) = bus.devices[..d].iter().position(|o| o.slave == dev.slave) {
            return Err(ConfigError::new(
                key("slave"),
                format!(
                    "slave {} is already devices[{d2}] on this bus: two meters on one address \
                     answer at once and garble each other",
                    dev.slave
                ),
            ));
        }
        let Some(profile) = profiles.get(&dev.profile) else {
            let mut known: Vec<&str> = profiles.iter().flat_map(|p| p.names()).collect();
            known.sort_unstable();
            return Err(ConfigError::new(
                key("profile"),
                format!(
                    "unknown profile {:?}; known: {}",
                    dev.profile,
                    known.join(", ")
                ),
            ));
        };
        let mut poll_ms = profile.poll_ms.clone();
        for (class, ms) in &dev.poll {
            if !poll_ms.contains_key(class) {
                let known: Vec<&str> = profile.poll_ms.keys().map(String::as_str).collect();
                return Err(ConfigError::new(
                    format!("{at}.poll.{class}"),
                    format!(
                        "profile {} has no poll class {class:?}; its classes: {}",
                        profile.meter.model,
                        known.join(", ")
                    ),
                ));
            }
            if *ms < 100 {
                return Err(ConfigError::new(
                    format!("{at}.poll.{class}"),
                    format!("is {ms}; must be at least 100 ms"),
                ));
            }
            poll_ms.insert(class.clone(), *ms);
        }
        let limits = Limits {
            max_hole: bus.max_hole.unwrap_or(profile.limits.max_hole),
            max_registers: bus.max_registers.unwrap_or(profile.limits.max_registers),
        };
        if let Some(r) = profile
            .registers
            .iter()
            .find(|r| r.words() > limits.max_registers)
        {
            return Err(ConfigError::new(
                key("profile"),
                format!(
                    "register {} at {:#06x} of {} spans {} registers, more than the bus's \
                     max_registers ({})",
                    r.field,
                    r.address,
                    profile.meter.model,
                    r.words(),
                    limits.max_registers
                ),
            ));
        }
        devices.push(DeviceSpec {
            name: dev.name.clone(),
            slave: dev.slave,
            profile: Arc::new(profile.clone()),
            poll_ms,
            limits,
        });
    }
    Ok(BusSpec {
        name: bus.name.clone(),
        link,
        line,
        silence,
        timeout: Duration::from_millis(bus.timeout_ms),
        retries: bus.retries,
        reconnect,
        device_backoff,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::ConfigSource;

    /// The section as `wattbus run` reads and resolves it (errors located in the source).
    fn load(text: &str) -> Result<Plan, ConfigError> {
        ConfigSource::from_parts(None, Some(text))?.resolve::<crate::ModbusIngest>()
    }

    const TWO_METERS: &str = r#"
[modbus_ingest]
[[modbus_ingest.buses]]
name = "rs485"
transport = "rtu"
path = "/dev/ttyUSB0"
parity = "even"
[[modbus_ingest.buses.devices]]
name = "house"
slave = 1
profile = "orno-we-515"
poll = { fast = 2000 }
[[modbus_ingest.buses.devices]]
name = "heat-pump"
slave = 2
profile = "orno-we-514"
"#;

    #[test]
    fn a_bus_with_two_meters_resolves_with_defaults_and_overrides() {
        let c = load(TWO_METERS).unwrap();
        let buses = c.buses;
        assert_eq!(buses.len(), 1);
        let b = &buses[0];
        assert_eq!(b.timeout, Duration::from_millis(500));
        assert_eq!(b.retries, 1);
        // 9600 8E1: 3.5 × 11 / 9600 s.
        assert!((b.silence.as_secs_f64() - 3.5 * 11.0 / 9600.0).abs() < 1e-6);
        assert_eq!(b.devices[0].poll_ms["fast"], 2000);
        assert_eq!(b.devices[0].poll_ms["slow"], 60_000);
        assert_eq!(b.devices[1].poll_ms["fast"], 1000);
        assert_eq!(b.devices[1].profile.meter.model, "orno-we-515");
        assert_eq!(c.health_listen, Some(([127, 0, 0, 1], 9113).into()));
    }

    #[test]
    fn an_unknown_profile_names_the_entry_and_lists_the_known_ones() {
        let text = TWO_METERS.replace("\"orno-we-514\"", "\"we-51\"");
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].devices[1].profile");
        assert!(
            e.reason.starts_with("unknown profile \"we-51\"; known: "),
            "{}",
            e.reason
        );
        assert!(e.reason.contains("orno-we-515"), "{}", e.reason);
    }

    #[test]
    fn duplicate_names_and_slaves_and_bad_addresses_are_refused() {
        let e = load(&TWO_METERS.replace("\"heat-pump\"", "\"house\"")).unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].devices[1].name");
        let e = load(&TWO_METERS.replace("slave = 2", "slave = 1")).unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].devices[1].slave");
        let e = load(&TWO_METERS.replace("slave = 2", "slave = 248")).unwrap_err();
        assert!(e.reason.contains("1..=247"), "{}", e.reason);
    }

    #[test]
    fn transports_need_their_keys() {
        let e = load(&TWO_METERS.replace("path = \"/dev/ttyUSB0\"", "")).unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].path");
        for transport in ["tcp", "rtu-over-tcp"] {
            let e = load(&bus(transport, "")).unwrap_err();
            assert_eq!(e.key, "modbus_ingest.buses[0].host");
            assert_eq!(
                e.reason,
                format!("is required for transport \"{transport}\"")
            );
        }
        let c = load(&bus("tcp", "host = \"10.0.0.5\"")).unwrap();
        let b = &c.buses[0];
        assert_eq!(b.line, None);
        assert_eq!(b.silence, Duration::ZERO);
        assert_eq!(
            b.link,
            Link::Tcp {
                host: "10.0.0.5".into(),
                port: 502
            }
        );
    }

    /// One bus of `transport` with `keys`, and one meter on it.
    fn bus(transport: &str, keys: &str) -> String {
        format!(
            "[[modbus_ingest.buses]]\nname = \"b\"\ntransport = \"{transport}\"\n{keys}\n\
             [[modbus_ingest.buses.devices]]\nname = \"m\"\nslave = 1\nprofile = \"orno-we-515\"\n"
        )
    }

    #[test]
    fn serial_keys_on_a_tcp_bus_are_refused_naming_the_key_and_the_transport() {
        let tcp = "host = \"10.0.0.5\"";
        for key in [
            "path = \"/dev/ttyUSB0\"",
            "baud = 9600",
            "parity = \"even\"",
            "data_bits = 8",
            "stop_bits = 1",
            "silence_ms = 5.0",
        ] {
            let e = load(&bus("tcp", &format!("{tcp}\n{key}"))).unwrap_err();
            let leaf = key.split(' ').next().unwrap();
            assert_eq!(e.key, format!("modbus_ingest.buses[0].{leaf}"), "{key}");
            let owners = if leaf == "path" {
                "\"rtu\""
            } else {
                "\"rtu\" or \"rtu-over-tcp\""
            };
            assert_eq!(
                e.reason,
                format!(
                    "belongs to transport = {owners}; modbus_ingest.buses[0].transport is \"tcp\""
                ),
                "{key}"
            );
        }
    }

    #[test]
    fn tcp_keys_on_an_rtu_bus_are_refused_naming_the_key_and_the_transport() {
        let rtu = "path = \"/dev/ttyUSB0\"";
        for key in ["host = \"10.0.0.5\"", "port = 502"] {
            let e = load(&bus("rtu", &format!("{rtu}\n{key}"))).unwrap_err();
            let leaf = key.split(' ').next().unwrap();
            assert_eq!(e.key, format!("modbus_ingest.buses[0].{leaf}"), "{key}");
            assert_eq!(
                e.reason,
                "belongs to transport = \"tcp\" or \"rtu-over-tcp\"; \
                 modbus_ingest.buses[0].transport is \"rtu\"",
                "{key}"
            );
        }
        // A gateway has no local serial port.
        let e = load(&bus(
            "rtu-over-tcp",
            "host = \"10.0.0.5\"\npath = \"/dev/ttyUSB0\"",
        ))
        .unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].path");
        assert_eq!(
            e.reason,
            "belongs to transport = \"rtu\"; modbus_ingest.buses[0].transport is \"rtu-over-tcp\""
        );
    }

    #[test]
    fn every_transport_resolves_with_the_keys_it_uses() {
        let c = load(&bus(
            "rtu",
            "path = \"/dev/ttyUSB0\"\nbaud = 19200\nparity = \"odd\"\ndata_bits = 8\n\
             stop_bits = 1\nsilence_ms = 5.0",
        ))
        .unwrap();
        let b = &c.buses[0];
        assert_eq!(
            b.link,
            Link::Rtu {
                path: "/dev/ttyUSB0".into(),
                baud: 19200,
                parity: Parity::Odd,
                stop_bits: 1
            }
        );
        assert_eq!(b.silence, Duration::from_millis(5));
        let c = load(&bus("tcp", "host = \"10.0.0.5\"\nport = 1502")).unwrap();
        let b = &c.buses[0];
        assert_eq!(
            b.link,
            Link::Tcp {
                host: "10.0.0.5".into(),
                port: 1502
            }
        );
        assert_eq!(b.line, None);
        // A gateway's RS485 side: its speed and framing set the silence and the utilisation.
        let c = load(&bus(
            "rtu-over-tcp",
            "host = \"10.0.0.5\"\nport = 4001\nbaud = 4800\nparity = \"even\"",
        ))
        .unwrap();
        let b = &c.buses[0];
        assert_eq!(
            b.link,
            Link::RtuOverTcp {
                host: "10.0.0.5".into(),
                port: 4001
            }
        );
        assert_eq!(b.line, Some(Line::new(4800, Framing::E1).unwrap()));
    }

    #[test]
    fn poll_overrides_must_name_a_class_of_the_profile() {
        let e = load(&TWO_METERS.replace("fast = 2000", "fats = 2000")).unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].devices[0].poll.fats");
        assert!(e.reason.contains("fast, slow"), "{}", e.reason);
    }

    #[test]
    fn framing_must_be_one_modbus_allows() {
        let e = load(&TWO_METERS.replace("parity = \"even\"", "parity = \"even\"\nstop_bits = 2"))
            .unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].stop_bits");
        let e = load(&TWO_METERS.replace("parity = \"even\"", "data_bits = 7")).unwrap_err();
        assert_eq!(e.key, "modbus_ingest.buses[0].data_bits");
    }
}
