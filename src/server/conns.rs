//! The connections of one loop: the slab, the connections with output to write
//! this turn, the ones to drop after it, and the one fan-out of an encoded
//! frame to a paper's members.

use slab::Slab;

use crate::conn::Conn;
use crate::metrics::{bump, LoopMetrics, Out};
use crate::paper::Member;

pub struct Conns {
    pub slab: Slab<Conn>,
    /// Connections with output to write this turn, each once.
    flush_list: Vec<usize>,
    /// Connections to drop once this turn's output is written.
    reap_list: Vec<usize>,
}

impl Conns {
    pub fn new() -> Self {
        Conns { slab: Slab::with_capacity(1024), flush_list: Vec::new(), reap_list: Vec::new() }
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

    /// Queues the same encoded frame for every member but `except`: one copy each,
    /// no allocation once the output buffers have grown. Counted once, as `kind`.
    pub fn fanout(
        &mut self,
        members: &[Member],
        except: Option<usize>,
        bytes: &[u8],
        kind: Out,
        metrics: &LoopMetrics,
    ) -> u64 {
        let mut recipients = 0;
        for member in members {
            if Some(member.key) != except {
                self.send(member.key, bytes);
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
