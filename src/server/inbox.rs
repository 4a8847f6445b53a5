//! What other threads send an event loop, and the handle they send it through:
//! a channel plus the loop's `Waker`, so a message never waits for a socket event.

use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Sender;
use mio::net::TcpStream;
use mio::Waker;

use crate::conn::http::Upgrade;
use crate::paper::StoredPaper;
use crate::store::Written;

/// A request read by one loop about a paper another loop owns.
pub enum Handoff {
    /// `rest` holds any bytes the client sent after the request head.
    Upgrade {
        upgrade: Upgrade,
        rest: Vec<u8>,
    },
    ReadPaper {
        paper: Arc<str>,
    },
}

impl Handoff {
    pub fn paper(&self) -> &str {
        match self {
            Handoff::Upgrade { upgrade, .. } => &upgrade.paper,
            Handoff::ReadPaper { paper } => paper,
        }
    }
}

pub enum InboxMsg {
    /// A connection for a paper this loop owns; `counted` when it holds a session
    /// slot of the node.
    Adopt { stream: TcpStream, peer: SocketAddr, serial: u64, counted: bool, handoff: Handoff },
    /// A paper read from storage, for the joiners of read `attempt`.
    Loaded { paper: Arc<str>, attempt: u64, stored: StoredPaper },
    /// Edits of this loop's sessions that are now in Redis.
    Written(Vec<Written>),
    /// A message another node published on a paper this loop owns: the JSON its
    /// members were sent.
    Relayed { paper: Arc<str>, node: Arc<str>, message: String },
    /// A node stopped announcing itself: its members leave every paper.
    NodeGone(Arc<str>),
    /// Stop accepting, close every session with 1001, then return.
    Stop,
}

/// The loop that owns a paper: every session of one paper lives there, whichever
/// loop accepted it. FNV-1a: stable and cheap; the spread only needs to be fair.
pub fn owner_loop(paper: &str, loops: usize) -> usize {
    let hash = paper.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (hash % loops as u64) as usize
}

#[derive(Clone)]
pub struct LoopHandle {
    pub tx: Sender<InboxMsg>,
    pub waker: Arc<Waker>,
}

impl LoopHandle {
    /// Delivers a message and wakes the loop. A loop that has returned drops what
    /// it is sent, which only happens during shutdown.
    pub fn send(&self, msg: InboxMsg) {
        if self.tx.send(msg).is_ok() {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake an event loop: {e}");
            }
        }
    }
}
