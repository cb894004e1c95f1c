//! What to read next on one bus: pure (no tokio, no clock), times are milliseconds on a
//! monotonic clock the caller owns.
//!
//! Every device on a bus shares one scheduler, because a bus carries one request at a time.
//! Each device has poll classes (`fast` every 1 s, `slow` every 60 s, …); a *poll* of a device
//! reads every class that is due at that moment, planned together by [`crate::plan::plan`], so
//! when energy is due it rides along with the power read instead of costing a second turn.
//!
//! Invariants:
//! - A class is due at `next_due`; after it is polled at `now` its next due time is
//!   `next_due + interval`, or `now + interval` if the bus fell behind by a whole interval
//!   (missed polls are skipped, never caught up in a burst).
//! - Among devices with something due, the one due longest goes first (ties: configuration
//!   order). A device that was just polled is due again one interval later, so every device
//!   gets its turn and none can starve another.
//! - A device whose poll failed (no usable answer) is *degraded*: it is not polled before
//!   `retry_at = now + backoff`, the backoff doubling from `backoff_min_ms` to
//!   `backoff_max_ms` with each further failure. Its due classes wait meanwhile, so it takes
//!   one request's worth of line time per backoff instead of one per interval, and the others
//!   keep their rates. The first success clears the backoff and the degraded state.
//! - Degraded/recovered transitions are reported once each, for events to log once.

use std::collections::BTreeMap;

use runtime::backoff::{Backoff, Retries};

use crate::config::DeviceSpec;
use crate::plan::{PlanError, Request, plan};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

#[derive(Debug, Clone)]
struct Class {
    name: String,
    interval: Millis,
    next_due: Millis,
}

#[derive(Debug, Clone)]
struct DeviceState {
    classes: Vec<Class>,
    /// Consecutive failed polls.
    /// Failed polls in a row, and the backoff they earned.
    retries: Retries,
    /// While degraded: not polled before this.
    retry_at: Option<Millis>,
}

impl DeviceState {
    /// When this device next has something to poll.
    fn due_at(&self) -> Millis {
        let class = self
            .classes
            .iter()
            .map(|c| c.next_due)
            .min()
            .unwrap_or(Millis::MAX);
        class.max(self.retry_at.unwrap_or(0))
    }
}

/// One poll of one device: the requests to send, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    /// Index of the device in the list given to [`Scheduler::new`].
    pub device: usize,
    /// The classes read, in name order.
    pub classes: Vec<String>,
    pub requests: Vec<Request>,
    /// When it was due (so `now - due` is how late the bus is).
    pub due: Millis,
}

/// A change of a device's health that events log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The first failure after a success: the device is now backed off.
    Degraded,
    /// The first success after failures.
    Recovered,
}

/// Every device of one bus and when each of its classes is due.
#[derive(Debug, Clone)]
pub struct Scheduler {
    devices: Vec<DeviceState>,
    /// Registers by device, for planning.
    specs: Vec<DeviceSpec>,
}

impl Scheduler {
    /// Every class of every device is due at `now` (the first poll reads everything).
    pub fn new(specs: Vec<DeviceSpec>, backoff: Backoff, now: Millis) -> Self {
        let devices = specs
            .iter()
            .map(|s| DeviceState {
                classes: s
                    .poll_ms
                    .iter()
                    // A class without registers would be polled with no request: leave it out.
                    .filter(|(name, _)| s.profile.registers.iter().any(|r| &r.poll == *name))
                    .map(|(name, &interval)| Class {
                        name: name.clone(),
                        interval: interval.max(1),
                        next_due: now,
                    })
                    .collect(),
                retries: Retries::new(backoff),
                retry_at: None,
            })
            .collect();
        Self { devices, specs }
    }

    pub fn specs(&self) -> &[DeviceSpec] {
        &self.specs
    }

    /// When the next poll is due (possibly in the past), or `None` without devices.
    pub fn next_due(&self) -> Option<Millis> {
        self.devices.iter().map(DeviceState::due_at).min()
    }

    /// The poll that is due at `now`, if any: the device due longest, with every class of it
    /// that is due. Its classes are rescheduled as if the poll happened at `now`.
    pub fn take_due(&mut self, now: Millis) -> Result<Option<Poll>, PlanError> {
        let Some((index, due)) = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (i, d.due_at()))
            .filter(|(_, due)| *due <= now)
            .min_by_key(|(i, due)| (*due, *i))
        else {
            return Ok(None);
        };
        let dev = &mut self.devices[index];
        let mut classes = Vec::new();
        for c in dev.classes.iter_mut().filter(|c| c.next_due <= now) {
            classes.push(c.name.clone());
            c.next_due = c.next_due.saturating_add(c.interval);
            if c.next_due <= now {
                c.next_due = now.saturating_add(c.interval);
            }
        }
        let spec = &self.specs[index];
        let requests = plan(
            &spec.profile.registers,
            |r| classes.contains(&r.poll),
            spec.limits,
        )?;
        Ok(Some(Poll {
            device: index,
            classes,
            requests,
            due,
        }))
    }

    /// Records how a poll of `device` ended at `now`.
    pub fn report(&mut self, device: usize, now: Millis, success: bool) -> Transition {
        let Some(dev) = self.devices.get_mut(device) else {
            return Transition::None;
        };
        if success {
            let was = dev.retries.failures() > 0;
            dev.retries.succeeded();
            dev.retry_at = None;
            return if was {
                Transition::Recovered
            } else {
                Transition::None
            };
        }
        // Unjittered: the scheduler is pure and its tests pin exact times; devices of one bus
        // share its line anyway, so there is no herd to spread.
        let backoff = u64::try_from(dev.retries.failed_exactly().as_millis()).unwrap_or(u64::MAX);
        dev.retry_at = Some(now.saturating_add(backoff));
        if dev.retries.failures() == 1 {
            Transition::Degraded
        } else {
            Transition::None
        }
    }

    pub fn is_degraded(&self, device: usize) -> bool {
        self.devices
            .get(device)
            .is_some_and(|d| d.retries.failures() > 0)
    }

    /// When a degraded device will be tried again.
    pub fn retry_at(&self, device: usize) -> Option<Millis> {
        self.devices.get(device).and_then(|d| d.retry_at)
    }

    /// Next due time per class of `device` (for tests and diagnostics).
    pub fn class_due(&self, device: usize) -> BTreeMap<String, Millis> {
        self.devices
            .get(device)
            .map(|d| {
                d.classes
                    .iter()
                    .map(|c| (c.name.clone(), c.next_due))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Function, Profiles};
    use proto::Segment;

    fn backoff(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff::from_config_ms("min", min_ms, "max", max_ms).unwrap()
    }
    use std::sync::Arc;

    fn we515(name: &str, fast: u64, slow: u64) -> DeviceSpec {
        let set = Profiles::builtin().unwrap();
        let p = set.get("orno-we-515").unwrap().clone();
        DeviceSpec {
            name: Segment::new(name).unwrap(),
            slave: 1,
            limits: p.limits,
            profile: Arc::new(p),
            poll_ms: [("fast".to_string(), fast), ("slow".to_string(), slow)].into(),
        }
    }

    fn ranges(p: &Poll) -> Vec<(u16, u16)> {
        p.requests.iter().map(|r| (r.start, r.last())).collect()
    }

    /// Runs the bus for `until` ms: every due poll at its due time, each taking `cost` ms of
    /// bus time; `fails(device)` says whether the device answers. Returns (time, device) of
    /// every poll.
    fn simulate(
        s: &mut Scheduler,
        until: Millis,
        cost: Millis,
        fails: impl Fn(usize, Millis) -> bool,
    ) -> Vec<(Millis, usize)> {
        let mut now = 0;
        let mut out = Vec::new();
        while now < until {
            match s.take_due(now).unwrap() {
                Some(p) => {
                    out.push((now, p.device));
                    // A failing device costs its timeout; an answering one its line time.
                    now += cost;
                    let failed = fails(p.device, now);
                    s.report(p.device, now, !failed);
                }
                None => now = s.next_due().unwrap().max(now + 1),
            }
        }
        out
    }

    #[test]
    fn the_first_poll_reads_every_class_then_each_class_at_its_own_rate() {
        let mut s = Scheduler::new(vec![we515("a", 1000, 60_000)], backoff(1000, 60_000), 0);
        let first = s.take_due(0).unwrap().unwrap();
        assert_eq!(first.classes, ["fast", "slow"]);
        assert_eq!(ranges(&first), [(0x0130, 0x015B), (0xA000, 0xA027)]);
        assert_eq!(s.take_due(999).unwrap(), None);
        assert_eq!(s.next_due(), Some(1000));
        let second = s.take_due(1000).unwrap().unwrap();
        assert_eq!(second.classes, ["fast"]);
        assert_eq!(ranges(&second), [(0x0130, 0x015B)]);
        assert!(
            second
                .requests
                .iter()
                .all(|r| r.function == Function::Holding)
        );
        // 60 s later both are due again and go out as one poll.
        for t in 2..60 {
            let p = s.take_due(t * 1000).unwrap().unwrap();
            assert_eq!(p.classes, ["fast"], "at {t} s");
        }
        let p = s.take_due(60_000).unwrap().unwrap();
        assert_eq!(p.classes, ["fast", "slow"]);
        assert_eq!(p.requests.len(), 2);
        assert_eq!(s.class_due(0)["slow"], 120_000);
    }

    #[test]
    fn a_late_bus_skips_missed_polls_instead_of_bursting() {
        let mut s = Scheduler::new(vec![we515("a", 1000, 60_000)], backoff(1000, 60_000), 0);
        s.take_due(0).unwrap();
        // The bus was busy for 3.5 s: one poll now, the next one interval later.
        let p = s.take_due(3500).unwrap().unwrap();
        assert_eq!(p.due, 1000);
        assert_eq!(s.class_due(0)["fast"], 4500);
        assert_eq!(s.take_due(3500).unwrap(), None);
    }

    #[test]
    fn devices_take_turns_by_how_long_they_have_been_due() {
        let mut s = Scheduler::new(
            vec![we515("a", 1000, 60_000), we515("b", 1000, 60_000)],
            backoff(1000, 60_000),
            0,
        );
        let polls = simulate(&mut s, 5000, 100, |_, _| false);
        let order: Vec<usize> = polls.iter().map(|p| p.1).collect();
        assert_eq!(order, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
        // Each device every 1000 ms.
        let a: Vec<Millis> = polls.iter().filter(|p| p.1 == 0).map(|p| p.0).collect();
        assert_eq!(a, [0, 1000, 2000, 3000, 4000]);
        let b: Vec<Millis> = polls.iter().filter(|p| p.1 == 1).map(|p| p.0).collect();
        assert_eq!(b, [100, 1100, 2100, 3100, 4100]);
    }

    #[test]
    fn a_failing_device_is_backed_off_and_does_not_delay_the_other() {
        let mut s = Scheduler::new(
            vec![we515("off", 1000, 60_000), we515("on", 1000, 60_000)],
            backoff(1000, 60_000),
            0,
        );
        // "off" never answers: each poll costs a 500 ms timeout ×2 (one retry) = 1000 ms.
        // Without backoff it would eat every second of the bus; with it, "on" keeps 1 s.
        let mut now = 0;
        let mut on = Vec::new();
        let mut off = Vec::new();
        while now < 70_000 {
            match s.take_due(now).unwrap() {
                Some(p) if p.device == 0 => {
                    off.push(now);
                    now += 1000;
                    s.report(0, now, false);
                }
                Some(p) => {
                    on.push(now);
                    now += 100;
                    s.report(p.device, now, true);
                }
                None => now = s.next_due().unwrap(),
            }
        }
        // Backoff 1, 2, 4, 8, 16, 32, 60 s after each failure ends.
        let gaps: Vec<Millis> = off.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..6], [2000, 3000, 5000, 9000, 17_000, 33_000]);
        assert!(s.is_degraded(0));
        // "on" is never late by more than one failing poll (1 s) and keeps ~1 poll/s.
        let late = on.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(late <= 2000, "longest gap {late}");
        assert!(
            on.len() >= 60,
            "{} polls of the answering device in 70 s",
            on.len()
        );
    }

    #[test]
    fn backoff_is_capped_and_cleared_by_a_success() {
        let mut s = Scheduler::new(vec![we515("a", 1000, 60_000)], backoff(1000, 4000), 0);
        assert_eq!(s.report(0, 0, false), Transition::Degraded);
        assert_eq!(s.retry_at(0), Some(1000));
        assert_eq!(s.report(0, 1000, false), Transition::None);
        assert_eq!(s.retry_at(0), Some(3000));
        s.report(0, 3000, false);
        assert_eq!(s.retry_at(0), Some(7000));
        s.report(0, 7000, false);
        assert_eq!(s.retry_at(0), Some(11_000), "capped at 4 s");
        assert_eq!(s.take_due(10_999).unwrap(), None);
        // The retry reads every class that came due meanwhile.
        let p = s.take_due(11_000).unwrap().unwrap();
        assert_eq!(p.classes, ["fast", "slow"]);
        assert_eq!(s.report(0, 11_100, true), Transition::Recovered);
        assert!(!s.is_degraded(0));
        assert_eq!(s.retry_at(0), None);
        assert_eq!(s.report(0, 12_100, true), Transition::None);
    }
}
