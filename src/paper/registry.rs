//! The papers one event loop holds: each is either being read from storage (its
//! joiners wait) or ready in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Paper, StoredPaper, VersionClock};

/// A message relayed by another node (the node, the JSON), kept while the paper
/// is read.
pub type Relayed = (Arc<str>, String);

pub enum Slot {
    /// Being read from storage; `waiters` are the loop keys of the joiners, and
    /// `relayed` what other nodes published meanwhile (`--cluster`), applied once
    /// the paper is read.
    Loading {
        waiters: Vec<usize>,
        deadline: Instant,
        attempt: u64,
        relayed: Vec<Relayed>,
    },
    Ready(Box<Paper>),
}

/// What a joiner finds when it asks for a paper.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// In memory: join now.
    Ready,
    /// Someone else's read is under way: wait for it.
    Waiting,
    /// Nobody asked before: start reading it, as this attempt.
    StartLoad(u64),
}

#[derive(Default)]
pub struct Registry {
    slots: HashMap<Arc<str>, Slot>,
    attempts: u64,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn paper(&self, id: &str) -> Option<&Paper> {
        match self.slots.get(id) {
            Some(Slot::Ready(paper)) => Some(paper),
            _ => None,
        }
    }

    pub fn paper_mut(&mut self, id: &str) -> Option<&mut Paper> {
        match self.slots.get_mut(id) {
            Some(Slot::Ready(paper)) => Some(paper),
            _ => None,
        }
    }

    /// Finds the paper for a joiner, registering it as a waiter when the paper is
    /// not in memory yet.
    pub fn lookup(&mut self, id: &Arc<str>, joiner: usize, deadline: Instant) -> Lookup {
        match self.slots.get_mut(id) {
            Some(Slot::Ready(_)) => Lookup::Ready,
            Some(Slot::Loading { waiters, .. }) => {
                waiters.push(joiner);
                Lookup::Waiting
            }
            None => {
                self.attempts += 1;
                let attempt = self.attempts;
                self.slots.insert(
                    id.clone(),
                    Slot::Loading { waiters: vec![joiner], deadline, attempt, relayed: Vec::new() },
                );
                Lookup::StartLoad(attempt)
            }
        }
    }

    /// A paper that needs no reading (memory store): ready and empty at once.
    pub fn insert_empty(&mut self, id: &Arc<str>, clock: &mut VersionClock) {
        self.slots
            .entry(id.clone())
            .or_insert_with(|| Slot::Ready(Box::new(Paper::new(id.clone(), StoredPaper::default(), clock))));
    }

    /// Makes a read paper ready and returns its waiters and what was relayed while
    /// it was read, or `None` when this read is stale (it timed out and its
    /// joiners were sent away).
    pub fn finish_load(
        &mut self,
        id: &Arc<str>,
        attempt: u64,
        stored: StoredPaper,
        clock: &mut VersionClock,
    ) -> Option<(Vec<usize>, Vec<Relayed>)> {
        match self.slots.get_mut(id) {
            Some(Slot::Loading { attempt: current, waiters, relayed, .. }) if *current == attempt => {
                let done = (std::mem::take(waiters), std::mem::take(relayed));
                self.slots.insert(id.clone(), Slot::Ready(Box::new(Paper::new(id.clone(), stored, clock))));
                Some(done)
            }
            _ => None,
        }
    }

    /// Keeps a relayed message for a paper being read; false if the paper is not.
    pub fn hold_relayed(&mut self, id: &str, node: &Arc<str>, message: &str) -> bool {
        match self.slots.get_mut(id) {
            Some(Slot::Loading { relayed, .. }) => {
                relayed.push((node.clone(), message.to_string()));
                true
            }
            _ => false,
        }
    }

    /// Every paper in memory.
    pub fn papers_mut(&mut self) -> impl Iterator<Item = &mut Paper> {
        self.slots.values_mut().filter_map(|slot| match slot {
            Slot::Ready(paper) => Some(&mut **paper),
            Slot::Loading { .. } => None,
        })
    }

    /// Forgets a joiner that left while it waited.
    pub fn forget_waiter(&mut self, id: &str, joiner: usize) {
        if let Some(Slot::Loading { waiters, .. }) = self.slots.get_mut(id) {
            waiters.retain(|&w| w != joiner);
        }
    }

    /// Drops a paper, in memory or being read (it was erased); returns the
    /// connections that waited for it.
    pub fn remove(&mut self, id: &str) -> Vec<usize> {
        match self.slots.remove(id) {
            Some(Slot::Loading { waiters, .. }) => waiters,
            _ => Vec::new(),
        }
    }

    /// Gives up the reads past their deadline; returns those papers and their waiters.
    pub fn expire_loads(&mut self, now: Instant) -> (Vec<Arc<str>>, Vec<usize>) {
        let mut papers = Vec::new();
        let mut sent_away = Vec::new();
        self.slots.retain(|id, slot| match slot {
            Slot::Loading { deadline, waiters, .. } if *deadline <= now => {
                papers.push(id.clone());
                sent_away.append(waiters);
                false
            }
            _ => true,
        });
        (papers, sent_away)
    }

    /// Drops the papers nobody has been on for `linger`, once all their edits are
    /// written; returns their ids.
    pub fn evict_idle(&mut self, now: Instant, linger: Duration) -> Vec<Arc<str>> {
        let mut dropped = Vec::new();
        self.slots.retain(|id, slot| match slot {
            Slot::Ready(paper)
                if paper.unwritten == 0
                    && paper.empty_since.is_some_and(|since| now.duration_since(since) >= linger) =>
            {
                dropped.push(id.clone());
                false
            }
            _ => true,
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joiners_wait_for_one_read() {
        let mut r = Registry::new();
        let mut clock = VersionClock::default();
        let id: Arc<str> = Arc::from("p1");
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(r.lookup(&id, 1, deadline), Lookup::StartLoad(1));
        assert_eq!(r.lookup(&id, 2, deadline), Lookup::Waiting);
        r.forget_waiter(&id, 1);
        assert_eq!(r.finish_load(&id, 1, StoredPaper::default(), &mut clock), Some((vec![2], vec![])));
        assert_eq!(r.lookup(&id, 3, deadline), Lookup::Ready);
        assert!(r.paper(&id).is_some());
    }

    #[test]
    fn a_late_read_after_a_timeout_is_ignored() {
        let mut r = Registry::new();
        let mut clock = VersionClock::default();
        let id: Arc<str> = Arc::from("p1");
        let now = Instant::now();
        assert_eq!(r.lookup(&id, 1, now), Lookup::StartLoad(1));
        assert_eq!(r.expire_loads(now), (vec![id.clone()], vec![1]));
        assert_eq!(r.lookup(&id, 2, now + Duration::from_secs(1)), Lookup::StartLoad(2));
        assert_eq!(r.finish_load(&id, 1, StoredPaper::default(), &mut clock), None);
        assert_eq!(r.finish_load(&id, 2, StoredPaper::default(), &mut clock), Some((vec![2], vec![])));
    }

    #[test]
    fn papers_with_unwritten_edits_stay() {
        let mut r = Registry::new();
        let mut clock = VersionClock::default();
        let id: Arc<str> = Arc::from("p1");
        r.insert_empty(&id, &mut clock);
        r.paper_mut(&id).unwrap().unwritten = 1;
        let later = Instant::now() + Duration::from_secs(60);
        assert!(r.evict_idle(later, Duration::from_secs(30)).is_empty());
        r.paper_mut(&id).unwrap().unwritten = 0;
        assert_eq!(r.evict_idle(later, Duration::from_secs(30)), vec![id]);
        assert!(r.is_empty());
    }
}
