//! Persistence behind the event loops (PROTOCOL.md section 4). Loops hand ops to
//! the writer thread through a bounded backlog and ask the loader threads for
//! papers; nothing here ever runs on a loop thread, and no loop ever waits on it.

mod batch;
mod calls;
pub mod codec;
pub mod endpoint;
pub mod keys;
pub mod loader;
mod parking;
pub mod relay;
mod shards;
pub mod slots;
mod suspects;
pub mod target;
pub mod writer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;

/// A note as the store writes and reads it; `data` is `None` for a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteValue {
    pub author: Arc<str>,
    pub data: Option<Arc<str>>,
    pub v: u64,
    /// The node that wrote this version (ties go to the greater node id).
    pub node: Arc<str>,
    /// Per-field versions (1.1), once a patch changed a field after the last upsert.
    pub fields: Option<Arc<crate::protocol::FieldVersions>>,
}

/// A member on another node, as the paper's presence hash lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub name: Arc<str>,
    pub node: Arc<str>,
}

/// What Redis holds of a paper, as read when it is loaded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredPaper {
    pub notes: Vec<(String, NoteValue)>,
    /// `Some(by)` once completed.
    pub completed_by: Option<String>,
    /// Members on other live nodes (`--cluster`).
    pub remote_members: Vec<PresenceMember>,
    /// The meta hash's `cover` (1.1), if it is readable.
    pub cover: Option<NoteValue>,
    /// The meta hash's `horizon` and `resume_floor` (PROTOCOL.md 4, 1.1).
    pub horizon: u64,
    pub resume_floor: u64,
    /// 1.2: the paper is erased, for this long yet (PROTOCOL.md 7).
    pub erased_for: Option<std::time::Duration>,
    /// 1.2: revoked users and the unix second until which each may not join.
    pub revoked: Vec<(String, u64)>,
}

/// Whether retrying can cure a failed write: the connection, a server loading
/// or busy, a failover in progress, memory, a flushed script cache. Anything
/// else (a key of the wrong type, a script error) fails only that paper.
pub fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some(
                "LOADING"
                    | "BUSY"
                    | "READONLY"
                    | "MASTERDOWN"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "OOM"
                    | "NOSCRIPT"
                    | "MISCONF"
                    | "NOREPLICAS"
                    | "MOVED"
                    | "ASK"
            )
        )
}

/// What the store threads report to an event loop.
#[derive(Debug)]
pub enum StoreEvent {
    /// What became of ops of the loop's sessions, in the order they were made.
    Written(Vec<Written>),
    /// A paper read from Redis, for the purpose it was asked for.
    Loaded { paper: Arc<str>, purpose: LoadPurpose, stored: StoredPaper },
    /// A paper is sealed in Redis: `notes` is the JSON array of its notes exactly
    /// as handed to the main backend. `origin` is the completer, when it is on
    /// this node and the seal is its own.
    Sealed { paper: Arc<str>, by: String, notes: String, origin: Option<Origin> },
    /// Redis refused a paper's writes for good (an error that retrying cannot
    /// cure); the error as Redis said it.
    Failed { paper: Arc<str>, error: String },
    /// A message another node published on a paper the loop owns: the JSON its
    /// members were sent.
    Relayed { paper: Arc<str>, node: Arc<str>, message: String },
    /// A node stopped announcing itself: its members leave every paper.
    NodeGone(Arc<str>),
    /// Other nodes may have lost this node's members (this node's relay was away,
    /// or a node it had declared gone is back): announce them all again.
    Reannounce,
}

/// How the store threads reach the event loops; the server implements it.
pub trait Loops: Send + Sync {
    /// How many loops there are.
    fn count(&self) -> usize;
    /// The loop that owns a paper.
    fn owner_of(&self, paper: &str) -> usize;
    /// Hands an event to a loop and wakes it.
    fn report(&self, loop_index: usize, event: StoreEvent);
}

/// Who made an edit: where the writer reports it written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub loop_index: usize,
    /// The loop's key for the session's connection, and its serial (keys are reused).
    pub conn: usize,
    pub serial: u64,
}

/// One unit of work for the writer. `relay`, with `--cluster`, is the message
/// to publish to the paper's channel (the node id, a newline, the JSON every
/// member is sent), in the same pipeline as the write.
#[derive(Debug)]
pub enum Op {
    /// Write one note (or its tombstone) if it advances the stored version.
    Note {
        paper: Arc<str>,
        id: Arc<str>,
        note: NoteValue,
        origin: Origin,
        reference: Option<Box<str>>,
        relay: Option<Box<str>>,
    },
    /// Patch some fields of a note (1.1): `patch` is the JSON object of them
    /// (`null` removes one), each applied if it advances that field's version.
    Patch {
        paper: Arc<str>,
        id: Arc<str>,
        patch: Box<str>,
        v: u64,
        node: Arc<str>,
        /// The note's version as this node held it when patched: a note Redis
        /// does not hold, at or below the horizon, may have been deleted by
        /// another node and dropped since (`not_found`, not `write_failed`).
        held: u64,
        origin: Origin,
        reference: Option<Box<str>>,
        relay: Option<Box<str>>,
    },
    /// Set the paper's cover if it advances the stored one (1.1); `note.author`
    /// is unused.
    Cover { paper: Arc<str>, cover: NoteValue, origin: Origin, reference: Option<Box<str>>, relay: Option<Box<str>> },
    /// Seal the paper as Redis holds it, hand that snapshot to the main backend
    /// and (with `--cluster`) to the other nodes, start its retention.
    Complete { paper: Arc<str>, by: Arc<str>, origin: Origin, reference: Option<Box<str>> },
    /// Only relayed: a join or leave (with the paper's presence entry to set or
    /// remove) or a cursor. Never acknowledged.
    Relay { paper: Arc<str>, presence: Option<Presence>, relay: Box<str> },
    /// Drop the paper's tombstones past retention from Redis too, as the loop
    /// did in memory (PROTOCOL.md 4, 1.1), when no write of the paper would.
    /// Never acknowledged.
    Prune { paper: Arc<str> },
    /// 1.2: erase the paper (PROTOCOL.md 7): delete its keys, set its `erased`
    /// marker for `retention_ms`, and tell the other nodes (`relay`).
    Erase { paper: Arc<str>, retention_ms: u64, origin: Origin, relay: Option<Box<str>> },
    /// 1.2: revoke a user's access to the paper until `until` (unix seconds),
    /// and tell the other nodes (`relay`).
    Revoke { paper: Arc<str>, user: Arc<str>, until: u64, origin: Origin, relay: Option<Box<str>> },
}

/// A member in the paper's presence hash, so that nodes loading the paper later
/// know who is on the others.
#[derive(Debug)]
pub struct Presence {
    pub member: Arc<str>,
    /// The JSON entry `{"user","name","node"}`, or `None` to remove it.
    pub entry: Option<String>,
}

impl Op {
    pub fn paper(&self) -> &Arc<str> {
        match self {
            Op::Note { paper, .. }
            | Op::Patch { paper, .. }
            | Op::Cover { paper, .. }
            | Op::Complete { paper, .. }
            | Op::Relay { paper, .. }
            | Op::Prune { paper }
            | Op::Erase { paper, .. }
            | Op::Revoke { paper, .. } => paper,
        }
    }

    pub fn relay(&self) -> Option<&str> {
        match self {
            Op::Note { relay, .. } | Op::Patch { relay, .. } | Op::Cover { relay, .. } => relay.as_deref(),
            // Published by their scripts, once applied.
            Op::Complete { .. } | Op::Prune { .. } | Op::Erase { .. } | Op::Revoke { .. } => None,
            Op::Relay { relay, .. } => Some(relay),
        }
    }

    /// The report of this op's outcome; `None` for what is only relayed.
    pub fn report(&self, outcome: Outcome) -> Option<Written> {
        let (paper, origin, v, reference, note) = match self {
            Op::Note { paper, origin, note, reference, id, .. } => (paper, origin, note.v, reference, Some(id)),
            Op::Cover { paper, origin, cover, reference, .. } => (paper, origin, cover.v, reference, None),
            Op::Patch { paper, origin, v, reference, id, .. } => (paper, origin, *v, reference, Some(id)),
            Op::Complete { paper, origin, reference, .. } => (paper, origin, 0, reference, None),
            Op::Erase { paper, origin, .. } | Op::Revoke { paper, origin, .. } => (paper, origin, 0, &None, None),
            Op::Relay { .. } | Op::Prune { .. } => return None,
        };
        let note = note.cloned();
        let effect = match self {
            Op::Erase { retention_ms, .. } => Some(Effect::Erased { for_ms: *retention_ms }),
            Op::Revoke { user, until, .. } => Some(Effect::Revoked { user: user.clone(), until: *until }),
            _ => None,
        };
        Some(Written { paper: paper.clone(), origin: *origin, v, reference: reference.clone(), outcome, note, effect })
    }
}

/// What Redis did with an op (PROTOCOL.md 3.1, 1.1: what `saved` means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, or Redis holds a later version of the same note: `saved`.
    Saved,
    /// The paper was sealed first: `paper_completed`.
    Sealed,
    /// Refused for good: `write_failed`.
    Failed,
    /// A patch of a note Redis holds deleted: a delete made on another node got
    /// there first, and its relayed message corrects the members. `not_found`.
    Gone,
    /// An upsert of a note Redis does not hold, at or below the paper's horizon
    /// (PROTOCOL.md 4, 1.1: never applied, as it could bring back a note deleted
    /// and dropped; a write made on a node cut from Redis while another node's
    /// deletes raised the horizon). `write_failed`, and the members are
    /// corrected; the paper itself is writable, so it goes on.
    BelowHorizon,
    /// 1.2: the paper is erased (PROTOCOL.md 7): nothing of it is written.
    Erased,
}

/// An op's outcome, reported back to the loop that made it.
#[derive(Debug, Clone)]
pub struct Written {
    pub paper: Arc<str>,
    pub origin: Origin,
    /// The version a `saved` confirms (0 for a completion).
    pub v: u64,
    /// The raw JSON string of the edit's `ref`, for an error.
    pub reference: Option<Box<str>>,
    pub outcome: Outcome,
    /// The note the edit was of (none for a cover or a completion).
    pub note: Option<Arc<str>>,
    /// What an erase or a revocation does once written, wherever its caller is.
    pub effect: Option<Effect>,
}

/// What a written erase or revocation makes this node do (PROTOCOL.md 7): it
/// is done even when its API call was already answered (504).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Erased { for_ms: u64 },
    Revoked { user: Arc<str>, until: u64 },
}

/// An op in the backlog, with when it was accepted (for the write-behind latency)
/// and what it costs the backlog in bytes.
#[derive(Debug)]
pub struct Queued {
    pub op: Op,
    pub at: Instant,
    pub bytes: usize,
}

impl Op {
    /// What the op holds in memory while it waits, about: its strings, and a
    /// fixed part for the op, its queue slot and allocations. The backlog's byte
    /// limit counts this (PROTOCOL.md 4, 1.2).
    pub fn bytes(&self) -> usize {
        const FIXED: usize = 192;
        let text = |s: &Option<Box<str>>| s.as_deref().map_or(0, str::len);
        let note_bytes = |n: &NoteValue| {
            let versions = n.fields.as_ref().map_or(0, |f| f.changed.keys().map(|k| k.len() + 48).sum());
            n.data.as_deref().map_or(0, str::len) + versions
        };
        FIXED
            + match self {
                Op::Note { id, note, reference, relay, .. } => {
                    id.len() + note_bytes(note) + text(reference) + text(relay)
                }
                Op::Patch { id, patch, reference, relay, .. } => id.len() + patch.len() + text(reference) + text(relay),
                Op::Cover { cover, reference, relay, .. } => note_bytes(cover) + text(reference) + text(relay),
                Op::Complete { by, reference, .. } => by.len() + text(reference),
                Op::Relay { presence, relay, .. } => {
                    relay.len()
                        + presence.as_ref().map_or(0, |p| p.member.len() + p.entry.as_ref().map_or(0, String::len))
                }
                Op::Prune { .. } => 0,
                Op::Erase { relay, .. } => text(relay),
                Op::Revoke { user, relay, .. } => user.len() + text(relay),
            }
    }
}

/// What the backlog holds: ops handed over and not yet written (queued or in the
/// writer's hands), and their bytes (`Op::bytes`). Both limits are exact.
#[derive(Debug, Default)]
pub struct BacklogLevel {
    pub ops: AtomicUsize,
    pub bytes: AtomicUsize,
}

impl BacklogLevel {
    pub fn ops(&self) -> usize {
        self.ops.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Ops that left the backlog (written, refused, or given up), with their bytes.
    pub fn release(&self, ops: usize, bytes: usize) {
        self.ops.fetch_sub(ops, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn take(&self, bytes: usize) {
        self.ops.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// The backlog's limits: whichever is reached first refuses new edits.
#[derive(Debug, Clone, Copy)]
pub struct BacklogLimits {
    pub ops: usize,
    pub bytes: usize,
}

/// The writer's bounded queue, bounded in ops and in bytes (PROTOCOL.md 4, 1.2).
#[derive(Clone)]
pub struct Backlog {
    tx: Sender<Queued>,
    level: Arc<BacklogLevel>,
    limits: BacklogLimits,
}

/// The backlog is full: the edit must be refused with `unavailable`.
#[derive(Debug)]
pub struct BacklogFull;

impl Backlog {
    pub fn new(limits: BacklogLimits) -> (Backlog, crossbeam_channel::Receiver<Queued>, Arc<BacklogLevel>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let level = Arc::new(BacklogLevel::default());
        (Backlog { tx, level: level.clone(), limits }, rx, level)
    }

    /// Queues an op without blocking.
    ///
    /// # Errors
    /// `BacklogFull` when `limits.ops` ops, or `limits.bytes` bytes, wait already
    /// (or would with this op); the op is dropped and the caller refuses the edit.
    pub fn submit(&self, op: Op) -> Result<(), BacklogFull> {
        let bytes = op.bytes();
        let ops_before = self.level.ops.fetch_add(1, Ordering::AcqRel);
        let bytes_before = self.level.bytes.fetch_add(bytes, Ordering::AcqRel);
        if ops_before >= self.limits.ops || bytes_before + bytes > self.limits.bytes {
            self.level.release(1, bytes);
            return Err(BacklogFull);
        }
        // The writer outlives every loop, so the channel is open while loops run.
        self.tx.send(Queued { op, at: Instant::now(), bytes }).map_err(|_| BacklogFull)
    }

    /// Queues an op whatever the limits (a presence leave, which must never be
    /// lost); it still counts, in ops and bytes. The caller bounds them: each
    /// leave follows one accepted join.
    pub fn submit_always(&self, op: Op) {
        let bytes = op.bytes();
        self.level.take(bytes);
        if self.tx.send(Queued { op, at: Instant::now(), bytes }).is_err() {
            self.level.release(1, bytes);
        }
    }

    /// Queues an op that may be lost without harm (a cursor), unless the backlog is
    /// half full: transient state must not crowd out edits.
    pub fn submit_transient(&self, op: Op) {
        if !self.is_half_full() {
            let _ = self.submit(op);
        }
    }

    pub fn len(&self) -> usize {
        self.level.ops()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Half the ops or half the bytes are taken: what may wait, waits.
    pub fn is_half_full(&self) -> bool {
        self.level.ops() >= self.limits.ops / 2 || self.level.bytes() >= self.limits.bytes / 2
    }
}

/// Why a paper is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPurpose {
    /// For the joiners (and readers) of this read attempt.
    Join(u64),
    /// Again, after the relay's subscription was rebuilt: merge what was missed.
    Merge,
    /// To see whether a paper Redis refused to write is readable again.
    Probe,
    /// For one `GET /papers` of a paper nobody holds: answered, not kept.
    Read(u64),
}

/// A loop's request to read a paper.
#[derive(Debug)]
pub struct LoadRequest {
    pub paper: Arc<str>,
    pub purpose: LoadPurpose,
    pub loop_index: usize,
    /// The joiners are sent away at this instant; reading after it is wasted.
    pub deadline: Instant,
}

/// Where a loop sends a paper to be read: straight to the loader, or with
/// `--cluster` through the relay thread, which subscribes to the paper's channel
/// first so that no change falls between the read and the subscription.
#[derive(Clone)]
pub enum Loads {
    Direct(Sender<LoadRequest>),
    Subscribed(Sender<relay::RelayCmd>),
}

impl Loads {
    pub fn load(&self, request: LoadRequest) {
        let sent = match self {
            Loads::Direct(loader) => loader.send(request).is_ok(),
            Loads::Subscribed(relay) => relay.send(relay::RelayCmd::Subscribe(request)).is_ok(),
        };
        if !sent {
            log::error!("the loader threads are gone");
        }
    }

    /// Reads a paper for one request, without subscribing to its channel.
    pub fn read_once(&self, request: LoadRequest) {
        let sent = match self {
            Loads::Direct(loader) => loader.send(request).is_ok(),
            Loads::Subscribed(relay) => relay.send(relay::RelayCmd::Read(request)).is_ok(),
        };
        if !sent {
            log::error!("the loader threads are gone");
        }
    }

    /// The paper left memory: stop listening to its channel.
    pub fn forget(&self, paper: Arc<str>) {
        if let Loads::Subscribed(relay) = self {
            let _ = relay.send(relay::RelayCmd::Unsubscribe(paper));
        }
    }
}

/// What became of an op handed to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// In the backlog; the loop hears when it is written.
    Queued,
    /// Nothing to wait for: the memory store holds it already.
    Written,
    /// The backlog is full: refuse the edit with `unavailable`.
    Full,
}

/// What a loop holds of the store.
#[derive(Clone)]
pub enum StoreHandle {
    Redis {
        backlog: Backlog,
        loads: Loads,
    },
    /// Papers live in the loops' memory only; every edit counts as written at once.
    Memory,
}

impl StoreHandle {
    /// Hands an op over without blocking.
    pub fn submit(&self, op: Op) -> Submitted {
        match self {
            StoreHandle::Redis { backlog, .. } => match backlog.submit(op) {
                Ok(()) => Submitted::Queued,
                Err(BacklogFull) => Submitted::Full,
            },
            StoreHandle::Memory => Submitted::Written,
        }
    }

    /// Hands over an op that must not be lost (a presence leave), even past the limit.
    pub fn submit_always(&self, op: Op) {
        if let StoreHandle::Redis { backlog, .. } = self {
            backlog.submit_always(op);
        }
    }

    /// Hands over an op that may be lost without harm (a cursor).
    pub fn submit_transient(&self, op: Op) {
        if let StoreHandle::Redis { backlog, .. } = self {
            backlog.submit_transient(op);
        }
    }

    /// Asks for a paper to be read: `Some` when the answer is known at once (the
    /// memory store holds nothing the loop does not), else it arrives as
    /// `StoreEvent::Loaded`.
    pub fn load(&self, request: LoadRequest) -> Option<StoredPaper> {
        match self {
            StoreHandle::Redis { loads, .. } => {
                loads.load(request);
                None
            }
            StoreHandle::Memory => Some(StoredPaper::default()),
        }
    }

    /// The backlog is half full or more: what may wait (presence to mend) waits.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreHandle::Redis { backlog, .. } => backlog.is_half_full(),
            StoreHandle::Memory => false,
        }
    }

    /// Reads a paper for one request, keeping nothing: `Some` at once with the
    /// memory store, else it arrives as `StoreEvent::Loaded` with this attempt.
    pub fn read_once(&self, request: LoadRequest) -> Option<StoredPaper> {
        match self {
            StoreHandle::Redis { loads, .. } => {
                loads.read_once(request);
                None
            }
            StoreHandle::Memory => Some(StoredPaper::default()),
        }
    }

    /// The paper left memory: stop listening to its channel.
    pub fn forget(&self, paper: Arc<str>) {
        if let StoreHandle::Redis { loads, .. } = self {
            loads.forget(paper);
        }
    }
}
