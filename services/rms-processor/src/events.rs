//! The processor's notable events, each logged and counted in one place (as the runtime's
//! `events`): the log line for the person at the terminal, the counter for the dashboard.
//!
//! The unit is the device: [`Events::device`] holds each device's counters, made once. Every
//! error event also counts in the core `wattbus_errors_total{service="rms-processor",kind}`
//! (the kinds are [`ERROR_KINDS`]), and every dead letter in the core
//! `wattbus_dead_letters_total` (docs/metrics.md).
//!
//! A device that sends poison frames usually sends many (a producer whose clock is wrong
//! stamps every frame wrong), so the log lines are limited to one per device and kind of
//! event per minute, each saying how many it stands for; the counters count every one.

use std::collections::HashMap;
use std::time::Duration;

use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, LogLimit, chain};

use crate::window::FrameOutcome;

/// The processor's own kinds of `wattbus_errors_total`, besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A frame ending more than max_ahead_ms after this host's clock: dead-lettered.
    "ahead",
    // A frame's sample rate outside 1 Hz..200 kHz: dead-lettered.
    "rate",
    // A frame naming one channel twice: dead-lettered.
    "channels",
    // A frame naming another device or site than its topic (or this processor's site): dead-lettered.
    "identity",
    // A frame without an origin for a device that has an owner (a possible forgery): dead-lettered.
    "origin",
    // A computed reading that cannot be stored (not a finite number): dead-lettered, its energy not counted.
    "unstorable_reading",
    // This host's clock reads before 2020: frames left unacknowledged until it is set.
    "clock_not_set",
    // A frame from another producer than the one whose frames its device takes: refused.
    "other_producer",
    // A channel's power beyond 10 MW: published as out_of_range, its energy not counted.
    "implausible",
    // A hole in a device's frames that no replay filled within reorder_ms: those samples are lost.
    "unfilled_hole",
    // A checkpoint could not journal, fsync or save: readings wait, frames stay unacknowledged.
    "checkpoint",
];

/// Least time between two log lines about the same device and kind of event.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The service's name in the core metrics.
const SERVICE: &str = <crate::RmsProcessor as runtime::Service>::NAME;

/// Events that are not about one device, and each device's events.
#[derive(Debug)]
pub struct Events {
    core: Core,
    frames: Counter,
    foreign: Counter,
    checkpoint_failures: Counter,
    /// Checkpoint failures are logged like a device's events, once a minute.
    log: LogLimit,
    devices: HashMap<String, DeviceEvents>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        Self {
            core: Core::of(SERVICE),
            frames: Counter::new("wattbus_rms_frames_total", "Raw frames received.", &[]),
            foreign: Counter::new(
                "wattbus_rms_foreign_frames_total",
                "Frames of devices another instance processes (left unacknowledged for it).",
                &[],
            ),
            checkpoint_failures: Counter::new(
                "wattbus_rms_checkpoint_failures_total",
                "Checkpoints that could not journal, fsync or save (frames stay unacknowledged and are tried again).",
                &[],
            ),
            log: LogLimit::new(LOG_EVERY),
            devices: HashMap::new(),
        }
    }

    /// `device`'s events (its counters are made the first time).
    pub fn device(&mut self, device: &str) -> &DeviceEvents {
        if !self.devices.contains_key(device) {
            let events = DeviceEvents::new(&self.core, device);
            self.devices.insert(device.to_string(), events);
        }
        &self.devices[device]
    }

    /// A raw frame came in (before it is checked).
    pub fn frame(&self) {
        self.frames.inc();
    }

    /// A frame of a device another instance processes: left unacknowledged for it.
    pub fn foreign(&self) {
        self.foreign.inc();
    }

    /// A checkpoint could not finish: nothing after the failed step happened.
    pub fn checkpoint_failed(&self, error: &dyn std::error::Error, waiting: usize) {
        self.checkpoint_failures.inc();
        self.core.error("checkpoint").inc();
        if let Some(unlogged) = self.log.allow_key("checkpoint") {
            tracing::error!(error = %chain(error), readings_waiting = waiting, unlogged, "Checkpoint failed; readings wait in memory and their frames stay unacknowledged. Trying again at the next one.");
        }
    }

    /// The checkpoint at shutdown failed: the next start replays these readings' frames.
    pub fn final_checkpoint_failed(&self, error: &dyn std::error::Error, waiting: usize) {
        self.checkpoint_failures.inc();
        self.core.error("checkpoint").inc();
        tracing::error!(error = %chain(error), readings = waiting, "Final checkpoint failed; the next start replays the frames of these readings.");
    }
}

/// One device's counters (labelled `device`) and its log limit (per kind of event).
#[derive(Debug)]
pub struct DeviceEvents {
    device: String,
    core: Core,
    log: LogLimit,
    windows: Counter,
    partial: Counter,
    samples: Counter,
    duplicate: Counter,
    gaps: Counter,
    discarded: Counter,
    unfilled: Counter,
    clock_not_set: Counter,
    implausible: Counter,
}

impl DeviceEvents {
    fn new(core: &Core, device: &str) -> Self {
        let labels: [(&'static str, &str); 1] = [("device", device)];
        Self {
            device: device.to_string(),
            core: core.clone(),
            log: LogLimit::new(LOG_EVERY),
            windows: Counter::new(
                "wattbus_rms_windows_total",
                "Windows computed (one reading per channel each).",
                &labels,
            ),
            partial: Counter::new(
                "wattbus_rms_partial_windows_total",
                "Windows closed short of the interval (a hole in the samples, a layout change, an idle device).",
                &labels,
            ),
            samples: Counter::new(
                "wattbus_rms_samples_total",
                "Samples received (per channel-instant: a 3-channel frame of 2000 counts 2000).",
                &labels,
            ),
            duplicate: Counter::new(
                "wattbus_rms_duplicate_samples_total",
                "Samples received again (replays) and skipped because they were already used.",
                &labels,
            ),
            gaps: Counter::new(
                "wattbus_rms_gaps_total",
                "Frames that did not continue the samples before them.",
                &labels,
            ),
            discarded: Counter::new(
                "wattbus_rms_discarded_samples_total",
                "Samples discarded because a run ended with fewer than two mains cycles of them.",
                &labels,
            ),
            unfilled: Counter::new(
                "wattbus_rms_unfilled_holes_total",
                "Holes in the frames that no replay filled within reorder_ms (lost in transport and not replayed).",
                &labels,
            ),
            clock_not_set: Counter::new(
                "wattbus_rms_clock_not_set_frames_total",
                "Frames left unacknowledged because this host's clock read before 2020 (replayed once it is set).",
                &labels,
            ),
            implausible: Counter::new(
                "wattbus_rms_implausible_readings_total",
                "Readings whose power was beyond 10 MW: published as out_of_range, energy not counted.",
                &labels,
            ),
        }
    }

    /// A frame of `samples` samples per channel is taken into the device's windows.
    pub fn samples(&self, samples: usize) {
        self.samples.add(samples as u64);
    }

    /// What pushing a frame (or releasing held ones) did to the device's windows.
    pub fn pushed(&self, p: FrameOutcome) {
        self.duplicate.add(p.duplicate_samples as u64);
        self.discarded.add(p.discarded_samples as u64);
        if p.gap {
            self.gaps.inc();
            tracing::debug!(device = %self.device, "Frame does not continue the samples before it; window closed early.");
        }
    }

    /// A quiet device's held samples were flushed; `discarded` were too few for a window.
    pub fn flushed(&self, discarded: usize) {
        self.discarded.add(discarded as u64);
    }

    /// A window was computed into readings.
    pub fn window(&self, partial: bool) {
        self.windows.inc();
        if partial {
            self.partial.inc();
        }
    }

    /// No replay filled a hole in the frames within `wait_ms`: the run goes on after it.
    /// Logged every time, as before: a hole is given up only after `reorder_ms`.
    pub fn hole_unfilled(&self, wait_ms: u64) {
        self.unfilled.inc();
        self.core.error("unfilled_hole").inc();
        tracing::warn!(device = %self.device, wait_ms, "No replay filled a hole in the frames in time; continuing after it (those samples are not counted).");
    }

    /// A frame or a reading of the device was sent to the dead-letter topic instead of used.
    /// `kind`: a frame's (`ahead`, `rate`, `channels`, `identity`, `origin`, see `check`) or
    /// `unstorable_reading`; one of [`ERROR_KINDS`].
    pub fn dead_lettered(&self, kind: &'static str, reason: &str) {
        debug_assert!(ERROR_KINDS.contains(&kind), "undeclared error kind {kind}");
        self.core.error(kind).inc();
        self.core.dead_letters.inc();
        let Some(unlogged) = self.log.allow_key(kind) else {
            return;
        };
        let device = self.device.as_str();
        if kind == "unstorable_reading" {
            tracing::error!(
                device,
                kind,
                reason,
                unlogged,
                "A reading could not be stored; sent to the dead-letter topic, its energy not counted. The device's other readings continue."
            );
        } else {
            tracing::error!(
                device,
                kind,
                reason,
                unlogged,
                "A raw frame cannot be used; sent to the dead-letter topic and acknowledged. The device's other frames continue."
            );
        }
    }

    /// A frame was left unused because this host's clock is not set.
    pub fn clock_not_set(&self) {
        self.clock_not_set.inc();
        self.core.error("clock_not_set").inc();
        if let Some(unlogged) = self.log.allow_key("clock_not_set") {
            tracing::warn!(
                device = %self.device,
                unlogged,
                "This host's clock is not set (it reads before 2020); frames are left unacknowledged until it is (their producer replays them). Is NTP running?"
            );
        }
    }

    /// A frame of the device came from `producer`, not from `owner`, whose frames it takes.
    pub fn other_producer(&self, owner: &str, producer: &str) {
        Counter::new(
            "wattbus_rms_other_producer_frames_total",
            "Frames refused (left unacknowledged) because their device takes the frames of another producer.",
            &[("device", &self.device), ("producer", producer)],
        )
        .inc();
        self.core.error("other_producer").inc();
        if let Some(unlogged) = self.log.allow_key("other_producer") {
            tracing::error!(
                device = %self.device,
                owner,
                producer,
                unlogged,
                "A frame of this device came from another producer than the one whose frames it \
                 takes; refused and left unacknowledged. Two producers publishing one device \
                 name (a misconfiguration, or a forger: give each producer user its `devices` \
                 in [[broker.users]]). If the device moved to the new producer, its frames are \
                 taken once they start 10 minutes after the last one counted from the old."
            );
        }
    }

    /// The device now takes the frames of `producer` instead of `owner`'s.
    pub fn moved(&self, owner: &str, producer: &str) {
        tracing::warn!(
            device = %self.device,
            from = owner,
            to = producer,
            "This device's frames now come from another producer (the old one sent none for 10 \
             minutes); taking them."
        );
    }

    /// A channel's power was beyond what a channel can measure.
    pub fn implausible(&self, channel: &str, power: f64) {
        self.implausible.inc();
        self.core.error("implausible").inc();
        if let Some(unlogged) = self.log.allow_key("implausible") {
            tracing::warn!(
                device = %self.device,
                channel,
                power,
                unlogged,
                "Power beyond what a channel can measure (is the scale right?); published as out_of_range, energy not counted."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use wattbus_testkit::logged;

    fn errors(kind: &str) -> u64 {
        Core::of(SERVICE).error(kind).get()
    }

    #[test]
    fn a_dead_letter_counts_under_its_kind_and_as_a_dead_letter_and_logs_once_a_minute() {
        let mut events = Events::new();
        let (ahead, dead) = (errors("ahead"), Core::of(SERVICE).dead_letters.get());
        let log = logged(|| {
            let d = events.device("test-dl");
            for _ in 0..5 {
                d.dead_lettered("ahead", "the frame ends 3600 s after this host's clock");
            }
        });
        // Only this test counts `ahead` in this binary; dead letters are counted by others too.
        assert_eq!(errors("ahead"), ahead + 5);
        assert!(Core::of(SERVICE).dead_letters.get() >= dead + 5);
        assert_eq!(
            log.matches("A raw frame cannot be used").count(),
            1,
            "{log}"
        );
        assert!(log.contains("device=\"test-dl\"") || log.contains("device=test-dl"));
        // Another kind and another device each have their own line.
        let log = logged(|| {
            events
                .device("test-dl")
                .dead_lettered("rate", "sample_rate_hz = 0.001");
            events
                .device("test-dl")
                .dead_lettered("rate", "sample_rate_hz = 0.001");
            events.device("test-dl-2").dead_lettered("ahead", "later");
        });
        assert_eq!(
            log.matches("A raw frame cannot be used").count(),
            2,
            "{log}"
        );
    }

    #[test]
    fn each_device_error_counts_under_its_kind_and_is_rate_limited_per_kind() {
        let mut events = Events::new();
        let kinds = [
            "clock_not_set",
            "other_producer",
            "implausible",
            "unfilled_hole",
            "unstorable_reading",
        ];
        let before: Vec<u64> = kinds.iter().map(|k| errors(k)).collect();
        let other = Counter::new(
            "wattbus_rms_other_producer_frames_total",
            "",
            &[("device", "test-kinds"), ("producer", "forger")],
        );
        let log = logged(|| {
            let d = events.device("test-kinds");
            for _ in 0..3 {
                d.clock_not_set();
                d.other_producer("owner", "forger");
                d.implausible("ct1", 2e7);
                d.hole_unfilled(1000);
                d.dead_lettered("unstorable_reading", "current_a is not a finite number");
            }
        });
        // Only this test counts these kinds in this binary.
        for (k, b) in kinds.iter().zip(before) {
            assert_eq!(errors(k), b + 3, "{k}");
        }
        assert_eq!(other.get(), 3);
        for line in [
            "clock is not set",
            "another producer than the one",
            "Power beyond what a channel can measure",
            "A reading could not be stored",
        ] {
            assert_eq!(log.matches(line).count(), 1, "{line}: {log}");
        }
        // Not limited, as before: each hole has waited reorder_ms already.
        assert_eq!(log.matches("No replay filled a hole").count(), 3, "{log}");
    }

    #[test]
    fn a_failed_checkpoint_counts_and_logs_its_cause_chain_once_a_minute() {
        let events = Events::new();
        let before = errors("checkpoint");
        let e = io::Error::other("no space left on device");
        let log = logged(|| {
            events.checkpoint_failed(&e, 7);
            events.checkpoint_failed(&e, 8);
        });
        assert_eq!(errors("checkpoint"), before + 2);
        assert_eq!(log.matches("Checkpoint failed").count(), 1, "{log}");
        assert!(log.contains("no space left on device"), "{log}");
    }

    #[test]
    fn every_error_kind_is_declared_once_and_apart_from_the_runtimes() {
        for (i, k) in ERROR_KINDS.iter().enumerate() {
            assert!(!ERROR_KINDS[..i].contains(k), "{k} twice");
            assert!(
                !runtime::telemetry::core::RUNTIME_ERROR_KINDS.contains(k),
                "{k} is the runtime's"
            );
        }
    }
}
