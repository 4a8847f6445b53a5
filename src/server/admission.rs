//! Letting connections in: accepting sockets, reading and routing the request
//! head (PROTOCOL.md section 1), the node's capacity check, plain replies, and
//! the hand-over of a request to the loop that owns its paper.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::event_loop::EventLoop;
use super::inbox::{Adopted, InboxMsg, Transfer};
use crate::conn::http::{Listener, Parsed, Reply, Route};
use crate::conn::{ApiCall, Conn, Io, Next, Phase, RequestStep};
use crate::metrics::bump;

impl EventLoop {
    /// Accepts while the node has socket slots. Out of slots or descriptors, the
    /// rest stays in the kernel's queue and `accept_retry` has the loop try again
    /// next turn: the listener is edge-triggered, so no new event would come for
    /// connections already queued.
    pub(super) fn accept(&mut self) {
        self.accept_from(Listener::Public);
    }

    /// The same on the internal listener (`--internal-listen`).
    pub(super) fn accept_internal(&mut self) {
        self.accept_from(Listener::Internal);
    }

    fn accept_from(&mut self, which: Listener) {
        loop {
            let listener = match which {
                Listener::Public => &self.listener,
                Listener::Internal => &self.internal,
            };
            let Some(listener) = listener else { return };
            if !self.node.take_socket() {
                self.accept_retry = true;
                return;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.accept_retry = false;
                    bump(&self.metrics.connections_accepted, 1);
                    // An address holding its cap of unfinished request heads gets no
                    // more: closed at once, its socket slot goes to other addresses.
                    let Some(head) = self.node.take_head(peer.ip()) else {
                        drop(stream);
                        self.node.release_socket();
                        bump(&self.metrics.heads_refused, 1);
                        continue;
                    };
                    let serial = self.node.serials.fetch_add(1, Ordering::Relaxed);
                    let deadline = Instant::now() + self.node.settings.handshake_timeout;
                    match self.register(stream, peer, serial, deadline) {
                        Some(key) => {
                            self.conns.slab[key].head = head;
                            self.conns.slab[key].listener = which;
                        }
                        None => {
                            self.node.release_socket();
                            if head {
                                self.node.release_head(peer.ip());
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.node.release_socket();
                    self.accept_retry = false;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => self.node.release_socket(),
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or kernel memory: the connection
                    // stays queued and is tried again next turn, once some may be free.
                    self.node.release_socket();
                    if !self.accept_retry {
                        log::warn!("cannot accept a connection ({e}); retrying every turn");
                    }
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    /// Puts a socket in the slab, reading its request head until `deadline`.
    fn register(&mut self, mut stream: TcpStream, peer: SocketAddr, serial: u64, deadline: Instant) -> Option<usize> {
        let entry = self.conns.slab.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("cannot register a connection from {peer}: {e}");
            return None;
        }
        // Small frames go out at once; the loop already batches a turn's output.
        let _ = stream.set_nodelay(true);
        cap_send_buffer(&stream);
        entry.insert(Conn::new(Io::new(stream), serial, peer, deadline));
        self.timers.deadline(deadline, key, serial);
        Some(key)
    }

    /// Sets a new deadline for a connection's current phase.
    pub(super) fn set_deadline(&mut self, key: usize, at: Instant) {
        if let Some(conn) = self.conns.slab.get_mut(key) {
            conn.deadline = Some(at);
            self.timers.deadline(at, key, conn.serial);
        }
    }

    pub(super) fn read_request(&mut self, key: usize) {
        let Some(conn) = self.conns.slab.get_mut(key) else { return };
        let mut bytes_in = 0;
        let step = conn.read_request(&self.node.policy, &mut bytes_in);
        bump(&self.metrics.bytes_in, bytes_in);
        let parsed = match step {
            RequestStep::Wait => return,
            RequestStep::Continue => return self.conns.queue_flush(key),
            RequestStep::Drop => return self.conns.doom(key),
            RequestStep::Parsed(parsed) => parsed,
        };
        if std::mem::take(&mut conn.head) {
            self.node.release_head(conn.peer.ip());
        }
        match parsed {
            Ok(Parsed::Partial) => {}
            Ok(Parsed::Complete { route: Route::Reply(reply), .. }) | Err(reply) => self.reply(key, &reply),
            Ok(Parsed::Complete { route: Route::Ready, .. }) => {
                let failing = self.node.failing_papers();
                let reply = match self.node.unready_reason() {
                    None => Reply::text(200, &format!("ready{failing}")),
                    Some(reason) => Reply::text(503, &format!("not ready: {reason}{failing}")),
                };
                self.reply(key, &reply);
            }
            Ok(Parsed::Complete { route: Route::Metrics, .. }) => {
                let reply = Reply {
                    status: 200,
                    extra_headers: "",
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: self.node.render_metrics(),
                };
                self.reply(key, &reply);
            }
            Ok(Parsed::Complete { len, route: Route::Echo(ws_key) }) => {
                conn.open_echo(len, &ws_key, self.node.settings.ws_config);
                self.metrics.http_response(101);
                self.act(key, Next::ReadAgain);
                self.conns.queue_flush(key);
            }
            Ok(Parsed::Complete { route: Route::ReadPaper(paper), .. }) => {
                self.route(key, Transfer::ReadPaper { paper: Arc::from(paper) })
            }
            Ok(Parsed::Complete { len, route: Route::Api(head) }) => {
                let body = conn.request_body(len, head.body_len);
                match crate::api::action(&head, body, self.node.settings.max_note_bytes) {
                    Err(reply) => self.reply(key, &reply),
                    Ok(action) => {
                        let call = ApiCall { paper: Arc::from(head.paper), action, started: Instant::now() };
                        self.route(key, Transfer::Api(Box::new(call)));
                    }
                }
            }
            Ok(Parsed::Complete { len, route: Route::Upgrade(upgrade) }) => {
                // Behind a trusted proxy, the client is who the proxy says it is.
                let peer = self.node.client_address(conn.peer.ip(), upgrade.forwarded_for.as_deref());
                conn.peer = SocketAddr::new(peer, conn.peer.port());
                // The last check of PROTOCOL.md's order: the node's capacity.
                if !self.node.admit(peer) {
                    return self.reply(key, &Reply::text(503, "this node is at its connection limit; retry later"));
                }
                conn.counted = true;
                let Phase::Request { buf, .. } = &mut conn.phase else { return };
                // The head and what followed it go with the request to its loop.
                let buf = std::mem::take(buf);
                self.route(key, Transfer::Upgrade { upgrade: Box::new(upgrade), buf, head_len: len });
            }
        }
    }

    /// Answers with a plain reply; the connection goes once it is written.
    pub(super) fn reply(&mut self, key: usize, reply: &Reply) {
        if let Some(conn) = self.conns.slab.get_mut(key) {
            if conn.reply(&reply.to_bytes()) {
                self.metrics.http_response(reply.status);
                self.conns.queue_flush(key);
            }
        }
    }

    /// Sends a request about a paper to the loop that owns the paper, or serves it here.
    fn route(&mut self, key: usize, transfer: Transfer) {
        let owner = self.owner_of(transfer.paper());
        // While stopping, nothing is handed to a loop that may have stopped already.
        if owner == self.index || self.stopping.is_some() {
            return self.start(key, transfer);
        }
        let conn = self.conns.slab.remove(key);
        self.output_held -= conn.held_out;
        let (peer, serial, counted, head_only, deadline) =
            (conn.peer, conn.serial, conn.counted, conn.head_only, conn.deadline.unwrap_or_else(Instant::now));
        let Some(mut io) = conn.into_io() else { return };
        if let Err(e) = self.poll.registry().deregister(&mut io.stream) {
            log::warn!("cannot hand over a connection from {peer}: {e}");
            self.node.release_socket();
            if counted {
                self.node.release(peer.ip());
            }
            return;
        }
        let adopted = Adopted { stream: io.stream, peer, serial, counted, head_only, deadline, transfer };
        self.loops[owner].send(InboxMsg::Adopt(adopted));
    }

    /// A connection handed over by another loop: it keeps its deadline.
    pub(super) fn adopt(&mut self, adopted: Adopted) {
        let Adopted { stream, peer, serial, counted, head_only, deadline, transfer } = adopted;
        match self.register(stream, peer, serial, deadline) {
            Some(key) => {
                self.conns.slab[key].counted = counted;
                self.conns.slab[key].head_only = head_only;
                self.start(key, transfer);
            }
            None => {
                self.node.release_socket();
                if counted {
                    self.node.release(peer.ip());
                }
            }
        }
    }

    /// Starts what a request asked for, on the loop that owns its paper. While
    /// stopping, a session is closed with 1001 at once and a read told to retry.
    fn start(&mut self, key: usize, transfer: Transfer) {
        match transfer {
            Transfer::Upgrade { upgrade, buf, head_len } => self.admit_session(key, *upgrade, buf, head_len),
            Transfer::Api(call) if self.stopping.is_some() => {
                let reply = crate::api::error(503, "unavailable", "this node is shutting down; retry");
                self.start_call(key, *call);
                self.answer_call(key, &reply);
            }
            Transfer::Api(call) => self.start_call(key, *call),
            Transfer::ReadPaper { .. } if self.stopping.is_some() => {
                self.reply(key, &Reply::text(503, "shutting down; retry"))
            }
            Transfer::ReadPaper { paper } if self.is_erased(&paper) => {
                self.reply(key, &Reply::text(410, "this paper was erased"))
            }
            Transfer::ReadPaper { paper } => {
                let Some(conn) = self.conns.slab.get_mut(key) else { return };
                if conn.wait_for_paper(paper.clone()) {
                    let settings = &self.node.settings;
                    let deadline = Instant::now() + settings.load_timeout + settings.handshake_timeout;
                    self.set_deadline(key, deadline);
                    self.find_paper(key, paper);
                }
            }
        }
    }
}

/// The kernel's send buffer of a client socket. Left to autotuning it grows to
/// `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) for a client that does not
/// read, out of the server's sight: a thousand never-reading joiners of a 3 MB
/// paper would pin gigabytes of kernel memory, past `net.ipv4.tcp_mem`, and
/// every TCP socket of the machine (the writer's to Redis too) would slow
/// down. Capped, what such a client has not read stays in the server's queue,
/// where a snapshot's bytes are shared and bounded
/// (`--max-snapshot-bytes-in-flight`, `--max-outbound-bytes`). 256 KiB still
/// carries 2.5 MB a second to a client 100 ms away.
const SEND_BUFFER: libc::c_int = 256 * 1024;

fn cap_send_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size = SEND_BUFFER;
    // SAFETY: setsockopt reads `size` (a c_int, of the length given) and
    // changes only the socket's option.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            std::ptr::addr_of!(size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
