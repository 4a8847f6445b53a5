//! Papers suspected of making Redis slow (PROTOCOL.md 4, 1.2: a call that may
//! have made Redis slow is never sent again whole). A paper whose call took part
//! in a pipeline that timed out, or that Redis answered `BUSY`, is sent alone,
//! one op at a time, until one such call is written; a lone op that times out
//! `STRIKES` times while Redis answers others is what makes Redis slow, and its
//! paper is blamed: it fails alone (`write_failed`), rather than every paper
//! waiting on it for ever.

use std::collections::HashMap;
use std::sync::Arc;

use super::Queued;

const STRIKES: u8 = 2;

/// Why the ops of a blamed paper fail.
pub(super) const SLOW_WRITE: &str = "a write of this paper keeps Redis busy past the I/O timeout";

#[derive(Default)]
pub(super) struct Suspects {
    /// Papers sent alone, with the lone timeouts so far.
    strikes: HashMap<Arc<str>, u8>,
    /// Papers whose call the last pipeline saw time out or answered `BUSY`.
    slow: Vec<Arc<str>>,
    /// Papers found to make Redis slow: their held ops fail.
    blamed: Vec<Arc<str>>,
}

impl Suspects {
    /// Whether a paper goes alone, one op at a time.
    pub fn contains(&self, paper: &str) -> bool {
        self.strikes.contains_key(paper)
    }

    /// The last pipeline saw this paper's call time out or meet `BUSY`.
    pub fn saw_slow(&mut self, paper: Arc<str>) {
        self.slow.push(paper);
    }

    /// Weighs what the last pipeline saw: its slow papers become suspects; a
    /// lone op written clears its paper; a lone op of a suspect slow again
    /// while Redis `answers` strikes it. Returns whether the lone op's paper is
    /// now blamed (its op fails).
    pub fn weigh(&mut self, batch: &[Queued], lone_written: bool, answers: impl FnOnce() -> bool) -> bool {
        let slow = std::mem::take(&mut self.slow);
        if let [lone] = batch {
            let paper = lone.op.paper();
            if lone_written {
                self.strikes.remove(paper);
            } else if slow.contains(paper) && self.strikes.contains_key(paper) && answers() {
                let strikes = self.strikes.get_mut(paper).expect("a suspect");
                *strikes += 1;
                if *strikes < STRIKES {
                    return false;
                }
                log::error!(
                    "a write of paper {paper} keeps Redis busy past the I/O timeout while Redis answers \
                     others: the paper's writes fail"
                );
                self.strikes.remove(paper);
                self.blamed.push(paper.clone());
                return true;
            }
        }
        for paper in slow {
            self.strikes.entry(paper).or_insert(0);
        }
        false
    }

    /// The papers blamed since last asked.
    pub fn take_blamed(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.blamed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::{Op, Queued};

    fn prune(paper: &str) -> Queued {
        let op = Op::Prune { paper: Arc::from(paper) };
        Queued { bytes: op.bytes(), op, at: Instant::now() }
    }

    #[test]
    fn a_lone_op_slow_again_while_redis_answers_is_blamed_at_the_second_strike() {
        let mut suspects = Suspects::default();
        let (a, b) = (prune("a"), prune("b"));
        // A pipeline of two papers timed out: both go alone from now on.
        suspects.saw_slow(Arc::from("a"));
        suspects.saw_slow(Arc::from("b"));
        assert!(!suspects.weigh(&[a, b], false, || panic!("not asked for a batch of two")));
        assert!(suspects.contains("a") && suspects.contains("b"));
        // b alone is written: cleared.
        assert!(!suspects.weigh(std::slice::from_ref(&prune("b")), true, || true));
        assert!(!suspects.contains("b"));
        // a alone is slow again while Redis answers: a strike, then blamed.
        let lone = [prune("a")];
        suspects.saw_slow(Arc::from("a"));
        assert!(!suspects.weigh(&lone, false, || true));
        assert!(suspects.take_blamed().is_empty());
        suspects.saw_slow(Arc::from("a"));
        assert!(suspects.weigh(&lone, false, || true));
        assert_eq!(suspects.take_blamed(), vec![Arc::<str>::from("a")]);
        assert!(!suspects.contains("a"));
        // Slow while Redis does not answer either: no strike (Redis is down, not the paper).
        suspects.saw_slow(Arc::from("c"));
        assert!(!suspects.weigh(&[prune("c")], false, || false));
        for _ in 0..3 {
            suspects.saw_slow(Arc::from("c"));
            assert!(!suspects.weigh(&[prune("c")], false, || false));
        }
        assert!(suspects.contains("c"));
    }
}
