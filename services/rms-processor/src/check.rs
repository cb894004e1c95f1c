//! Is a raw frame fit to be cut into windows? (pure: no tokio, no I/O)
//!
//! `proto` already refuses what makes no sense in any frame (no samples, NaN, channels of
//! different lengths, a start outside 2000..2100). What is refused here would be valid on the
//! wire but would poison the processor's state for the device: a frame dated ahead of the
//! clock moves the device's mark past every frame that follows (they would all be skipped as
//! already counted), a sample rate far outside what any producer samples at makes windows of
//! one sample or of billions, two channels with one name count one channel's energy twice,
//! and a frame whose payload names another device or site than its topic would be counted
//! under a name nobody published for. Each is dead-lettered by the caller, never used.

use proto::{Kind, RawFrame, Segment};

/// Lowest and highest sample rate accepted: serial-ingest's own bounds for a stream port.
pub const MIN_RATE_HZ: f64 = 1.0;
pub const MAX_RATE_HZ: f64 = 200_000.0;

/// 2020-01-01 (Unix µs): a clock that reads earlier was never set (a Pi without a real-time
/// clock before NTP). Frames cannot be judged "ahead" of it.
pub const CLOCK_SET_US: i64 = 1_577_836_800_000_000;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Short and fixed, for the counter's label: `ahead`, `rate`, `channels`, `identity`; or
    /// `clock`: not refused for good, this host's clock is not set and cannot tell (the
    /// caller leaves the frame unacknowledged, to be replayed once it is).
    pub kind: &'static str,
    /// For a person: what was wrong, with the values.
    pub reason: String,
}

fn refused(kind: &'static str, reason: String) -> Result<(), Refused> {
    Err(Refused { kind, reason })
}

/// Check `frame`, received on `topic`, against `site` and the clock (`now_us`, Unix µs).
pub fn frame(
    frame: &RawFrame,
    topic: &str,
    site: &Segment,
    now_us: i64,
    max_ahead_us: i64,
) -> Result<(), Refused> {
    // The topic is what the broker authorised; the payload only repeats it.
    match proto::parse(topic) {
        Some(t) if t.kind == Kind::Raw && t.rest.first() == Some(&frame.device) => {
            if t.site != frame.site || frame.site != *site {
                return refused(
                    "identity",
                    format!(
                        "the frame names site {} but came on {topic} (this processor's site is {site})",
                        frame.site
                    ),
                );
            }
        }
        _ => {
            return refused(
                "identity",
                format!(
                    "the frame names device {} but came on {topic}",
                    frame.device
                ),
            );
        }
    }
    let rate = frame.sample_rate_hz;
    if !(MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate) {
        return refused(
            "rate",
            format!("sample_rate_hz = {rate} is outside {MIN_RATE_HZ}..={MAX_RATE_HZ}"),
        );
    }
    for (i, c) in frame.channels.iter().enumerate() {
        if frame.channels[..i].iter().any(|o| o.channel == c.channel) {
            return refused(
                "channels",
                format!("channel {} appears twice in one frame", c.channel),
            );
        }
    }
    let n = frame.channels.first().map_or(0, |c| c.samples.len());
    let end_us = frame.start_ts_us as f64 + n as f64 * 1e6 / rate;
    let limit = now_us.saturating_add(max_ahead_us);
    if end_us > limit as f64 && now_us < CLOCK_SET_US {
        return refused(
            "clock",
            "this host's clock is not set (it reads before 2020), so whether the frame is \
             dated in the future cannot be told"
                .into(),
        );
    }
    if end_us > limit as f64 {
        let ahead_s = (end_us - now_us as f64) / 1e6;
        return refused(
            "ahead",
            format!(
                "the frame ends {ahead_s:.0} s after this host's clock (at most {} s are \
                 accepted, max_ahead_ms); is the producer's clock or this host's wrong?",
                max_ahead_us / 1_000_000
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{RawChannel, Topic};

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    const NOW_US: i64 = 1_796_000_000_000_000;
    const AHEAD_US: i64 = 60_000_000;

    fn raw(device: &str, start_us: i64, rate: f64, names: &[&str]) -> RawFrame {
        RawFrame {
            origin: None,
            site: seg("home"),
            device: seg(device),
            start_ts_us: start_us,
            sample_rate_hz: rate,
            channels: names
                .iter()
                .map(|n| RawChannel {
                    channel: seg(n),
                    unit: seg("a"),
                    samples: vec![0.0; 200],
                })
                .collect(),
            continues: true,
        }
    }

    fn check(f: &RawFrame, topic_device: &str) -> Result<(), Refused> {
        let topic = Topic::raw(&seg("home"), &seg(topic_device));
        frame(f, topic.as_str(), &seg("home"), NOW_US, AHEAD_US)
    }

    fn kind(r: Result<(), Refused>) -> &'static str {
        r.err().map_or("ok", |e| e.kind)
    }

    #[test]
    fn an_ordinary_frame_passes() {
        assert_eq!(
            check(
                &raw("ct-1", NOW_US - 100_000, 2000.0, &["ct1", "v1"]),
                "ct-1"
            ),
            Ok(())
        );
        // Old frames are replays, not mistakes: any age passes.
        assert_eq!(
            check(&raw("ct-1", 946_684_800_000_000, 2000.0, &["ct1"]), "ct-1"),
            Ok(())
        );
    }

    #[test]
    fn frames_dated_ahead_of_the_clock_are_refused_with_the_margin_named() {
        // 2098, and the last second of 2099 (whose window would end in 2100, past what a
        // measurement may carry).
        for start in [
            4_071_000_000_000_000,
            4_102_444_799_900_000,
            NOW_US + AHEAD_US,
        ] {
            let r = check(&raw("ct-1", start, 2000.0, &["ct1"]), "ct-1");
            let e = r.unwrap_err();
            assert_eq!(e.kind, "ahead");
            assert!(e.reason.contains("at most 60 s"), "{}", e.reason);
        }
        // Within the margin: a producer on another host whose clock is a little ahead.
        let ok = raw("ct-1", NOW_US + AHEAD_US - 200_000, 2000.0, &["ct1"]);
        assert_eq!(check(&ok, "ct-1"), Ok(()));
    }

    #[test]
    fn a_host_whose_clock_is_not_set_refuses_nothing_for_good() {
        // Booted without a real-time clock, before NTP: 1970. Dead-lettering (and
        // acknowledging) every frame would throw away the readings of a producer whose clock
        // is right.
        let f = raw("ct-1", NOW_US, 2000.0, &["ct1"]);
        let topic = Topic::raw(&seg("home"), &seg("ct-1"));
        let r = frame(&f, topic.as_str(), &seg("home"), 20_000_000, AHEAD_US);
        assert_eq!(kind(r), "clock");
    }

    #[test]
    fn rates_no_producer_samples_at_are_refused() {
        for rate in [1e-6, 0.5, 200_001.0, 1e12] {
            assert_eq!(
                kind(check(
                    &raw("ct-1", NOW_US - 10_000_000, rate, &["ct1"]),
                    "ct-1"
                )),
                "rate",
                "{rate}"
            );
        }
        for rate in [1.0, 2000.0, 200_000.0] {
            assert_eq!(
                kind(check(
                    &raw("ct-1", NOW_US - 10_000_000_000, rate, &["ct1"]),
                    "ct-1"
                )),
                "ok",
                "{rate}"
            );
        }
    }

    #[test]
    fn a_channel_named_twice_is_refused() {
        let f = raw("ct-1", NOW_US - 1_000_000, 2000.0, &["ct1", "v1", "ct1"]);
        assert_eq!(kind(check(&f, "ct-1")), "channels");
    }

    #[test]
    fn a_payload_that_names_another_device_or_site_than_its_topic_is_refused() {
        let f = raw("ct-2", NOW_US - 1_000_000, 2000.0, &["ct1"]);
        let e = check(&f, "ct-1").unwrap_err();
        assert_eq!(e.kind, "identity");
        assert!(
            e.reason.contains("ct-2") && e.reason.contains("raw/ct-1"),
            "{}",
            e.reason
        );
        let mut other_site = raw("ct-1", NOW_US - 1_000_000, 2000.0, &["ct1"]);
        other_site.site = seg("barn");
        assert_eq!(kind(check(&other_site, "ct-1")), "identity");
        let f = raw("ct-1", NOW_US - 1_000_000, 2000.0, &["ct1"]);
        let on_barn = Topic::raw(&seg("barn"), &seg("ct-1"));
        assert_eq!(
            kind(frame(&f, on_barn.as_str(), &seg("home"), NOW_US, AHEAD_US)),
            "identity"
        );
        assert_eq!(
            kind(frame(&f, "not/a/topic", &seg("home"), NOW_US, AHEAD_US)),
            "identity"
        );
    }
}
