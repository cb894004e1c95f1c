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

#[cfg(test)]
mod tests {
    use super::*;

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
