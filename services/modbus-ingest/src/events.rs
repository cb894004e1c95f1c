//! Every notable event of a bus and its devices logs and counts here, in one place: the log
//! line is for the person at the terminal, the counters (labelled `bus`, `device`, and `code`
//! for exceptions) for the dashboard and for the `modbus_device` health measurement.
//!
//! Log levels follow STYLE.md. A device that stops answering is WARN once when it becomes
//! degraded and INFO once when it recovers, never per poll (a meter switched off for a week
//! would otherwise fill the log). ERROR is kept for what a person must fix: a device that
//! refuses the profile's reads with exception 01/02 poll after poll (wrong profile, or another
//! meter on that slave address) — its readings will not come until someone acts.

use runtime::telemetry::{Counter, Gauge};

/// Consecutive illegal-function/address exceptions after which the profile is considered
/// wrong for the device (one could be a meter busy with a tariff switch; three in a row
/// are not).
const MISMATCH_AFTER: u32 = 3;

/// Counters of one bus.
#[derive(Debug, Clone)]
pub struct BusEvents {
    bus: String,
    reconnects: Counter,
    link_errors: Counter,
}

impl BusEvents {
    pub fn new(bus: &str) -> Self {
        let l: [(&'static str, &str); 1] = [("bus", bus)];
        Self {
            bus: bus.to_string(),
            reconnects: Counter::new(
                "wattbus_modbus_reconnects_total",
                "Times a bus's port or connection was opened again (after a failure, or to resync after garbage).",
                &l,
            ),
            link_errors: Counter::new(
                "wattbus_modbus_link_errors_total",
                "Failures to open a port or connect, and I/O errors on an open link.",
                &l,
            ),
        }
    }

    pub fn connected(&self, first: bool, link: &str) {
        if first {
            tracing::debug!(bus = %self.bus, link, "Bus link open.");
        } else {
            self.reconnects.inc();
            tracing::debug!(bus = %self.bus, link, "Bus link open again.");
        }
    }

    /// The link could not be opened, or broke. WARN once per outage (`first`), DEBUG for
    /// every further attempt.
    pub fn link_failed(
        &self,
        error: &dyn std::error::Error,
        link: &str,
        first: bool,
        retry_ms: u64,
    ) {
        self.link_errors.inc();
        if first {
            tracing::warn!(bus = %self.bus, link, error = %chain(error), retry_ms, "Bus link failed; retrying with backoff. Readings of every device on it are missing until it is back.");
        } else {
            tracing::debug!(bus = %self.bus, link, error = %chain(error), retry_ms, "Bus link still failing.");
        }
    }

    pub fn link_restored(&self, link: &str) {
        tracing::info!(bus = %self.bus, link, "Bus link restored.");
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }
}

/// Counters and log state of one device.
#[derive(Debug, Clone)]
pub struct DeviceEvents {
    bus: String,
    device: String,
    requests: Counter,
    retries: Counter,
    timeouts: Counter,
    crc_errors: Counter,
    wrong_slave: Counter,
    exceptions: Counter,
    bad_values: Counter,
    readings: Counter,
    degraded: Gauge,
    /// Consecutive responses that were exception 01 or 02.
    mismatch_streak: u32,
    /// The same counts, of this task only: the Prometheus counters are process-wide and
    /// shared by every task with the same labels, the health measurement reports this bus's.
    pub counts: Counts,
}

/// What happened to one device since the service started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub retries: u64,
    pub timeouts: u64,
    pub crc_errors: u64,
    pub wrong_slave: u64,
    pub exceptions: u64,
    pub readings: u64,
}

impl Counts {
    /// Requests that got no usable answer or an exception.
    pub fn errors(&self) -> u64 {
        self.timeouts + self.crc_errors + self.wrong_slave + self.exceptions
    }
}

impl DeviceEvents {
    pub fn new(bus: &str, device: &str) -> Self {
        let l: [(&'static str, &str); 2] = [("bus", bus), ("device", device)];
        Self {
            bus: bus.to_string(),
            device: device.to_string(),
            requests: Counter::new(
                "wattbus_modbus_requests_total",
                "Read requests sent to a device, retries included.",
                &l,
            ),
            retries: Counter::new(
                "wattbus_modbus_retries_total",
                "Requests sent again after no answer or a garbled one.",
                &l,
            ),
            timeouts: Counter::new(
                "wattbus_modbus_timeouts_total",
                "Requests that got no byte of answer within timeout_ms.",
                &l,
            ),
            crc_errors: Counter::new(
                "wattbus_modbus_crc_errors_total",
                "Answers that were garbled: wrong CRC, a short or malformed frame.",
                &l,
            ),
            wrong_slave: Counter::new(
                "wattbus_modbus_wrong_slave_total",
                "Answers from another slave address than the one asked (two meters on one address?).",
                &l,
            ),
            exceptions: Counter::new(
                "wattbus_modbus_exceptions_all_total",
                "Exception responses of any code (per code: wattbus_modbus_exceptions_total).",
                &l,
            ),
            bad_values: Counter::new(
                "wattbus_modbus_bad_values_total",
                "Register values that decoded to NaN or infinity and were left out.",
                &l,
            ),
            readings: Counter::new(
                "wattbus_modbus_readings_total",
                "Measurements journaled and published from a device.",
                &l,
            ),
            degraded: Gauge::new(
                "wattbus_modbus_device_degraded",
                "1 while a device is backed off because it stopped answering.",
                &l,
            ),
            mismatch_streak: 0,
            counts: Counts::default(),
        }
    }

    pub fn request(&mut self, retry: bool) {
        self.requests.inc();
        self.counts.requests += 1;
        if retry {
            self.retries.inc();
            self.counts.retries += 1;
        }
    }

    pub fn timeout(&mut self, timeout_ms: u128) {
        self.timeouts.inc();
        self.counts.timeouts += 1;
        tracing::debug!(bus = %self.bus, device = %self.device, timeout_ms, "No answer in time.");
    }

    pub fn garbled(&mut self, what: &str) {
        self.crc_errors.inc();
        self.counts.crc_errors += 1;
        tracing::debug!(bus = %self.bus, device = %self.device, what, "Garbled answer discarded; the link is reopened to resync.");
    }

    pub fn wrong_slave(&mut self, detail: &str) {
        self.wrong_slave.inc();
        self.counts.wrong_slave += 1;
        tracing::debug!(bus = %self.bus, device = %self.device, detail, "Answer from another slave discarded.");
    }

    /// An exception response. `code` is the Modbus exception code.
    pub fn exception(&mut self, code: u8, function: u8, start: u16, count: u16) {
        self.exceptions.inc();
        self.counts.exceptions += 1;
        let code_label = format!("{code:02}");
        Counter::new(
            "wattbus_modbus_exceptions_total",
            "Exception responses by code (01 illegal function, 02 illegal data address, 04 device failure, 06 busy, …).",
            &[("bus", &self.bus), ("device", &self.device), ("code", &code_label)],
        )
        .inc();
        if matches!(code, 1 | 2) {
            self.mismatch_streak += 1;
            if self.mismatch_streak == MISMATCH_AFTER {
                tracing::error!(bus = %self.bus, device = %self.device, code, function, start = format!("{start:#06x}"), count, "The device refuses the profile's read poll after poll (illegal function/address): check the device's `profile` and `slave`. Its readings stay missing until fixed.");
                return;
            }
        }
        tracing::debug!(bus = %self.bus, device = %self.device, code, function, start = format!("{start:#06x}"), count, "Exception response.");
    }

    /// A good response ends a run of mismatch exceptions.
    pub fn answered(&mut self) {
        self.mismatch_streak = 0;
    }

    pub fn bad_value(&self, field: &str, error: &dyn std::error::Error) {
        self.bad_values.inc();
        tracing::debug!(bus = %self.bus, device = %self.device, field, error = %error, "Value left out.");
    }

    pub fn reading(&mut self) {
        self.readings.inc();
        self.counts.readings += 1;
    }

    pub fn degraded(&self, backoff_ms: u64) {
        self.degraded.set(1.0);
        tracing::warn!(bus = %self.bus, device = %self.device, backoff_ms, "Device stopped answering; backing off its polls (up to backoff_max_ms) so the bus's other devices keep their rates.");
    }

    pub fn recovered(&self) {
        self.degraded.set(0.0);
        tracing::info!(bus = %self.bus, device = %self.device, "Device answers again; polling at its normal rate.");
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.get() > 0.5
    }
}

/// An error and its sources, `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
