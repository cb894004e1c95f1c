//! Every notable event of a bus and its devices logs and counts here, in one place: the log
//! line is for the person at the terminal, the counters (labelled `bus`, `device`, and `code`
//! for exceptions) for the dashboard and for the `modbus_device` health measurement.
//!
//! Log levels follow STYLE.md. A device that stops answering is WARN once when it becomes
//! degraded and INFO once when it recovers, never per poll (a meter switched off for a week
//! would otherwise fill the log). ERROR is kept for what a person must fix: a device that
//! refuses the profile's reads with exception 01/02 poll after poll (wrong profile, or another
//! meter on that slave address) — its readings will not come until someone acts.
//!
//! Every error event also counts in the core `wattbus_errors_total{service="modbus-ingest",kind}`
//! (docs/metrics.md), under one of [`ERROR_KINDS`], so one panel shows every service's errors.

use runtime::delivery::DeliveryError;
use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, Gauge, chain};

/// The kinds of `wattbus_errors_total` modbus-ingest reports besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A request got no byte of answer within timeout_ms.
    "timeout",
    // An answer was garbled: wrong CRC, a short or malformed frame.
    "crc",
    // An answer came from another slave address than the one asked (two meters on one address?).
    "wrong_slave",
    // A device answered with a Modbus exception (wattbus_modbus_exceptions_total has its code).
    "exception",
    // A bus's port or connection could not be opened, or failed while open.
    "link",
    // A register value decoded to NaN or infinity and was left out of its reading.
    "bad_value",
    // A bus's reads could not be planned and the bus stopped (a checked configuration cannot
    // get here).
    "plan",
];

/// The service's core metrics, for a bus's or a device's events.
fn core() -> Core {
    Core::of(<crate::ModbusIngest as runtime::Service>::NAME)
}

/// Consecutive illegal-function/address exceptions after which the profile is considered
/// wrong for the device (one could be a meter busy with a tariff switch; three in a row
/// are not).
const MISMATCH_AFTER: u32 = 3;

/// Counters of one bus.
#[derive(Debug, Clone)]
pub struct BusEvents {
    bus: String,
    /// The service's core metrics: `link` and `plan` errors here, a reading not sent in the
    /// runtime.
    core: Core,
    /// `wattbus_errors_total{kind="link"}`, beside the bus's own link error counter.
    link_kind: Counter,
    reconnects: Counter,
    link_errors: Counter,
}

impl BusEvents {
    pub fn new(bus: &str) -> Self {
        let l: [(&'static str, &str); 1] = [("bus", bus)];
        let core = core();
        Self {
            bus: bus.to_string(),
            link_kind: core.error("link"),
            core,
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
        self.link_kind.inc();
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

    /// The scheduler could not plan the bus's reads: the bus task stops. Limits were checked
    /// at start-up, so a valid configuration never gets here; polling on would spin.
    pub fn cannot_plan(&self, error: &dyn std::error::Error) {
        self.core.error("plan").inc();
        tracing::error!(bus = %self.bus, error = %chain(error), "Cannot plan the bus's reads; stopping it.");
    }

    /// The bus's health measurement could not be sent ([`runtime::events::reading_not_sent`]).
    pub fn not_sent(&self, error: &DeliveryError) {
        runtime::events::reading_not_sent(&self.core, &self.bus, error);
    }
}

/// The core error counters of the kinds a device reports.
#[derive(Debug, Clone)]
struct Errors {
    timeout: Counter,
    crc: Counter,
    wrong_slave: Counter,
    exception: Counter,
    bad_value: Counter,
}

/// Counters and log state of one device.
#[derive(Debug, Clone)]
pub struct MeterEvents {
    bus: String,
    device: String,
    core: Core,
    errors: Errors,
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

impl MeterEvents {
    pub fn new(bus: &str, device: &str) -> Self {
        let l: [(&'static str, &str); 2] = [("bus", bus), ("device", device)];
        let core = core();
        Self {
            bus: bus.to_string(),
            device: device.to_string(),
            errors: Errors {
                timeout: core.error("timeout"),
                crc: core.error("crc"),
                wrong_slave: core.error("wrong_slave"),
                exception: core.error("exception"),
                bad_value: core.error("bad_value"),
            },
            core,
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
        self.errors.timeout.inc();
        self.counts.timeouts += 1;
        tracing::debug!(bus = %self.bus, device = %self.device, timeout_ms, "No answer in time.");
    }

    pub fn garbled(&mut self, what: &str) {
        self.crc_errors.inc();
        self.errors.crc.inc();
        self.counts.crc_errors += 1;
        tracing::debug!(bus = %self.bus, device = %self.device, what, "Garbled answer discarded; the link is reopened to resync.");
    }

    pub fn wrong_slave(&mut self, detail: &str) {
        self.wrong_slave.inc();
        self.errors.wrong_slave.inc();
        self.counts.wrong_slave += 1;
        tracing::debug!(bus = %self.bus, device = %self.device, detail, "Answer from another slave discarded.");
    }

    /// An exception response. `code` is the Modbus exception code.
    pub fn exception(&mut self, code: u8, function: u8, start: u16, count: u16) {
        self.exceptions.inc();
        self.errors.exception.inc();
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
        self.errors.bad_value.inc();
        tracing::debug!(bus = %self.bus, device = %self.device, field, error = %chain(error), "Value left out.");
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

    /// A reading or the device's health measurement could not be sent
    /// ([`runtime::events::reading_not_sent`]).
    pub fn not_sent(&self, error: &DeliveryError) {
        runtime::events::reading_not_sent(&self.core, &self.device, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core_errors(kind: &str) -> u64 {
        core().error(kind).get()
    }

    #[test]
    fn every_error_event_counts_under_a_declared_kind_and_per_device() {
        let bus = BusEvents::new("kinds-test-bus");
        let mut d = MeterEvents::new("kinds-test-bus", "kinds-test-meter");
        let io = std::io::Error::other("connection reset");
        let nan = std::io::Error::other("NaN");
        type Event<'a> = Box<dyn FnMut(&mut MeterEvents) + 'a>;
        let mut events: Vec<(&str, Event)> = vec![
            ("timeout", Box::new(|d| d.timeout(500))),
            ("crc", Box::new(|d| d.garbled("wrong CRC"))),
            (
                "wrong_slave",
                Box::new(|d| d.wrong_slave("slave 2, asked 1")),
            ),
            ("exception", Box::new(|d| d.exception(2, 3, 0x0130, 44))),
            ("bad_value", Box::new(|d| d.bad_value("power_w", &nan))),
            (
                "link",
                Box::new(|_| bus.link_failed(&io, "tcp 10.0.0.9:502", true, 1000)),
            ),
        ];
        for (kind, event) in &mut events {
            assert!(ERROR_KINDS.contains(kind), "{kind} is not declared");
            let before = core_errors(kind);
            event(&mut d);
            assert_eq!(core_errors(kind) - before, 1, "{kind}");
        }
        assert_eq!(
            d.counts,
            Counts {
                timeouts: 1,
                crc_errors: 1,
                wrong_slave: 1,
                exceptions: 1,
                ..Counts::default()
            },
            "the device's own counts, for its health measurement"
        );
        assert_eq!(d.bad_values.get(), 1);
        assert_eq!(bus.link_errors.get(), 1);
    }

    #[test]
    fn a_bus_that_cannot_plan_counts_its_kind() {
        let before = core_errors("plan");
        BusEvents::new("plan-test-bus").cannot_plan(&std::io::Error::other("max_registers is 0"));
        assert!(ERROR_KINDS.contains(&"plan"));
        assert_eq!(core_errors("plan") - before, 1);
    }
}
