//! The connections of one loop: the slab, the connections with output to write
//! this turn, the ones to drop after it, and the one fan-out of an encoded
//! frame to a paper's members.

use std::sync::Arc;

use slab::Slab;

use crate::conn::{Conn, Part};
use crate::metrics::{bump, LoopMetrics, Out};
use crate::paper::Member;
use crate::shared::{InFlight, Shared};

/// A broadcast frame larger than this is shared by its recipients' queues
/// rather than copied into each (a `completed` message carries the whole paper).
const SHARE_ABOVE: usize = 64 * 1024;

pub struct Conns {
    pub slab: Slab<Conn>,
    /// Connections with output to write this turn, each once.
    flush_list: Vec<usize>,
    /// Connections to drop once this turn's output is written.
    reap_list: Vec<usize>,
    /// The node's count of shared bytes, which large broadcasts join.
    in_flight: Arc<InFlight>,
}

impl Conns {
    pub fn new(in_flight: Arc<InFlight>) -> Self {
        Conns { slab: Slab::with_capacity(1024), flush_list: Vec::new(), reap_list: Vec::new(), in_flight }
    }

    /// The connection at `key`, if it is still the one with `serial` (keys are
    /// reused, serials are not) and not about to be dropped.
    pub fn live(&self, key: usize, serial: u64) -> Option<&Conn> {
        self.slab.get(key).filter(|c| c.serial == serial && !c.doomed)
    }

    /// Queues an encoded frame for one connection. Whether it keeps up is judged
    /// when its output is written, not here: one turn may queue a burst that a
    /// healthy reader takes at once.
    pub fn send(&mut self, key: usize, bytes: &[u8]) {
        let Some(conn) = self.slab.get_mut(key) else { return };
        let Some(io) = conn.phase.io() else { return };
        io.out.queue(bytes);
        if !conn.flush_queued {
            conn.flush_queued = true;
            self.flush_list.push(key);
        }
    }

    /// Queues one frame made of parts for one connection (a snapshot: its own
    /// start, a shared body, its own end).
    pub fn send_parts(&mut self, key: usize, parts: &[Part]) {
        let Some(conn) = self.slab.get_mut(key) else { return };
        let Some(io) = conn.phase.io() else { return };
        io.out.queue_parts(parts);
        if !conn.flush_queued {
            conn.flush_queued = true;
            self.flush_list.push(key);
        }
    }

    /// Queues the same encoded frame for every member but `except`: one copy each,
    /// no allocation once the output buffers have grown; a large frame is shared
    /// instead. Counted once, as `kind`.
    pub fn fanout(
        &mut self,
        members: &[Member],
        except: Option<usize>,
        bytes: &[u8],
        kind: Out,
        metrics: &LoopMetrics,
    ) -> u64 {
        let mut recipients = 0;
        let shared =
            (bytes.len() > SHARE_ABOVE && members.len() > 1).then(|| Shared::new(bytes.to_vec(), &self.in_flight));
        for member in members {
            if Some(member.key) != except {
                match &shared {
                    Some(shared) => self.send_parts(member.key, &[Part::Shared(shared)]),
                    None => self.send(member.key, bytes),
                }
                recipients += 1;
            }
        }
        metrics.message_out(kind, recipients);
        bump(&metrics.broadcasts, 1);
        bump(&metrics.broadcast_recipients, recipients);
        recipients
    }

    pub fn queue_flush(&mut self, key: usize) {
        if let Some(conn) = self.slab.get_mut(key) {
            if !conn.flush_queued {
                conn.flush_queued = true;
                self.flush_list.push(key);
            }
        }
    }

    pub fn next_to_flush(&mut self) -> Option<usize> {
        self.flush_list.pop()
    }

    pub fn has_output(&self) -> bool {
        !self.flush_list.is_empty()
    }

    /// Marks a connection to be dropped after this turn's flush.
    pub fn doom(&mut self, key: usize) {
        if let Some(conn) = self.slab.get_mut(key) {
            if !conn.doomed {
                conn.doomed = true;
                self.reap_list.push(key);
            }
        }
    }

    pub fn take_doomed(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.reap_list)
    }
}
