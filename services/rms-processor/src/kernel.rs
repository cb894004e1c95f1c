//! The RMS kernel: whole mains cycles out of a block of samples, DC removed per window, RMS
//! current and — with a voltage channel — RMS voltage, real and apparent power and power factor.
//!
//! Pure and allocation-free: no tokio, no I/O, f32 samples in, f64 results out.
//!
//! Why whole cycles: the RMS of a sine over a window that ends mid-cycle is off by up to ~1/(2k)
//! for k cycles in the window (the part-cycle's energy is not the mean). Why DC per window:
//! a CT on an ADC sits on a mid-rail offset (≈512 counts) that drifts with temperature and
//! supply; emonLib's `calcIrms` follows it with a slow low-pass filter that needs seconds to
//! settle after every start and every step. The mean over whole cycles *is* the offset of a
//! periodic signal, so subtracting it costs nothing and needs no settling.
//!
//! How a window is cut:
//! 1. A first offset estimate: the mean of the first (nominal) cycle.
//! 2. Zero crossings of the reference signal (voltage when there is one, else current) minus
//!    that estimate, upward, with hysteresis (the signal must have been below −h since the
//!    last crossing, h = 10% of the first cycle's peak), so noise near zero does not count.
//!    The first crossing from the start, the last one from the end (each scan stays within a
//!    cycle or so): the span between holds a whole number of cycles. Crossing positions are
//!    interpolated to fractions of a sample.
//! 3. One pass over the span: sums of x, x² (and v, v², v·i) in eight f32 lanes (the
//!    compiler turns that into SIMD), relative to the estimate so large offsets cost no
//!    precision; the partial samples at both ends are weighted by their fraction.
//! 4. Mean = DC, variance = RMS², covariance = real power.
//!
//! A block with no two crossings (a dead channel, a flat line, pure DC, less than a cycle)
//! falls back to the whole block with its mean removed, flagged `whole_cycles = false`.

/// Samples of one window. `voltage`, when present, has the same length and sample instants.
#[derive(Debug, Clone, Copy)]
pub struct WindowSamples<'a> {
    pub current: &'a [f32],
    pub voltage: Option<&'a [f32]>,
}

/// Settings of one channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelSettings {
    pub sample_rate_hz: f64,
    /// Nominal mains frequency (50 or 60): only sizes the first offset estimate.
    pub mains_hz: f64,
    /// Amps per sample unit (after offset removal).
    pub current_scale: f64,
    /// Volts per sample unit.
    pub voltage_scale: f64,
    /// Voltage sample shift in samples, -1..=1 (positive: voltage delayed), correcting the
    /// phase error of the sensors and of sequential ADC sampling.
    pub phase_shift: f32,
}

/// One window's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub current_rms_a: f64,
    pub voltage_rms_v: Option<f64>,
    pub real_power_w: Option<f64>,
    pub apparent_power_va: Option<f64>,
    pub power_factor: Option<f64>,
    /// Mean of the current samples (the DC offset), in sample units.
    pub current_offset: f64,
    /// Whole cycles found in the window (fractional only in the fallback).
    pub cycles: f64,
    /// `false`: no two crossings; the whole block was used.
    pub whole_cycles: bool,
    /// Samples (with fractions) the sums covered.
    pub samples: f64,
}

const LANES: usize = 8;

/// The span of whole cycles, as fractional sample positions `[start, end)`, and how many
/// cycles it holds.
fn cycle_span(
    x: &[f32],
    offset: f32,
    per_cycle: usize,
    per_cycle_exact: f64,
) -> Option<(f64, f64, usize)> {
    let first = &x[..per_cycle.min(x.len())];
    let peak = first.iter().fold(0f32, |m, s| m.max((s - offset).abs()));
    if peak <= 0.0 || !peak.is_finite() {
        return None;
    }
    let h = 0.1 * peak;
    // Upward crossings, scanning forward from the start.
    let mut armed = false;
    let mut start = None;
    for i in 1..x.len() {
        let (a, b) = (x[i - 1] - offset, x[i] - offset);
        if b < -h {
            armed = true;
        }
        if armed && a < 0.0 && b >= 0.0 {
            start = Some(i - 1);
            break;
        }
    }
    let start = start?;
    // The last crossing, scanning back from the end: the scan stays within the last cycle or
    // so, keeping the kernel to one pass over the samples. Hysteresis as above: the signal
    // must have been below −h within the half cycle before the crossing.
    let half = (per_cycle / 2).max(1);
    let mut end = None;
    let mut i = x.len() - 1;
    while i > start + half {
        let (a, b) = (x[i - 1] - offset, x[i] - offset);
        if a < 0.0 && b >= 0.0 {
            let lo = (i - 1).saturating_sub(half);
            if x[lo..i - 1].iter().any(|s| s - offset < -h) {
                end = Some(i - 1);
                break;
            }
        }
        i -= 1;
    }
    let end = end?;
    let frac = |i: usize| {
        let (a, b) = (x[i] - offset, x[i + 1] - offset);
        i as f64 + f64::from(-a / (b - a))
    };
    let (a, b) = (frac(start), frac(end));
    // Whole cycles between the two crossings, from the nominal period (exact to within
    // 1/(2k) of a frequency deviation for k cycles: ±1% at 50 cycles).
    let cycles = ((b - a) / per_cycle_exact).round().max(1.0) as usize;
    Some((a, b, cycles))
}

/// Sums over `[lo, hi)` of d = x - off (and of e = v - voff, e², d·e): in eight lanes.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    n: f64,
    d: f64,
    dd: f64,
    e: f64,
    ee: f64,
    de: f64,
}

fn sums_current(x: &[f32], off: f32) -> Sums {
    let mut s1 = [0f32; LANES];
    let mut s2 = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            let d = c[k] - off;
            s1[k] += d;
            s2[k] += d * d;
        }
    }
    let mut out = Sums {
        n: x.len() as f64,
        d: s1.iter().map(|v| f64::from(*v)).sum(),
        dd: s2.iter().map(|v| f64::from(*v)).sum(),
        ..Sums::default()
    };
    for v in rest {
        let d = f64::from(v - off);
        out.d += d;
        out.dd += d * d;
    }
    out
}

fn sums_power(x: &[f32], v: &[f32], off: f32, voff: f32) -> Sums {
    let mut s = [[0f32; LANES]; 5];
    let n = x.len().min(v.len());
    let (x, v) = (&x[..n], &v[..n]);
    let xc = x.chunks_exact(LANES);
    let vc = v.chunks_exact(LANES);
    let tail = n - xc.remainder().len();
    for (cx, cv) in xc.zip(vc) {
        for k in 0..LANES {
            let d = cx[k] - off;
            let e = cv[k] - voff;
            s[0][k] += d;
            s[1][k] += d * d;
            s[2][k] += e;
            s[3][k] += e * e;
            s[4][k] += d * e;
        }
    }
    let total = |a: &[f32; LANES]| a.iter().map(|v| f64::from(*v)).sum::<f64>();
    let mut out = Sums {
        n: n as f64,
        d: total(&s[0]),
        dd: total(&s[1]),
        e: total(&s[2]),
        ee: total(&s[3]),
        de: total(&s[4]),
    };
    for i in tail..n {
        let d = f64::from(x[i] - off);
        let e = f64::from(v[i] - voff);
        out.d += d;
        out.dd += d * d;
        out.e += e;
        out.ee += e * e;
        out.de += d * e;
    }
    out
}

/// Add `w` × the sample at `i` to `s` (for the fractional ends of a span).
fn add_partial(s: &mut Sums, x: &[f32], v: Option<&[f32]>, i: usize, w: f64, off: f32, voff: f32) {
    if w <= 0.0 || i >= x.len() {
        return;
    }
    let d = f64::from(x[i] - off);
    s.n += w;
    s.d += w * d;
    s.dd += w * d * d;
    if let Some(v) = v
        && let Some(vi) = v.get(i)
    {
        let e = f64::from(vi - voff);
        s.e += w * e;
        s.ee += w * e * e;
        s.de += w * d * e;
    }
}

fn mean(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    (x.iter().map(|v| f64::from(*v)).sum::<f64>() / x.len() as f64) as f32
}

/// Shift `v` by `shift` samples (|shift| ≤ 1) with linear interpolation into `out`.
pub fn shift_voltage(v: &[f32], shift: f32, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(v.len());
    let s = shift.clamp(-1.0, 1.0);
    let n = v.len();
    for i in 0..n {
        // Positive shift: the voltage sample at i is taken as the one from (i - s).
        let (a, b, t) = if s >= 0.0 {
            (v[i.saturating_sub(1)], v[i], 1.0 - s)
        } else {
            (v[i], v[(i + 1).min(n - 1)], -s)
        };
        out.push(a + t * (b - a));
    }
}

/// Compute one window. `shifted` is scratch space for the phase-shifted voltage.
pub fn compute(
    w: &WindowSamples<'_>,
    cal: &ChannelSettings,
    shifted: &mut Vec<f32>,
) -> Option<Figures> {
    let x = w.current;
    if x.len() < 2 {
        return None;
    }
    let v: Option<&[f32]> = match w.voltage {
        Some(v) if v.len() == x.len() => {
            if cal.phase_shift == 0.0 {
                Some(v)
            } else {
                shift_voltage(v, cal.phase_shift, shifted);
                Some(shifted.as_slice())
            }
        }
        _ => None,
    };
    let per_cycle = ((cal.sample_rate_hz / cal.mains_hz).round() as usize).clamp(2, x.len());
    let off = mean(&x[..per_cycle]);
    let voff = v.map_or(0.0, |v| mean(&v[..per_cycle]));
    let (reference, ref_off) = match v {
        Some(v) => (v, voff),
        None => (x, off),
    };
    let span = cycle_span(
        reference,
        ref_off,
        per_cycle,
        cal.sample_rate_hz / cal.mains_hz,
    );
    let (s, cycles, whole) = match span {
        // Crossings are interpolated from differences that overflow f32 when samples come
        // near ±f32::MAX: such a span is not a span, and slicing with it would panic.
        Some((a, b, cycles)) if cycles >= 1 && a.is_finite() && b.is_finite() && a < b => {
            // Whole samples strictly inside [a, b), and the fractions at both ends.
            let hi = (b.floor() as usize).min(x.len());
            let lo = (a.ceil() as usize).min(hi);
            let mut s = match v {
                Some(v) => sums_power(&x[lo..hi], &v[lo..hi], off, voff),
                None => sums_current(&x[lo..hi], off),
            };
            // Sample lo-1 covers [lo-1, lo); only its part after `a` belongs to the span.
            add_partial(&mut s, x, v, lo.saturating_sub(1), lo as f64 - a, off, voff);
            add_partial(&mut s, x, v, hi, b - hi as f64, off, voff);
            (s, cycles as f64, true)
        }
        _ => {
            let s = match v {
                Some(v) => sums_power(x, v, off, voff),
                None => sums_current(x, off),
            };
            (
                s,
                x.len() as f64 / (cal.sample_rate_hz / cal.mains_hz),
                false,
            )
        }
    };
    if s.n <= 0.0 {
        return None;
    }
    let md = s.d / s.n;
    // Rounding can make a variance a hair below zero; clamp that, but let a NaN through
    // (`f64::max` would turn it into 0: samples that overflowed would read as a dead
    // channel, stored as a good 0 A, instead of being refused as not a number).
    let non_negative = |v: f64| if v < 0.0 { 0.0 } else { v };
    let var_i = non_negative(s.dd / s.n - md * md);
    let irms = var_i.sqrt() * cal.current_scale.abs();
    let (vrms, p, va, pf) = if v.is_some() {
        let me = s.e / s.n;
        let var_v = non_negative(s.ee / s.n - me * me);
        let vrms = var_v.sqrt() * cal.voltage_scale.abs();
        let p = (s.de / s.n - md * me) * cal.current_scale * cal.voltage_scale;
        let va = vrms * irms;
        let pf = if va > 0.0 { Some(p / va) } else { None };
        (Some(vrms), Some(p), Some(va), pf)
    } else {
        (None, None, None, None)
    };
    Some(Figures {
        current_rms_a: irms,
        voltage_rms_v: vrms,
        real_power_w: p,
        apparent_power_va: va,
        power_factor: pf,
        current_offset: f64::from(off) + md,
        cycles,
        whole_cycles: whole,
        samples: s.n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    const FS: f64 = 2000.0;

    fn cal(mains_hz: f64) -> ChannelSettings {
        ChannelSettings {
            sample_rate_hz: FS,
            mains_hz,
            current_scale: 1.0,
            voltage_scale: 1.0,
            phase_shift: 0.0,
        }
    }

    /// `Σ a_k sin(2π k f t + φ_k) + dc`, starting at an arbitrary phase.
    fn signal(n: usize, f: f64, parts: &[(f64, f64, f64)], dc: f64, start_phase: f64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f64 / FS;
                let s: f64 = parts
                    .iter()
                    .map(|(k, a, ph)| a * (2.0 * PI * k * f * t + k * start_phase + ph).sin())
                    .sum();
                (s + dc) as f32
            })
            .collect()
    }

    fn rms_of(parts: &[(f64, f64, f64)]) -> f64 {
        (parts.iter().map(|(_, a, _)| a * a / 2.0).sum::<f64>()).sqrt()
    }

    fn close(got: f64, want: f64, tol: f64, what: &str) {
        let err = (got - want).abs() / want.abs();
        assert!(
            err <= tol,
            "{what}: got {got}, want {want} (error {:.4}%)",
            err * 100.0
        );
    }

    #[test]
    fn rms_of_sines_and_harmonics_at_50_49_8_and_60_hz() {
        for f in [50.0, 49.8, 60.0] {
            for parts in [
                vec![(1.0, 10.0, 0.0)],
                vec![(1.0, 10.0, 0.0), (3.0, 3.0, 0.4), (5.0, 1.5, 1.1)],
            ] {
                for start in [0.0, 0.7, 2.0, 4.5] {
                    // 1 s at 2 kHz; 49.8 and 60 Hz have no whole number of samples per cycle.
                    let x = signal(2000, f, &parts, 512.0, start);
                    let r = compute(
                        &WindowSamples {
                            current: &x,
                            voltage: None,
                        },
                        &cal(f),
                        &mut Vec::new(),
                    )
                    .unwrap();
                    assert!(r.whole_cycles);
                    close(
                        r.current_rms_a,
                        rms_of(&parts),
                        0.005,
                        &format!("{f} Hz {parts:?} start {start}"),
                    );
                    close(r.current_offset, 512.0, 0.001, "offset");
                }
            }
        }
    }

    #[test]
    fn a_short_window_still_uses_whole_cycles() {
        // 3.3 cycles of 50 Hz: a plain mean of squares would be off by several percent.
        let x = signal(132, 50.0, &[(1.0, 5.0, 0.0)], 100.0, 1.0);
        let r = compute(
            &WindowSamples {
                current: &x,
                voltage: None,
            },
            &cal(50.0),
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(r.cycles, 2.0);
        close(r.current_rms_a, 5.0 / 2f64.sqrt(), 0.005, "short window");
    }

    #[test]
    fn noise_adds_its_variance_and_nothing_else() {
        let mut rng = fastrand::Rng::with_seed(7);
        // Uniform noise in ±0.5: variance 1/12.
        let mut x = signal(2000, 50.0, &[(1.0, 10.0, 0.0)], 512.0, 0.3);
        for s in &mut x {
            *s += (rng.f64() - 0.5) as f32;
        }
        let r = compute(
            &WindowSamples {
                current: &x,
                voltage: None,
            },
            &cal(50.0),
            &mut Vec::new(),
        )
        .unwrap();
        close(
            r.current_rms_a,
            (50.0f64 + 1.0 / 12.0).sqrt(),
            0.005,
            "sine + noise",
        );
    }

    #[test]
    fn real_power_and_power_factor_with_a_phase_angle_and_harmonics() {
        for f in [50.0, 49.8, 60.0] {
            for phi in [0.0, 0.5, -0.8, 1.2] {
                let v = signal(2000, f, &[(1.0, 325.0, 0.0)], 2048.0, 0.9);
                // Current lags by phi and carries harmonics, which add VA but no W.
                let i = signal(2000, f, &[(1.0, 14.0, -phi), (3.0, 4.0, 0.3)], 510.0, 0.9);
                let r = compute(
                    &WindowSamples {
                        current: &i,
                        voltage: Some(&v),
                    },
                    &cal(f),
                    &mut Vec::new(),
                )
                .unwrap();
                let vrms = 325.0 / 2f64.sqrt();
                let irms = rms_of(&[(1.0, 14.0, 0.0), (3.0, 4.0, 0.0)]);
                let p = vrms * 14.0 / 2f64.sqrt() * phi.cos();
                close(r.voltage_rms_v.unwrap(), vrms, 0.005, "Vrms");
                close(r.current_rms_a, irms, 0.005, "Irms");
                close(
                    r.real_power_w.unwrap(),
                    p,
                    0.01,
                    &format!("P at {f} Hz, phi {phi}"),
                );
                close(r.power_factor.unwrap(), p / (vrms * irms), 0.01, "PF");
                close(r.apparent_power_va.unwrap(), vrms * irms, 0.01, "VA");
            }
        }
    }

    #[test]
    fn export_gives_negative_power() {
        let v = signal(2000, 50.0, &[(1.0, 325.0, 0.0)], 0.0, 0.0);
        let i = signal(2000, 50.0, &[(1.0, -10.0, 0.0)], 0.0, 0.0);
        let r = compute(
            &WindowSamples {
                current: &i,
                voltage: Some(&v),
            },
            &cal(50.0),
            &mut Vec::new(),
        )
        .unwrap();
        assert!(r.real_power_w.unwrap() < 0.0);
        close(r.power_factor.unwrap(), -1.0, 0.01, "PF of export");
    }

    #[test]
    fn phase_shift_corrects_a_sampling_delay() {
        // The voltage is sampled half a sample late (sequential ADC): a resistive load then
        // reads PF < 1 unless the shift puts it back.
        let delay = 0.5 / FS; // seconds
        let v: Vec<f32> = (0..2000)
            .map(|k| (325.0 * (2.0 * PI * 50.0 * (k as f64 / FS + delay)).sin()) as f32)
            .collect();
        let i = signal(2000, 50.0, &[(1.0, 10.0, 0.0)], 0.0, 0.0);
        let mut c = cal(50.0);
        let mut scratch = Vec::new();
        let raw = compute(
            &WindowSamples {
                current: &i,
                voltage: Some(&v),
            },
            &c,
            &mut scratch,
        )
        .unwrap();
        c.phase_shift = 0.5;
        let fixed = compute(
            &WindowSamples {
                current: &i,
                voltage: Some(&v),
            },
            &c,
            &mut scratch,
        )
        .unwrap();
        assert!(fixed.power_factor.unwrap() > raw.power_factor.unwrap());
        close(
            fixed.power_factor.unwrap(),
            1.0,
            0.001,
            "PF after the shift",
        );
    }

    #[test]
    fn calibration_scales_and_dead_channels_fall_back() {
        let x = signal(2000, 50.0, &[(1.0, 100.0, 0.0)], 512.0, 0.0);
        let mut c = cal(50.0);
        c.current_scale = 0.0293; // e.g. an SCT-013 with its burden, per ADC count
        let r = compute(
            &WindowSamples {
                current: &x,
                voltage: None,
            },
            &c,
            &mut Vec::new(),
        )
        .unwrap();
        close(
            r.current_rms_a,
            100.0 / 2f64.sqrt() * 0.0293,
            0.005,
            "scaled",
        );
        // A flat line: no crossings; RMS 0, not NaN.
        let flat = vec![512.0f32; 2000];
        let r = compute(
            &WindowSamples {
                current: &flat,
                voltage: None,
            },
            &c,
            &mut Vec::new(),
        )
        .unwrap();
        assert!(!r.whole_cycles);
        assert_eq!(r.current_rms_a, 0.0);
        assert!(
            compute(
                &WindowSamples {
                    current: &[1.0],
                    voltage: None
                },
                &c,
                &mut Vec::new()
            )
            .is_none()
        );
    }

    /// 40 samples per cycle at 2 kHz: `hi` for 25, `lo` for 15.
    fn square(cycles: usize, hi: f32, lo: f32) -> Vec<f32> {
        (0..cycles * 40)
            .map(|i| if i % 40 < 25 { hi } else { lo })
            .collect()
    }

    #[test]
    fn samples_near_the_limit_of_f32_give_no_panic() {
        // The first cycle's mean (the offset estimate) is 1.5e38; later cycles dip to -3e38,
        // so `sample - offset` overflows to -inf at the last crossing and its interpolated
        // position is NaN while the first one is finite. A frame can carry such samples (they
        // are finite f32), and a panic here would end the processing of every device.
        let mut x = square(1, 3e38, -1e38);
        x.extend(square(49, 3e38, -3e38));
        let r = compute(
            &WindowSamples {
                current: &x,
                voltage: None,
            },
            &cal(50.0),
            &mut Vec::new(),
        );
        // What the kernel makes of it does not matter (the processor dead-letters a reading
        // that is not finite); that it returns does.
        assert!(r.is_none_or(|r| r.samples > 0.0));
    }

    #[test]
    fn random_windows_of_any_length_rate_and_magnitude_never_panic() {
        let mut rng = fastrand::Rng::with_seed(10);
        let magnitudes = [0.0f32, 1e-30, 1.0, 512.0, 1e20, 1e38, f32::MAX];
        for _ in 0..2000 {
            let n = rng.usize(0..600);
            let m = magnitudes[rng.usize(..magnitudes.len())];
            let offset =
                magnitudes[rng.usize(..magnitudes.len())] * if rng.bool() { 1.0 } else { -1.0 };
            let noisy = |rng: &mut fastrand::Rng| -> Vec<f32> {
                (0..n)
                    .map(|i| {
                        let s = (i as f32 * 0.157).sin() * m;
                        (s + (rng.f32() - 0.5) * m + offset).clamp(-f32::MAX, f32::MAX)
                    })
                    .collect()
            };
            let x = noisy(&mut rng);
            let v = noisy(&mut rng);
            let c = ChannelSettings {
                sample_rate_hz: [1.0, 99.0, 2000.0, 3000.0, 200_000.0][rng.usize(..5)],
                mains_hz: [50.0, 60.0][rng.usize(..2)],
                current_scale: [1.0, 1e30, -0.05][rng.usize(..3)],
                voltage_scale: 1.0,
                phase_shift: rng.f32() * 2.0 - 1.0,
            };
            let w = WindowSamples {
                current: &x,
                voltage: rng.bool().then_some(v.as_slice()),
            };
            let _ = compute(&w, &c, &mut Vec::new());
        }
    }
}
