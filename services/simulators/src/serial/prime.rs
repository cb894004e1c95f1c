//! `stream` protocol device (Project Prime style): a CT clamp sampled from a timer, streamed
//! as checksummed blocks without being asked.
//!
//! The model knows nothing of time or ports: each [`Prime::next_line`] is the next block of
//! `samples_per_line` sample instants. The driver decides when a line is due. Sample `n` of
//! the run is taken at `start_ms / 1000 + n / sample_rate_hz` seconds, so a run is fully
//! determined by the config, the seed and the start time, and a test can recompute any sample.

use std::f64::consts::TAU;
use std::fmt::Write as _;

/// The ADC of an ATmega328P: 10 bits.
const ADC_MAX: i64 = 1023;

/// One channel's analog signal, as the ADC sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Waveform {
    /// Mains frequency; 50 Hz in Europe, 60 Hz in the Americas.
    pub frequency_hz: f64,
    /// RMS of the fundamental in ADC counts (a CT clamp's swing around the bias point).
    pub rms_counts: f64,
    /// The mid-rail bias point of the CT circuit; 512 for a divider across 5 V.
    pub offset_counts: f64,
    /// Phase of the fundamental at t = 0, so channels (current vs voltage) can be shifted.
    pub phase_rad: f64,
    /// 3rd harmonic RMS as a fraction of the fundamental's (switch-mode supplies, ~0.1..0.8).
    pub harmonic3: f64,
    /// 5th harmonic RMS as a fraction of the fundamental's.
    pub harmonic5: f64,
    /// Uniform noise amplitude in counts (±), the ADC's and the cable's.
    pub noise_counts: f64,
}

impl Default for Waveform {
    fn default() -> Self {
        Self {
            frequency_hz: 50.0,
            rms_counts: 100.0,
            offset_counts: 512.0,
            phase_rad: 0.0,
            harmonic3: 0.0,
            harmonic5: 0.0,
            noise_counts: 0.0,
        }
    }
}

impl Waveform {
    /// The RMS of the AC part (what a processor that removes DC per window computes), in
    /// counts: fundamental and harmonics are orthogonal over whole cycles, uniform noise of
    /// ±a has variance a²/3, and rounding to whole counts adds 1/12. Clipping at 0/1023 is
    /// not modelled: keep `offset ± peak` inside the ADC range when comparing.
    pub fn analytic_rms_counts(&self) -> f64 {
        let h = 1.0 + self.harmonic3 * self.harmonic3 + self.harmonic5 * self.harmonic5;
        let noise_var = self.noise_counts * self.noise_counts / 3.0;
        (self.rms_counts * self.rms_counts * h + noise_var + 1.0 / 12.0).sqrt()
    }

    /// The noiseless analog value at `phase` (fundamental cycles, fractional part matters).
    fn value(&self, cycles: f64) -> f64 {
        let a = self.rms_counts * std::f64::consts::SQRT_2;
        let x = TAU * cycles + self.phase_rad;
        self.offset_counts
            + a * (x.sin() + self.harmonic3 * (3.0 * x).sin() + self.harmonic5 * (5.0 * x).sin())
    }
}

/// Deliberate faults, so tests and the demo can watch the parser's error paths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrimeFault {
    /// Every N-th line has one byte corrupted after its checksum was computed (a bit error on
    /// a marginal cable): the parser must count it `garbled` and see the seq gap it leaves.
    pub garble_every: Option<u32>,
}

/// Configuration of a [`Prime`].
#[derive(Debug, Clone, PartialEq)]
pub struct PrimeConfig {
    /// Timer rate of the sketch; the doc's default is 2000.
    pub sample_rate_hz: u32,
    /// Sample instants per line (each carries one value per channel); 20 as the sketch's
    /// double-buffered blocks, i.e. one line per 10 ms at 2 kHz.
    pub samples_per_line: usize,
    /// One waveform per channel, 1..=3 (A0..A2 of the sketch).
    pub channels: Vec<Waveform>,
    /// First `seq` after reset; a real sketch starts at 0, tests start near 65535 to see it wrap.
    pub first_seq: u16,
    pub fault: PrimeFault,
}

impl Default for PrimeConfig {
    fn default() -> Self {
        Self {
            sample_rate_hz: 2000,
            samples_per_line: 20,
            channels: vec![Waveform::default()],
            first_seq: 0,
            fault: PrimeFault::default(),
        }
    }
}

/// A config the device could not have.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrimeConfigError {
    #[error("channels must be 1..=3, got {0}")]
    Channels(usize),
    #[error("sample_rate_hz must be 1..=20000, got {0}")]
    SampleRate(u32),
    #[error("samples_per_line must be 1..=200, got {0}")]
    SamplesPerLine(usize),
    #[error("garble_every must be at least 1")]
    GarbleEvery,
}

/// One line's worth of samples, before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleBlock {
    pub seq: u16,
    /// Interleaved by instant: `a0,b0,a1,b1,...`.
    pub values: Vec<u16>,
}

/// The streaming device.
#[derive(Debug, Clone)]
pub struct Prime {
    config: PrimeConfig,
    rng: fastrand::Rng,
    /// Fractional cycles of each channel's fundamental at sample 0, reduced to 0..1 once so
    /// that a Unix-epoch start time does not eat the f64 precision of every sample's phase.
    phase0: Vec<f64>,
    /// Index of the next sample instant since start.
    next_sample: u64,
    seq: u16,
    /// Lines produced, for the fault schedule.
    lines: u64,
}

impl Prime {
    /// A device reset at `start_ms` (Unix ms); the same seed and start give the same lines.
    pub fn new(config: PrimeConfig, seed: u64, start_ms: i64) -> Result<Self, PrimeConfigError> {
        if !(1..=3).contains(&config.channels.len()) {
            return Err(PrimeConfigError::Channels(config.channels.len()));
        }
        if !(1..=20_000).contains(&config.sample_rate_hz) {
            return Err(PrimeConfigError::SampleRate(config.sample_rate_hz));
        }
        if !(1..=200).contains(&config.samples_per_line) {
            return Err(PrimeConfigError::SamplesPerLine(config.samples_per_line));
        }
        if config.fault.garble_every == Some(0) {
            return Err(PrimeConfigError::GarbleEvery);
        }
        // start_ms is reduced modulo 1000 s, a whole number of cycles for any frequency with
        // up to three decimals; f × start_ms / 1000 unreduced is ~1e11 and loses 1e-5 cycles.
        let phase0 = config
            .channels
            .iter()
            .map(|w| ((w.frequency_hz * (start_ms.rem_euclid(1_000_000) as f64)) / 1000.0).fract())
            .collect();
        Ok(Self {
            seq: config.first_seq,
            config,
            rng: fastrand::Rng::with_seed(seed),
            phase0,
            next_sample: 0,
            lines: 0,
        })
    }

    pub fn config(&self) -> &PrimeConfig {
        &self.config
    }

    /// The banner a sketch prints after reset, `\n`-terminated.
    pub fn banner(&self) -> String {
        format!(
            "# wattbus-stream rate={} channels={}\n",
            self.config.sample_rate_hz,
            self.config.channels.len()
        )
    }

    /// RMS of each channel's AC part in counts; see [`Waveform::analytic_rms_counts`].
    pub fn analytic_rms_counts(&self) -> Vec<f64> {
        self.config
            .channels
            .iter()
            .map(Waveform::analytic_rms_counts)
            .collect()
    }

    /// How long one line's samples span, so a driver can pace lines.
    pub fn line_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.config.samples_per_line as f64 / f64::from(self.config.sample_rate_hz),
        )
    }

    /// The seq the next line will carry.
    pub fn next_seq(&self) -> u16 {
        self.seq
    }

    /// The next block of samples.
    pub fn next_block(&mut self) -> SampleBlock {
        let rate = f64::from(self.config.sample_rate_hz);
        let mut values =
            Vec::with_capacity(self.config.samples_per_line * self.config.channels.len());
        for _ in 0..self.config.samples_per_line {
            let n = self.next_sample;
            self.next_sample += 1;
            for (w, p0) in self.config.channels.iter().zip(&self.phase0) {
                // Reduce n modulo one second of samples first: f × n / rate stays small.
                let whole_s = (n / u64::from(self.config.sample_rate_hz)) as f64;
                let rest = (n % u64::from(self.config.sample_rate_hz)) as f64 / rate;
                let cycles = p0 + (w.frequency_hz * whole_s).fract() + w.frequency_hz * rest;
                let noise = if w.noise_counts > 0.0 {
                    (self.rng.f64() * 2.0 - 1.0) * w.noise_counts
                } else {
                    0.0
                };
                let v = (w.value(cycles) + noise).round() as i64;
                values.push(v.clamp(0, ADC_MAX) as u16);
            }
        }
        let block = SampleBlock {
            seq: self.seq,
            values,
        };
        self.seq = self.seq.wrapping_add(1);
        block
    }

    /// Skip `lines` lines as if they were sent and lost (the host stopped reading and the
    /// USB bridge dropped them): seq and the sample clock move on, nothing is produced.
    pub fn skip_lines(&mut self, lines: u64) {
        self.next_sample += lines * self.config.samples_per_line as u64;
        // Truncation is the point: seq wraps every 65536 lines.
        self.seq = self.seq.wrapping_add((lines % 65_536) as u16);
        self.lines += lines;
        // The noise sequence is not advanced: noise is noise.
    }

    /// The next line, exactly as the device sends it (`<seq>:<v>,...*<CS>\n`), with the
    /// configured faults applied.
    pub fn next_line(&mut self) -> String {
        let block = self.next_block();
        self.lines += 1;
        let mut line = encode_line(&block);
        if let Some(n) = self.config.fault.garble_every
            && self.lines.is_multiple_of(u64::from(n))
        {
            garble(&mut line);
        }
        line
    }
}

/// `<seq>:<v>,...*<CS>\n` for a block.
pub fn encode_line(block: &SampleBlock) -> String {
    let mut s = String::with_capacity(8 + block.values.len() * 5);
    // Writing to a String cannot fail.
    let _infallible = write!(s, "{}:", block.seq);
    for (i, v) in block.values.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _infallible = write!(s, "{v}");
    }
    let cs = checksum(s.as_bytes());
    // `writeln!` ends in a bare `\n`, as the doc wants (no `\r`).
    let _infallible = writeln!(s, "*{cs:02X}");
    s
}

/// XOR of every byte, as NMEA: the doc's checksum over everything before the `*`.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

/// Corrupt one payload byte so the checksum no longer matches: the first digit after `:`
/// becomes another digit. The line stays ASCII, so it is the checksum that must catch it.
fn garble(line: &mut String) {
    let Some(colon) = line.find(':') else { return };
    let i = colon + 1;
    let Some(c) = line.as_bytes().get(i).copied() else {
        return;
    };
    let replacement = if c == b'9' { '8' } else { '9' };
    line.replace_range(i..=i, &replacement.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_MS: i64 = 1_764_000_000_123;

    fn prime(config: PrimeConfig) -> Prime {
        Prime::new(config, 42, START_MS).unwrap()
    }

    /// A parser written from the doc, independent of `encode_line`.
    fn parse(line: &str) -> (u16, Vec<u16>, u8, u8) {
        let body = line.strip_suffix('\n').unwrap();
        let (payload, cs) = body.split_once('*').unwrap();
        assert_eq!(cs.len(), 2);
        assert!(
            cs.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
        let given = u8::from_str_radix(cs, 16).unwrap();
        let mut computed = 0u8;
        for b in payload.bytes() {
            computed ^= b;
        }
        let (seq, values) = payload.split_once(':').unwrap();
        let values = values.split(',').map(|v| v.parse().unwrap()).collect();
        (seq.parse().unwrap(), values, given, computed)
    }

    #[test]
    fn lines_carry_a_checksum_an_independent_parser_agrees_with() {
        let mut p = prime(PrimeConfig::default());
        for i in 0..100u16 {
            let line = p.next_line();
            let (seq, values, given, computed) = parse(&line);
            assert_eq!(seq, i);
            assert_eq!(values.len(), 20);
            assert_eq!(given, computed, "{line}");
        }
    }

    #[test]
    fn a_known_line_has_the_known_checksum() {
        let line = encode_line(&SampleBlock {
            seq: 1234,
            values: vec![512, 530],
        });
        // '1'^'2'^'3'^'4'^':'^'5'^'1'^'2'^','^'5'^'3'^'0' = 0x12, worked out by hand
        // (and with Python's functools.reduce) rather than by `checksum`.
        assert_eq!(line, "1234:512,530*12\n");
    }

    #[test]
    fn seq_wraps_from_65535_to_0() {
        let mut p = prime(PrimeConfig {
            first_seq: 65_534,
            ..PrimeConfig::default()
        });
        let seqs: Vec<u16> = (0..4).map(|_| parse(&p.next_line()).0).collect();
        assert_eq!(seqs, [65_534, 65_535, 0, 1]);
    }

    #[test]
    fn skipped_lines_leave_a_seq_gap_and_keep_the_sample_clock() {
        let mut a = prime(PrimeConfig {
            first_seq: 65_530,
            ..PrimeConfig::default()
        });
        let mut b = a.clone();
        for _ in 0..10 {
            a.next_line();
        }
        b.skip_lines(10);
        assert_eq!(b.next_seq(), 4);
        assert_eq!(a.next_block(), b.next_block());
    }

    #[test]
    fn channels_are_interleaved_by_instant() {
        let ch = |phase_rad| Waveform {
            phase_rad,
            rms_counts: 300.0,
            ..Waveform::default()
        };
        let mut three = prime(PrimeConfig {
            channels: vec![ch(0.0), ch(1.0), ch(2.0)],
            ..PrimeConfig::default()
        });
        let mut singles: Vec<Prime> = [0.0, 1.0, 2.0]
            .into_iter()
            .map(|p| {
                prime(PrimeConfig {
                    channels: vec![ch(p)],
                    ..PrimeConfig::default()
                })
            })
            .collect();
        let (_, values, _, _) = parse(&three.next_line());
        assert_eq!(values.len(), 60);
        let per: Vec<Vec<u16>> = singles.iter_mut().map(|s| s.next_block().values).collect();
        for i in 0..20 {
            assert_eq!(values[3 * i..3 * i + 3], [per[0][i], per[1][i], per[2][i]]);
        }
        // And they really differ, or the check above proves nothing.
        assert_ne!(per[0], per[1]);
    }

    #[test]
    fn rms_of_generated_samples_matches_the_analytic_rms() {
        let config = PrimeConfig {
            channels: vec![
                Waveform::default(),
                Waveform {
                    rms_counts: 150.0,
                    harmonic3: 0.3,
                    harmonic5: 0.1,
                    noise_counts: 4.0,
                    phase_rad: 0.7,
                    ..Waveform::default()
                },
                // A small load: 20 counts is ~0.5 A on a 30 A clamp. (Much smaller and the
                // rounding stops behaving like independent noise of variance 1/12.)
                Waveform {
                    rms_counts: 20.0,
                    noise_counts: 2.0,
                    frequency_hz: 60.0,
                    ..Waveform::default()
                },
            ],
            ..PrimeConfig::default()
        };
        let mut p = prime(config);
        let analytic = p.analytic_rms_counts();
        // 1 s = 50 (60) whole cycles: 100 lines of 20 instants.
        let mut per_ch = vec![Vec::new(); 3];
        for _ in 0..100 {
            for (i, v) in p.next_block().values.into_iter().enumerate() {
                per_ch[i % 3].push(f64::from(v));
            }
        }
        for (ch, samples) in per_ch.iter().enumerate() {
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            let rms = (samples.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                / samples.len() as f64)
                .sqrt();
            let err = (rms - analytic[ch]).abs() / analytic[ch];
            assert!(err < 0.005, "channel {ch}: {rms} vs {}", analytic[ch]);
            assert!((mean - 512.0).abs() < 1.0, "channel {ch} mean {mean}");
        }
    }

    #[test]
    fn the_same_seed_and_start_give_the_same_lines() {
        let config = PrimeConfig {
            channels: vec![Waveform {
                noise_counts: 5.0,
                ..Waveform::default()
            }],
            ..PrimeConfig::default()
        };
        let mut a = Prime::new(config.clone(), 7, START_MS).unwrap();
        let mut b = Prime::new(config.clone(), 7, START_MS).unwrap();
        let mut c = Prime::new(config, 8, START_MS).unwrap();
        let la: Vec<String> = (0..50).map(|_| a.next_line()).collect();
        let lb: Vec<String> = (0..50).map(|_| b.next_line()).collect();
        let lc: Vec<String> = (0..50).map(|_| c.next_line()).collect();
        assert_eq!(la, lb);
        assert_ne!(la, lc);
    }

    #[test]
    fn the_start_time_sets_the_phase() {
        // 10 ms later is half a 50 Hz cycle: the wave is mirrored about the offset.
        let mut a = Prime::new(PrimeConfig::default(), 1, START_MS).unwrap();
        let mut b = Prime::new(PrimeConfig::default(), 1, START_MS + 10).unwrap();
        let va = a.next_block().values;
        let vb = b.next_block().values;
        for (x, y) in va.iter().zip(&vb) {
            assert!((i32::from(*x) + i32::from(*y) - 1024).abs() <= 1, "{x} {y}");
        }
    }

    #[test]
    fn a_garbled_line_fails_its_checksum_and_the_others_do_not() {
        let mut p = prime(PrimeConfig {
            fault: PrimeFault {
                garble_every: Some(5),
            },
            ..PrimeConfig::default()
        });
        for i in 1..=20 {
            let (_, _, given, computed) = parse(&p.next_line());
            assert_eq!(given != computed, i % 5 == 0, "line {i}");
        }
    }

    #[test]
    fn the_banner_follows_the_doc() {
        let p = prime(PrimeConfig {
            channels: vec![Waveform::default(); 2],
            ..PrimeConfig::default()
        });
        assert_eq!(p.banner(), "# wattbus-stream rate=2000 channels=2\n");
    }

    #[test]
    fn impossible_configs_are_refused() {
        let bad = PrimeConfig {
            channels: vec![],
            ..PrimeConfig::default()
        };
        assert_eq!(
            Prime::new(bad, 1, 0).unwrap_err(),
            PrimeConfigError::Channels(0)
        );
    }
}
