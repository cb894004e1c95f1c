//! Windows out of raw frames, per device (pure: no tokio, no I/O).
//!
//! A device's frames arrive in order, each a block of consecutive samples that starts where
//! the previous one ended (serial-ingest's sample clock makes them abut exactly). The
//! assembler keeps the samples not yet used, cuts a window every `interval` worth of them,
//! and hands each window to the caller with its own start and end time.
//!
//! Invariants:
//! - **The mark.** Samples before `mark` (Unix µs) have been used (a window was computed from
//!   them, or they were discarded as too few). The mark only moves forward. Samples before it
//!   that arrive again — a replay after a restart or an overdue acknowledgement — are cut off,
//!   so a replay never counts energy twice, and windows after a restart start exactly where
//!   they did before it, so the replayed measurements are identical (same timestamp, same
//!   values) and storing them again changes nothing.
//! - **No window spans a hole.** A frame that starts more than one sample period after the
//!   samples held closes them as a shorter window of its own (a *partial* window; too short a
//!   rest — under `min_window` — is discarded and counted), and the new run starts at the
//!   frame's own time. A change of sample rate or channels does the same.
//! - **A hole a replay will fill is waited for.** A frame that says it `continues` its run
//!   (the producer lost no sample before it) but starts after a hole was delayed or dropped in
//!   transport, and its producer will replay the missing frame: it is held, with the frames
//!   after it, until the replay arrives or the caller's wait runs out. A frame that starts a
//!   run (`continues = false`) after a hole closes the run at once: those samples are gone.
//! - **Resuming waits for the replay.** After a restart, the producer's live frames can come
//!   before its replay of the frames the processor never acknowledged. While resuming from a
//!   saved mark, every frame after a hole behind the mark is held the same way.
//! - **A frame is done when its last sample is behind the mark.** Its token (the
//!   acknowledgement handle) is released then, and not before: the caller acknowledges only
//!   what its saved state covers.

use std::collections::VecDeque;

use proto::Segment;

/// One channel of a frame, as received. Its name stays the frame's [`Segment`]: it becomes
/// the channel of the reading computed from it, with no conversion that could fail.
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    pub name: Segment,
    /// `a`, `v` or `adc`, as the producer labelled the samples.
    pub unit: Segment,
    pub samples: Vec<f32>,
}

/// Consecutive samples of every channel of a device, ready for the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The device whose samples these are. It travels with the window, stamped by the
    /// device's own assembler, so whoever computes and publishes a window labels it with this
    /// and nothing else: a window cannot be published under another device's name, whatever
    /// the caller happens to be handling when it comes out (a frame of another device, a
    /// checkpoint).
    pub device: Segment,
    /// Time of the first sample and just after the last one (Unix µs).
    pub start_us: i64,
    pub end_us: i64,
    pub sample_rate_hz: f64,
    pub channels: Vec<Channel>,
    /// Shorter than the interval: closed early at a hole, a layout change or idleness.
    pub partial: bool,
}

impl Window {
    pub fn duration_s(&self) -> f64 {
        (self.end_us - self.start_us) as f64 / 1e6
    }

    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name.as_str() == name)
    }
}

/// What [`Assembler::push`] did with a frame, for counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameOutcome {
    /// Leading samples already used before (a replay), cut off.
    pub duplicate_samples: usize,
    /// The frame did not continue the samples held: they were closed first.
    pub gap: bool,
    /// Samples discarded because a run closed with fewer than `min_window` of them.
    pub discarded_samples: usize,
    /// Frames held behind a hole were used without it being filled (the wait ran out).
    pub held_released: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Layout {
    rate_hz: f64,
    names: Vec<Segment>,
    units: Vec<Segment>,
}

/// A frame held until the hole before it is filled (or the wait is over).
#[derive(Debug)]
struct Held {
    start_us: i64,
    rate_hz: f64,
    continues: bool,
    channels: Vec<Channel>,
}

/// Most frames held behind a hole; past this the hole is accepted at once (memory bound:
/// a device streaming 0.1 s frames for longer than a minute).
const MAX_HELD: usize = 600;

/// The window assembler of one device. `T` is whatever the caller needs to acknowledge a
/// frame once it is used.
#[derive(Debug)]
pub struct Assembler<T> {
    /// Stamped on every window cut here.
    device: Segment,
    interval_s: f64,
    min_window_s: f64,
    layout: Option<Layout>,
    /// Samples not used yet, per channel (all the same length).
    held: Vec<Vec<f32>>,
    /// Time of `held[..][0]` (fractional µs: periods like 1/3 kHz are not whole µs).
    held_start_us: f64,
    mark_us: Option<i64>,
    /// Frames not done yet: (time just after their last sample, token), in arrival order.
    pending: VecDeque<(i64, T)>,
    /// Resuming from a saved mark: nothing continued it yet.
    resuming: bool,
    /// Frames held behind a hole a replay may fill, sorted by start, and when the hold began
    /// (caller's clock, ms).
    waiting: Vec<Held>,
    waiting_since_ms: Option<u64>,
}

impl<T> Assembler<T> {
    /// `mark_us`: where the saved state says this device's used samples end.
    pub fn new(device: Segment, interval_s: f64, min_window_s: f64, mark_us: Option<i64>) -> Self {
        Self {
            device,
            interval_s,
            min_window_s,
            layout: None,
            held: Vec::new(),
            held_start_us: 0.0,
            mark_us,
            pending: VecDeque::new(),
            resuming: mark_us.is_some(),
            waiting: Vec::new(),
            waiting_since_ms: None,
        }
    }

    /// Frames held while resuming (see the module doc).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Give up waiting for a replay once the hold has lasted `max_wait_ms`: the hole is
    /// accepted and the held frames are used.
    pub fn release_waiting(
        &mut self,
        now_ms: u64,
        max_wait_ms: u64,
        out: &mut Vec<Window>,
    ) -> FrameOutcome {
        let due = self
            .waiting_since_ms
            .is_some_and(|since| now_ms.saturating_sub(since) >= max_wait_ms);
        if !due {
            return FrameOutcome::default();
        }
        self.resuming = false;
        self.drain(now_ms, true, out)
    }

    /// Use held frames in order while they continue what came before; stop at a hole that a
    /// replay can fill (unless `force`, which accepts the first hole).
    fn drain(&mut self, now_ms: u64, mut force: bool, out: &mut Vec<Window>) -> FrameOutcome {
        let mut report = FrameOutcome::default();
        while let Some(first) = self.waiting.first() {
            let period = 1e6 / first.rate_hz;
            let expected = if self.held_samples() > 0 {
                Some(self.held_end_us())
            } else {
                self.mark_us.map(|m| m as f64)
            };
            let hole = expected.is_some_and(|e| first.start_us as f64 > e + period);
            // A replay can fill the hole if the frame says it continues its run, or if we are
            // resuming from a saved mark (what came after it was never acknowledged).
            let fillable = first.continues || self.resuming;
            if hole && fillable && !force && self.waiting.len() < MAX_HELD {
                self.waiting_since_ms.get_or_insert(now_ms);
                return report;
            }
            force = false;
            let f = self.waiting.remove(0);
            if !hole {
                self.resuming = false;
            }
            let r = self.add(f.start_us, f.rate_hz, f.channels, out);
            report.duplicate_samples += r.duplicate_samples;
            report.discarded_samples += r.discarded_samples;
            report.gap |= r.gap;
            report.held_released |= hole;
        }
        self.waiting_since_ms = None;
        report
    }

    pub fn mark(&self) -> Option<i64> {
        self.mark_us
    }

    /// Samples held per channel, not yet in a window.
    pub fn held_samples(&self) -> usize {
        self.held.first().map_or(0, Vec::len)
    }

    fn period_us(&self) -> f64 {
        self.layout.as_ref().map_or(0.0, |l| 1e6 / l.rate_hz)
    }

    fn held_end_us(&self) -> f64 {
        self.held_start_us + self.held_samples() as f64 * self.period_us()
    }

    /// Add a frame; windows completed by it are appended to `out`. Frames must be valid
    /// (`proto` checks: equal lengths, finite samples, positive rate). `now_ms` is the
    /// caller's monotonic clock, for the resume wait.
    // A frame's four facts, its token, the clock and the output: a struct for the frame would
    // only be built to be taken apart again on the next line.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        start_us: i64,
        sample_rate_hz: f64,
        continues: bool,
        channels: Vec<Channel>,
        token: T,
        now_ms: u64,
        out: &mut Vec<Window>,
    ) -> FrameOutcome {
        let n = channels.first().map_or(0, |c| c.samples.len());
        let period = 1e6 / sample_rate_hz;
        let end_us = (start_us as f64 + n as f64 * period).round() as i64;
        self.pending.push_back((end_us, token));
        let at = self.waiting.partition_point(|h| h.start_us <= start_us);
        self.waiting.insert(
            at,
            Held {
                start_us,
                rate_hz: sample_rate_hz,
                continues,
                channels,
            },
        );
        self.drain(now_ms, false, out)
    }

    fn add(
        &mut self,
        start_us: i64,
        sample_rate_hz: f64,
        channels: Vec<Channel>,
        out: &mut Vec<Window>,
    ) -> FrameOutcome {
        let mut report = FrameOutcome::default();
        let n = channels.first().map_or(0, |c| c.samples.len());
        let period = 1e6 / sample_rate_hz;
        let layout = Layout {
            rate_hz: sample_rate_hz,
            names: channels.iter().map(|c| c.name.clone()).collect(),
            units: channels.iter().map(|c| c.unit.clone()).collect(),
        };
        if self.layout.as_ref() != Some(&layout) {
            if self.layout.is_some() && self.held_samples() > 0 {
                report.gap = true;
                report.discarded_samples += self.close(out);
            }
            self.layout = Some(layout);
            self.held = vec![Vec::new(); channels.len()];
        }
        // Where this frame should start to continue what is held (or what was used).
        let expected = if self.held_samples() > 0 {
            Some(self.held_end_us())
        } else {
            self.mark_us.map(|m| m as f64)
        };
        let mut skip = 0usize;
        let mut start = start_us as f64;
        if let Some(e) = expected {
            if start > e + period {
                if self.held_samples() > 0 {
                    report.gap = true;
                    report.discarded_samples += self.close(out);
                }
            } else if start < e - period / 2.0 {
                // Overlaps samples already held or used: cut them off.
                skip = (((e - start) / period).round() as usize).min(n);
                start += skip as f64 * period;
            }
        }
        report.duplicate_samples = skip;
        if skip < n {
            if self.held_samples() == 0 {
                self.held_start_us = start;
            }
            for (held, c) in self.held.iter_mut().zip(channels) {
                held.extend_from_slice(&c.samples[skip..]);
            }
        }
        self.cut_full(out);
        report
    }

    /// Cut every whole interval held.
    fn cut_full(&mut self, out: &mut Vec<Window>) {
        let Some(layout) = &self.layout else { return };
        let per_window = (self.interval_s * layout.rate_hz).round().max(1.0) as usize;
        while self.held_samples() >= per_window {
            out.push(self.take(per_window, false));
        }
    }

    /// Take the first `n` held samples as a window and move the mark past them.
    fn take(&mut self, n: usize, partial: bool) -> Window {
        let period = self.period_us();
        let (rate_hz, names, units) = match &self.layout {
            Some(l) => (l.rate_hz, l.names.clone(), l.units.clone()),
            None => (1.0, Vec::new(), Vec::new()),
        };
        let start = self.held_start_us;
        let end = start + n as f64 * period;
        let channels = self
            .held
            .iter_mut()
            .zip(names.into_iter().zip(units))
            .map(|(held, (name, unit))| Channel {
                name,
                unit,
                samples: held.drain(..n).collect(),
            })
            .collect();
        self.held_start_us = end;
        self.advance_mark(end.round() as i64);
        Window {
            device: self.device.clone(),
            start_us: start.round() as i64,
            end_us: end.round() as i64,
            sample_rate_hz: rate_hz,
            channels,
            partial,
        }
    }

    fn advance_mark(&mut self, to: i64) {
        self.mark_us = Some(self.mark_us.map_or(to, |m| m.max(to)));
    }

    /// Close what is held as a partial window (or discard it if shorter than `min_window`).
    /// Returns the samples discarded.
    fn close(&mut self, out: &mut Vec<Window>) -> usize {
        let n = self.held_samples();
        if n == 0 {
            return 0;
        }
        let rate = self.layout.as_ref().map_or(1.0, |l| l.rate_hz);
        if n as f64 / rate >= self.min_window_s {
            out.push(self.take(n, true));
            0
        } else {
            let end = self.held_end_us();
            for h in &mut self.held {
                h.clear();
            }
            self.held_start_us = end;
            self.advance_mark(end.round() as i64);
            n
        }
    }

    /// The device went quiet: close what is held now rather than wait for a frame that may
    /// never come. Returns the samples discarded.
    pub fn flush(&mut self, out: &mut Vec<Window>) -> usize {
        self.close(out)
    }

    /// Tokens of frames whose every sample is behind the mark, in arrival order. (A replayed
    /// frame arrives after later ones, so every pending frame is looked at, not a prefix.)
    pub fn done(&mut self) -> Vec<T> {
        let Some(mark) = self.mark_us else {
            return Vec::new();
        };
        // One sample period of slack: frame ends are rounded to whole µs.
        let slack = self.period_us().ceil() as i64;
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.pending.len());
        for (end, t) in self.pending.drain(..) {
            if end <= mark + slack {
                out.push(t);
            } else {
                keep.push_back((end, t));
            }
        }
        self.pending = keep;
        out
    }

    /// Frames received but not yet done.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_000_000_000_000;

    fn dev() -> Segment {
        Segment::new("ct-1").unwrap()
    }

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn ch(name: &str, samples: Vec<f32>) -> Vec<Channel> {
        vec![Channel {
            name: seg(name),
            unit: seg("a"),
            samples,
        }]
    }

    /// Samples numbered by their index since T0 at 2 kHz, so a window's content shows
    /// exactly which samples it holds.
    fn numbered(from: usize, n: usize) -> Vec<f32> {
        (from..from + n).map(|i| i as f32).collect()
    }

    fn frame_at(i: usize) -> i64 {
        T0 + (i as i64) * 500
    }

    #[test]
    fn frames_of_any_size_make_whole_windows_that_abut() {
        let mut a = Assembler::new(dev(), 1.0, 0.04, None);
        let mut out = Vec::new();
        // 700-sample frames at 2 kHz: windows of 2000 cut across frame borders.
        for k in 0..10 {
            a.push(
                frame_at(k * 700),
                2000.0,
                true,
                ch("ct1", numbered(k * 700, 700)),
                k,
                0,
                &mut out,
            );
        }
        assert_eq!(out.len(), 3, "7000 samples make three 1 s windows");
        for (w, win) in out.iter().enumerate() {
            assert_eq!(win.start_us, frame_at(w * 2000));
            assert_eq!(win.end_us, frame_at((w + 1) * 2000));
            assert_eq!(win.channels[0].samples, numbered(w * 2000, 2000));
            assert!(!win.partial);
        }
        assert_eq!(a.mark(), Some(frame_at(6000)));
        assert_eq!(a.held_samples(), 1000);
        // Frames 0..=7 end at or before sample 5600 < 6000: done. Frame 8 ends at 6300.
        assert_eq!(a.done(), (0..8).collect::<Vec<_>>());
        assert_eq!(a.pending(), 2);
    }

    #[test]
    fn a_replay_after_a_restart_counts_nothing_twice_and_cuts_the_same_windows() {
        // Before the crash: windows up to sample 4000 were used and saved.
        let mut first = Assembler::new(dev(), 1.0, 0.04, None);
        let mut before = Vec::new();
        for k in 0..6 {
            first.push(
                frame_at(k * 1000),
                2000.0,
                true,
                ch("ct1", numbered(k * 1000, 1000)),
                (),
                0,
                &mut before,
            );
        }
        let saved_mark = first.mark();
        assert_eq!(saved_mark, Some(frame_at(6000)));
        // After the restart the producer replays frames from sample 3500 on, in other sizes.
        let mut again = Assembler::new(dev(), 1.0, 0.04, saved_mark);
        let mut after = Vec::new();
        let mut dup = 0;
        for k in 0..5 {
            let from = 3500 + k * 1500;
            dup += again
                .push(
                    frame_at(from),
                    2000.0,
                    true,
                    ch("ct1", numbered(from, 1500)),
                    (),
                    0,
                    &mut after,
                )
                .duplicate_samples;
        }
        assert_eq!(dup, 2500, "samples 3500..6000 were used before the crash");
        // Windows continue exactly where they stopped: 6000..8000, 8000..10000.
        assert_eq!(after.len(), 2);
        assert_eq!(after[0].start_us, frame_at(6000));
        assert_eq!(after[0].channels[0].samples, numbered(6000, 2000));
        assert_eq!(after[1].channels[0].samples, numbered(8000, 2000));
    }

    #[test]
    fn resuming_waits_for_the_replay_to_fill_the_hole_behind_the_mark() {
        // Saved mark at sample 2000. Live frames from 3000 on come first, then the replay.
        let mut a = Assembler::new(dev(), 1.0, 0.04, Some(frame_at(2000)));
        let mut out = Vec::new();
        for k in 0..6 {
            let from = 3000 + k * 500;
            a.push(
                frame_at(from),
                2000.0,
                true,
                ch("ct1", numbered(from, 500)),
                from,
                100,
                &mut out,
            );
        }
        assert!(out.is_empty());
        assert_eq!(a.waiting(), 6);
        // The replay: 1500..3000 (the first part was used before the restart).
        a.push(
            frame_at(1500),
            2000.0,
            false,
            ch("ct1", numbered(1500, 1500)),
            1500,
            200,
            &mut out,
        );
        assert_eq!(a.waiting(), 0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].channels[0].samples, numbered(2000, 2000));
        assert_eq!(out[1].channels[0].samples, numbered(4000, 2000));
        assert!(out.iter().all(|w| !w.partial));
    }

    #[test]
    fn a_hole_behind_the_mark_that_no_replay_fills_is_accepted_after_the_wait() {
        let mut a = Assembler::new(dev(), 1.0, 0.04, Some(frame_at(2000)));
        let mut out = Vec::new();
        a.push(
            frame_at(9000),
            2000.0,
            true,
            ch("ct1", numbered(9000, 2500)),
            0,
            1_000,
            &mut out,
        );
        assert!(a.release_waiting(5_000, 15_000, &mut out) == FrameOutcome::default());
        assert!(out.is_empty());
        a.release_waiting(16_000, 15_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].start_us, frame_at(9000));
        // From now on a hole before a frame that starts a run closes the run at once.
        a.push(
            frame_at(20_000),
            2000.0,
            false,
            ch("ct1", numbered(20_000, 100)),
            1,
            16_001,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert!(
            out[1].partial,
            "the 500 samples held were closed at the hole"
        );
    }

    #[test]
    fn a_hole_closes_the_run_as_a_partial_window_and_restarts_at_the_frame() {
        let mut a = Assembler::new(dev(), 1.0, 0.04, None);
        let mut out = Vec::new();
        a.push(
            frame_at(0),
            2000.0,
            true,
            ch("ct1", numbered(0, 1200)),
            0,
            0,
            &mut out,
        );
        // Samples 1200..1500 were lost at the device (a USB hiccup): the next frame starts
        // a run at 1500.
        let r = a.push(
            frame_at(1500),
            2000.0,
            false,
            ch("ct1", numbered(1500, 2500)),
            1,
            0,
            &mut out,
        );
        assert!(r.gap);
        assert_eq!(out.len(), 2);
        assert!(out[0].partial);
        assert_eq!(
            (out[0].start_us, out[0].end_us),
            (frame_at(0), frame_at(1200))
        );
        assert!(!out[1].partial);
        assert_eq!(out[1].start_us, frame_at(1500));
        assert_eq!(out[1].channels[0].samples, numbered(1500, 2000));
        assert_eq!(a.done(), vec![0], "frame 1 still has samples held");
    }

    #[test]
    fn a_frame_lost_in_transport_is_waited_for_and_its_replay_fills_the_hole() {
        let mut a = Assembler::new(dev(), 1.0, 0.04, None);
        let mut out = Vec::new();
        let push = |a: &mut Assembler<usize>, k: usize, now: u64, out: &mut Vec<Window>| {
            a.push(
                frame_at(k * 500),
                2000.0,
                k > 0,
                ch("ct1", numbered(k * 500, 500)),
                k,
                now,
                out,
            )
        };
        for k in [0, 1, 2] {
            push(&mut a, k, 0, &mut out);
        }
        // Frame 3 was dropped by the broker; 4..8 arrive, each saying it continues its run.
        for k in 4..9 {
            push(&mut a, k, 100, &mut out);
        }
        assert!(out.is_empty(), "nothing is cut across the hole");
        assert_eq!(a.waiting(), 5);
        assert!(a.release_waiting(5_000, 15_000, &mut out) == FrameOutcome::default());
        // The replay of frame 3.
        let r = push(&mut a, 3, 6_000, &mut out);
        assert!(!r.gap && !r.held_released);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].channels[0].samples, numbered(0, 2000));
        assert_eq!(out[1].channels[0].samples, numbered(2000, 2000));
        assert!(out.iter().all(|w| !w.partial));
        let mut done = a.done();
        done.sort_unstable();
        assert_eq!(
            done,
            (0..8).collect::<Vec<_>>(),
            "frame 8 still has samples held"
        );
    }

    #[test]
    fn a_rest_shorter_than_the_minimum_is_discarded_and_counted() {
        let mut a = Assembler::new(dev(), 1.0, 0.04, None);
        let mut out = Vec::new();
        a.push(
            frame_at(0),
            2000.0,
            true,
            ch("ct1", numbered(0, 50)),
            0,
            0,
            &mut out,
        );
        let r = a.push(
            frame_at(5000),
            2000.0,
            false,
            ch("ct1", numbered(5000, 10)),
            1,
            0,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(r.discarded_samples, 50, "25 ms is under the 40 ms minimum");
        assert_eq!(a.done(), vec![0]);
        let mut out = Vec::new();
        assert_eq!(a.flush(&mut out), 10);
        assert_eq!(a.done(), vec![1]);
        assert_eq!(a.mark(), Some(frame_at(5010)));
    }

    #[test]
    fn a_change_of_rate_or_channels_never_mixes_layouts_in_one_window() {
        let mut a = Assembler::new(dev(), 1.0, 0.04, None);
        let mut out = Vec::new();
        a.push(
            frame_at(0),
            2000.0,
            true,
            ch("ct1", vec![1.0; 1000]),
            0,
            0,
            &mut out,
        );
        let two = vec![
            Channel {
                name: seg("ct1"),
                unit: seg("a"),
                samples: vec![2.0; 2000],
            },
            Channel {
                name: seg("v1"),
                unit: seg("v"),
                samples: vec![3.0; 2000],
            },
        ];
        let r = a.push(frame_at(1000), 2000.0, true, two, 1, 0, &mut out);
        assert!(r.gap);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].channels.len(), 1);
        assert!(out[0].channels[0].samples.iter().all(|s| *s == 1.0));
        assert_eq!(out[1].channels.len(), 2);
        assert!(out[1].channels[0].samples.iter().all(|s| *s == 2.0));
    }

    #[test]
    fn sample_periods_that_are_not_whole_microseconds_do_not_drift() {
        // 3 kHz: 333.33 µs per sample. An hour of 0.5 s frames, windows of 1 s.
        let mut a = Assembler::new(dev(), 1.0, 0.04, None);
        let mut out = Vec::new();
        for k in 0..7200i64 {
            let start = T0 + (k as f64 * 500_000.0).round() as i64;
            a.push(
                start,
                3000.0,
                true,
                ch("ct1", vec![0.0; 1500]),
                (),
                0,
                &mut out,
            );
            for _ in a.done() {}
        }
        assert_eq!(out.len(), 3600, "no hole was ever seen");
        assert!(out.iter().all(|w| !w.partial));
        assert_eq!(out[3599].end_us, T0 + 3_600_000_000);
        assert_eq!(a.pending(), 0);
    }
}
