//! When the writer tries again what failed, and what it holds back meanwhile:
//! a shard (its connection broke, it does not answer, or replicas did not take
//! its writes) or one paper (Redis said to try again: a slot on the move, a
//! script cache flushed). Each waits on its own, doubling its wait while it
//! keeps failing, so that the rest of the backlog is written meanwhile: one
//! master's trouble holds up only the papers it serves. A master whose
//! connection failed is sent writes again only once a probe, off the writer
//! thread, found it answering (`shards.rs`): one that hangs cannot hold up the
//! writer again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first and the longest wait of a shard that failed. Its papers wait no
/// longer than `SHARD_MAX` (and a probe) after it is back.
const SHARD_FIRST: Duration = Duration::from_millis(50);
const SHARD_MAX: Duration = Duration::from_secs(1);
/// The same for one paper that Redis asked to try again.
const PAPER_FIRST: Duration = Duration::from_millis(50);
const PAPER_MAX: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Parking {
    shards: HashMap<String, (Backoff, Retry)>,
    papers: HashMap<Arc<str>, Backoff>,
}

/// What a shard that failed needs before it is sent writes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Its wait only: it answered, but not as asked (replicas missing), or it
    /// is the one Redis of a single-server setup.
    AfterWait,
    /// Its wait, then a probe that finds it answering: its connection failed.
    AfterProbe,
}

struct Backoff {
    until: Instant,
    wait: Duration,
}

impl Backoff {
    fn again(previous: Option<&Backoff>, first: Duration, max: Duration, now: Instant) -> Backoff {
        let wait = previous.map_or(first, |b| (b.wait * 2).min(max));
        Backoff { until: now + wait, wait }
    }
}

impl Parking {
    /// Nothing waits: every op can be sent.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty() && self.papers.is_empty()
    }

    /// Whether any shard failed and has not been written to since.
    pub fn any_shard_failing(&self) -> bool {
        !self.shards.is_empty()
    }

    pub fn shard_failed(&mut self, shard: &str, retry: Retry, now: Instant) {
        let next = Backoff::again(self.shards.get(shard).map(|(b, _)| b), SHARD_FIRST, SHARD_MAX, now);
        self.shards.insert(shard.to_string(), (next, retry));
    }

    pub fn shard_answered(&mut self, shard: &str) {
        self.shards.remove(shard);
    }

    /// Whether the shard has failed and has not answered since.
    pub fn shard_is_failing(&self, shard: &str) -> bool {
        self.shards.contains_key(shard)
    }

    /// Whether ops for the shard may be sent now.
    pub fn shard_ready(&self, shard: &str, now: Instant) -> bool {
        self.shards.get(shard).is_none_or(|(b, retry)| *retry == Retry::AfterWait && now >= b.until)
    }

    /// The shards whose wait is over and that must be probed before they are used.
    pub fn to_probe(&self, now: Instant) -> impl Iterator<Item = &str> {
        self.shards
            .iter()
            .filter(move |(_, (b, retry))| *retry == Retry::AfterProbe && now >= b.until)
            .map(|(s, _)| s.as_str())
    }

    pub fn paper_failed(&mut self, paper: &Arc<str>, now: Instant) {
        let next = Backoff::again(self.papers.get(paper), PAPER_FIRST, PAPER_MAX, now);
        self.papers.insert(paper.clone(), next);
    }

    /// Whether ops for the paper may be sent now.
    pub fn paper_ready(&self, paper: &str, now: Instant) -> bool {
        self.papers.get(paper).is_none_or(|b| now >= b.until)
    }

    /// Forgets the papers for which nothing is held any more.
    pub fn keep_papers(&mut self, mut held: impl FnMut(&str) -> bool) {
        self.papers.retain(|paper, _| held(paper));
    }

    /// Forgets the shards that are no longer in the slot map (a replica took over).
    pub fn keep_shards(&mut self, mut current: impl FnMut(&str) -> bool) {
        self.shards.retain(|shard, _| current(shard));
    }

    /// When the next wait still ahead of `now` ends (a wait already over is
    /// waiting for something else: a probe, or its shard).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.shards.values().map(|(b, _)| b).chain(self.papers.values()).map(|b| b.until).filter(|&t| t > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_shard_waits_twice_as_long_each_time_up_to_the_cap_and_is_forgotten_when_it_answers() {
        let mut parking = Parking::default();
        let t0 = Instant::now();
        assert!(parking.shard_ready("a", t0));
        parking.shard_failed("a", Retry::AfterWait, t0);
        assert!(!parking.shard_ready("a", t0 + SHARD_FIRST / 2));
        assert!(parking.shard_ready("a", t0 + SHARD_FIRST));
        assert!(parking.shard_ready("b", t0), "another shard is not held back");
        parking.shard_failed("a", Retry::AfterWait, t0);
        assert!(!parking.shard_ready("a", t0 + SHARD_FIRST), "the second wait is longer");
        for _ in 0..20 {
            parking.shard_failed("a", Retry::AfterWait, t0);
        }
        assert_eq!(parking.next_due(t0), Some(t0 + SHARD_MAX));
        assert_eq!(parking.next_due(t0 + SHARD_MAX), None, "a wait that is over is not waited for");
        assert!(parking.any_shard_failing());
        parking.shard_answered("a");
        assert!(parking.shard_ready("a", t0) && parking.is_empty());
    }

    #[test]
    fn a_shard_whose_connection_failed_is_ready_only_once_it_answers() {
        let mut parking = Parking::default();
        let t0 = Instant::now();
        parking.shard_failed("a", Retry::AfterProbe, t0);
        assert_eq!(parking.to_probe(t0).count(), 0, "not probed before its wait is over");
        let later = t0 + SHARD_MAX;
        assert_eq!(parking.to_probe(later).collect::<Vec<_>>(), ["a"]);
        assert!(!parking.shard_ready("a", later), "its wait is over, but it has not answered");
        parking.shard_answered("a");
        assert!(parking.shard_ready("a", later));
    }

    #[test]
    fn papers_wait_on_their_own_and_are_forgotten_once_nothing_of_them_is_held() {
        let mut parking = Parking::default();
        let t0 = Instant::now();
        let (p, q): (Arc<str>, Arc<str>) = ("p".into(), "q".into());
        parking.paper_failed(&p, t0);
        parking.paper_failed(&q, t0);
        parking.paper_failed(&q, t0);
        assert!(!parking.paper_ready("p", t0) && parking.paper_ready("p", t0 + PAPER_FIRST));
        assert!(!parking.paper_ready("q", t0 + PAPER_FIRST));
        assert!(parking.paper_ready("r", t0));
        assert_eq!(parking.next_due(t0), Some(t0 + PAPER_FIRST));
        parking.keep_papers(|paper| paper == "q");
        assert!(parking.paper_ready("p", t0) && !parking.paper_ready("q", t0));
        assert!(!parking.any_shard_failing());
    }
}
