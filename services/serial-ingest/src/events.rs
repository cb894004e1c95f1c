//! Every notable event of a port logs and counts here, in one place: the log line is for the
//! person at the terminal, the counter (labelled `port`, `device`) for the dashboard. Every
//! error event also counts in the core `wattbus_errors_total{service="serial-ingest",kind}`
//! (docs/metrics.md), under one of [`ERROR_KINDS`], so one panel shows every service's errors.
//!
//! Garbled lines are the one event that can come thousands of times a second (a wrong baud
//! rate garbles every line), so their WARN is rate-limited per port ([`LogLimit`]): the
//! first, then at most one a minute with the count since the last. Dropped stream lines
//! likewise (a clock stepped back an hour drops lines for an hour). The counters count
//! every one.

use std::time::Duration;

use runtime::delivery::DeliveryError;
use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, LogLimit, chain};

use crate::protocol::{Excerpt, ParseError};

/// The kinds of `wattbus_errors_total` serial-ingest reports besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A line was not UTF-8, did not parse or failed its checksum (skipped).
    "garbled", // A line was longer than max_line_bytes (discarded whole).
    "overlong",
    // A request-response device did not answer a poll in time (the poll is skipped).
    "timeout",
    // A port could not be opened, read or written, or reached end of file (unplugged?).
    "port",   // An open port's device fell silent (the port is reopened).
    "silent", // Stream lines lost: a gap in their sequence numbers.
    "gap",
    // Stream lines dropped because their stamps would go back over samples already sent (the
    // system clock stepped back, or the device's sample clock runs fast).
    "clock",
];

/// At most one garbled-line WARN, and one dropped-lines WARN, per port this often.
const FLOOD_LOG_EVERY: Duration = Duration::from_secs(60);

/// Keyed by port: one port's flood never hides another's first line.
static GARBLED_LOG: LogLimit = LogLimit::new(FLOOD_LOG_EVERY);
static DROPPED_LOG: LogLimit = LogLimit::new(FLOOD_LOG_EVERY);

/// The core error counters of the kinds a port reports.
#[derive(Debug, Clone)]
struct Errors {
    garbled: Counter,
    overlong: Counter,
    timeout: Counter,
    port: Counter,
    silent: Counter,
    gap: Counter,
    clock: Counter,
}

impl Errors {
    fn of(core: &Core) -> Self {
        Self {
            garbled: core.error("garbled"),
            overlong: core.error("overlong"),
            timeout: core.error("timeout"),
            port: core.error("port"),
            silent: core.error("silent"),
            gap: core.error("gap"),
            clock: core.error("clock"),
        }
    }
}

/// The counters of one port. Clones (the port's reader and its publisher) count into the
/// same series.
#[derive(Debug, Clone)]
pub struct PortEvents {
    port: String,
    device: String,
    /// The service's core metrics: error kinds here, a reading not sent in the runtime.
    core: Core,
    errors: Errors,
    lines: Counter,
    readings: Counter,
    frames: Counter,
    garbled: Counter,
    overlong: Counter,
    timeouts: Counter,
    lost_lines: Counter,
    dropped_lines: Counter,
    reopens: Counter,
    port_errors: Counter,
    unknown_keys: Counter,
    out_of_range: Counter,
    ignored: Counter,
}

impl PortEvents {
    pub fn new(port: &str, device: &str) -> Self {
        let l: [(&'static str, &str); 2] = [("port", port), ("device", device)];
        let core = Core::of(<crate::SerialIngest as runtime::Service>::NAME);
        Self {
            port: port.to_string(),
            device: device.to_string(),
            errors: Errors::of(&core),
            core,
            lines: Counter::new(
                "wattbus_serial_lines_total",
                "Complete lines read from a serial port.",
                &l,
            ),
            readings: Counter::new(
                "wattbus_serial_readings_total",
                "Measurements journaled and published from a serial port.",
                &l,
            ),
            frames: Counter::new(
                "wattbus_serial_frames_total",
                "Raw sample frames journaled and published from a serial port.",
                &l,
            ),
            garbled: Counter::new(
                "wattbus_serial_garbled_lines_total",
                "Lines skipped because they were not UTF-8, did not parse or failed their checksum.",
                &l,
            ),
            overlong: Counter::new(
                "wattbus_serial_overlong_lines_total",
                "Lines longer than max_line_bytes, discarded whole.",
                &l,
            ),
            timeouts: Counter::new(
                "wattbus_serial_timeouts_total",
                "Polls a request-response device did not answer in time.",
                &l,
            ),
            lost_lines: Counter::new(
                "wattbus_serial_lost_lines_total",
                "Stream lines lost, by gaps in their sequence numbers.",
                &l,
            ),
            dropped_lines: Counter::new(
                "wattbus_serial_dropped_lines_total",
                "Stream lines dropped because their stamps would have gone back over samples already sent.",
                &l,
            ),
            reopens: Counter::new(
                "wattbus_serial_port_reopens_total",
                "Times a port was opened again after it failed, vanished or fell silent.",
                &l,
            ),
            port_errors: Counter::new(
                "wattbus_serial_port_errors_total",
                "Failures to open, read or write a port, and ends of file (device unplugged).",
                &l,
            ),
            unknown_keys: Counter::new(
                "wattbus_serial_unknown_keys_total",
                "Keys of sensor lines that no channel maps (skipped).",
                &l,
            ),
            out_of_range: Counter::new(
                "wattbus_serial_out_of_range_total",
                "Readings published with quality out_of_range (a saturated sensor).",
                &l,
            ),
            ignored: Counter::new(
                "wattbus_serial_unsolicited_lines_total",
                "Request-response lines that arrived with no poll outstanding (discarded).",
                &l,
            ),
        }
    }

    pub fn line(&self) {
        self.lines.inc();
    }

    pub fn reading(&self) {
        self.readings.inc();
    }

    pub fn frame(&self) {
        self.frames.inc();
    }

    pub fn garbled(&self, reason: &ParseError, line: &str, baud: Option<u32>) {
        self.garbled_text(&reason.to_string(), Some(line), baud);
    }

    pub fn not_utf8(&self, baud: Option<u32>) {
        self.garbled_text("not UTF-8", None, baud);
    }

    /// `baud`: the line's rate, left out behind a serial device server (`tcp://`).
    fn garbled_text(&self, reason: &str, line: Option<&str>, baud: Option<u32>) {
        self.garbled.inc();
        self.errors.garbled.inc();
        let Some(unlogged) = GARBLED_LOG.allow_key(&self.port) else {
            return;
        };
        let excerpt = line.map(|l| Excerpt(l).to_string()).unwrap_or_default();
        tracing::warn!(
            port = %self.port,
            device = %self.device,
            reason,
            line = %excerpt,
            garbled_since_last_log = unlogged + 1,
            baud,
            "Garbled line skipped (logged at most once a minute). If every line is garbled, check the baud rate against the sketch (`baud`, or the serial device server's for a tcp:// port) and the cable."
        );
    }

    pub fn overlong(&self, max_line_bytes: usize) {
        self.overlong.inc();
        self.errors.overlong.inc();
        tracing::warn!(port = %self.port, device = %self.device, max_line_bytes, "Line longer than max_line_bytes discarded (a missing newline or a wrong baud rate?).");
    }

    pub fn timeout(&self, silent_polls: u32, max_silent_polls: u32) {
        self.timeouts.inc();
        self.errors.timeout.inc();
        tracing::debug!(port = %self.port, device = %self.device, silent_polls, max_silent_polls, "No answer to a poll in time; skipped.");
    }

    pub fn unsolicited(&self) {
        self.ignored.inc();
        tracing::debug!(port = %self.port, device = %self.device, "Line with no poll outstanding discarded (a late answer?).");
    }

    pub fn lost_lines(&self, n: u32) {
        self.lost_lines.add(u64::from(n));
        self.errors.gap.inc();
        tracing::warn!(port = %self.port, device = %self.device, lost_lines = n, "Stream lines lost (sequence gap); the frame is closed at the gap.");
    }

    pub fn resynced(&self) {
        tracing::info!(port = %self.port, device = %self.device, "Sample clock and system clock drifted apart by more than 50 ms; frames restart at the read time.");
    }

    /// Lines are lost here (the system clock stepped back, or the device's clock is fast), so
    /// it is a WARN, at most once a minute like garbled lines: a clock stepped back an hour
    /// drops lines for an hour. Each line says how many lines this drop lost and how many
    /// drops went unlogged since the last line (the counter has every line).
    pub fn dropped_lines(&self, n: u32) {
        self.dropped_lines.add(u64::from(n));
        self.errors.clock.inc();
        let Some(unlogged_drops) = DROPPED_LOG.allow_key(&self.port) else {
            return;
        };
        tracing::warn!(
            port = %self.port,
            device = %self.device,
            dropped_lines = n,
            unlogged_drops,
            "Stream lines dropped (logged at most once a minute): the device's sample clock runs \
             ahead of the system clock (was the system clock set back?), and stamping them at \
             their read time would put them over samples already sent."
        );
    }

    pub fn banner_mismatch(&self, what: &str, device_says: f64, configured: f64) {
        tracing::warn!(port = %self.port, device = %self.device, what, device_says, configured, "The device's banner disagrees with the configuration; using the configuration.");
    }

    pub fn unknown_key(&self, key: &str) {
        self.unknown_keys.inc();
        tracing::debug!(port = %self.port, device = %self.device, key, "Key not mapped by any channel; skipped.");
    }

    pub fn out_of_range(&self) {
        self.out_of_range.inc();
    }

    pub fn opened(&self, reopen: bool) {
        if reopen {
            self.reopens.inc();
            tracing::info!(port = %self.port, device = %self.device, "Serial port reopened.");
        } else {
            tracing::info!(port = %self.port, device = %self.device, "Serial port opened.");
        }
    }

    /// Opening failed. The first failure in a row is a WARN; the rest are DEBUG, so an
    /// unplugged device does not fill the log.
    pub fn open_failed(&self, error: &dyn std::error::Error, retry_in: Duration, first: bool) {
        self.port_errors.inc();
        self.errors.port.inc();
        if first {
            tracing::warn!(port = %self.port, device = %self.device, error = %chain(error), retry_in_ms = retry_in.as_millis() as u64, "Cannot open the serial port; retrying with backoff. Is the device plugged in and the path right?");
        } else {
            tracing::debug!(port = %self.port, device = %self.device, error = %chain(error), retry_in_ms = retry_in.as_millis() as u64, "Still cannot open the serial port.");
        }
    }

    /// The open port failed: a read or write error, or end of file (unplugged).
    pub fn port_gone(&self, why: &str) {
        self.port_errors.inc();
        self.errors.port.inc();
        tracing::warn!(port = %self.port, device = %self.device, reason = why, "Serial port lost (unplugged?); closing it and reopening with backoff.");
    }

    /// The port is open but the device says nothing.
    pub fn silent(&self, why: &str) {
        self.errors.silent.inc();
        tracing::warn!(port = %self.port, device = %self.device, reason = why, "Device silent; reopening the serial port.");
    }

    /// The port's input buffer could not be flushed before a poll (the poll goes out anyway;
    /// a stale byte is then taken for an unsolicited line or a garbled answer, both counted).
    pub fn flush_failed(&self, error: &dyn std::error::Error) {
        tracing::debug!(port = %self.port, device = %self.device, error = %chain(error), "Cannot flush the port's input buffer.");
    }

    /// A reading or frame could not be sent: logged and counted by the runtime, the same way
    /// for every device reader ([`runtime::events::reading_not_sent`]).
    pub fn send_failed(&self, error: &DeliveryError) {
        runtime::events::reading_not_sent(&self.core, &self.device, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use wattbus_testkit::capture;

    fn core_errors(kind: &str) -> u64 {
        Core::of("serial-ingest").error(kind).get()
    }

    /// The minute itself is LogLimit's (its own test advances the clock); here: the event
    /// goes through it per port, and counts every line both per port and under its kind.
    #[test]
    fn garbled_lines_are_all_counted_but_logged_once_a_minute_per_port() {
        let before = core_errors("garbled");
        let e = PortEvents::new("/dev/test-garbled", "garbled-test");
        let other = PortEvents::new("/dev/test-garbled-2", "garbled-test-2");
        let log = capture(|| {
            e.garbled(&ParseError::Empty, "", Some(9600));
            for _ in 0..500 {
                e.garbled(&ParseError::Empty, "x", Some(9600));
            }
            e.not_utf8(Some(9600));
            other.not_utf8(None);
        });
        let lines = log.at(Level::WARN);
        assert_eq!(lines.len(), 2, "the first of each port only: {lines:#?}");
        assert!(
            lines[0].contains("port=/dev/test-garbled ")
                && lines[0].contains("garbled_since_last_log=1")
        );
        assert!(lines[0].contains("baud=9600"), "{}", lines[0]);
        assert!(lines[1].contains("port=/dev/test-garbled-2 ") && lines[1].contains("not UTF-8"));
        assert!(
            !lines[1].contains("baud="),
            "a tcp:// port names no baud rate of its own: {}",
            lines[1]
        );
        assert_eq!(e.garbled.get(), 502, "the port's counter counts every one");
        assert_eq!(
            core_errors("garbled") - before,
            503,
            "and so does the core kind"
        );
    }

    #[test]
    fn dropped_stream_lines_are_counted_by_line_and_logged_once_a_minute_per_port() {
        let before = core_errors("clock");
        let e = PortEvents::new("/dev/test-dropped", "dropped-test");
        let log = capture(|| {
            for _ in 0..10 {
                e.dropped_lines(7);
            }
        });
        let lines = log.at(Level::WARN);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("dropped_lines=7"), "{}", lines[0]);
        assert_eq!(e.dropped_lines.get(), 70);
        assert_eq!(
            core_errors("clock") - before,
            10,
            "one error event per drop"
        );
    }

    #[test]
    fn every_error_event_counts_under_a_declared_kind() {
        let e = PortEvents::new("/dev/test-kinds", "kinds-test");
        let io = std::io::Error::other("gone");
        let events: [(&str, &dyn Fn()); 6] = [
            ("overlong", &|| e.overlong(512)),
            ("timeout", &|| e.timeout(1, 3)),
            ("port", &|| e.open_failed(&io, Duration::from_secs(1), true)),
            ("port", &|| e.port_gone("end of file")),
            ("silent", &|| e.silent("no line for 10 s")),
            ("gap", &|| e.lost_lines(3)),
        ];
        for (kind, event) in events {
            assert!(ERROR_KINDS.contains(&kind), "{kind} is not declared");
            let before = core_errors(kind);
            event();
            assert_eq!(core_errors(kind) - before, 1, "{kind}");
        }
        assert_eq!(e.port_errors.get(), 2);
    }
}
