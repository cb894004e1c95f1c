//! The `[node_health]` section, and its resolution into the [`Plan`] `run` uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::Segment;
use runtime::config::{ConfigError, StreamConfig};
use serde::Deserialize;

use crate::sample::node_from_hostname;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id and journal name. By default `node-health-<node>`: every node's differs
    /// without being told, and all belong to one broker user, `node-health`.
    pub instance: Option<Segment>,
    /// The device the readings are published as [default: the hostname, lower-cased, with
    /// what a device name may not hold turned into `-`]. Required where the hostname is a
    /// stock one (`raspberrypi`, `localhost`, … [`STOCK_HOSTNAMES`]) or gives no name: two
    /// machines under one name would mix their readings. Set it in a container, whose
    /// hostname is its id unless it shares the host's (`uts: host`). Empty is unset (compose
    /// passes `NODE_NAME` from `.env`, empty when not given).
    #[serde(deserialize_with = "empty_is_unset")]
    pub node: Option<Segment>,
    /// One reading per group this often.
    pub interval_ms: u64,
    /// The filesystem whose free space is published, and whose block device's writes are
    /// [default: `data_dir`, where the journals wear the card].
    pub disk_path: Option<PathBuf>,
    /// The block device whose writes are published, as `/proc/diskstats` names it
    /// (`mmcblk0`, `sda`, `nvme0n1`; `/dev/` may be given) [default: the disk holding
    /// `disk_path`, found through `/sys/dev/block`].
    pub block_device: Option<String>,
    /// Where procfs is: a container may see the host's at `/host/proc`; tests use a copy.
    pub proc_root: PathBuf,
    /// Where sysfs is.
    pub sys_root: PathBuf,
    /// Delivery of the readings (`meas` stream).
    pub stream: StreamConfig,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: None,
            node: None,
            interval_ms: 10_000,
            disk_path: None,
            block_device: None,
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            stream: StreamConfig::default(),
            health_listen: Some(([127, 0, 0, 1], 9118).into()),
        }
    }
}

/// The shortest interval: procfs is cheap to read, but each reading is a journal record and an
/// InfluxDB point, and a node's health changes over seconds, not milliseconds.
pub const MIN_INTERVAL_MS: u64 = 1000;
/// The longest: an hour.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;

/// Where the node's name came from, for the start log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeName {
    Configured,
    /// From this hostname.
    Hostname(String),
    /// No usable hostname: why.
    Fallback(String),
}

/// The section, checked: what [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instance: Segment,
    pub node: Segment,
    pub node_name: NodeName,
    pub interval: Duration,
    /// `None`: the data directory.
    pub disk_path: Option<PathBuf>,
    /// `None`: found from `disk_path`.
    pub block_device: Option<String>,
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    pub stream: StreamConfig,
    pub health_listen: Option<SocketAddr>,
}

impl Plan {
    /// The filesystem whose space is published.
    pub fn disk_path(&self, data_dir: &Path) -> PathBuf {
        self.disk_path
            .clone()
            .unwrap_or_else(|| data_dir.to_path_buf())
    }
}

/// The name of a node whose hostname gives none.
pub const FALLBACK_NODE: &str = "node";

/// Hostnames machines have out of the box, so that two of them often share one: not taken as a
/// node's name without being told (a second Pi still called `raspberrypi` would publish under
/// the same device, and take over the first one's broker connection).
pub const STOCK_HOSTNAMES: &[&str] = &[
    "raspberrypi",
    "raspberry",
    "pi",
    "localhost",
    "localhost.localdomain",
    "debian",
    "ubuntu",
    "dietpi",
    "armbian",
    "orangepi",
    "odroid",
    "rockpi",
    "alarmpi",
    "octopi",
    "homeassistant",
    "node",
];

/// Whether `node` (from a hostname) is a stock name: its first label is one of
/// [`STOCK_HOSTNAMES`] (`raspberrypi.local` and `raspberrypi.lan` are `raspberrypi`).
fn is_stock(node: &str) -> bool {
    let first = node.split('.').next().unwrap_or(node);
    STOCK_HOSTNAMES.contains(&first) || STOCK_HOSTNAMES.contains(&node)
}

fn empty_is_unset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Segment>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text {
        Some(t) if !t.trim().is_empty() => Segment::new(t.trim().to_string())
            .map(Some)
            .map_err(serde::de::Error::custom),
        _ => Ok(None),
    }
}

/// This machine's name as node-health would take it from its hostname (or [`FALLBACK_NODE`]),
/// stock or not: for the demo, where every service runs on the one machine.
pub fn hostname_node(proc_root: &Path) -> Segment {
    default_node(proc_root).0
}

/// The default instance, `node-health-<node>`, cut to a client id's 64 characters with a
/// digest of the whole name, so that long names stay apart.
fn default_instance(node: &Segment) -> Option<Segment> {
    let full = format!("node-health-{node}");
    if let Ok(s) = Segment::new(full.clone()) {
        return Some(s);
    }
    // FNV-1a: stable across releases and platforms (the instance names the journal).
    let digest = node.as_str().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let head: String = node.as_str().chars().take(40).collect();
    Segment::new(format!("node-health-{head}-{digest:08x}")).ok()
}

impl Config {
    /// Check the section; errors name `section.key`. Reads the hostname (from `proc_root`)
    /// when `node` is not given.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(ConfigError::new(
                key("interval_ms"),
                format!("must be from {MIN_INTERVAL_MS} (a second) to {MAX_INTERVAL_MS} (an hour)"),
            ));
        }
        for (leaf, path) in [
            ("proc_root", Some(&self.proc_root)),
            ("sys_root", Some(&self.sys_root)),
            ("disk_path", self.disk_path.as_ref()),
        ] {
            if let Some(p) = path
                && !p.is_absolute()
            {
                return Err(ConfigError::new(
                    key(leaf),
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        let block_device = match &self.block_device {
            None => None,
            Some(given) => {
                let name = given.trim();
                let name = name.strip_prefix("/dev/").unwrap_or(name);
                if name.is_empty()
                    || name.len() > 64
                    || name.contains('/')
                    || name.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(ConfigError::new(
                        key("block_device"),
                        format!(
                            "{given:?} is not a block device's name as /proc/diskstats gives it (e.g. mmcblk0, sda, nvme0n1)"
                        ),
                    ));
                }
                Some(name.to_string())
            }
        };
        let (node, node_name) = match self.node {
            Some(n) => (n, NodeName::Configured),
            None => match default_node(&self.proc_root) {
                (_, NodeName::Fallback(why)) => {
                    return Err(ConfigError::new(
                        key("node"),
                        format!(
                            "is not set and the hostname gives no name ({why}): set it, e.g. node = \"pi-garage\" (compose: NODE_NAME in .env)"
                        ),
                    ));
                }
                (n, NodeName::Hostname(h)) if is_stock(n.as_str()) => {
                    return Err(ConfigError::new(
                        key("node"),
                        format!(
                            "is not set, and this machine is called {h:?}, as machines of its kind are out of the box: a second one would publish its health under the same device and take over this one's broker connection. Set it, e.g. node = \"pi-garage\" (compose: NODE_NAME in .env), or give the machine a hostname of its own"
                        ),
                    ));
                }
                found => found,
            },
        };
        let instance = match self.instance {
            Some(i) => i,
            None => default_instance(&node).ok_or_else(|| {
                ConfigError::new(
                    key("instance"),
                    format!("no default fits for node {node}: set an instance"),
                )
            })?,
        };
        self.stream.validate(&key("stream"))?;
        Ok(Plan {
            instance,
            node,
            node_name,
            interval: Duration::from_millis(self.interval_ms),
            disk_path: self.disk_path,
            block_device,
            proc_root: self.proc_root,
            sys_root: self.sys_root,
            stream: self.stream,
            health_listen: self.health_listen,
        })
    }
}

/// The node's name from the hostname the kernel gives this process (its UTS namespace's:
/// a container's own unless it shares the host's).
fn default_node(proc_root: &Path) -> (Segment, NodeName) {
    let path = proc_root.join("sys/kernel/hostname");
    let fallback = || Segment::new(FALLBACK_NODE).unwrap_or_else(|_| unreachable!("valid literal"));
    match crate::sources::read_capped(&path, 256) {
        Ok(text) => match node_from_hostname(&text) {
            Some(node) => (node, NodeName::Hostname(text.trim().to_string())),
            None => (
                fallback(),
                NodeName::Fallback(format!("the hostname {:?} gives no name", text.trim())),
            ),
        },
        Err(e) => (
            fallback(),
            NodeName::Fallback(format!(
                "cannot read {}: {}",
                path.display(),
                runtime::telemetry::chain(&e)
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `toml` as the body of `[node_health]`.
    fn resolve(toml: &str) -> Result<Plan, ConfigError> {
        let text = format!("[node_health]\n{toml}");
        runtime::ConfigSource::from_parts(None, Some(&text))?.resolve::<crate::NodeHealth>()
    }

    #[test]
    fn mistakes_name_the_key() {
        for (toml, key) in [
            ("interval_ms = 999\n", "node_health.interval_ms"),
            ("interval_ms = 3600001\n", "node_health.interval_ms"),
            ("proc_root = \"proc\"\n", "node_health.proc_root"),
            ("sys_root = \"./sys\"\n", "node_health.sys_root"),
            ("disk_path = \"data\"\n", "node_health.disk_path"),
            ("block_device = \"\"\n", "node_health.block_device"),
            ("block_device = \"/dev/\"\n", "node_health.block_device"),
            (
                "block_device = \"mmcblk0 p2\"\n",
                "node_health.block_device",
            ),
            (
                "block_device = \"disk/by-id/x\"\n",
                "node_health.block_device",
            ),
            ("node = \"pi/1\"\n", "node_health.node"),
            ("bogus = 1\n", "bogus"),
            (
                "[node_health.stream]\nmax_bytes = 10\n",
                "node_health.stream.max_bytes",
            ),
        ] {
            let e = resolve(toml).expect_err(toml).to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn a_section_as_a_user_writes_it() {
        let p = resolve(
            "node = \"pi-garage\"\ninterval_ms = 5000\nblock_device = \"/dev/mmcblk0\"\nproc_root = \"/host/proc\"\ndisk_path = \"/var/lib/wattbus\"\n",
        )
        .unwrap();
        assert_eq!(p.node.as_str(), "pi-garage");
        assert_eq!(p.node_name, NodeName::Configured);
        assert_eq!(p.instance.as_str(), "node-health-pi-garage");
        assert_eq!(p.interval, Duration::from_secs(5));
        assert_eq!(p.block_device.as_deref(), Some("mmcblk0"));
        assert_eq!(p.proc_root, Path::new("/host/proc"));
        assert_eq!(
            p.disk_path(Path::new("/elsewhere")),
            Path::new("/var/lib/wattbus")
        );
    }

    #[test]
    fn by_default_the_node_is_the_hostname_made_a_device_name() {
        let proc = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(proc.path().join("sys/kernel")).unwrap();
        std::fs::write(proc.path().join("sys/kernel/hostname"), "Pi_Garage\n").unwrap();
        let p = resolve(&format!("proc_root = {:?}\n", proc.path())).unwrap();
        assert_eq!(p.node.as_str(), "pi_garage");
        assert_eq!(p.node_name, NodeName::Hostname("Pi_Garage".into()));
        assert_eq!(p.instance.as_str(), "node-health-pi_garage");
        assert_eq!(p.interval, Duration::from_secs(10));
        assert_eq!(p.disk_path(Path::new("/data")), Path::new("/data"));
        assert_eq!(p.block_device, None);

        // A hostname that gives no name, none at all, or a stock one: `node` must be set.
        std::fs::write(proc.path().join("sys/kernel/hostname"), "???\n").unwrap();
        let e = resolve(&format!("proc_root = {:?}\n", proc.path())).unwrap_err();
        assert_eq!(e.key, "node_health.node");
        let e = resolve("proc_root = \"/nonexistent-proc\"\n").unwrap_err();
        assert_eq!(e.key, "node_health.node");
        assert!(
            e.reason.contains("/nonexistent-proc/sys/kernel/hostname"),
            "{}",
            e.reason
        );
        for stock in [
            "raspberrypi",
            "raspberrypi.local",
            "localhost",
            "alarmpi",
            "DietPi",
        ] {
            std::fs::write(
                proc.path().join("sys/kernel/hostname"),
                format!("{stock}\n"),
            )
            .unwrap();
            let e = resolve(&format!("proc_root = {:?}\n", proc.path())).unwrap_err();
            assert_eq!(e.key, "node_health.node", "{stock}");
            assert!(e.reason.contains(&format!("{stock:?}")), "{}", e.reason);
        }
        std::fs::write(proc.path().join("sys/kernel/hostname"), "raspberrypi\n").unwrap();
        // Set, or empty (compose's NODE_NAME left out: unset), it decides.
        let p = resolve(&format!(
            "proc_root = {:?}\nnode = \"pi-garage\"\n",
            proc.path()
        ))
        .unwrap();
        assert_eq!(p.node.as_str(), "pi-garage");
        let e = resolve(&format!("proc_root = {:?}\nnode = \" \"\n", proc.path())).unwrap_err();
        assert_eq!(e.key, "node_health.node");
        // The demo takes the machine's name whatever it is.
        assert_eq!(hostname_node(proc.path()).as_str(), "raspberrypi");
        // A long name: the default instance is cut, with a digest, and still apart.
        let long = |c: char| format!("node = \"{}\"\n", c.to_string().repeat(60));
        let a = resolve(&long('a')).unwrap().instance;
        let b = resolve(&long('b')).unwrap().instance;
        assert!(
            a.as_str().len() <= 64 && a.as_str().starts_with("node-health-aaaa"),
            "{a}"
        );
        assert_ne!(a, b);
        // An instance given is kept whatever the node.
        let p = resolve("instance = \"node-health-north\"\nnode = \"pi-3\"\n").unwrap();
        assert_eq!(p.instance.as_str(), "node-health-north");
    }
}
