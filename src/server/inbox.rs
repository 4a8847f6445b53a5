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

pub enum InboxMsg {
    /// An upgrade request read by another loop, for a paper this loop owns; `rest`
    /// holds any bytes the client sent after the request head.
    Adopt { stream: TcpStream, peer: SocketAddr, serial: u64, upgrade: Upgrade, rest: Vec<u8> },
    /// A paper read from storage, for the joiners of read `attempt`.
    Loaded { paper: Arc<str>, attempt: u64, stored: StoredPaper },
    /// Edits of this loop's sessions that are now in Redis.
    Written(Vec<Written>),
    /// Stop accepting, close every session with 1001, then return.
    Stop,
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
