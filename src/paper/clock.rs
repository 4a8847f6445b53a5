//! Note versions (PROTOCOL.md section 2): a hybrid clock per event loop.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Whether version `a` (with its node) wins over version `b`: last writer wins by
/// `v`, ties go to the greater node id.
pub fn newer(a: (u64, &str), b: (u64, &str)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 > b.1)
}

pub use crate::protocol::MAX_VERSION;

/// Hands out versions that are milliseconds since the epoch times 1024 plus a
/// counter: they follow wall time (so a restarted server continues above what it
/// wrote before) and strictly increase on one loop even within a millisecond or
/// when the wall clock steps back.
///
/// A version is stamped with the node that made it, and ties go to the greater
/// node id (PROTOCOL.md 2). Ties would also show a client the same `v` twice, so
/// with several nodes each one takes versions of its own residue modulo `STRIDE`
/// (from a hash of its id): two nodes collide only if their ids hash alike.
#[derive(Debug, Default)]
pub struct VersionClock {
    last: u64,
    node: Arc<str>,
    /// 1 on a single node, else `STRIDE`.
    stride: u64,
    residue: u64,
}

/// How far ahead of the wall clock an observed version may pull the clock: an
/// hour of versions (clocks of other nodes may run a little ahead).
const MAX_LEAD: u64 = 3_600_000 << 10;

/// Versions per millisecond tick shared out among nodes.
const STRIDE: u64 = 64;

impl VersionClock {
    /// A clock for the node `node` (empty on a single node).
    pub fn new(node: Arc<str>) -> Self {
        let (stride, residue) = if node.is_empty() {
            (1, 0)
        } else {
            let hash =
                node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            (STRIDE, hash % STRIDE)
        };
        VersionClock { last: 0, node, stride, residue }
    }

    /// The node id stamped on this clock's versions.
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// The next version, above every version this clock handed out or observed and
    /// above `floor` (the note's current version); `None` when the note cannot
    /// advance any more (its version is at the top of the range).
    pub fn next(&mut self, floor: u64) -> Option<u64> {
        self.next_at(now_ms(), floor)
    }

    /// Raises the clock above a version read from storage or relayed, unless that
    /// version lies far in the future: one note's version never limits what can
    /// be done to another (PROTOCOL.md 2, 1.1); its own floor keeps it in order.
    pub fn observe(&mut self, v: u64) {
        self.observe_at(now_ms(), v);
    }

    fn observe_at(&mut self, now_ms: u64, v: u64) {
        if v <= (now_ms << 10).saturating_add(MAX_LEAD) {
            self.last = self.last.max(v);
        }
    }

    fn next_at(&mut self, now_ms: u64, floor: u64) -> Option<u64> {
        let stride = self.stride.max(1);
        let at_least = (now_ms << 10).max(self.last.saturating_add(1)).max(floor.saturating_add(1));
        let v = at_least.checked_add((self.residue + stride - at_least % stride) % stride)?;
        if v > MAX_VERSION {
            return None;
        }
        // A note far ahead of the clock moves on from its own version without
        // dragging the clock (and every other note) along.
        if v <= (now_ms << 10).saturating_add(MAX_LEAD) || floor < self.last {
            self.last = self.last.max(v);
        }
        Some(v)
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increases_within_a_millisecond() {
        let mut clock = VersionClock::default();
        let a = clock.next_at(1000, 0).unwrap();
        let b = clock.next_at(1000, 0).unwrap();
        assert_eq!(a, 1000 << 10);
        assert_eq!(b, a + 1);
    }

    #[test]
    fn survives_the_wall_clock_stepping_back() {
        let mut clock = VersionClock::default();
        let a = clock.next_at(5000, 0).unwrap();
        let b = clock.next_at(4000, 0).unwrap();
        assert!(b > a);
    }

    #[test]
    fn continues_above_stored_versions() {
        let mut clock = VersionClock::default();
        let stored = (9000 << 10) + 7;
        assert_eq!(clock.next_at(1000, stored), Some(stored + 1));
        clock.observe_at(9000, stored + 100);
        assert_eq!(clock.next_at(1000, 0), Some(stored + 101));
    }

    #[test]
    fn a_version_far_ahead_limits_only_its_own_note() {
        let mut clock = VersionClock::default();
        let now = 1_800_000_000_000;
        clock.observe_at(now, MAX_VERSION);
        let other = clock.next_at(now, 0).unwrap();
        assert_eq!(other, now << 10, "another note keeps the wall clock's versions");
        assert_eq!(clock.next_at(now, MAX_VERSION), None, "the note at the top refuses");
        assert_eq!(clock.next_at(now, u64::MAX), None, "nothing wraps");
        let near_top = clock.next_at(now, MAX_VERSION - 5).unwrap();
        assert_eq!(near_top, MAX_VERSION - 4);
        assert_eq!(clock.next_at(now, 0), Some(other + 1), "and the clock stayed where it was");
    }

    #[test]
    fn nodes_never_pick_the_same_version() {
        let (mut a, mut b) = (VersionClock::new(Arc::from("node-a")), VersionClock::new(Arc::from("node-b")));
        let mut seen = std::collections::HashSet::new();
        let mut last_a = 0;
        for now in [1000, 1000, 1000, 1001, 999] {
            let (va, vb) = (a.next_at(now, 0).unwrap(), b.next_at(now, 0).unwrap());
            assert!(va > last_a);
            last_a = va;
            assert!(seen.insert(va) && seen.insert(vb), "{va} {vb}");
        }
        // A floor from the other node is passed, still on this node's own residue.
        let v = a.next_at(0, vb_floor(&mut b)).unwrap();
        assert_eq!(v % STRIDE, a.residue);
    }

    fn vb_floor(b: &mut VersionClock) -> u64 {
        b.next_at(5000, 0).unwrap()
    }

    #[test]
    fn ties_go_to_the_greater_node() {
        assert!(newer((2, "a"), (1, "z")));
        assert!(newer((2, "b"), (2, "a")));
        assert!(!newer((2, "a"), (2, "a")));
        assert!(!newer((1, "z"), (2, "a")));
    }

    #[test]
    fn real_versions_fit_in_a_javascript_number() {
        let v = VersionClock::default().next(0).unwrap();
        assert!(v > 1_600_000_000_000 << 10 && v < MAX_VERSION);
    }
}
