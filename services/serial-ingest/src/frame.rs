//! The stream frame assembler: samples of numbered lines in, frames of `frame_ms` out (pure).
//!
//! Invariants:
//! - A *run* is a stretch of lines with consecutive sequence numbers (65535 wraps to 0) whose
//!   sample clock agrees with the system clock. Within a run, sample `n` is stamped
//!   `run start + n / rate`, so consecutive frames abut exactly: a frame's start plus its
//!   sample count over the rate is the next frame's start, with no rounding that accumulates.
//! - The first line of a run is stamped from its read time: its last sample was taken just
//!   before it was read, so the run starts at `read time − samples / rate`.
//! - A sequence gap (lines lost) or a drift of the sample clock from the read time beyond
//!   [`RESYNC_US`] closes the current frame, short, and starts a new run: a frame never spans
//!   a hole or a clock jump.
//! - A frame holds at most `frame_len` samples per channel and every channel the same number.

/// Beyond this disagreement between the sample clock and the read time the run restarts at
/// the read time: a visible discontinuity rather than a slowly wrong timestamp.
pub const RESYNC_US: i64 = 50_000;

/// One frame's worth of samples, raw (before `scale`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// When the first sample was taken (Unix µs).
    pub start_ts_us: i64,
    /// One vector per channel, all the same length.
    pub samples: Vec<Vec<i32>>,
    /// Not the first frame of its run: it starts where the previous frame ended.
    pub continues: bool,
}

impl Block {
    pub fn len(&self) -> usize {
        self.samples.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one line did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Frames completed (or closed short by a gap or resync), oldest first.
    pub frames: Vec<Block>,
    /// Lines lost before this one, by its sequence number.
    pub lost_lines: u32,
    /// The run restarted because the sample clock drifted from the read time.
    pub resynced: bool,
}

#[derive(Debug)]
struct Run {
    /// Time of the run's sample 0 (Unix µs).
    start_us: i64,
    /// Samples per channel taken into the run so far.
    taken: u64,
    /// Run index of the current frame's first sample.
    frame_first: u64,
    current: Vec<Vec<i32>>,
}

#[derive(Debug)]
pub struct FrameAssembler {
    channels: usize,
    rate_hz: f64,
    frame_len: usize,
    last_seq: Option<u16>,
    run: Option<Run>,
}

impl FrameAssembler {
    /// `channels ≥ 1`, `rate_hz > 0`, `frame_len ≥ 1` samples per channel (config checks them).
    pub fn new(channels: usize, rate_hz: f64, frame_len: usize) -> Self {
        Self {
            channels: channels.max(1),
            rate_hz,
            frame_len: frame_len.max(1),
            last_seq: None,
            run: None,
        }
    }

    fn offset_us(&self, samples: u64) -> i64 {
        (samples as f64 * 1e6 / self.rate_hz).round() as i64
    }

    /// Add one line's samples (interleaved by instant; a multiple of the channel count, as
    /// the parser guarantees) read at `read_ms`.
    pub fn push(&mut self, seq: u16, values: &[i32], read_ms: i64) -> Pushed {
        let mut out = Pushed::default();
        let k = (values.len() / self.channels) as u64;
        let read_us = read_ms.saturating_mul(1000);
        if let Some(last) = self.last_seq {
            let lost = seq.wrapping_sub(last).wrapping_sub(1);
            if lost != 0 {
                out.lost_lines = u32::from(lost);
                out.frames.extend(self.close());
            }
        }
        self.last_seq = Some(seq);
        if let Some(run) = &self.run {
            let clock_end = run.start_us + self.offset_us(run.taken + k);
            if (clock_end - read_us).abs() > RESYNC_US {
                out.resynced = true;
                out.frames.extend(self.close());
            }
        }
        if self.run.is_none() {
            self.run = Some(Run {
                start_us: read_us - self.offset_us(k),
                taken: 0,
                frame_first: 0,
                current: vec![Vec::with_capacity(self.frame_len); self.channels],
            });
        }
        for instant in values.chunks_exact(self.channels) {
            let full = {
                let Some(run) = self.run.as_mut() else { break };
                for (c, v) in instant.iter().enumerate() {
                    run.current[c].push(*v);
                }
                run.taken += 1;
                run.current[0].len() >= self.frame_len
            };
            if full {
                out.frames.extend(self.take_frame());
            }
        }
        out
    }

    /// The current frame so far, taken out; the run continues.
    fn take_frame(&mut self) -> Option<Block> {
        let run = self.run.as_mut()?;
        if run.current[0].is_empty() {
            return None;
        }
        let first = run.frame_first;
        let start = run.start_us;
        run.frame_first = run.taken;
        let samples = std::mem::replace(
            &mut run.current,
            vec![Vec::with_capacity(self.frame_len); self.channels],
        );
        Some(Block {
            start_ts_us: start + self.offset_us(first),
            samples,
            continues: first > 0,
        })
    }

    /// End the run: the partial frame, if any, comes out short. The next line starts a new
    /// run (sequence continuity is still checked).
    pub fn close(&mut self) -> Option<Block> {
        let block = self.take_frame();
        self.run = None;
        block
    }

    /// The device restarted (banner) or the port was reopened: close the run and forget the
    /// sequence number, so the next line is not taken for a gap.
    pub fn reset(&mut self) -> Option<Block> {
        self.last_seq = None;
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_MS: i64 = 1_764_000_000_000;

    /// 1 channel, 1000 Hz, frames of 10 samples, lines of 5 samples (5 ms each).
    fn asm() -> FrameAssembler {
        FrameAssembler::new(1, 1000.0, 10)
    }

    fn vals(from: i32) -> Vec<i32> {
        (from..from + 5).collect()
    }

    #[test]
    fn frames_abut_exactly_and_keep_every_sample_in_order() {
        let mut a = asm();
        let mut frames = Vec::new();
        for i in 0..8u16 {
            // Read times jitter by a few ms around the true time; the clock ignores that.
            let jitter = [0, 3, -2, 4, 1, -3, 2, 0][usize::from(i)];
            let read = T0_MS + 5 * (i64::from(i) + 1) + jitter;
            let p = a.push(i, &vals(i32::from(i) * 5), read);
            assert_eq!((p.lost_lines, p.resynced), (0, false));
            frames.extend(p.frames);
        }
        assert_eq!(frames.len(), 4);
        // First line read at T0+5 ms with 5 samples at 1 kHz: the run starts at T0.
        assert_eq!(frames[0].start_ts_us, T0_MS * 1000);
        for w in frames.windows(2) {
            assert_eq!(
                w[0].start_ts_us + w[0].len() as i64 * 1000,
                w[1].start_ts_us
            );
        }
        let all: Vec<i32> = frames.iter().flat_map(|f| f.samples[0].clone()).collect();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn only_the_first_frame_of_a_run_says_it_does_not_continue() {
        let mut a = asm();
        let mut frames = Vec::new();
        for i in 0..4u16 {
            frames.extend(
                a.push(i, &vals(i32::from(i) * 5), T0_MS + 5 * (i64::from(i) + 1))
                    .frames,
            );
        }
        // A lost line: the run restarts, so the next frame starts a hole that is real.
        frames.extend(a.push(5, &vals(25), T0_MS + 30).frames);
        frames.extend(a.push(6, &vals(30), T0_MS + 35).frames);
        frames.extend(a.push(7, &vals(35), T0_MS + 40).frames);
        // The rest, closed short at shutdown, still continues its run.
        frames.extend(a.close());
        let continues: Vec<bool> = frames.iter().map(|f| f.continues).collect();
        assert_eq!(continues, vec![false, true, false, true]);
    }

    #[test]
    fn two_channels_are_deinterleaved() {
        let mut a = FrameAssembler::new(2, 1000.0, 2);
        let p = a.push(1, &[10, 20, 11, 21, 12, 22], T0_MS);
        assert_eq!(p.frames.len(), 1);
        assert_eq!(p.frames[0].samples, vec![vec![10, 11], vec![20, 21]]);
        let rest = a.close().unwrap();
        assert_eq!(rest.samples, vec![vec![12], vec![22]]);
        assert_eq!(rest.start_ts_us, p.frames[0].start_ts_us + 2000);
    }

    #[test]
    fn a_sequence_gap_closes_the_frame_and_counts_the_lost_lines() {
        let mut a = asm();
        assert!(a.push(10, &vals(0), T0_MS + 5).frames.is_empty());
        // Lines 11 and 12 lost; 13 read 15 ms later.
        let p = a.push(13, &vals(15), T0_MS + 20);
        assert_eq!(p.lost_lines, 2);
        assert_eq!(
            p.frames.len(),
            1,
            "the frame before the gap is closed short"
        );
        assert_eq!(p.frames[0].samples[0], vals(0));
        assert_eq!(p.frames[0].start_ts_us, T0_MS * 1000);
        // The new run is stamped from its own read time, not continued over the hole.
        let p = a.push(14, &vals(20), T0_MS + 25);
        assert_eq!(p.frames.len(), 1);
        assert_eq!(p.frames[0].start_ts_us, (T0_MS + 15) * 1000);
        assert_eq!(p.frames[0].samples[0], (15..25).collect::<Vec<_>>());
    }

    #[test]
    fn the_sequence_wraps_from_65535_to_0_without_a_gap() {
        let mut a = asm();
        a.push(65534, &vals(0), T0_MS + 5);
        let p = a.push(65535, &vals(5), T0_MS + 10);
        assert_eq!(p.lost_lines, 0);
        let p2 = a.push(0, &vals(10), T0_MS + 15);
        assert_eq!((p2.lost_lines, p2.resynced), (0, false));
        let p3 = a.push(1, &vals(15), T0_MS + 20);
        assert_eq!(p3.frames[0].start_ts_us, p.frames[0].start_ts_us + 10_000);
        // 65535 → 2 skips 0 and 1.
        let mut b = asm();
        b.push(65535, &vals(0), T0_MS);
        assert_eq!(b.push(2, &vals(0), T0_MS + 15).lost_lines, 2);
    }

    #[test]
    fn a_clock_drift_beyond_50_ms_restarts_the_run_at_the_read_time() {
        let mut a = asm();
        a.push(1, &vals(0), T0_MS + 5);
        // Within 50 ms: kept on the sample clock.
        let p = a.push(2, &vals(5), T0_MS + 10 + 50);
        assert!(!p.resynced);
        assert_eq!(p.frames[0].start_ts_us, T0_MS * 1000);
        // A read stalled 200 ms: line 3 should end at T0+15 ms by the sample clock.
        let p = a.push(3, &vals(10), T0_MS + 215);
        assert!(p.resynced);
        assert_eq!(p.lost_lines, 0);
        let p = a.push(4, &vals(15), T0_MS + 220);
        assert_eq!(p.frames[0].start_ts_us, (T0_MS + 210) * 1000);
        assert_eq!(p.frames[0].samples[0], (10..20).collect::<Vec<_>>());
    }

    #[test]
    fn a_resync_closes_a_partial_frame_short() {
        let mut a = asm();
        a.push(1, &vals(0), T0_MS + 5);
        let p = a.push(2, &vals(5), T0_MS + 500);
        assert!(p.resynced);
        assert_eq!(p.frames.len(), 1);
        assert_eq!(p.frames[0].samples[0], vals(0));
        assert_eq!(p.frames[0].start_ts_us, T0_MS * 1000);
    }

    #[test]
    fn reset_forgets_the_sequence_so_a_restarted_device_is_no_gap() {
        let mut a = asm();
        a.push(500, &vals(0), T0_MS + 5);
        let partial = a.reset().unwrap();
        assert_eq!(partial.samples[0], vals(0));
        assert_eq!(a.push(0, &vals(0), T0_MS + 100).lost_lines, 0);
        assert!(a.reset().is_some());
        assert!(a.reset().is_none());
    }
}
