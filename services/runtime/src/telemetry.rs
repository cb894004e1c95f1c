//! Logging setup and the process-wide metrics registry.
//!
//! Metrics are a handful of atomics rendered as Prometheus text: no exporter crate, no HTTP
//! stack. A metric is identified by its name and labels; asking twice returns the same cell, so
//! events can count from anywhere. Hot paths keep the returned handle.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::config::{ConfigError, LogConfig, LogFormat};

pub mod core;

/// Install the global `tracing` subscriber. `RUST_LOG`, when set, overrides `log.level`.
/// Calling it again (tests, the demo) keeps the first subscriber.
///
/// Colours only when standard error is a terminal: a log file, `journalctl` or `docker logs`
/// gets plain text, not escape codes.
pub fn init_logging(cfg: &LogConfig) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => {
            crate::config::parse_filter(&directives).map_err(|reason| ConfigError {
                origin: Some("environment variable RUST_LOG".into()),
                key: "log.level".into(),
                reason,
            })?
        }
        Err(_) => cfg.filter()?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // Ignoring the result is deliberate: it fails only when a subscriber is already set.
    let _already_set = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetricType {
    Counter,
    Gauge,
}

type Labels = Vec<(&'static str, String)>;

struct Family {
    help: &'static str,
    kind: MetricType,
    series: BTreeMap<Labels, Arc<AtomicU64>>,
}

#[derive(Default)]
struct Registry {
    families: BTreeMap<&'static str, Family>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

fn cell(
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &[(&'static str, &str)],
) -> Arc<AtomicU64> {
    let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    let family = reg.families.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
    family.series.entry(labels).or_default().clone()
}

/// Make family `name` known with no series yet: `/metrics` shows its HELP and TYPE, so a
/// dashboard or alert written against it finds it before its first event.
fn declare(name: &'static str, help: &'static str, kind: MetricType) {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.families.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
}

/// A monotonically increasing count.
#[derive(Clone, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn new(name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Self {
        Self(cell(name, help, MetricType::Counter, labels))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// [`declare`] a counter family.
    pub fn declare(name: &'static str, help: &'static str) {
        declare(name, help, MetricType::Counter);
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn new(name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Self {
        Self(cell(name, help, MetricType::Gauge, labels))
    }
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    /// [`declare`] a gauge family.
    pub fn declare(name: &'static str, help: &'static str) {
        declare(name, help, MetricType::Gauge);
    }
}

/// The values of family `name`'s series labelled `service = service`, as f64 (a counter's
/// count, a gauge's value), for [`core::Core::health`].
fn values_of(name: &str, service: &str) -> Vec<f64> {
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    let Some(family) = reg.families.get(name) else {
        return Vec::new();
    };
    family
        .series
        .iter()
        .filter(|(labels, _)| labels.iter().any(|(k, v)| *k == "service" && v == service))
        .map(|(_, value)| {
            let raw = value.load(Ordering::Relaxed);
            match family.kind {
                #[allow(clippy::cast_precision_loss)] // counts far below 2^53
                MetricType::Counter => raw as f64,
                MetricType::Gauge => f64::from_bits(raw),
            }
        })
        .collect()
}

/// Every metric in Prometheus text exposition format 0.0.4.
pub fn render() -> String {
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (name, family) in &reg.families {
        let kind = match family.kind {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in &family.series {
            out.push_str(name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let _ = write!(out, "{k}=\"{v}\"");
                }
                out.push('}');
            }
            let raw = value.load(Ordering::Relaxed);
            let _ = match family.kind {
                MetricType::Counter => writeln!(out, " {raw}"),
                MetricType::Gauge => writeln!(out, " {}", f64::from_bits(raw)),
            };
        }
    }
    out
}

/// An error with its causes, `a: b: c` (a cause already in the text is not repeated): how
/// every wattbus log line shows an error.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

/// Most keys one [`LogLimit`] remembers; past it the longest quiet is forgotten (and logs
/// again when it recurs).
const LOG_LIMIT_KEYS: usize = 256;

/// How wattbus logs a flood: per key (a port, a reason, a client), the first event, then at
/// most one per `every`, each line saying how many went unlogged since. Counters count every
/// event; the log stays readable when a device garbles every line or a client sends thousands
/// of forged messages a second. The one rate limiter of the workspace.
#[derive(Debug)]
pub struct LogLimit {
    every: std::time::Duration,
    keys: Mutex<Vec<(String, std::time::Instant, u64)>>,
}

impl LogLimit {
    pub const fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            keys: Mutex::new(Vec::new()),
        }
    }

    /// `Some(events not logged since the last line)` when this one is to be logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_key("")
    }

    /// [`Self::allow`] for the events of `key` alone.
    pub fn allow_key(&self, key: &str) -> Option<u64> {
        self.allow_key_at(key, std::time::Instant::now())
    }

    fn allow_key_at(&self, key: &str, now: std::time::Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, at, unlogged)) = keys.iter_mut().find(|(k, ..)| k == key) {
            if now.saturating_duration_since(*at) < self.every {
                *unlogged += 1;
                return None;
            }
            *at = now;
            return Some(std::mem::take(unlogged));
        }
        if keys.len() >= LOG_LIMIT_KEYS
            && let Some(oldest) = keys
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, at, _))| *at)
                .map(|(i, _)| i)
        {
            keys.swap_remove(oldest);
        }
        keys.push((key.to_string(), now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_is_logged_once_per_interval_and_key_with_the_count_of_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        assert_eq!(limit.allow_key_at("a", t0), Some(0), "the first is logged");
        assert_eq!(
            limit.allow_key_at("b", t0),
            Some(0),
            "another key has its own"
        );
        for s in 1..=59 {
            assert_eq!(limit.allow_key_at("a", t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(
            limit.allow_key_at("a", t0 + Duration::from_secs(60)),
            Some(59),
            "the next line says how many went unlogged"
        );
        assert_eq!(limit.allow_key_at("a", t0 + Duration::from_secs(61)), None);
        assert_eq!(
            limit.allow_key_at("b", t0 + Duration::from_secs(61)),
            Some(0)
        );
    }

    #[test]
    fn many_keys_do_not_grow_it_without_bound() {
        let limit = LogLimit::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        for i in 0..1000u64 {
            assert_eq!(
                limit.allow_key_at(&i.to_string(), t0 + Duration::from_millis(i)),
                Some(0)
            );
        }
        assert_eq!(limit.keys.lock().unwrap().len(), LOG_LIMIT_KEYS);
        // The newest are remembered.
        assert_eq!(limit.allow_key_at("999", t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn a_cause_chain_is_one_line_without_repeats() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "cannot open /dev/ttyUSB0: No such file",
            Some(Box::new(E(
                "No such file",
                Some(Box::new(E("os error 2", None))),
            ))),
        );
        assert_eq!(
            chain(&e),
            "cannot open /dev/ttyUSB0: No such file: os error 2"
        );
    }

    #[test]
    fn counters_with_the_same_identity_share_a_cell_and_render() {
        let a = Counter::new("test_things_total", "Things.", &[("svc", "a\"b")]);
        let b = Counter::new("test_things_total", "Things.", &[("svc", "a\"b")]);
        a.inc();
        b.add(2);
        assert_eq!(a.get(), 3);
        Gauge::new("test_level", "Level.", &[]).set(1.5);
        let text = render();
        assert!(
            text.contains(
                "# TYPE test_things_total counter\ntest_things_total{svc=\"a\\\"b\"} 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("test_level 1.5\n"), "{text}");
    }
}
