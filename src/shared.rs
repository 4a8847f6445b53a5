//! Bytes written to many connections at once: the part of a paper's snapshot
//! that is the same for every joiner (also the body of `GET /papers`), and
//! large broadcasts. Encoded once, held by each connection's outbox through a
//! reference, and counted once against the node's bound (`--max-snapshot-bytes-in-flight`)
//! for as long as any connection holds them. Knows neither sockets nor notes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// The node's count of shared bytes held by connections, and its bound.
#[derive(Debug)]
pub struct InFlight {
    used: AtomicUsize,
    limit: usize,
}

impl InFlight {
    pub fn new(limit: usize) -> Self {
        InFlight { used: AtomicUsize::new(0), limit }
    }

    /// Bytes held now, each buffer once.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the bound is reached: no new bytes fit, whatever their size.
    pub fn is_full(&self) -> bool {
        let used = self.used();
        used > 0 && used >= self.limit
    }

    /// Whether `more` bytes fit under the bound. With nothing in flight anything
    /// fits, so that a paper larger than the bound can still be read, one at a time.
    pub fn has_room(&self, more: usize) -> bool {
        let used = self.used();
        used == 0 || used.saturating_add(more) <= self.limit
    }
}

struct Counted {
    bytes: Vec<u8>,
    in_flight: Arc<InFlight>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.in_flight.used.fetch_sub(self.bytes.len(), Ordering::Relaxed);
    }
}

/// Encoded bytes shared between connections; cloning is a reference count.
#[derive(Clone)]
pub struct Shared(Arc<Counted>);

impl Shared {
    /// Takes `bytes` (no copy) and counts them in flight until the last clone goes.
    pub fn new(bytes: Vec<u8>, in_flight: &Arc<InFlight>) -> Self {
        in_flight.used.fetch_add(bytes.len(), Ordering::Relaxed);
        Shared(Arc::new(Counted { bytes, in_flight: in_flight.clone() }))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    pub fn len(&self) -> usize {
        self.0.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.bytes.is_empty()
    }

    /// A reference that does not keep the bytes: a cache that never pins them.
    pub fn downgrade(&self) -> WeakShared {
        WeakShared(Arc::downgrade(&self.0))
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shared({} bytes)", self.len())
    }
}

/// Shared bytes as long as some connection still holds them.
#[derive(Clone, Default)]
pub struct WeakShared(Weak<Counted>);

impl WeakShared {
    pub fn upgrade(&self) -> Option<Shared> {
        self.0.upgrade().map(Shared)
    }
}

impl std::fmt::Debug for WeakShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakShared")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bytes_count_once_while_held() {
        let in_flight = Arc::new(InFlight::new(10));
        assert!(in_flight.has_room(1_000), "nothing in flight: anything fits");
        let a = Shared::new(vec![1; 6], &in_flight);
        let b = a.clone();
        assert_eq!(in_flight.used(), 6);
        assert!(in_flight.has_room(4) && !in_flight.has_room(5));
        let weak = a.downgrade();
        drop(a);
        assert_eq!(weak.upgrade().map(|s| s.len()), Some(6));
        drop(b);
        assert_eq!(in_flight.used(), 0);
        assert!(weak.upgrade().is_none(), "a cache never keeps the bytes");
    }
}
