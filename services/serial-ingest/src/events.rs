//! Every notable event of a port logs and counts here, in one place: the log line is for the
//! person at the terminal, the counter (labelled `port`, `device`) for the dashboard.
//!
//! Garbled lines are the one event that can come thousands of times a second (a wrong baud
//! rate garbles every line), so their WARN is rate-limited: the first, then at most one a
//! minute with the count since the last. The counter always counts every one.

use std::time::Duration;

use runtime::delivery::DeliveryError;
use runtime::telemetry::Counter;
use tokio::time::Instant;

use crate::protocol::{Excerpt, ParseError};

/// At most one garbled-line WARN per port this often.
const GARBLED_LOG_EVERY: Duration = Duration::from_secs(60);

/// The counters of one port.
#[derive(Debug, Clone)]
pub struct PortEvents {
    port: String,
    device: String,
    lines: Counter,
    readings: Counter,
    frames: Counter,
    garbled: Counter,
    overlong: Counter,
    timeouts: Counter,
    lost_lines: Counter,
    dropped_lines: Counter,
    reopens: Counter,
    errors: Counter,
    unknown_keys: Counter,
    out_of_range: Counter,
    ignored: Counter,
    /// When the last garbled WARN was logged, and how many went unlogged since.
    garbled_logged: Option<Instant>,
    /// Likewise for dropped stream lines.
    dropped_logged: Option<Instant>,
    dropped_quiet: u64,
    garbled_quiet: u64,
}

impl PortEvents {
    pub fn new(port: &str, device: &str) -> Self {
        let l: [(&'static str, &str); 2] = [("port", port), ("device", device)];
        Self {
            port: port.to_string(),
            device: device.to_string(),
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
            errors: Counter::new(
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
            garbled_logged: None,
            garbled_quiet: 0,
            dropped_logged: None,
            dropped_quiet: 0,
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

    pub fn garbled(&mut self, reason: &ParseError, line: &str, baud: u32) {
        self.garbled_text(&reason.to_string(), Some(line), baud);
    }

    pub fn not_utf8(&mut self, baud: u32) {
        self.garbled_text("not UTF-8", None, baud);
    }

    fn garbled_text(&mut self, reason: &str, line: Option<&str>, baud: u32) {
        self.garbled.inc();
        let now = Instant::now();
        let due = self
            .garbled_logged
            .is_none_or(|t| now.duration_since(t) >= GARBLED_LOG_EVERY);
        if !due {
            self.garbled_quiet += 1;
            return;
        }
        let since_last = self.garbled_quiet + 1;
        self.garbled_logged = Some(now);
        self.garbled_quiet = 0;
        let excerpt = line.map(|l| Excerpt(l).to_string()).unwrap_or_default();
        tracing::warn!(
            port = %self.port,
            device = %self.device,
            reason,
            line = %excerpt,
            garbled_since_last_log = since_last,
            baud,
            "Garbled line skipped (logged at most once a minute). If every line is garbled, check `baud` against the sketch and the cable."
        );
    }

    pub fn overlong(&self, max_line_bytes: usize) {
        self.overlong.inc();
        tracing::warn!(port = %self.port, device = %self.device, max_line_bytes, "Line longer than max_line_bytes discarded (a missing newline or a wrong baud rate?).");
    }

    pub fn timeout(&self, silent_polls: u32, max_silent_polls: u32) {
        self.timeouts.inc();
        tracing::debug!(port = %self.port, device = %self.device, silent_polls, max_silent_polls, "No answer to a poll in time; skipped.");
    }

    pub fn unsolicited(&self) {
        self.ignored.inc();
        tracing::debug!(port = %self.port, device = %self.device, "Line with no poll outstanding discarded (a late answer?).");
    }

    pub fn lost_lines(&self, n: u32) {
        self.lost_lines.add(u64::from(n));
        tracing::warn!(port = %self.port, device = %self.device, lost_lines = n, "Stream lines lost (sequence gap); the frame is closed at the gap.");
    }

    pub fn resynced(&self) {
        tracing::info!(port = %self.port, device = %self.device, "Sample clock and system clock drifted apart by more than 50 ms; frames restart at the read time.");
    }

    /// Lines are lost here (the system clock stepped back, or the device's clock is fast), so
    /// it is a WARN, at most once a minute like garbled lines: a clock stepped back an hour
    /// drops lines for an hour.
    pub fn dropped_lines(&mut self, n: u32) {
        self.dropped_lines.add(u64::from(n));
        let now = Instant::now();
        if self
            .dropped_logged
            .is_some_and(|t| now.duration_since(t) < GARBLED_LOG_EVERY)
        {
            self.dropped_quiet += u64::from(n);
            return;
        }
        let dropped_since_last_log = self.dropped_quiet + u64::from(n);
        self.dropped_logged = Some(now);
        self.dropped_quiet = 0;
        tracing::warn!(
            port = %self.port,
            device = %self.device,
            dropped_since_last_log,
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
        self.errors.inc();
        if first {
            tracing::warn!(port = %self.port, device = %self.device, error = %error, retry_in_ms = retry_in.as_millis() as u64, "Cannot open the serial port; retrying with backoff. Is the device plugged in and the path right?");
        } else {
            tracing::debug!(port = %self.port, device = %self.device, error = %error, retry_in_ms = retry_in.as_millis() as u64, "Still cannot open the serial port.");
        }
    }

    /// The open port failed: a read or write error, or end of file (unplugged).
    pub fn port_gone(&self, why: &str) {
        self.errors.inc();
        tracing::warn!(port = %self.port, device = %self.device, reason = why, "Serial port lost (unplugged?); closing it and reopening with backoff.");
    }

    /// The port is open but the device says nothing.
    pub fn silent(&self, why: &str) {
        tracing::warn!(port = %self.port, device = %self.device, reason = why, "Device silent; reopening the serial port.");
    }

    /// A reading or frame could not be sent. A journal that refuses it (disk full) is logged
    /// once per episode, counted and reported on /healthz by the producer, which tries again
    /// with the next one: here it is only a DEBUG line, not one ERROR per reading.
    pub fn send_failed(&self, error: &DeliveryError) {
        if error.is_not_journaled() {
            tracing::debug!(port = %self.port, device = %self.device, error = %error, "A reading was not journaled.");
        } else {
            tracing::error!(port = %self.port, device = %self.device, error = %error, "Cannot send a reading; it is lost.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn garbled_lines_are_all_counted_but_logged_at_most_once_a_minute() {
        let mut e = PortEvents::new("/dev/test-garbled", "garbled-test");
        let why = ParseError::Empty;
        e.garbled(&why, "", 9600);
        assert_eq!(e.garbled_quiet, 0, "the first one is logged");
        for _ in 0..500 {
            e.garbled(&why, "x", 9600);
        }
        assert_eq!(e.garbled_quiet, 500, "the rest within the minute are not");
        tokio::time::advance(Duration::from_secs(59)).await;
        e.not_utf8(9600);
        assert_eq!(e.garbled_quiet, 501);
        tokio::time::advance(Duration::from_secs(2)).await;
        e.garbled(&why, "x", 9600);
        assert_eq!(e.garbled_quiet, 0, "a minute on, one line with the count");
        assert_eq!(e.garbled.get(), 503, "the counter counts every one");
    }
}
