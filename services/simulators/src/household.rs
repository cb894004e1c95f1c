//! A household's electrical load, as a meter would read it. Deterministic for a given seed,
//! so tests can rely on its ranges.

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HouseholdReading {
    pub power_w: f64,
    pub voltage_v: f64,
    pub current_a: f64,
    pub frequency_hz: f64,
    /// The import energy register; only grows (across restarts too: [`crate::Register`]).
    pub energy_wh: f64,
}

#[derive(Debug, Clone)]
pub struct Household {
    rng: u64,
    energy_wh: f64,
    last_ms: Option<i64>,
    /// Remaining kettle time, in ms.
    kettle_ms: i64,
    voltage_v: f64,
}

/// The most a household draws (base swell, fridge, kettle, noise): what its energy register
/// can gain in a given time at most.
pub const MAX_POWER_W: f64 = 180.0 + 60.0 + 95.0 + 2000.0 + 2.5;

impl Household {
    /// Its register continues from `energy_wh`, as a real meter's does whoever reads it.
    pub fn with_energy(seed: u64, energy_wh: f64) -> Self {
        Self {
            energy_wh,
            ..Self::new(seed)
        }
    }

    pub fn new(seed: u64) -> Self {
        Self {
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            energy_wh: 0.0,
            last_ms: None,
            kettle_ms: 0,
            voltage_v: 230.0,
        }
    }

    /// xorshift64*: enough randomness for a load curve, no dependency.
    fn rand(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The register now, unrounded.
    pub fn energy_wh(&self) -> f64 {
        self.energy_wh
    }

    /// Advance to `now_ms` and read.
    pub fn step(&mut self, now_ms: i64) -> HouseholdReading {
        let dt_ms = self.last_ms.map_or(0, |l| (now_ms - l).clamp(0, 3_600_000));
        self.last_ms = Some(now_ms);
        // Base load with a slow daily-ish swell, the fridge compressor on ~40% of a 20 min
        // cycle, and a 2 kW kettle for a couple of minutes now and then.
        let t = now_ms as f64 / 1000.0;
        let base = 180.0 + 60.0 * (t / 3600.0 * std::f64::consts::TAU / 24.0).sin();
        let fridge = if (t % 1200.0) < 480.0 { 95.0 } else { 0.0 };
        if self.kettle_ms <= 0 && self.rand() < 0.004 {
            self.kettle_ms = 120_000;
        }
        let kettle = if self.kettle_ms > 0 { 2000.0 } else { 0.0 };
        self.kettle_ms -= dt_ms;
        let power_w = base + fridge + kettle + 5.0 * (self.rand() - 0.5);
        self.voltage_v =
            (self.voltage_v + (self.rand() - 0.5) * 0.6).clamp(225.0, 236.0) - kettle * 0.0005;
        let frequency_hz = 50.0 + (self.rand() - 0.5) * 0.04;
        self.energy_wh += power_w * dt_ms as f64 / 3_600_000.0;
        HouseholdReading {
            power_w: round(power_w, 1),
            voltage_v: round(self.voltage_v, 1),
            current_a: round(power_w / self.voltage_v, 3),
            frequency_hz: round(frequency_hz, 2),
            energy_wh: round(self.energy_wh, 3),
        }
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible_and_energy_only_grows() {
        let mut h = Household::new(7);
        let mut last_energy = 0.0;
        for i in 0..20_000 {
            let r = h.step(1_764_000_000_000 + i * 1000);
            assert!((100.0..2400.0).contains(&r.power_w), "{r:?}");
            assert!((220.0..240.0).contains(&r.voltage_v), "{r:?}");
            assert!(
                (r.current_a - r.power_w / r.voltage_v).abs() < 0.01,
                "{r:?}"
            );
            assert!(r.energy_wh >= last_energy);
            last_energy = r.energy_wh;
        }
        // ~5.5 h at 150..2400 W.
        assert!(
            last_energy > 5.5 * 150.0 && last_energy < 5.5 * 2400.0,
            "{last_energy}"
        );
    }
}
