//! `lines` protocol device: a fridge/freezer thermometer that prints `key=value` pairs when
//! it likes, e.g. `fridge=4.52 freezer=-18.31\r\n`.

use std::f64::consts::TAU;
use std::fmt::Write as _;

/// One printed key.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorChannel {
    /// `[A-Za-z0-9._-]{1,64}` per the doc.
    pub key: String,
    /// The value it swings around (e.g. 4 °C for a fridge).
    pub mean: f64,
    /// Half the peak-to-peak swing: a compressor cycle moves a fridge by about ±1 °C.
    pub swing: f64,
    /// Period of the swing, in seconds (a compressor cycle, ~20 min).
    pub period_s: f64,
    /// Uniform noise amplitude (±), a sensor's last digit.
    pub noise: f64,
}

/// Deliberate faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorFault {
    /// Every N-th line has a value with trailing junk (`4.52x`): the whole line is garbled.
    pub garble_every: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SensorConfig {
    pub channels: Vec<SensorChannel>,
    /// Decimals printed, as a sketch's `Serial.print(v, 2)`.
    pub decimals: usize,
    pub fault: SensorFault,
}

impl Default for SensorConfig {
    /// A fridge at ~4.5 °C and a freezer at ~−18 °C.
    fn default() -> Self {
        Self {
            channels: vec![
                SensorChannel {
                    key: "fridge".into(),
                    mean: 4.5,
                    swing: 1.0,
                    period_s: 1200.0,
                    noise: 0.02,
                },
                SensorChannel {
                    key: "freezer".into(),
                    mean: -18.0,
                    swing: 1.5,
                    period_s: 1800.0,
                    noise: 0.02,
                },
            ],
            decimals: 2,
            fault: SensorFault::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SensorConfigError {
    #[error("at least one channel is needed")]
    NoChannels,
    #[error("key {0:?} is not [A-Za-z0-9._-]{{1,64}}")]
    Key(String),
    #[error("garble_every must be at least 1")]
    GarbleEvery,
}

/// The sensor-lines device.
#[derive(Debug, Clone)]
pub struct Sensor {
    config: SensorConfig,
    rng: fastrand::Rng,
    lines: u64,
}

impl Sensor {
    pub fn new(config: SensorConfig, seed: u64) -> Result<Self, SensorConfigError> {
        if config.channels.is_empty() {
            return Err(SensorConfigError::NoChannels);
        }
        for c in &config.channels {
            let ok = (1..=64).contains(&c.key.len())
                && c.key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(SensorConfigError::Key(c.key.clone()));
            }
        }
        if config.fault.garble_every == Some(0) {
            return Err(SensorConfigError::GarbleEvery);
        }
        Ok(Self {
            config,
            rng: fastrand::Rng::with_seed(seed),
            lines: 0,
        })
    }

    /// The values at `now_ms` (Unix ms), before printing, in channel order.
    pub fn values_at(&mut self, now_ms: i64) -> Vec<f64> {
        let t = now_ms as f64 / 1000.0;
        self.config
            .channels
            .iter()
            .map(|c| {
                let phase = if c.period_s > 0.0 {
                    (t / c.period_s).fract()
                } else {
                    0.0
                };
                c.mean + c.swing * (TAU * phase).sin() + (self.rng.f64() * 2.0 - 1.0) * c.noise
            })
            .collect()
    }

    /// The line printed at `now_ms`, `\r\n`-terminated as `Serial.println` ends it.
    pub fn line(&mut self, now_ms: i64) -> String {
        let values = self.values_at(now_ms);
        self.lines += 1;
        let garble = self
            .config
            .fault
            .garble_every
            .is_some_and(|n| self.lines.is_multiple_of(u64::from(n)));
        let mut out = String::with_capacity(48);
        for (i, (c, v)) in self.config.channels.iter().zip(values).enumerate() {
            if i > 0 {
                out.push(' ');
            }
            // Writing to a String cannot fail.
            let _infallible = write!(out, "{}={:.*}", c.key, self.config.decimals, v);
            if garble && i == 0 {
                out.push('x');
            }
        }
        out.push_str("\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_764_000_000_000;

    fn pairs(line: &str) -> Vec<(String, f64)> {
        line.strip_suffix("\r\n")
            .unwrap()
            .split(' ')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn prints_fridge_and_freezer_pairs_that_vary_slowly() {
        let mut s = Sensor::new(SensorConfig::default(), 1).unwrap();
        let mut last: Option<Vec<(String, f64)>> = None;
        let mut fridge = Vec::new();
        for i in 0..1200 {
            let line = s.line(T + i * 1000);
            assert!(line.ends_with("\r\n"));
            let p = pairs(&line);
            assert_eq!(p[0].0, "fridge");
            assert_eq!(p[1].0, "freezer");
            assert!((3.0..6.0).contains(&p[0].1), "{line}");
            assert!((-20.0..-16.0).contains(&p[1].1), "{line}");
            if let Some(l) = &last {
                assert!((l[0].1 - p[0].1).abs() < 0.1, "{line}");
            }
            fridge.push(p[0].1);
            last = Some(p);
        }
        // Over a whole compressor cycle it does swing.
        let max = fridge.iter().copied().fold(f64::MIN, f64::max);
        let min = fridge.iter().copied().fold(f64::MAX, f64::min);
        assert!(max - min > 1.5, "{min}..{max}");
    }

    #[test]
    fn prints_two_decimals() {
        let mut s = Sensor::new(SensorConfig::default(), 1).unwrap();
        let line = s.line(T);
        for pair in line.trim_end().split(' ') {
            let (_, v) = pair.split_once('=').unwrap();
            let (_, frac) = v.split_once('.').unwrap();
            assert_eq!(frac.len(), 2, "{line}");
        }
    }

    #[test]
    fn garbled_lines_have_trailing_junk_on_a_value() {
        let mut s = Sensor::new(
            SensorConfig {
                fault: SensorFault {
                    garble_every: Some(2),
                },
                ..SensorConfig::default()
            },
            1,
        )
        .unwrap();
        let a = s.line(T);
        let b = s.line(T);
        assert!(a.split_whitespace().all(|p| !p.ends_with('x')), "{a}");
        let first = b.split(' ').next().unwrap();
        assert!(first.ends_with('x'), "{b}");
        assert!(first.split_once('=').unwrap().1.parse::<f64>().is_err());
    }

    #[test]
    fn keys_outside_the_doc_charset_are_refused() {
        let mut config = SensorConfig::default();
        config.channels[0].key = "fridge temp".into();
        assert_eq!(
            Sensor::new(config, 1).unwrap_err(),
            SensorConfigError::Key("fridge temp".into())
        );
    }
}
