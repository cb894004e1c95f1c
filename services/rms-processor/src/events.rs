//! The processor's notable events, each logged and counted in one place (as the runtime's
//! `events`): the log line for the person at the terminal, the counter for the dashboard.
//!
//! A device that sends poison frames usually sends many (a producer whose clock is wrong
//! stamps every frame wrong), so the log lines are limited to one per device and kind of
//! event per minute, each saying how many it stands for; the counters count every one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use runtime::telemetry::Counter;

/// Least time between two log lines about the same device and kind of event.
const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Events {
    /// Per (device, kind): when a line was last logged, and how many events since.
    logged: HashMap<(String, &'static str), (Instant, u64)>,
}

impl Events {
    /// Whether to log this one, and how many went unlogged before it.
    fn due(&mut self, device: &str, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        match self.logged.get_mut(&(device.to_string(), kind)) {
            Some((last, quiet)) if now.duration_since(*last) < LOG_EVERY => {
                *quiet += 1;
                None
            }
            Some((last, quiet)) => {
                let n = *quiet;
                *last = now;
                *quiet = 0;
                Some(n)
            }
            None => {
                self.logged.insert((device.to_string(), kind), (now, 0));
                Some(0)
            }
        }
    }

    /// A frame or a reading of `device` was sent to the dead-letter topic instead of used.
    /// `kind`: `ahead`, `rate`, `channels`, `identity`, `origin` (a frame), `reading` (a reading).
    pub fn dead_lettered(&mut self, device: &str, kind: &'static str, reason: &str) {
        Counter::new(
            "wattbus_rms_dead_letters_total",
            "Frames and readings sent to the dead-letter topic instead of being used (kind: ahead, rate, channels, identity, origin, reading).",
            &[("device", device), ("kind", kind)],
        )
        .inc();
        if let Some(unlogged) = self.due(device, kind) {
            if kind == "reading" {
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
    }

    /// A frame was left unused because this host's clock is not set.
    pub fn clock_not_set(&mut self, device: &str) {
        Counter::new(
            "wattbus_rms_clock_not_set_frames_total",
            "Frames left unacknowledged because this host's clock read before 2020 (replayed once it is set).",
            &[("device", device)],
        )
        .inc();
        if let Some(unlogged) = self.due(device, "clock") {
            tracing::warn!(
                device,
                unlogged,
                "This host's clock is not set (it reads before 2020); frames are left unacknowledged until it is (their producer replays them). Is NTP running?"
            );
        }
    }

    /// A frame of `device` came from `producer`, not from `owner`, whose frames it takes.
    pub fn other_producer(&mut self, device: &str, owner: &str, producer: &str) {
        Counter::new(
            "wattbus_rms_other_producer_frames_total",
            "Frames refused (left unacknowledged) because their device takes the frames of another producer.",
            &[("device", device), ("producer", producer)],
        )
        .inc();
        if let Some(unlogged) = self.due(device, "other_producer") {
            tracing::error!(
                device,
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

    /// `device` now takes the frames of `producer` instead of `owner`'s.
    pub fn device_moved(&mut self, device: &str, owner: &str, producer: &str) {
        tracing::warn!(
            device,
            from = owner,
            to = producer,
            "This device's frames now come from another producer (the old one sent none for 10 \
             minutes); taking them."
        );
    }

    /// A channel's power was beyond what a channel can measure.
    pub fn implausible(&mut self, device: &str, channel: &str, power: f64) {
        Counter::new(
            "wattbus_rms_implausible_readings_total",
            "Readings whose power was beyond 10 MW: published as out_of_range, energy not counted.",
            &[("device", device)],
        )
        .inc();
        if let Some(unlogged) = self.due(device, "implausible") {
            tracing::warn!(
                device,
                channel,
                power,
                unlogged,
                "Power beyond what a channel can measure (is the scale right?); published as out_of_range, energy not counted."
            );
        }
    }

    /// A checkpoint could not finish: nothing after the failed step happened.
    pub fn checkpoint_failed(&mut self, error: &dyn std::error::Error, waiting: usize) {
        Counter::new(
            "wattbus_rms_checkpoint_failures_total",
            "Checkpoints that could not journal, fsync or save (frames stay unacknowledged and are tried again).",
            &[],
        )
        .inc();
        if let Some(unlogged) = self.due("", "checkpoint") {
            tracing::error!(error = %error, readings_waiting = waiting, unlogged, "Checkpoint failed; readings wait in memory and their frames stay unacknowledged. Trying again at the next one.");
        }
    }
}
