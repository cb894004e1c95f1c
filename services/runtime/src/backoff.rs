//! How long to wait before trying again: the one backoff every retry loop in wattbus uses.
//!
//! Reconnecting to the broker, reopening a serial port, reopening a Modbus link, polling a
//! meter that stopped answering, retrying an InfluxDB write, restarting the demo's broker:
//! each waits `min · 2^n` after its n-th failure in a row (n from 0), capped at `max`, and
//! starts over at `min` after a success.
//!
//! Two halves, both pure (no clock, no tokio):
//! - [`Backoff`], the policy: `min` and `max`, checked once where they are configured (a zero
//!   `min` would retry in a tight loop, a `max` below `min` is a typo), so no retry loop checks
//!   them again.
//! - [`Retries`], one loop's state: the failures in a row. [`Retries::failed`] returns the wait
//!   after this failure, jittered into `[d/2, d]` so that seven services (or four ports, or
//!   three Pis) that failed together do not retry in lockstep; [`Retries::failed_exactly`] returns
//!   it unjittered, for schedulers whose tests pin exact times.

use std::time::Duration;

use crate::ConfigError;

/// A backoff policy: `min` doubling per failure up to `max`. Valid by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

/// Past this many doublings the cap has long been reached (2^20 · 1 ms is over 17 minutes);
/// stopping there keeps the arithmetic far from overflow.
const MAX_DOUBLINGS: u32 = 20;

impl Backoff {
    /// `min` doubling up to `max`; `None` if `min` is zero or `max` is below it.
    pub const fn new(min: Duration, max: Duration) -> Option<Self> {
        if min.is_zero() || max.as_nanos() < min.as_nanos() {
            None
        } else {
            Some(Self { min, max })
        }
    }

    /// For a constant policy: a bad one fails the build (in a `const`) rather than a Pi.
    ///
    /// # Panics
    ///
    /// If `min` is zero or `max` below it; use it only for constants.
    pub const fn constant(min: Duration, max: Duration) -> Self {
        match Self::new(min, max) {
            Some(b) => b,
            None => panic!("backoff: min must be positive and max at least min"),
        }
    }

    /// From a config section's `<min_key>` and `<max_key>` in milliseconds: an error names
    /// the key at fault (`modbus_ingest.buses[0].reconnect_max_ms`) and what is wrong.
    pub fn from_config_ms(
        min_key: &str,
        min_ms: u64,
        max_key: &str,
        max_ms: u64,
    ) -> Result<Self, ConfigError> {
        if min_ms == 0 {
            return Err(ConfigError::new(
                min_key,
                "must be at least 1 (0 would retry in a tight loop)",
            ));
        }
        if max_ms < min_ms {
            return Err(ConfigError::new(
                max_key,
                format!("must be at least {min_key} ({min_ms}), is {max_ms}"),
            ));
        }
        Ok(Self {
            min: Duration::from_millis(min_ms),
            max: Duration::from_millis(max_ms),
        })
    }

    pub const fn min(&self) -> Duration {
        self.min
    }

    pub const fn max(&self) -> Duration {
        self.max
    }

    /// The wait after the `n`-th failure in a row (0 for the first): `min · 2^n`, capped.
    pub fn nominal(&self, n: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << n.min(MAX_DOUBLINGS))
            .min(self.max)
    }

    /// The wait after one of `d`: doubled, capped at `max`. For a wait that did not start at
    /// `min` (a replay due a reconnect's short grace after it doubles from there).
    pub fn doubled(&self, d: Duration) -> Duration {
        d.saturating_mul(2).min(self.max)
    }

    /// [`Self::nominal`] scaled by `unit` in `[0, 1]` into `[d/2, d]`: the jitter, with the
    /// randomness passed in so that it is testable.
    pub fn jittered(&self, n: u32, unit: f64) -> Duration {
        self.nominal(n).mul_f64(0.5 + unit.clamp(0.0, 1.0) * 0.5)
    }
}

/// One retry loop's state: how many times in a row it failed.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    failures: u32,
}

impl Retries {
    pub const fn new(policy: Backoff) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// One more failure: the wait before the next attempt, jittered.
    pub fn failed(&mut self) -> Duration {
        let wait = self.policy.jittered(self.failures, fastrand::f64());
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// One more failure: the wait before the next attempt, exactly `min · 2^n` (capped).
    pub fn failed_exactly(&mut self) -> Duration {
        let wait = self.policy.nominal(self.failures);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// It worked: the next failure waits `min` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far (0 after a success).
    pub const fn failures(&self) -> u32 {
        self.failures
    }

    /// Carry a count over (a connection the broker closed right after accepting it counts as
    /// one more failure, not a fresh start: see `bus`).
    pub fn set_failures(&mut self, failures: u32) {
        self.failures = failures;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_min_and_stops_at_max() {
        let b = Backoff::new(100 * MS, 5000 * MS).unwrap();
        let waits: Vec<u64> = (0..8).map(|n| b.nominal(n).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.nominal(u32::MAX), 5000 * MS, "no overflow however many");
    }

    #[test]
    fn doubling_an_arbitrary_wait_stays_within_the_policy() {
        let b = Backoff::new(100 * MS, 5000 * MS).unwrap();
        assert_eq!(
            b.doubled(30 * MS),
            60 * MS,
            "a short wait doubles from where it is"
        );
        assert_eq!(b.doubled(700 * MS), 1400 * MS);
        assert_eq!(b.doubled(4000 * MS), 5000 * MS, "capped");
        assert_eq!(b.doubled(Duration::MAX), 5000 * MS);
    }

    #[test]
    fn jitter_stays_within_the_upper_half() {
        let b = Backoff::new(100 * MS, 5000 * MS).unwrap();
        for n in 0..30 {
            let d = b.nominal(n);
            assert_eq!(b.jittered(n, 0.0), d / 2);
            assert_eq!(b.jittered(n, 1.0), d);
            assert_eq!(b.jittered(n, 7.0), d, "out-of-range randomness is clamped");
        }
        let mut r = Retries::new(b);
        for n in 0..30 {
            let w = r.failed();
            let d = b.nominal(n);
            assert!(w >= d / 2 && w <= d, "failure {n}: {w:?} vs {d:?}");
        }
    }

    #[test]
    fn a_success_starts_over_at_min() {
        let mut r = Retries::new(Backoff::constant(10 * MS, 1000 * MS));
        assert_eq!(r.failed_exactly(), 10 * MS);
        assert_eq!(r.failed_exactly(), 20 * MS);
        assert_eq!(r.failed_exactly(), 40 * MS);
        assert_eq!(r.failures(), 3);
        r.succeeded();
        assert_eq!(r.failures(), 0);
        assert_eq!(r.failed_exactly(), 10 * MS);
    }

    #[test]
    fn bad_policies_are_refused_naming_the_key() {
        assert!(Backoff::new(Duration::ZERO, MS).is_none());
        assert!(Backoff::new(2 * MS, MS).is_none());
        assert_eq!(Backoff::new(MS, MS).map(|b| b.nominal(9)), Some(MS));

        let e = Backoff::from_config_ms("s.min_ms", 0, "s.max_ms", 10).unwrap_err();
        assert_eq!(e.key, "s.min_ms");
        assert!(e.reason.contains("at least 1"), "{e}");
        let e = Backoff::from_config_ms("s.min_ms", 500, "s.max_ms", 100).unwrap_err();
        assert_eq!(e.key, "s.max_ms");
        assert!(e.reason.contains("s.min_ms (500)"), "{e}");
        let b = Backoff::from_config_ms("s.min_ms", 5, "s.max_ms", 100).unwrap();
        assert_eq!((b.min(), b.max()), (5 * MS, 100 * MS));
    }
}
