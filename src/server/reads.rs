//! Papers read for one request each and kept by nobody (`GET /papers` of a
//! paper not in memory, an API presence call), and the papers this loop knows
//! to be erased: state of one loop, owned here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// One-time reads under way: each attempt's connection (key and serial).
#[derive(Default)]
pub struct Reads {
    waiting: HashMap<u64, (usize, u64)>,
    made: u64,
}

impl Reads {
    /// A read for the connection `key` (with `serial`): its attempt number.
    pub fn start(&mut self, key: usize, serial: u64) -> u64 {
        self.made += 1;
        self.waiting.insert(self.made, (key, serial));
        self.made
    }

    /// The connection a read was for, once it is answered.
    pub fn finish(&mut self, read: u64) -> Option<(usize, u64)> {
        self.waiting.remove(&read)
    }

    /// The connection stopped waiting.
    pub fn forget(&mut self, key: usize) {
        self.waiting.retain(|_, (k, _)| *k != key);
    }
}

/// Papers erased (PROTOCOL.md 7), and until when each answers 410 here.
#[derive(Default)]
pub struct Erasures(HashMap<Arc<str>, Instant>);

impl Erasures {
    pub fn insert(&mut self, paper: Arc<str>, until: Instant) {
        self.0.insert(paper, until);
    }

    /// Until when a paper is erased, if it still is at `now`.
    pub fn until(&mut self, paper: &str, now: Instant) -> Option<Instant> {
        match self.0.get(paper) {
            Some(&until) if until > now => Some(until),
            Some(_) => {
                self.0.remove(paper);
                None
            }
            None => None,
        }
    }

    /// Forgets erasures past their retention.
    pub fn expire(&mut self, now: Instant) {
        self.0.retain(|_, until| *until > now);
    }
}
