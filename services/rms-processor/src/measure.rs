//! One window to one reading per channel (pure: no tokio).
//!
//! Which channel is what: every channel of the frame is a current channel, except one that a
//! configured channel names as its `voltage`; a channel labelled `v` that nobody pairs is
//! reported as a voltage of its own. A current channel with a paired voltage gets real power
//! and power factor; without one, apparent power from the nominal voltage, labelled so.

use std::collections::BTreeMap;

use proto::{Measurement, Payload as _, Quality, ReadingId, Segment};

use crate::config::Config;
use crate::energy::Energy;
use crate::kernel::{self, ChannelSettings};
use crate::seg;
use crate::window::Window;

/// Largest power (W, or VA for an estimate) one channel is taken to measure: 10 MW, forty
/// times a 5000 A CT on 400 V. A figure beyond it is a calibration mistake (a scale in mA
/// per count taken as A) or garbage samples: it is published flagged `out_of_range` and not
/// integrated, because one such window would add more to the energy counter than a house
/// uses in a lifetime, and a counter only a person can reset.
pub const MAX_PLAUSIBLE_POWER: f64 = 10e6;

/// What a channel's power figure rests on: the `power_basis` tag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Basis {
    /// Real power from a paired voltage channel.
    Measured,
    /// `Irms × nominal`: apparent power only.
    NominalVoltage(f64),
    /// A voltage channel on its own.
    VoltageOnly,
}

impl Basis {
    pub const fn tag(self) -> &'static str {
        match self {
            Basis::Measured => "measured",
            Basis::NominalVoltage(_) => "nominal_voltage",
            Basis::VoltageOnly => "voltage_only",
        }
    }
}

/// A channel's figures for one window, before energy is added.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelFigures {
    pub channel: Segment,
    pub basis: Basis,
    /// `current_a`, `voltage_v`, `power_w`, `apparent_power_va`, `power_factor`, … (no energy).
    pub fields: BTreeMap<String, f64>,
    /// The power to integrate into energy (W for `Measured`, VA for `NominalVoltage`).
    pub power_for_energy: Option<f64>,
    /// Whole mains cycles were found (false: a flat or dead channel, the block was used).
    pub whole_cycles: bool,
}

/// Compute every channel of `w`, with the settings of the window's own device.
pub fn window(cfg: &Config, w: &Window, scratch: &mut Vec<f32>) -> Vec<ChannelFigures> {
    let device = w.device.as_str();
    let paired: Vec<&Segment> = w
        .channels
        .iter()
        .filter_map(|c| cfg.channel(device, c.name.as_str())?.voltage.as_ref())
        .collect();
    let mut out = Vec::new();
    for c in &w.channels {
        if paired.contains(&&c.name) {
            continue;
        }
        let cc = cfg.channel(device, c.name.as_str());
        let scale = cc.map_or(1.0, |x| x.scale);
        let voltage = cc
            .and_then(|x| x.voltage.as_ref())
            .and_then(|v| w.channel(v.as_str()));
        let voltage_scale = voltage
            .and_then(|v| cfg.channel(device, v.name.as_str()))
            .map_or(1.0, |x| x.scale);
        let cal = ChannelSettings {
            sample_rate_hz: w.sample_rate_hz,
            mains_hz: cfg.mains_hz,
            current_scale: scale,
            voltage_scale,
            phase_shift: cc.map_or(0.0, |x| x.phase_shift),
        };
        let win = kernel::WindowSamples {
            current: &c.samples,
            voltage: voltage.map(|v| v.samples.as_slice()),
        };
        let Some(r) = kernel::compute(&win, &cal, scratch) else {
            continue;
        };
        let mut fields = BTreeMap::new();
        let (basis, power) = if c.unit.as_str() == "v" && voltage.is_none() {
            fields.insert("voltage_v".to_string(), r.current_rms_a);
            (Basis::VoltageOnly, None)
        } else if let (Some(v), Some(p), Some(va)) =
            (r.voltage_rms_v, r.real_power_w, r.apparent_power_va)
        {
            fields.insert("current_a".to_string(), r.current_rms_a);
            fields.insert("voltage_v".to_string(), v);
            fields.insert("power_w".to_string(), p);
            fields.insert("apparent_power_va".to_string(), va);
            if let Some(pf) = r.power_factor {
                fields.insert("power_factor".to_string(), pf);
            }
            (Basis::Measured, Some(p))
        } else {
            let nominal = cc
                .and_then(|x| x.nominal_voltage_v)
                .unwrap_or(cfg.nominal_voltage_v);
            let va = r.current_rms_a * nominal;
            fields.insert("current_a".to_string(), r.current_rms_a);
            fields.insert("apparent_power_va".to_string(), va);
            fields.insert("nominal_voltage_v".to_string(), nominal);
            (Basis::NominalVoltage(nominal), Some(va))
        };
        out.push(ChannelFigures {
            channel: c.name.clone(),
            basis,
            fields,
            power_for_energy: power,
            whole_cycles: r.whole_cycles,
        });
    }
    out
}

/// What one window came to.
#[derive(Debug, Default)]
pub struct WindowOutcome {
    /// Readings to journal, energy included.
    pub readings: Vec<Measurement>,
    /// Readings that cannot be stored, with why (a value that is not a finite number after
    /// calibration, a time a reading cannot carry). Their energy is not counted.
    pub invalid: Vec<(Measurement, String)>,
    /// Channels whose power was beyond [`MAX_PLAUSIBLE_POWER`], and that power: their readings
    /// are in `readings`, flagged `out_of_range`, and their energy was not counted.
    pub implausible: Vec<(Segment, f64)>,
}

/// The readings of window `w`, labelled with the window's own device, with energy added to
/// `energy`. Each reading is checked as its payload will be checked when journaled *before*
/// its energy is added, so a reading that cannot be stored never counts.
pub fn measurements(
    cfg: &Config,
    site: &Segment,
    w: &Window,
    energy: &mut Energy,
    scratch: &mut Vec<f32>,
) -> WindowOutcome {
    let mut out = WindowOutcome::default();
    // The reading's time is the end of its window: when the value was complete. It comes from
    // the sample clock, so a replayed window carries the same time as the first.
    let ts_ms = w.end_us.div_euclid(1000);
    let dt_s = w.duration_s();
    for r in window(cfg, w, scratch) {
        let power = r.power_for_energy;
        let plausible = power.is_none_or(|p| p.abs() <= MAX_PLAUSIBLE_POWER);
        let mut m = Measurement {
            tags: [(seg("power_basis"), seg(r.basis.tag()))].into(),
            ..Measurement::new(
                ReadingId::new(site.clone(), w.device.clone(), r.channel),
                seg("power"),
                ts_ms,
                if plausible {
                    Quality::Good
                } else {
                    Quality::OutOfRange
                },
                r.fields,
            )
        };
        if let Err(reason) = m.validate() {
            out.invalid.push((m, reason));
            continue;
        }
        if let Some(p) = power {
            let key = energy_key(w.device.as_str(), m.channel.as_str(), r.basis);
            let c = energy.add(&key, if plausible { p } else { 0.0 }, dt_s, ts_ms);
            match r.basis {
                Basis::NominalVoltage(_) => {
                    m.fields.insert("apparent_energy_vah".into(), c.import_wh);
                }
                _ => {
                    m.fields.insert("energy_import_wh".into(), c.import_wh);
                    m.fields.insert("energy_export_wh".into(), c.export_wh);
                }
            }
            // A reset (`wattbus energy reset`) shows in every reading after it, so a dashboard
            // can tell a counter that restarted from one that ran backwards.
            m.fields.insert("energy_resets".into(), f64::from(c.resets));
            if !plausible {
                out.implausible.push((m.channel.clone(), p));
            }
        }
        out.readings.push(m);
    }
    out
}

/// The energy counter's key for a channel: measured Wh and nominal VAh never share one, so
/// adding a voltage sensor later does not splice two kinds of energy into one counter.
pub fn energy_key(device: &str, channel: &str, basis: Basis) -> String {
    match basis {
        Basis::NominalVoltage(_) => format!("{device}/{channel}/vah"),
        _ => format!("{device}/{channel}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RmsChannelConfig;
    use crate::window::Channel;
    use proto::Segment;
    use std::f64::consts::PI;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn sine(n: usize, fs: f64, rms: f64, dc: f64, phase: f64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (rms * 2f64.sqrt() * (2.0 * PI * 50.0 * i as f64 / fs + phase).sin() + dc) as f32
            })
            .collect()
    }

    fn window(device: &str, channels: Vec<Channel>) -> Window {
        Window {
            device: seg(device),
            start_us: 1_764_000_000_000_000,
            end_us: 1_764_000_001_000_000,
            sample_rate_hz: 2000.0,
            channels,
            partial: false,
        }
    }

    fn chan(name: &str, unit: &str, samples: Vec<f32>) -> Channel {
        Channel {
            name: seg(name),
            unit: seg(unit),
            samples,
        }
    }

    #[test]
    fn a_ct_alone_gets_apparent_power_from_the_nominal_voltage_labelled_so() {
        let cfg = Config {
            channels: vec![RmsChannelConfig {
                device: seg("prime-1"),
                channel: seg("ct1"),
                scale: 0.5,
                voltage: None,
                phase_shift: 0.0,
                nominal_voltage_v: Some(120.0),
            }],
            ..Config::default()
        };
        // 10 counts RMS on a 512 offset, 0.5 A per count: 5 A.
        let w = window(
            "prime-1",
            vec![chan("ct1", "adc", sine(2000, 2000.0, 10.0, 512.0, 0.3))],
        );
        let r = super::window(&cfg, &w, &mut Vec::new());
        assert_eq!(r.len(), 1);
        let f = &r[0].fields;
        assert!((f["current_a"] - 5.0).abs() < 0.025, "{f:?}");
        assert!((f["apparent_power_va"] - 600.0).abs() < 3.0, "{f:?}");
        assert_eq!(f["nominal_voltage_v"], 120.0);
        assert!(
            !f.contains_key("power_w"),
            "no real power without a voltage"
        );
        assert_eq!(r[0].basis.tag(), "nominal_voltage");
        assert_eq!(energy_key("prime-1", "ct1", r[0].basis), "prime-1/ct1/vah");
    }

    #[test]
    fn a_paired_voltage_gives_real_power_and_is_not_reported_twice() {
        let cfg = Config {
            channels: vec![RmsChannelConfig {
                device: seg("d"),
                channel: seg("ct1"),
                scale: 1.0,
                voltage: Some(seg("v1")),
                phase_shift: 0.0,
                nominal_voltage_v: None,
            }],
            ..Config::default()
        };
        // 4 A and 230 V, current lagging by 60°: P = 460 W, PF = 0.5.
        let w = window(
            "d",
            vec![
                chan("ct1", "a", sine(2000, 2000.0, 4.0, 0.0, -PI / 3.0)),
                chan("v1", "v", sine(2000, 2000.0, 230.0, 0.0, 0.0)),
            ],
        );
        let r = super::window(&cfg, &w, &mut Vec::new());
        assert_eq!(r.len(), 1, "the voltage channel is part of ct1's reading");
        let f = &r[0].fields;
        assert!((f["power_w"] - 460.0).abs() < 4.6, "{f:?}");
        assert!((f["power_factor"] - 0.5).abs() < 0.01, "{f:?}");
        assert!((f["voltage_v"] - 230.0).abs() < 1.0, "{f:?}");
        assert_eq!(r[0].basis, Basis::Measured);
        assert_eq!(r[0].power_for_energy, Some(f["power_w"]));
    }

    fn energy() -> (tempfile::TempDir, Energy) {
        let dir = tempfile::tempdir().unwrap();
        let e = Energy::load(&dir.path().join("energy.json")).unwrap();
        (dir, e)
    }

    #[test]
    fn readings_carry_the_device_of_their_window_and_count_its_energy_there() {
        let (_dir, mut e) = energy();
        let cfg = Config::default();
        for (device, rms) in [("ct-1", 5.0), ("ct-2", 0.8)] {
            let w = window(
                device,
                vec![chan("ct1", "a", sine(2000, 2000.0, rms, 0.0, 0.0))],
            );
            let out = measurements(&cfg, &seg("home"), &w, &mut e, &mut Vec::new());
            assert_eq!(out.readings.len(), 1);
            let m = &out.readings[0];
            assert_eq!((m.device.as_str(), m.channel.as_str()), (device, "ct1"));
            assert!((m.fields["current_a"] - rms).abs() < rms * 0.005, "{m:?}");
            assert_eq!(m.ts_ms, 1_764_000_001_000);
        }
        let vah = |k: &str| e.get(k).unwrap().import_wh;
        assert!((vah("ct-1/ct1/vah") - 5.0 * 230.0 / 3600.0).abs() < 0.01);
        assert!((vah("ct-2/ct1/vah") - 0.8 * 230.0 / 3600.0).abs() < 0.002);
    }

    #[test]
    fn a_reading_that_cannot_be_stored_is_set_aside_and_counts_no_energy() {
        let (_dir, mut e) = energy();
        let cfg = Config::default();
        // A window ending in 2100: a measurement cannot carry that time.
        let mut late = window(
            "ct-1",
            vec![chan("ct1", "a", sine(2000, 2000.0, 5.0, 0.0, 0.0))],
        );
        late.start_us = 4_102_444_799_500_000;
        late.end_us = 4_102_444_800_500_000;
        // Samples whose calibrated value is not a finite number (f32 overflows).
        let huge = window("ct-2", vec![chan("ct1", "a", vec![3e38; 2000])]);
        let cfg_scaled = Config {
            channels: vec![RmsChannelConfig {
                device: seg("ct-2"),
                channel: seg("ct1"),
                scale: 1e300,
                voltage: None,
                phase_shift: 0.0,
                nominal_voltage_v: None,
            }],
            ..Config::default()
        };
        let mut flat = huge.clone();
        flat.channels[0].samples = (0..2000)
            .map(|i| if i % 2 == 0 { 3e38 } else { -3e38 })
            .collect();
        for (cfg, w) in [(&cfg, &late), (&cfg_scaled, &flat)] {
            let out = measurements(cfg, &seg("home"), w, &mut e, &mut Vec::new());
            assert!(out.readings.is_empty(), "{:?}", out.readings);
            assert_eq!(out.invalid.len(), 1);
            assert_eq!(out.invalid[0].0.device, w.device);
        }
        assert!(
            e.channels().next().is_none(),
            "no energy counted for what was not stored"
        );
    }

    #[test]
    fn an_implausible_power_is_flagged_and_not_integrated() {
        let (_dir, mut e) = energy();
        // 1e5 A on the nominal 230 V: 23 MVA.
        let w = window(
            "ct-1",
            vec![chan("ct1", "a", sine(2000, 2000.0, 1e5, 0.0, 0.0))],
        );
        let out = measurements(
            &Config::default(),
            &seg("home"),
            &w,
            &mut e,
            &mut Vec::new(),
        );
        assert_eq!(out.readings.len(), 1);
        assert_eq!(out.readings[0].quality, Quality::OutOfRange);
        assert_eq!(out.readings[0].fields["apparent_energy_vah"], 0.0);
        assert_eq!(out.implausible.len(), 1);
    }

    #[test]
    fn an_unpaired_voltage_channel_reports_its_voltage() {
        let w = window(
            "d",
            vec![chan("v1", "v", sine(2000, 2000.0, 231.0, 0.0, 0.0))],
        );
        let r = super::window(&Config::default(), &w, &mut Vec::new());
        assert_eq!(r[0].basis, Basis::VoltageOnly);
        assert!((r[0].fields["voltage_v"] - 231.0).abs() < 1.0);
        assert_eq!(r[0].power_for_energy, None);
    }
}
