//! What code logged, captured on the calling thread: for tests that a flood is logged once per
//! interval, that a line names what a person needs, that a quiet path stays quiet.
//!
//! Its own `tracing` subscriber, active only while the closure runs and only on this thread,
//! so tests running side by side never see each other's lines.

use std::sync::{Arc, Mutex};

use tracing::Level;

/// Every event `f` logged, one line each: `LEVEL field=value …` (the message is the field
/// `message`; text fields are quoted, `%`-formatted ones are not).
pub fn logged(f: impl FnOnce()) -> String {
    capture(f).text()
}

/// Every event `f` logged, with its level.
pub fn capture(f: impl FnOnce()) -> Log {
    let log = Capture::default();
    tracing::subscriber::with_default(log.clone(), f);
    let lines = log.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Log(lines)
}

/// Captured events, in order.
#[derive(Debug, Clone, Default)]
pub struct Log(Vec<(Level, String)>);

impl Log {
    /// The fields of the events logged at `level`.
    pub fn at(&self, level: Level) -> Vec<String> {
        self.0
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// All events, one line each.
    pub fn text(&self) -> String {
        self.0
            .iter()
            .map(|(level, fields)| format!("{level} {fields}\n"))
            .collect()
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(Level, String)>>>);

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if !self.0.is_empty() {
                    self.0.push(' ');
                }
                self.0.push_str(&format!("{}={v:?}", f.name()));
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let level = *event.metadata().level();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((level, fields.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_their_level_and_fields_and_other_threads_are_not_captured() {
        let log = capture(|| {
            tracing::warn!(port = "/dev/x", n = 3, "Garbled line.");
            std::thread::spawn(|| tracing::error!("elsewhere"))
                .join()
                .unwrap();
            tracing::debug!("quiet");
        });
        assert_eq!(
            log.at(Level::WARN),
            ["message=Garbled line. port=\"/dev/x\" n=3"]
        );
        assert_eq!(log.at(Level::DEBUG).len(), 1);
        assert!(log.at(Level::ERROR).is_empty());
        assert!(log.text().starts_with("WARN message=Garbled line."));
    }
}
