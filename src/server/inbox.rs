//! What other threads send an event loop, and the handle they send it through:
//! a channel plus the loop's `Waker`, so a message never waits for a socket event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use mio::net::TcpStream;
use mio::Waker;

use crate::conn::http::Upgrade;
use crate::conn::ApiCall;
use crate::store::{Loops, StoreEvent};

/// A request read by one loop about a paper another loop owns.
pub enum Transfer {
    /// The head took `head_len` bytes of `buf`; what follows belongs to the session.
    Upgrade {
        upgrade: Box<Upgrade>,
        buf: Vec<u8>,
        head_len: usize,
    },
    ReadPaper {
        paper: Arc<str>,
    },
    /// A backend API call (PROTOCOL.md 7).
    Api(Box<ApiCall>),
}

impl Transfer {
    pub fn paper(&self) -> &str {
        match self {
            Transfer::Upgrade { upgrade, .. } => &upgrade.paper,
            Transfer::ReadPaper { paper } => paper,
            Transfer::Api(call) => &call.paper,
        }
    }
}

/// A connection handed to the loop that owns its paper. It keeps the deadline
/// it had where it was accepted, and its session slot if it took one.
pub struct Adopted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub serial: u64,
    pub counted: bool,
    /// A `HEAD` request: answered without the body.
    pub head_only: bool,
    pub deadline: Instant,
    pub transfer: Transfer,
}

pub enum InboxMsg {
    Adopt(Adopted),
    /// From the store threads: writes, loads, relayed messages, nodes gone.
    Store(StoreEvent),
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

/// Every loop's handle, as the store threads see them.
pub struct LoopHandles(pub Arc<[LoopHandle]>);

impl Loops for LoopHandles {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn owner_of(&self, paper: &str) -> usize {
        owner_loop(paper, self.0.len())
    }

    fn report(&self, loop_index: usize, event: StoreEvent) {
        self.0[loop_index].send(InboxMsg::Store(event));
    }
}
