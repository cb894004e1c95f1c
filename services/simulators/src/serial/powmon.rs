//! `request-response` protocol device (PowMon style): ACS712 hall-effect current sensors on
//! the Arduino's analog pins, read when the Pi asks.
//!
//! The model turns a simulated load in amps into the raw ADC count the sketch would send, by
//! inverting the doc's conversion: `raw = round((amps × sensitivity + offset_v) / vpp)`,
//! clamped to the ADC's 0..1023. It records the amps it meant, so a test can check the
//! service's conversion end to end.

use std::fmt::Write as _;

/// What a sensor is measuring, over time.
#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    /// A steady current (a heater on a thermostat's long "on"; or a saturating one).
    Constant { amps: f64 },
    /// On for `on_ms` at the start of every `period_ms`, off the rest: a kettle now and then,
    /// a fridge compressor cycling.
    Cycle {
        on_amps: f64,
        off_amps: f64,
        on_ms: i64,
        period_ms: i64,
    },
}

impl Load {
    /// A 2 kW kettle at 230 V (8.7 A), boiling for 2 minutes every 10.
    pub fn kettle() -> Self {
        Self::Cycle {
            on_amps: 2000.0 / 230.0,
            off_amps: 0.0,
            on_ms: 120_000,
            period_ms: 600_000,
        }
    }

    /// A fridge compressor (~95 W) on 8 minutes of every 20, with a small standby draw.
    pub fn fridge() -> Self {
        Self::Cycle {
            on_amps: 95.0 / 230.0,
            off_amps: 0.02,
            on_ms: 480_000,
            period_ms: 1_200_000,
        }
    }

    /// 13.9 A, beyond the default `max_amps` of 10 (raw 700 with the default constants, the
    /// doc's out-of-range example): exercises `out_of_range`.
    pub fn saturated() -> Self {
        Self::Constant { amps: 13.9 }
    }

    /// The current at `now_ms` (Unix ms).
    pub fn amps_at(&self, now_ms: i64) -> f64 {
        match *self {
            Self::Constant { amps } => amps,
            Self::Cycle {
                on_amps,
                off_amps,
                on_ms,
                period_ms,
            } => {
                if now_ms.rem_euclid(period_ms.max(1)) < on_ms {
                    on_amps
                } else {
                    off_amps
                }
            }
        }
    }
}

/// Deliberate faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PowMonFault {
    /// Every N-th request gets no answer (a sketch busy or a lost line): the service counts a
    /// `timeout`, and after `max_silent_polls` in a row reopens the port.
    pub silent_every: Option<u32>,
}

/// Configuration of a [`PowMon`]; the conversion constants are the doc's, per sensor the same.
#[derive(Debug, Clone, PartialEq)]
pub struct PowMonConfig {
    /// One load per sensor (A0, A1, A2): 1..=3.
    pub sensors: Vec<Load>,
    /// 0.066 V/A for an ACS712-30A.
    pub sensitivity_v_per_a: f64,
    /// The sensor's output at 0 A: half its 5 V supply.
    pub offset_v: f64,
    /// ADC reference (the Uno's 5 V) ...
    pub adc_vref_v: f64,
    /// ... and steps (10 bits): `vpp = adc_vref_v / adc_counts`.
    pub adc_counts: u32,
    pub fault: PowMonFault,
}

impl Default for PowMonConfig {
    fn default() -> Self {
        Self {
            sensors: vec![Load::kettle()],
            sensitivity_v_per_a: 0.066,
            offset_v: 2.5,
            adc_vref_v: 5.0,
            adc_counts: 1024,
            fault: PowMonFault::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PowMonConfigError {
    #[error("sensors must be 1..=3, got {0}")]
    Sensors(usize),
    #[error("sensitivity_v_per_a, adc_vref_v and adc_counts must be positive")]
    Constants,
    #[error("silent_every must be at least 1")]
    SilentEvery,
}

/// The request/response device.
#[derive(Debug, Clone)]
pub struct PowMon {
    config: PowMonConfig,
    /// The amps each sensor was meant to read at the last answer, for tests to compare.
    last_amps: Vec<f64>,
    /// Requests seen, for the fault schedule.
    requests: u64,
}

impl PowMon {
    pub fn new(config: PowMonConfig) -> Result<Self, PowMonConfigError> {
        if !(1..=3).contains(&config.sensors.len()) {
            return Err(PowMonConfigError::Sensors(config.sensors.len()));
        }
        if !(config.sensitivity_v_per_a > 0.0 && config.adc_vref_v > 0.0 && config.adc_counts > 0) {
            return Err(PowMonConfigError::Constants);
        }
        if config.fault.silent_every == Some(0) {
            return Err(PowMonConfigError::SilentEvery);
        }
        Ok(Self {
            last_amps: vec![0.0; config.sensors.len()],
            config,
            requests: 0,
        })
    }

    pub fn config(&self) -> &PowMonConfig {
        &self.config
    }

    /// The amps each sensor was meant to read when the last answer was made.
    pub fn last_amps(&self) -> &[f64] {
        &self.last_amps
    }

    /// The raw count the ADC gives for `amps`, clamped to the ADC's range as the real one is.
    pub fn raw_for_amps(&self, amps: f64) -> u16 {
        let c = &self.config;
        let vpp = c.adc_vref_v / f64::from(c.adc_counts);
        let raw = ((amps * c.sensitivity_v_per_a + c.offset_v) / vpp).round();
        let max = f64::from(c.adc_counts.saturating_sub(1).min(u32::from(u16::MAX)));
        // Clamped first, so the cast cannot truncate.
        raw.clamp(0.0, max) as u16
    }

    /// The answer to one received line (without its `\n`; a trailing `\r` is ignored), or
    /// `None` for a line that is not a request, or a request the fault plan drops.
    pub fn answer(&mut self, line: &[u8], now_ms: i64) -> Option<String> {
        if !is_request(line) {
            return None;
        }
        self.requests += 1;
        if let Some(n) = self.config.fault.silent_every
            && self.requests.is_multiple_of(u64::from(n))
        {
            return None;
        }
        let mut out = String::with_capacity(16);
        for (i, load) in self.config.sensors.iter().enumerate() {
            let amps = load.amps_at(now_ms);
            self.last_amps[i] = amps;
            if i > 0 {
                out.push(',');
            }
            // Writing to a String cannot fail.
            let _infallible = write!(out, "{}", self.raw_for_amps(amps));
        }
        // Serial.println's line end.
        out.push_str("\r\n");
        Some(out)
    }
}

/// A request is any line whose first word is `read` (the doc; the Pi sends `read \n`).
pub fn is_request(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.split(|b| b.is_ascii_whitespace())
        .find(|w| !w.is_empty())
        .is_some_and(|w| w == b"read")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_764_000_000_000;

    fn powmon(sensors: Vec<Load>) -> PowMon {
        PowMon::new(PowMonConfig {
            sensors,
            ..PowMonConfig::default()
        })
        .unwrap()
    }

    /// The doc's conversion, written out again here rather than shared with the model.
    fn doc_amps(raw: u16) -> f64 {
        let vpp = 5.0 / 1024.0;
        (f64::from(raw) * vpp - 2.5) / 0.066
    }

    #[test]
    fn answers_the_six_bytes_the_pi_sends() {
        let mut p = powmon(vec![Load::Constant { amps: 0.0 }]);
        assert_eq!(p.answer(b"read ", T).as_deref(), Some("512\r\n"));
        assert_eq!(p.answer(b"read", T).as_deref(), Some("512\r\n"));
        assert_eq!(p.answer(b"read\r", T).as_deref(), Some("512\r\n"));
        assert_eq!(p.answer(b"  read all", T).as_deref(), Some("512\r\n"));
    }

    #[test]
    fn other_lines_get_no_answer() {
        let mut p = powmon(vec![Load::Constant { amps: 0.0 }]);
        for line in [
            b"".as_slice(),
            b"reading",
            b"READ",
            b"rea",
            b"x read",
            b"# read",
            b"\r",
        ] {
            assert_eq!(
                p.answer(line, T),
                None,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn several_sensors_answer_in_one_line() {
        let mut p = powmon(vec![
            Load::Constant { amps: 0.0 },
            Load::Constant {
                amps: 6.510_416_666,
            },
            Load::Constant {
                amps: -8.285_984_848,
            },
        ]);
        // The doc's table: 512 → 0 A, 600 → 6.51 A, 400 → −8.29 A.
        assert_eq!(p.answer(b"read ", T).as_deref(), Some("512,600,400\r\n"));
    }

    #[test]
    fn raw_values_round_trip_through_the_doc_conversion_within_one_step() {
        let step = (5.0 / 1024.0) / 0.066;
        let mut p = powmon(vec![Load::kettle(), Load::fridge()]);
        let mut seen_on = false;
        for i in 0..1200 {
            let now = T + i * 1000;
            let answer = p.answer(b"read ", now).unwrap();
            let raws: Vec<u16> = answer
                .strip_suffix("\r\n")
                .unwrap()
                .split(',')
                .map(|v| v.parse().unwrap())
                .collect();
            assert_eq!(raws.len(), 2);
            for (raw, intended) in raws.iter().zip(p.last_amps()) {
                let got = doc_amps(*raw);
                assert!((got - intended).abs() <= step, "{got} vs {intended}");
            }
            seen_on |= p.last_amps()[0] > 8.0;
        }
        assert!(seen_on, "the kettle never boiled in 20 minutes");
    }

    #[test]
    fn a_saturating_load_reads_beyond_max_amps_and_clamps_at_the_adc_limit() {
        let mut p = powmon(vec![Load::saturated(), Load::Constant { amps: 60.0 }]);
        assert_eq!(p.answer(b"read ", T).as_deref(), Some("700,1023\r\n"));
        assert!(doc_amps(700) > 10.0);
    }

    #[test]
    fn the_fault_plan_leaves_every_nth_request_unanswered() {
        let mut p = PowMon::new(PowMonConfig {
            fault: PowMonFault {
                silent_every: Some(3),
            },
            ..PowMonConfig::default()
        })
        .unwrap();
        let answered: Vec<bool> = (0..6).map(|_| p.answer(b"read ", T).is_some()).collect();
        assert_eq!(answered, [true, true, false, true, true, false]);
    }
}
