//! One delivery round's decisions: which request goes out next, and what an answer means for
//! the readings in it (pure: no I/O, no tokio, no clock; [`crate::sink`] does the writing).
//!
//! A round gets the readings to deliver as ranges of lines, one range per request within the
//! endpoint's limits. It hands out one request at a time ([`Round::next`]) and is told the
//! endpoint's answer ([`Round::answer`]); at the end it says which readings were refused for
//! good (to be dead-lettered), which are kept to try again, and, if it stopped early, the
//! ranges not written and why. The rules live here, apart from the HTTP and the spool, so
//! that they can be tested against every kind of endpoint in unit tests.
//!
//! The rules:
//! - **A refusal of particular readings** (400/422, or 413) splits the request in halves until
//!   the refused reading is alone. InfluxDB's refusal is trusted: the reading is dead-lettered.
//! - **A cautious endpoint** (the HTTP output's, which may be anything) must earn that trust.
//!   At the end of a round that took something, each reading refused alone is sent alone once
//!   more: an endpoint that refused everything and was fixed in the meantime takes it now. A
//!   reading refused again is dead-lettered only if the endpoint then takes another request;
//!   when nothing is left to send, the round ends by sending again one reading the endpoint
//!   took in this round (a duplicate, which receivers drop by the reading's identity): taken,
//!   the refusals stand; refused, the endpoint refuses everything now. So an endpoint (or a
//!   proxy before it) that refuses everything — a wrong setting, gzip it cannot read, an API
//!   that changed, even in the middle of a round, even right after it refused a reading that
//!   was really bad — has nothing dead-lettered; the readings wait. A round stops after about
//!   2·log2(n) failed requests with nothing taken, after trying the round's last reading
//!   (once per take): a run of refused readings at the head (too old for the API, say) must
//!   not hold back the good ones behind it.
//! - InfluxDB's refusals are trusted (they name the point; its client tells a proxy's error
//!   page apart and calls it a setting); the HTTP output's endpoint is cautious.
//! - **A 5xx** ends the round (the endpoint is down), unless the round was started to
//!   *bisect*: then a failing request is split to probe (2 splits while nothing is taken,
//!   then one request beside them; an endpoint that is down costs 4 requests a round); a
//!   reading that alone fails while
//!   the endpoint takes others is *held* (kept, retried later, reported) and never
//!   dead-lettered: a flaky load balancer must not lose good readings.
//! - **Anything else** (no answer, 408/429, a setting refused) ends the round with what is
//!   not written, in order.

use std::ops::Range;

use crate::events::OutputNames;
use crate::http::WriteOutcome;

/// Why a round could not write everything now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    Unavailable(String),
    Refused(String),
    /// Shutdown was requested between the requests of a split batch.
    Stopping,
}

/// Failed requests in a row, with nothing taken, after which a bisecting round takes the
/// endpoint for down: the failing request, two probes into it, and one request beside them.
const DOWN_AFTER: usize = 4;

/// What a round wants next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send these lines as one request, then call [`Round::answer`].
    Write(Range<usize>),
    /// The round is over.
    Done(Verdict),
}

/// What became of a round's readings.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// Single readings refused for good, with the endpoint's reason: to be dead-lettered.
    pub refused: Vec<(Range<usize>, String)>,
    /// Single readings the endpoint fails on (5xx) while it takes others, with its answer:
    /// they are also in `result`'s kept ranges, and are to be reported.
    pub held: Vec<(Range<usize>, String)>,
    /// `Ok`: every other reading was written; the ranges are to be tried again later
    /// (spooled, no backoff), in order. `Err`: the round stopped; the ranges not written, as a
    /// stack (the last entry is the first in order), and why.
    pub result: Outcome,
}

/// `Ok`: the ranges to try again later, in order. `Err`: the ranges not written, as a stack,
/// and why.
pub(crate) type Outcome = Result<Vec<Range<usize>>, (Vec<Range<usize>>, Failure)>;

/// What an answer did to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reaction {
    Taken,
    /// It failed and was split in halves, to find the reading at fault.
    Split,
    /// It failed; its readings are set aside or the round is over.
    Failed,
    /// It was the round's closing probe: a reading already taken, sent again.
    Probe,
}

/// A single reading refused (`refusal`) or failing (5xx) in a cautious round: its fate is
/// decided at the end.
#[derive(Debug)]
struct Suspect {
    r: Range<usize>,
    reason: String,
    refusal: bool,
    /// A refusal sent alone once more at the end of the round, and refused again.
    confirmed: bool,
    /// Requests taken before it last failed: a confirmed refusal is trusted if the endpoint
    /// took more after.
    takes_at: usize,
}

impl Suspect {
    /// A refusal to take at its word: refused again when sent alone at the end of the round,
    /// and the endpoint took another request after that (of `takes` so far).
    fn trusted(&self, takes: usize) -> bool {
        self.refusal && self.confirmed && self.takes_at < takes
    }
}

/// One delivery round; see the module doc.
#[derive(Debug)]
pub(crate) struct Round {
    /// The endpoint's name, for the messages, and what to check.
    names: OutputNames,
    /// Over the failure budget, the last request was tried (once per take).
    jump_ok: bool,
    /// The round's last reading, sent over the failure budget: taken, the endpoint is proven
    /// to take readings and the budget no longer applies to this round.
    jumped: Option<Range<usize>>,
    cautious: bool,
    bisect: bool,
    /// Failed requests in a row with nothing taken after which a cautious round stops.
    budget: usize,
    /// Requests to send, as a stack (the last is next).
    stack: Vec<Range<usize>>,
    first: bool,
    failed_once: bool,
    taken_after_failure: bool,
    failures_since_taken: usize,
    probes: usize,
    suspects: Vec<Suspect>,
    /// Requests taken so far, and the first reading of the last one.
    takes: usize,
    last_taken: Option<usize>,
    /// A refusal sent again to confirm it, and where it was among the suspects.
    confirming: Option<(usize, Suspect)>,
    /// The closing probe: whether it was sent, is out, and how it failed.
    probed: bool,
    probing: bool,
    probe_failed: Option<Failure>,
    /// Shutdown was asked for (the probe is not sent).
    stopping: bool,
    /// Requests answered 5xx while bisecting, set aside until the endpoint takes something.
    deferred: Vec<Range<usize>>,
    refused: Vec<(Range<usize>, String)>,
    held: Vec<(Range<usize>, String)>,
    last_why: String,
    /// Set by an answer that ends the round.
    stopped: Option<(Vec<Range<usize>>, Failure)>,
}

impl Round {
    /// A round over `lines` lines sent as `requests` (in order), to the endpoint of `names`.
    pub(crate) fn new(
        names: OutputNames,
        mut requests: Vec<Range<usize>>,
        lines: usize,
        cautious: bool,
        bisect: bool,
    ) -> Self {
        requests.reverse();
        Self {
            names,
            jump_ok: true,
            jumped: None,
            cautious,
            bisect: cautious && bisect,
            budget: 2 * (usize::BITS - lines.leading_zeros()) as usize + 4,
            stack: requests,
            first: true,
            failed_once: false,
            taken_after_failure: false,
            failures_since_taken: 0,
            probes: 0,
            suspects: Vec::new(),
            takes: 0,
            last_taken: None,
            confirming: None,
            probed: false,
            probing: false,
            probe_failed: None,
            stopping: false,
            deferred: Vec::new(),
            refused: Vec::new(),
            held: Vec::new(),
            last_why: String::new(),
            stopped: None,
        }
    }

    /// The next request, or the verdict. `stopping`: shutdown was asked for; the round ends
    /// before its next request (never before its first).
    pub(crate) fn next(&mut self, stopping: bool) -> Step {
        self.stopping = stopping;
        if let Some(stopped) = self.stopped.take() {
            return Step::Done(self.verdict(Err(stopped)));
        }
        loop {
            if let Some(r) = self.stack.pop() {
                if !self.first && stopping {
                    let rest = self.rest(Some(r));
                    return Step::Done(self.verdict(Err((rest, Failure::Stopping))));
                }
                self.first = false;
                return Step::Write(r);
            }
            // The endpoint took something since it failed: what was set aside is looked into.
            if !self.deferred.is_empty() && self.taken_after_failure {
                let deferred = std::mem::take(&mut self.deferred);
                self.stack.extend(deferred.into_iter().rev());
                continue;
            }
            // Each refusal is sent alone once more, when the endpoint has taken something: a
            // reading refused while the endpoint refused everything (and was then fixed) is
            // taken now.
            if !stopping
                && self.takes > 0
                && let Some(i) = self.suspects.iter().position(|s| s.refusal && !s.confirmed)
            {
                let s = self.suspects.remove(i);
                let r = s.r.clone();
                self.confirming = Some((i, s));
                return Step::Write(r);
            }
            // Confirmed refusals with nothing taken after them: is the endpoint still taking
            // anything?
            if !stopping
                && !self.probed
                && self.deferred.is_empty()
                && let Some(i) = self.last_taken
                && self
                    .suspects
                    .iter()
                    .any(|s| s.refusal && s.confirmed && s.takes_at == self.takes)
            {
                self.probed = true;
                self.probing = true;
                return Step::Write(i..i + 1);
            }
            let result = self.finish();
            return Step::Done(self.verdict(result));
        }
    }

    /// The endpoint's answer to request `r` (the last one [`Round::next`] gave).
    pub(crate) fn answer(&mut self, r: Range<usize>, outcome: &WriteOutcome) -> Reaction {
        if std::mem::take(&mut self.probing) {
            self.probe_failed = match outcome {
                WriteOutcome::Written => {
                    self.takes += 1;
                    self.taken_after_failure |= self.failed_once;
                    None
                }
                WriteOutcome::Rejected(msg) => Some(Failure::Refused(self.refuses_all(msg))),
                WriteOutcome::TooLarge => Some(Failure::Refused(
                    self.refuses_all("413 for a single reading it took a moment before"),
                )),
                WriteOutcome::Refused { what, .. } => Some(Failure::Refused(what.clone())),
                WriteOutcome::Unavailable(why) | WriteOutcome::ServerError(why) => {
                    Some(Failure::Unavailable(why.clone()))
                }
            };
            return Reaction::Probe;
        }
        if let Some((i, mut s)) = self.confirming.take() {
            let stop = match outcome {
                WriteOutcome::Written => None,
                WriteOutcome::Rejected(_) | WriteOutcome::TooLarge => {
                    if let WriteOutcome::Rejected(msg) = outcome {
                        s.reason = msg.clone();
                    }
                    s.confirmed = true;
                    s.takes_at = self.takes;
                    None
                }
                WriteOutcome::Refused { what, .. } => Some(Failure::Refused(what.clone())),
                WriteOutcome::Unavailable(why) | WriteOutcome::ServerError(why) => {
                    Some(Failure::Unavailable(why.clone()))
                }
            };
            if !matches!(outcome, WriteOutcome::Written) {
                self.suspects.insert(i, s);
                if let Some(failure) = stop {
                    let rest = self.rest(None);
                    self.stopped = Some((rest, failure));
                }
                return Reaction::Failed;
            }
            // Taken now: no longer a suspect.
        }
        if matches!(outcome, WriteOutcome::Written) {
            self.taken_after_failure |= self.failed_once;
            self.failures_since_taken = 0;
            self.takes += 1;
            self.last_taken = Some(r.start);
            self.jump_ok = true;
            if self.jumped.as_ref() == Some(&r) {
                // Everything it refuses from here on is refused with the endpoint working:
                // a run of refused readings longer than the budget is worked through.
                self.budget = usize::MAX;
            }
            return Reaction::Taken;
        }
        self.failed_once = true;
        self.failures_since_taken += 1;
        let single = r.len() == 1;
        let over_budget = self.cautious && self.failures_since_taken > self.budget;
        if over_budget && (!self.jump_ok || self.stack.is_empty()) {
            // Many requests failed in a row with nothing taken, the last request of the round
            // too: the endpoint refuses (or fails on) everything. The readings wait; no more
            // requests now.
            let failure = match outcome {
                WriteOutcome::Rejected(msg) => Failure::Refused(self.refuses_all(msg)),
                WriteOutcome::TooLarge => Failure::Refused(format!(
                    "{} finds every request too large (413); lower {}",
                    self.names.name, self.names.bytes_key
                )),
                WriteOutcome::Refused { what, .. } => Failure::Refused(what.clone()),
                WriteOutcome::Unavailable(why) | WriteOutcome::ServerError(why) => {
                    Failure::Unavailable(why.clone())
                }
                WriteOutcome::Written => Failure::Unavailable(self.last_why.clone()),
            };
            return self.stop(r, failure);
        }
        let reaction = self.failed(r, outcome, single);
        if over_budget && self.stopped.is_none() && !self.stack.is_empty() {
            // Before giving up, the round's last reading goes next: what the endpoint refuses
            // may be a run of readings at the head (too old, say), with the rest good. Taken,
            // the round goes on where it was; refused, it ends at the next failure.
            self.jump_ok = false;
            let last = self.stack.remove(0);
            if last.len() > 1 {
                self.stack.insert(0, last.start..last.end - 1);
            }
            self.jumped = Some(last.end - 1..last.end);
            self.stack.push(last.end - 1..last.end);
        }
        reaction
    }

    /// A failed answer to `r` (not over the budget).
    fn failed(&mut self, r: Range<usize>, outcome: &WriteOutcome, single: bool) -> Reaction {
        match outcome {
            WriteOutcome::Written => Reaction::Taken,
            WriteOutcome::Rejected(msg) if single => {
                self.suspect(r, msg.clone());
                Reaction::Failed
            }
            WriteOutcome::TooLarge if single => {
                let msg = format!(
                    "{} answered 413: this single reading is larger than it accepts",
                    self.names.name
                );
                self.suspect(r, msg);
                Reaction::Failed
            }
            WriteOutcome::Rejected(_) | WriteOutcome::TooLarge => {
                self.split(r);
                Reaction::Split
            }
            WriteOutcome::ServerError(why) if self.bisect => {
                self.last_why = why.clone();
                if !self.taken_after_failure && self.failures_since_taken >= DOWN_AFTER {
                    // Probed, a request beside the failing one too, nothing taken: the
                    // endpoint is down, not one reading bad.
                    return self.stop(r, Failure::Unavailable(why.clone()));
                }
                if !single && (self.taken_after_failure || self.probes < 2) {
                    self.probes += usize::from(!self.taken_after_failure);
                    self.split(r);
                    return Reaction::Split;
                }
                if single && self.taken_after_failure {
                    self.suspects.push(Suspect {
                        r,
                        reason: why.clone(),
                        refusal: false,
                        confirmed: false,
                        takes_at: self.takes,
                    });
                } else {
                    self.deferred.push(r);
                }
                Reaction::Failed
            }
            WriteOutcome::Unavailable(why) | WriteOutcome::ServerError(why) => {
                self.stop(r, Failure::Unavailable(why.clone()))
            }
            WriteOutcome::Refused { what, .. } => self.stop(r, Failure::Refused(what.clone())),
        }
    }

    /// Request `r` was given up without an answer (stopping): the round ends, with it unwritten.
    pub(crate) fn abandon(&mut self, r: Range<usize>) {
        self.probing = false;
        if let Some((i, s)) = self.confirming.take() {
            self.suspects.insert(i, s);
            let rest = self.rest(None);
            self.stopped = Some((rest, Failure::Stopping));
            return;
        }
        let rest = self.rest(Some(r));
        self.stopped = Some((rest, Failure::Stopping));
    }

    fn split(&mut self, r: Range<usize>) {
        let mid = r.start + r.len() / 2;
        self.stack.push(mid..r.end);
        self.stack.push(r.start..mid);
    }

    /// A reading refused alone: dead-lettered at once, or, when cautious, at the end if the
    /// endpoint proved it takes others.
    fn suspect(&mut self, r: Range<usize>, msg: String) {
        if self.cautious {
            self.suspects.push(Suspect {
                r,
                reason: msg,
                refusal: true,
                confirmed: false,
                takes_at: self.takes,
            });
        } else {
            self.refused.push((r, msg));
        }
    }

    fn stop(&mut self, r: Range<usize>, failure: Failure) -> Reaction {
        let rest = self.rest(Some(r));
        self.stopped = Some((rest, failure));
        Reaction::Failed
    }

    /// What is not written when the round ends early, as a stack: the requests still to
    /// send, `r`, what was set aside and the suspects, in order. A refusal the endpoint
    /// proved (it took another request after it) stands.
    fn rest(&mut self, r: Option<Range<usize>>) -> Vec<Range<usize>> {
        let mut stack = std::mem::take(&mut self.stack);
        stack.extend(r);
        stack.extend(std::mem::take(&mut self.deferred).into_iter().rev());
        let mut unproven = Vec::new();
        for s in std::mem::take(&mut self.suspects) {
            if s.trusted(self.takes) {
                self.refused.push((s.r, s.reason));
            } else {
                unproven.push(s.r);
            }
        }
        stack.extend(unproven);
        // In order (disjoint ranges; a jump to the last request put it out of place).
        stack.sort_unstable_by_key(|r| std::cmp::Reverse(r.start));
        stack
    }

    /// Every request answered: the suspects' fate.
    fn finish(&mut self) -> Outcome {
        if !self.deferred.is_empty() {
            // Failing and nothing taken: the endpoint is down, not one reading bad.
            let why = self.last_why.clone();
            return Err((self.rest(None), Failure::Unavailable(why)));
        }
        let mut kept = Vec::new();
        let mut refusals = Vec::new();
        for s in std::mem::take(&mut self.suspects) {
            if s.trusted(self.takes) {
                // Refused twice, and the endpoint took another request after.
                self.refused.push((s.r, s.reason));
            } else if s.refusal {
                refusals.push(s.reason);
                kept.push(s.r);
            } else {
                // Failing alone (5xx) while the endpoint takes others: kept, never refused.
                self.held.push((s.r.clone(), s.reason));
                kept.push(s.r);
            }
        }
        if kept.is_empty() {
            return Ok(kept);
        }
        if let Some(failure) = self.probe_failed.take() {
            return Err((kept.into_iter().rev().collect(), failure));
        }
        if !self.taken_after_failure || !refusals.is_empty() {
            let failure = match refusals.first() {
                // Unproven because the probe was not sent.
                Some(_) if self.stopping => Failure::Stopping,
                Some(msg) => Failure::Refused(self.refuses_all(msg)),
                None => Failure::Unavailable(self.last_why.clone()),
            };
            return Err((kept.into_iter().rev().collect(), failure));
        }
        Ok(kept)
    }

    fn verdict(&mut self, result: Outcome) -> Verdict {
        Verdict {
            refused: std::mem::take(&mut self.refused),
            held: std::mem::take(&mut self.held),
            result,
        }
    }

    /// What an endpoint refusing every reading is told.
    fn refuses_all(&self, msg: &str) -> String {
        format!(
            "{} refuses every reading it is sent ({msg}); they are kept until it takes them: \
             check {}",
            self.names.name, self.names.check
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = "unknown field \"foo\"";

    struct Run {
        verdict: Verdict,
        writes: Vec<Range<usize>>,
        /// Readings in requests the endpoint took, in the order taken.
        taken: Vec<usize>,
    }

    /// A round over `n` readings in requests of `per` against `endpoint`.
    fn run(
        n: usize,
        per: usize,
        cautious: bool,
        bisect: bool,
        mut endpoint: impl FnMut(&Range<usize>) -> WriteOutcome,
    ) -> Run {
        let requests = (0..n).step_by(per).map(|s| s..(s + per).min(n)).collect();
        let mut round = Round::new(crate::events::HTTP, requests, n, cautious, bisect);
        let (mut writes, mut taken) = (Vec::new(), Vec::new());
        loop {
            match round.next(false) {
                Step::Write(r) => {
                    writes.push(r.clone());
                    let outcome = endpoint(&r);
                    if round.answer(r.clone(), &outcome) == Reaction::Taken {
                        taken.extend(r);
                    }
                }
                Step::Done(verdict) => {
                    return Run {
                        verdict,
                        writes,
                        taken,
                    };
                }
            }
            assert!(writes.len() <= 4 * n + 64, "the round does not end");
        }
    }

    /// 400 for a request holding any of `bad`, else taken.
    fn refusing(bad: &[usize]) -> impl FnMut(&Range<usize>) -> WriteOutcome + '_ {
        |r| {
            if bad.iter().any(|b| r.contains(b)) {
                WriteOutcome::Rejected(REFUSED.into())
            } else {
                WriteOutcome::Written
            }
        }
    }

    /// A stack of ranges as the readings in order.
    fn unstack(stack: &[Range<usize>]) -> Vec<usize> {
        stack.iter().rev().flat_map(|r| r.clone()).collect()
    }

    fn singles(v: &[(Range<usize>, String)]) -> Vec<usize> {
        v.iter()
            .map(|(r, _)| {
                assert_eq!(r.len(), 1, "only single readings are refused or held");
                r.start
            })
            .collect()
    }

    #[test]
    fn influxdb_refusals_are_dead_lettered_and_everything_else_written() {
        let run = run(100, 1000, false, false, refusing(&[37, 80]));
        assert_eq!(singles(&run.verdict.refused), [37, 80]);
        assert!(run.verdict.refused.iter().all(|(_, why)| why == REFUSED));
        let mut taken = run.taken.clone();
        taken.sort_unstable();
        let expected: Vec<usize> = (0..100).filter(|i| *i != 37 && *i != 80).collect();
        assert_eq!(taken, expected);
        assert_eq!(run.verdict.result, Ok(Vec::new()));
    }

    #[test]
    fn a_cautious_refusal_is_trusted_once_the_endpoint_took_others_after_failing() {
        let run = run(100, 1000, true, false, refusing(&[37, 80]));
        assert_eq!(singles(&run.verdict.refused), [37, 80]);
        assert_eq!(run.taken.len(), 98);
        assert_eq!(run.verdict.result, Ok(Vec::new()));
    }

    #[test]
    fn a_lone_reading_refused_by_a_cautious_endpoint_is_kept_not_dead_lettered() {
        // Nothing else was sent to prove the endpoint takes anything at all.
        let run = run(1, 1000, true, false, refusing(&[0]));
        assert!(run.verdict.refused.is_empty());
        let Err((rest, Failure::Refused(why))) = run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        assert_eq!(unstack(&rest), [0]);
        assert!(why.contains("refuses every reading it is sent"), "{why}");
        assert!(why.contains(REFUSED), "{why}");
    }

    #[test]
    fn an_endpoint_refusing_everything_keeps_every_reading_in_order() {
        let run = run(1000, 1000, true, false, |_| {
            WriteOutcome::Rejected(REFUSED.into())
        });
        assert!(run.verdict.refused.is_empty());
        let Err((rest, Failure::Refused(_))) = &run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        assert_eq!(unstack(rest), (0..1000).collect::<Vec<_>>());
        // About 2·log2(n) + 4 requests and the last reading, not one per reading.
        assert!(run.writes.len() <= 26, "{} requests", run.writes.len());
    }

    #[test]
    fn an_api_that_changes_in_the_middle_of_a_round_has_nothing_dead_lettered() {
        let mut sent = 0;
        let run = run(1000, 100, true, false, |_| {
            sent += 1;
            if sent <= 3 {
                WriteOutcome::Written
            } else {
                WriteOutcome::Rejected(REFUSED.into())
            }
        });
        assert!(run.verdict.refused.is_empty());
        assert_eq!(run.taken, (0..300).collect::<Vec<_>>());
        let Err((rest, Failure::Refused(_))) = &run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        assert_eq!(unstack(rest), (300..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_refusal_with_nothing_sent_after_it_is_proven_by_sending_a_taken_reading_again() {
        // One reading per request, the last one bad.
        let run = run(5, 1, true, false, refusing(&[4]));
        assert_eq!(singles(&run.verdict.refused), [4]);
        assert_eq!(run.writes.last(), Some(&(3..4)), "the probe");
        assert_eq!(run.taken, [0, 1, 2, 3]);
        assert_eq!(run.verdict.result, Ok(Vec::new()));
    }

    #[test]
    fn an_endpoint_turning_to_refuse_everything_has_nothing_dead_lettered_even_a_bad_reading() {
        let mut sent = 0;
        let run = run(100, 10, true, false, |r| {
            sent += 1;
            if sent > 8 || r.contains(&5) {
                WriteOutcome::Rejected(REFUSED.into())
            } else {
                WriteOutcome::Written
            }
        });
        // Reading 5 is really bad, but by the time it is sent again the endpoint refuses
        // everything: its refusal proves nothing, and it waits with the rest.
        assert!(run.verdict.refused.is_empty());
        let Err((rest, Failure::Refused(why))) = &run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        assert!(why.contains("refuses every reading"), "{why}");
        let mut all = run.taken.clone();
        all.extend(unstack(rest));
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn an_endpoint_fixed_in_the_middle_of_a_round_gets_what_it_refused_before() {
        let mut sent = 0;
        let run = run(100, 10, true, false, |_| {
            sent += 1;
            if sent <= 6 {
                WriteOutcome::Rejected(REFUSED.into())
            } else {
                WriteOutcome::Written
            }
        });
        assert!(run.verdict.refused.is_empty(), "{:?}", run.verdict.refused);
        let mut taken = run.taken.clone();
        taken.sort_unstable();
        assert_eq!(taken, (0..100).collect::<Vec<_>>());
        assert_eq!(run.verdict.result, Ok(Vec::new()));
    }

    #[test]
    fn a_run_of_refused_readings_at_the_head_does_not_hold_back_the_rest() {
        // An API refusing readings older than some age, after a long outage: the first 30 of
        // the spool are refused, the rest good. More than the failure budget in a row.
        let bad: Vec<usize> = (0..30).collect();
        let run = run(100, 1000, true, false, refusing(&bad));
        assert_eq!(singles(&run.verdict.refused), bad);
        let mut taken = run.taken.clone();
        taken.sort_unstable();
        assert_eq!(taken, (30..100).collect::<Vec<_>>());
        assert_eq!(run.verdict.result, Ok(Vec::new()));
    }

    #[test]
    fn a_5xx_ends_the_round_with_the_rest_in_order() {
        for cautious in [false, true] {
            let run = run(1000, 100, cautious, false, |r| {
                if r.start == 200 {
                    WriteOutcome::ServerError("503 Service Unavailable".into())
                } else {
                    WriteOutcome::Written
                }
            });
            assert_eq!(run.taken, (0..200).collect::<Vec<_>>());
            let Err((rest, Failure::Unavailable(why))) = &run.verdict.result else {
                panic!("{:?}", run.verdict.result);
            };
            assert_eq!(why, "503 Service Unavailable");
            assert_eq!(unstack(rest), (200..1000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_reading_the_endpoint_fails_on_is_held_while_the_rest_is_delivered() {
        let run = run(500, 100, true, true, |r| {
            if r.contains(&123) {
                WriteOutcome::ServerError("500 Internal Server Error".into())
            } else {
                WriteOutcome::Written
            }
        });
        assert!(run.verdict.refused.is_empty(), "a 5xx never dead-letters");
        assert_eq!(singles(&run.verdict.held), [123]);
        let Ok(kept) = &run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        assert_eq!(unstack(kept), [123], "kept in the spool, to be tried again");
        let mut taken = run.taken.clone();
        taken.sort_unstable();
        assert_eq!(taken, (0..500).filter(|i| *i != 123).collect::<Vec<_>>());
    }

    #[test]
    fn an_endpoint_that_is_down_costs_four_requests_when_bisecting() {
        let run = run(1000, 100, true, true, |_| {
            WriteOutcome::ServerError("502 Bad Gateway".into())
        });
        assert_eq!(run.writes.len(), 4);
        assert!(run.taken.is_empty() && run.verdict.held.is_empty());
        let Err((rest, Failure::Unavailable(_))) = &run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        let mut all = unstack(rest);
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_setting_refused_ends_the_round() {
        let run = run(10, 5, true, false, |_| WriteOutcome::Refused {
            status: 401,
            what: "influx_writer.http.token is not accepted".into(),
        });
        assert_eq!(run.writes.len(), 1);
        let Err((rest, Failure::Refused(what))) = &run.verdict.result else {
            panic!("{:?}", run.verdict.result);
        };
        assert!(what.contains("token"));
        assert_eq!(unstack(rest), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn stopping_ends_the_round_between_requests_never_before_the_first() {
        let mut round = Round::new(crate::events::HTTP, vec![0..5, 5..10], 10, true, false);
        let Step::Write(r) = round.next(true) else {
            panic!("the first request is always sent");
        };
        assert_eq!(round.answer(r, &WriteOutcome::Written), Reaction::Taken);
        let Step::Done(verdict) = round.next(true) else {
            panic!("a round that is asked to stop stops");
        };
        let Err((rest, Failure::Stopping)) = verdict.result else {
            panic!("{:?}", verdict.result);
        };
        assert_eq!(unstack(&rest), (5..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_request_given_up_at_shutdown_leaves_every_reading_unwritten_in_order() {
        let mut round = Round::new(crate::events::HTTP, vec![0..5, 5..10], 10, true, false);
        let Step::Write(r) = round.next(false) else {
            panic!("a first request");
        };
        assert_eq!(round.answer(r, &WriteOutcome::Written), Reaction::Taken);
        let Step::Write(r) = round.next(false) else {
            panic!("a second request");
        };
        round.abandon(r);
        let Step::Done(verdict) = round.next(false) else {
            panic!("the round ends");
        };
        let Err((rest, Failure::Stopping)) = verdict.result else {
            panic!("{:?}", verdict.result);
        };
        assert_eq!(unstack(&rest), (5..10).collect::<Vec<_>>());
    }

    /// A small deterministic generator (no dependency for one test).
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Endpoints of every kind at random: readings it refuses, readings it fails on, 5xx at
    /// random (a flaky load balancer), refusing or failing everything from some request on.
    /// Whatever it does, every reading ends up exactly once taken, dead-lettered or kept; only
    /// a reading the endpoint refused alone is dead-lettered; a cautious round dead-letters
    /// nothing unless the endpoint took something after it first failed.
    #[test]
    fn whatever_the_endpoint_does_no_reading_is_lost_or_dead_lettered_wrongly() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for case in 0..3000 {
            let n = 1 + rng.below(300) as usize;
            let per = 1 + rng.below(64) as usize;
            let cautious = rng.below(2) == 0;
            let bisect = rng.below(2) == 0;
            let bad: Vec<usize> = (0..n).filter(|_| rng.below(40) == 0).collect();
            let poison: Vec<usize> = (0..n).filter(|_| rng.below(60) == 0).collect();
            let flaky = rng.below(4) == 0;
            // From this request on, everything is refused (0) or fails (1); or everything is
            // refused until this request (2: the endpoint is fixed).
            let from = (rng.below(3) == 0).then(|| (rng.below(10) as usize, rng.below(3)));
            let mut sent = 0usize;
            let mut taken_after_first_failure = false;
            let mut failed = false;
            let mut state = rng.next() | 1;
            let run = run(n, per, cautious, bisect, |r| {
                sent += 1;
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let outcome = match from {
                    Some((k, 0)) if sent > k => WriteOutcome::Rejected(REFUSED.into()),
                    Some((k, 1)) if sent > k => WriteOutcome::ServerError("500".into()),
                    Some((k, 2)) if sent <= k => WriteOutcome::Rejected(REFUSED.into()),
                    _ if flaky && state.is_multiple_of(3) => {
                        WriteOutcome::ServerError("502".into())
                    }
                    _ if poison.iter().any(|p| r.contains(p)) => {
                        WriteOutcome::ServerError("500".into())
                    }
                    _ if bad.iter().any(|b| r.contains(b)) => {
                        WriteOutcome::Rejected(REFUSED.into())
                    }
                    _ => WriteOutcome::Written,
                };
                if outcome == WriteOutcome::Written {
                    taken_after_first_failure |= failed;
                } else {
                    failed = true;
                }
                outcome
            });
            let v = &run.verdict;
            let refused = singles(&v.refused);
            let held = singles(&v.held);
            let mut all = run.taken.clone();
            all.extend(&refused);
            match &v.result {
                Ok(kept) => all.extend(kept.iter().flat_map(|r| r.clone())),
                Err((rest, _)) => all.extend(unstack(rest)),
            }
            all.sort_unstable();
            assert_eq!(
                all,
                (0..n).collect::<Vec<_>>(),
                "case {case}: a reading lost or counted twice"
            );
            // InfluxDB's refusals are trusted; a cautious round's only with proof.
            if cautious || !matches!(from, Some((_, 0 | 2))) {
                for r in &refused {
                    assert!(
                        bad.contains(r),
                        "case {case}: reading {r} dead-lettered wrongly"
                    );
                }
            }
            if cautious && !taken_after_first_failure {
                assert!(
                    refused.is_empty(),
                    "case {case}: dead-lettered without proof"
                );
            }
            if let Ok(kept) = &v.result {
                let kept: Vec<usize> = kept.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(kept, held, "case {case}: kept readings are the held ones");
            }
            for h in &held {
                assert!(
                    poison.contains(h) || flaky || matches!(from, Some((_, 1))),
                    "case {case}: reading {h} held, but the endpoint never failed on it alone"
                );
            }
        }
    }
}
