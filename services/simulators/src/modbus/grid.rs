//! The household behind a simulated meter: what flows through it at an instant, and the
//! energy counters that integrate it. Pure (no tokio), deterministic for a seed and a time.
//!
//! The load is built to exercise the signed registers a decoder gets wrong most easily:
//! - **export**: rooftop solar from 06:00 to 20:00 UTC peaks near 3 kW around 13:00, well
//!   above the house's few hundred watts, so active power goes negative in the afternoon;
//! - **leading power factor**: LED drivers and switch-mode supplies draw a constant capacitive
//!   ~140 var; when the fridge compressor (inductive) is off, the capacitive part dominates, the
//!   reactive power is negative and the power factor is negative (leading).
//!
//! UTC rather than local time so a test that picks "14:00" gets the same sun on every machine.

use std::f64::consts::{PI, TAU};

/// Nominal mains voltage; the simulated voltage wanders a few volts around it.
const NOMINAL_V: f64 = 230.0;
/// Capacitive draw of electronics that is always on (negative = capacitive).
const ELECTRONICS_VAR: f64 = -140.0;
/// Integration step of the energy counters: fine enough that the 10 Wh register resolution
/// never sees the integration error, coarse enough that a day costs 86 400 cheap steps.
const STEP_MS: i64 = 1000;
/// Above this many steps the step grows, so a jump of months does not stall a request.
const MAX_STEPS: i64 = 200_000;

/// What flows through the meter at one instant (unrounded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Flow {
    /// Net active power; negative = export.
    pub power_w: f64,
    /// Net reactive power; negative = capacitive (leading).
    pub reactive_var: f64,
    pub voltage_v: f64,
    pub frequency_hz: f64,
}

impl Flow {
    pub(crate) fn apparent_va(&self) -> f64 {
        self.power_w.hypot(self.reactive_var)
    }

    pub(crate) fn current_a(&self) -> f64 {
        self.apparent_va() / self.voltage_v
    }

    /// |P| / S, negative when the reactive power is capacitive (the ORNO and Eastron
    /// convention: the sign says leading/lagging, not import/export). 1.0 with no load.
    pub(crate) fn power_factor(&self) -> f64 {
        let s = self.apparent_va();
        if s < 1e-9 {
            return 1.0;
        }
        let pf = self.power_w.abs() / s;
        if self.reactive_var < 0.0 { -pf } else { pf }
    }
}

/// The household: a seed shifts the phases so two meters on one bus read differently.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GridLoad {
    phase: f64,
}

impl GridLoad {
    pub(crate) fn new(seed: u64) -> Self {
        // Any spread of phases will do; a multiplicative hash keeps seeds 1 and 2 far apart.
        let phase = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        Self { phase }
    }

    pub(crate) fn flow(&self, now_ms: i64) -> Flow {
        let t = now_ms as f64 / 1000.0;
        let hour = (now_ms.rem_euclid(86_400_000)) as f64 / 3_600_000.0;
        let base = 220.0 + 40.0 * (TAU * t / 5400.0 + TAU * self.phase).sin();
        // Compressor on for 8 of every 20 minutes.
        let fridge_on = (t + 1200.0 * self.phase).rem_euclid(1200.0) < 480.0;
        let (fridge_w, fridge_var) = if fridge_on {
            (110.0, 160.0)
        } else {
            (0.0, 0.0)
        };
        let cooking_w = if (18.0..19.5).contains(&hour) {
            1800.0
        } else {
            0.0
        };
        let solar_w = if (6.0..20.0).contains(&hour) {
            let clouds = 0.875 + 0.125 * (TAU * t / 900.0 + TAU * self.phase).sin();
            3200.0 * (PI * (hour - 6.0) / 14.0).sin().powf(1.5) * clouds
        } else {
            0.0
        };
        let power_w = base + fridge_w + cooking_w - solar_w;
        // Motors and transformers in the base load are slightly inductive.
        let reactive_var = 0.08 * base + fridge_var + ELECTRONICS_VAR;
        // Import pulls the voltage down, export pushes it up, as on a real feeder.
        let voltage_v = NOMINAL_V + 3.0 * (TAU * t / 7200.0).sin() - 0.002 * power_w;
        let frequency_hz = 50.0
            + 0.03 * (TAU * t / 300.0 + TAU * self.phase).sin()
            + 0.01 * (TAU * t / 47.0).sin();
        Flow {
            power_w,
            reactive_var,
            voltage_v,
            frequency_hz,
        }
    }
}

/// Energy counters integrated from the flow. Time only moves forward: a request for an
/// earlier instant is served from the latest state, so no counter can ever go down.
#[derive(Debug, Clone)]
pub(crate) struct Integrator<const N: usize> {
    last_ms: i64,
    /// Counter values in Wh (or varh), unrounded.
    pub totals: [f64; N],
}

impl<const N: usize> Integrator<N> {
    pub(crate) fn new(start_ms: i64, initial: [f64; N]) -> Self {
        Self {
            last_ms: start_ms,
            totals: initial,
        }
    }

    /// Integrate to `now_ms` (midpoint rule); `rate(t_ms)` gives each counter's rate in W
    /// (or var) at an instant. Negative rates are ignored: counters never run backwards.
    pub(crate) fn advance(&mut self, now_ms: i64, mut rate: impl FnMut(i64) -> [f64; N]) {
        let span = now_ms - self.last_ms;
        if span <= 0 {
            return;
        }
        let step = STEP_MS.max(span / MAX_STEPS + 1);
        let mut t = self.last_ms;
        while t < now_ms {
            let dt = step.min(now_ms - t);
            let r = rate(t + dt / 2);
            for (total, r) in self.totals.iter_mut().zip(r) {
                *total += r.max(0.0) * dt as f64 / 3_600_000.0;
            }
            t += dt;
        }
        self.last_ms = now_ms;
    }

    pub(crate) fn last_ms(&self) -> i64 {
        self.last_ms
    }
}
