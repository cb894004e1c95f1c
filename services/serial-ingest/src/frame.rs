//! The stream frame assembler: samples of numbered lines in, frames of `frame_ms` out (pure).
//!
//! Invariants:
//! - A *run* is a stretch of lines with consecutive sequence numbers (65535 wraps to 0) whose
//!   sample clock agrees with the system clock. Within a run, sample `n` is stamped
//!   `run start + n / rate`, so consecutive frames abut exactly: a frame's start plus its
//!   sample count over the rate is the next frame's start, with no rounding that accumulates.
//! - The first line of a run is stamped from its read time: its last sample was taken just
//!   before it was read, so the run starts at `read time − samples / rate`.
//! - A line read late is no reason to doubt the sample clock: a slow host (a loaded Pi) finds
//!   the lines waiting in the port's buffer and reads them in a burst, and the device sampled
//!   them on time. Only a sample clock that stays behind the read time by over [`RESYNC_US`]
//!   for [`LATE_PERSIST_US`] (a slow device clock, a system clock step) restarts the run.
//! - A sample clock *ahead* of the read time by over [`RESYNC_US`] is impossible for samples
//!   stamped rightly (a sample is read after it is taken): the run's start was stamped from a
//!   late read (its first line waited in a buffer) or the device clock is fast. While no frame
//!   of the run is out, the run's start moves back to agree with the read time; after that
//!   the run restarts.
//! - Stamps only move forward: a run never starts before, or within one sample period after,
//!   the end of the last frame handed out (the rms-processor takes samples stamped before what
//!   it used as a replay and cuts them off, and joins a frame that starts within one period of
//!   its samples to them as their continuation). A line that would start a run there is
//!   dropped, and counted, until the read time has moved on past it.
//! - A sequence gap (lines lost) or a restart of the run closes the current frame, short: a
//!   frame never spans a hole or a clock jump.
//! - A frame holds at most `frame_len` samples per channel and every channel the same number.

/// Beyond this disagreement between the sample clock and the read time the run restarts at
/// the read time: a visible discontinuity rather than a slowly wrong timestamp.
pub const RESYNC_US: i64 = 50_000;

/// How long (read time) a sample clock must stay more than [`RESYNC_US`] behind the read time
/// before the run restarts: longer than any burst of buffered lines takes to read (a burst of
/// a second's lines is read in a few ms, each line stamped 1 ms after the one before).
pub const LATE_PERSIST_US: i64 = 1_000_000;

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
pub struct LineOutcome {
    /// Frames completed (or closed short by a gap or resync), oldest first.
    pub frames: Vec<Block>,
    /// Lines lost before this one, by its sequence number.
    pub lost_lines: u32,
    /// The run restarted because the sample clock drifted from the read time.
    pub resynced: bool,
    /// Lines dropped because a run starting with them would have been stamped over (or right
    /// against) samples already handed out; see the module doc.
    pub dropped_lines: u32,
}

/// How long `samples` take at `rate_hz`, in whole µs.
fn offset_us(samples: u64, rate_hz: f64) -> i64 {
    (samples as f64 * 1e6 / rate_hz).round() as i64
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
    /// Read time of the first of the lines, in a row, whose sample clock was more than
    /// [`RESYNC_US`] behind the read time.
    late_since_us: Option<i64>,
}

#[derive(Debug)]
pub struct FrameAssembler {
    channels: usize,
    rate_hz: f64,
    frame_len: usize,
    last_seq: Option<u16>,
    run: Option<Run>,
    /// Just after the last sample of the last frame handed out (Unix µs).
    floor_us: Option<i64>,
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
            floor_us: None,
        }
    }

    fn offset_us(&self, samples: u64) -> i64 {
        offset_us(samples, self.rate_hz)
    }

    /// Add one line's samples (interleaved by instant; a multiple of the channel count, as
    /// the parser guarantees) read at `read_ms`.
    pub fn push(&mut self, seq: u16, values: &[i32], read_ms: i64) -> LineOutcome {
        let mut out = LineOutcome::default();
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
        let min_start = self.min_start_us();
        let mut restart = false;
        if let Some(run) = self.run.as_mut() {
            let clock_end = run.start_us + offset_us(run.taken + k, self.rate_hz);
            let drift = clock_end - read_us;
            if drift < -RESYNC_US {
                let since = *run.late_since_us.get_or_insert(read_us);
                restart = read_us - since >= LATE_PERSIST_US;
            } else {
                run.late_since_us = None;
                if drift > RESYNC_US {
                    if run.frame_first == 0 {
                        // Nothing of this run is out yet: its start was stamped from a line
                        // read late. Move it back, never onto what came before.
                        let want = run.start_us - drift;
                        run.start_us = min_start.map_or(want, |m| want.max(m));
                    } else {
                        restart = true;
                    }
                }
            }
        }
        if restart {
            out.resynced = true;
            out.frames.extend(self.close());
        }
        if self.run.is_none() {
            let start_us = read_us - self.offset_us(k);
            if self.min_start_us().is_some_and(|m| start_us < m) {
                out.dropped_lines += 1;
                return out;
            }
            self.run = Some(Run {
                start_us,
                taken: 0,
                frame_first: 0,
                current: vec![Vec::with_capacity(self.frame_len); self.channels],
                late_since_us: None,
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

    /// The earliest a new run may start: past one sample period after the last frame out.
    fn min_start_us(&self) -> Option<i64> {
        self.floor_us.map(|f| f + self.offset_us(1) + 1)
    }

    /// The current frame so far, taken out; the run continues.
    fn take_frame(&mut self) -> Option<Block> {
        let run = self.run.as_mut()?;
        if run.current[0].is_empty() {
            return None;
        }
        let first = run.frame_first;
        let start = run.start_us;
        let taken = run.taken;
        run.frame_first = taken;
        let samples = std::mem::replace(
            &mut run.current,
            vec![Vec::with_capacity(self.frame_len); self.channels],
        );
        let end = start + self.offset_us(taken);
        self.floor_us = Some(self.floor_us.map_or(end, |f| f.max(end)));
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
    fn a_sample_clock_behind_the_read_time_for_a_second_restarts_the_run_at_the_read_time() {
        let mut a = asm();
        a.push(1, &vals(0), T0_MS + 5);
        // Within 50 ms: kept on the sample clock.
        let p = a.push(2, &vals(5), T0_MS + 10 + 50);
        assert!(!p.resynced);
        assert_eq!(p.frames[0].start_ts_us, T0_MS * 1000);
        // From line 3 on every line is read 200 ms after its sample clock says it ended (the
        // system clock stepped, or the device's clock is slow): not a burst of buffered lines
        // but the clocks apart. Line 3 is 200 ms late at T0 + 215 ms; the lines stay late
        // until a line read a second later, line 203, restarts the run.
        let mut frames = Vec::new();
        for seq in 3..=203u16 {
            let read = T0_MS + 5 * i64::from(seq) + 200;
            let p = a.push(seq, &vals(0), read);
            assert_eq!(p.resynced, seq == 203, "line {seq}");
            assert_eq!(p.lost_lines, 0);
            if seq == 203 {
                assert!(p.frames.is_empty(), "lines 201, 202 were a whole frame");
            }
            frames.extend(p.frames);
        }
        // Lines 3..=202 stayed on the sample clock: frames abut.
        assert_eq!(frames.len(), 100);
        assert_eq!(frames[0].start_ts_us, (T0_MS + 10) * 1000);
        assert_eq!(frames[99].start_ts_us, (T0_MS + 10 + 99 * 10) * 1000);
        assert!(frames.iter().all(|f| f.continues));
        // Line 203 starts a new run at its read time.
        let p = a.push(204, &vals(0), T0_MS + 5 * 204 + 200);
        assert_eq!(p.frames[0].start_ts_us, (T0_MS + 5 * 203 + 200 - 5) * 1000);
        assert!(!p.frames[0].continues);
    }

    #[test]
    fn a_sample_clock_ahead_of_the_read_time_closes_the_frame_short_and_never_goes_back() {
        let mut a = asm();
        let mut frames = Vec::new();
        for seq in 0..5u16 {
            frames.extend(
                a.push(seq, &vals(0), T0_MS + 5 * (i64::from(seq) + 1))
                    .frames,
            );
        }
        assert_eq!(frames.len(), 2, "lines 0..=3; line 4 is half a frame");
        // The system clock steps back 100 ms: line 5's samples would be read before taken.
        let p = a.push(5, &vals(0), T0_MS + 30 - 100);
        assert!(p.resynced);
        assert_eq!(p.frames.len(), 1, "the partial frame is closed short");
        assert_eq!(p.frames[0].len(), 5);
        assert_eq!(p.frames[0].start_ts_us, (T0_MS + 20) * 1000);
        // A run at the read time would stamp samples over those out already (up to T0 + 25):
        // lines are dropped until one read past them starts a run.
        assert_eq!(p.dropped_lines, 1);
        let mut dropped = 1;
        let mut next = None;
        for seq in 6..40u16 {
            let p = a.push(seq, &vals(0), T0_MS + 5 * (i64::from(seq) + 1) - 100);
            assert_eq!(p.lost_lines, 0);
            dropped += p.dropped_lines;
            if let Some(f) = p.frames.first() {
                next = Some(f.clone());
                break;
            }
        }
        // Line 26, read at T0 + 35 ms, is the first that starts past T0 + 25 ms + 1 period.
        assert_eq!(dropped, 21);
        let next = next.unwrap();
        assert_eq!(next.start_ts_us, (T0_MS + 30) * 1000);
        assert!(!next.continues);
    }

    /// A device at 2 kHz, 20 samples a line (one line per 10 ms), frames of 1 s, read by a
    /// host that stalls: line `i` (values `20i..20i+20`) ends at `T0 + 10(i+1)` ms; lines due
    /// while the host is stalled in `stall` (ms after T0) are read together when it wakes,
    /// all with that read time. The port's buffer holds the last `buffer_ms` of lines; older ones are lost.
    /// Returns every frame, the rest closed at the end.
    fn read_with_stall(lines: u16, stall: std::ops::Range<i64>, buffer_ms: i64) -> Vec<Block> {
        let mut a = FrameAssembler::new(1, 2000.0, 2000);
        let mut frames = Vec::new();
        for i in 0..lines {
            let due = 10 * (i64::from(i) + 1);
            if stall.contains(&due) && due < stall.end - buffer_ms {
                continue;
            }
            let read = if stall.contains(&due) { stall.end } else { due };
            let read_ms = T0_MS + read;
            let values: Vec<i32> = (i32::from(i) * 20..i32::from(i) * 20 + 20).collect();
            frames.extend(a.push(i, &values, read_ms).frames);
        }
        frames.extend(a.close());
        frames
    }

    /// Frames must never be stamped over each other, and each must carry the time its samples
    /// were taken (within the resync bound), whatever the host's read delays were.
    fn assert_stamped_truly(frames: &[Block]) {
        let all: Vec<i32> = frames.iter().flat_map(|f| f.samples[0].clone()).collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "samples in order");
        for w in frames.windows(2) {
            let end = w[0].start_ts_us + w[0].len() as i64 * 500;
            assert!(
                w[1].start_ts_us >= end,
                "a frame at {} overlaps the one before it (ends {}): {:?}",
                w[1].start_ts_us - T0_MS * 1000,
                end - T0_MS * 1000,
                frames
                    .iter()
                    .map(|f| (f.start_ts_us - T0_MS * 1000, f.len(), f.continues))
                    .collect::<Vec<_>>()
            );
        }
        for f in frames {
            // Sample n was taken at T0 + n × 0.5 ms.
            let truth = T0_MS * 1000 + i64::from(f.samples[0][0]) * 500;
            assert!(
                (f.start_ts_us - truth).abs() <= RESYNC_US,
                "frame of sample {} stamped {} µs off",
                f.samples[0][0],
                f.start_ts_us - truth
            );
        }
    }

    #[test]
    fn a_host_that_reads_late_keeps_the_sample_clock_and_never_stamps_frames_over_each_other() {
        // Stalls of 60 ms to 900 ms (a loaded Raspberry Pi), the lines waiting in the buffer.
        for stall_ms in [60, 120, 300, 900] {
            let frames = read_with_stall(500, 1_205..1_205 + stall_ms, 1_000);
            assert_stamped_truly(&frames);
            // Nothing was lost: one run, whole frames of 1 s, every sample.
            assert_eq!(
                frames.iter().map(Block::len).collect::<Vec<_>>(),
                vec![2000; 5],
                "stall of {stall_ms} ms"
            );
            assert!(frames.iter().skip(1).all(|f| f.continues));
        }
    }

    #[test]
    fn a_run_whose_first_line_was_read_late_moves_back_to_the_time_its_lines_came() {
        // A stall of 1.5 s with room for 1 s of lines: 0.5 s are lost, and the first line
        // after the gap, which starts a run, was read 1 s late; the 99 lines after it come in
        // the same burst. Stamping them from the first one's read time would put them a
        // second late, and restarting at the read time later would stamp over them.
        let frames = read_with_stall(500, 1_205..2_705, 1_000);
        assert_stamped_truly(&frames);
        let continues: Vec<bool> = frames.iter().map(|f| f.continues).collect();
        assert_eq!(continues, vec![false, true, false, true, true, true]);
        assert_eq!(
            frames.iter().map(Block::len).sum::<usize>(),
            (500 - 50) * 20,
            "all but the 50 lines lost"
        );
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
