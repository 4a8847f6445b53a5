//! A batch's pipeline, typed: each command is a `Call` that knows what it
//! writes (`encode`) and what its reply says of its ops (`read`), so that the
//! writer never walks the batch twice in the same order by hand.

use redis::{Pipeline, RedisError, RedisResult, Script, Value};

use super::batch::{CoverWrite, NoteWrite, PaperWrites, Plan};
use super::{keys, Op, Outcome, Queued};

/// Lua shared by the scripts: whether a stored value is one the loader reads
/// (`codec::read_note`: UTF-8, a JSON note, `v` in [1, 2^53), `data` an object),
/// and its version and node. A value the loader skips counts as absent, so that
/// a new write replaces it instead of being swallowed by it.
const READABLE: &str = include_str!("scripts/readable.lua");

/// Writes notes of one paper, each only if it advances the stored version (ties
/// to the greater node id), so that a resent batch or a late write from another
/// node never goes back in time; what it applies it publishes to the other
/// nodes (so that they never show an edit Redis refused). Keeps the tombstone
/// horizon (PROTOCOL.md 4, 1.1: a sorted set of tombstones by version, pruned
/// past retention or the cap, `horizon` raised) and the resume floor (a change
/// applied more than the resume window below the greatest version raises it).
/// Patches are merged field by field (PROTOCOL.md 2, 1.1), and a note keeps at
/// most 64 removed fields' versions, older ones folded into its floor (1.2).
/// Each note a call touches is read and parsed once, and written once at the
/// end: a call costs its ops plus the notes it touches, never ops times notes.
/// An erased paper (1.2) is not written at all. KEYS: notes, meta, tombstones,
/// erased. ARGV: now_ms, the channel (empty without `--cluster`), retention
/// (versions), max tombstones, then (kind, id, value, v, node, relay, held)
/// septuples, kind `w` (a whole note or tombstone) or `p` (a patch: value is
/// the object of fields, `null` removing one; held is the note's version as
/// its node held it, 0 for a whole write). Returns one code per write: 1
/// applied, 2 superseded (Redis holds a later version, or this one), 3 refused
/// because the paper is sealed, 4 refused because it is at or below the
/// horizon and the note is not there (a delete of it is 2: the note is gone
/// either way), 5 a patch of a note Redis holds deleted (or does not hold,
/// while the version its node held is at or below the horizon: its delete may
/// have been dropped), 6 a patch of a note that is not there or cannot be
/// read, 7 the paper is erased.
const WRITE_NOTES: &str = include_str!("scripts/write_notes.lua");

/// Sets a paper's cover (1.1, `meta`) if it advances the stored one's version
/// (ties to the greater node id), and publishes it to the other nodes when it
/// does; an applied cover counts as a write of the paper (`created_ms`,
/// `updated_ms`). KEYS: meta, erased. ARGV: value, v, node, channel (or empty),
/// relay, now_ms. Returns 1 applied, 2 superseded, 3 refused because the paper
/// is sealed, 7 the paper is erased.
const WRITE_COVER: &str = include_str!("scripts/write_cover.lua");

/// Seals a paper once, as Redis holds it: the snapshot is built here from the
/// notes hash, so that the stream entry and the hash never disagree. Marks it
/// completed, adds its one stream entry, publishes `completed` with the notes
/// to the other nodes (when a channel is given), and starts the retention of its
/// keys. Run again (a resent batch, or a paper sealed by another node), it adds
/// nothing. KEYS: notes, meta, tombstones, erased, stream. ARGV: paper, by,
/// now_ms, retention seconds, channel (or empty), relay prefix. Returns the
/// notes JSON array, who completed the paper, and the snapshot still to append
/// to the stream (or empty); for an erased paper, a fourth element.
///
/// On a Redis Cluster the stream lives in another slot, which a script may not
/// touch: called without the stream key, it leaves the snapshot in the meta hash
/// as `handoff_pending`; the writer appends it to the stream, then removes it
/// (at least once: a writer that dies between leaves the marker for the next sweep).
const COMPLETE: &str = include_str!("scripts/complete.lua");

/// Erases a paper (PROTOCOL.md 7, 1.2): sets its `erased` marker for the
/// retention, deletes its keys, and publishes the erase to the other nodes. The
/// marker makes every other script a no-op for the paper (they answer 7). Run
/// again, it ends in the same state. KEYS: notes, meta, tombstones, members,
/// revoked, erased. ARGV: retention ms, channel (or empty), relay. Returns 1.
const ERASE: &str = include_str!("scripts/erase.lua");

/// Revokes a user (PROTOCOL.md 7, 1.2): sets `user -> until` in the paper's
/// revoked hash, drops the revocations past, keeps the key until the last one
/// ends, and publishes it to the other nodes. KEYS: revoked, erased. ARGV: user,
/// until (unix seconds), now (unix seconds), channel (or empty), relay. Returns
/// 1, or 7 for an erased paper.
const REVOKE: &str = include_str!("scripts/revoke.lua");

/// Sets (or, with an empty entry, removes) a member's presence entry and the
/// hash's expiry, unless the paper is erased: a node that missed the erase
/// must not bring a key of the paper back. KEYS: members, erased. ARGV:
/// member, entry (or empty), ttl ms. Returns 1, or 0 for an erased paper.
const PRESENCE: &str = include_str!("scripts/presence.lua");

/// The scripts the writer calls, loaded on each of its connections.
#[derive(Clone)]
pub(super) struct Scripts {
    write_notes: Script,
    write_cover: Script,
    complete: Script,
    erase: Script,
    revoke: Script,
    presence: Script,
}

impl Scripts {
    /// On a Redis Cluster, relayed messages go by sharded pub/sub, which a
    /// script may use for a channel of its own slot.
    pub fn new(redis_cluster: bool) -> Scripts {
        let publish = |script: String| if redis_cluster { script.replace("'PUBLISH'", "'SPUBLISH'") } else { script };
        Scripts {
            write_notes: Script::new(&publish(format!("{READABLE}{WRITE_NOTES}"))),
            write_cover: Script::new(&publish(WRITE_COVER.to_string())),
            complete: Script::new(&publish(format!("{READABLE}{COMPLETE}"))),
            erase: Script::new(&publish(ERASE.to_string())),
            revoke: Script::new(&publish(REVOKE.to_string())),
            presence: Script::new(PRESENCE),
        }
    }

    pub fn all(&self) -> Vec<Script> {
        [&self.write_notes, &self.write_cover, &self.complete, &self.erase, &self.revoke, &self.presence]
            .into_iter()
            .cloned()
            .collect()
    }

    /// Loads every script on a new connection.
    ///
    /// # Errors
    /// The connection failed.
    pub fn load(&self, conn: &mut impl redis::ConnectionLike) -> RedisResult<()> {
        self.all().iter().try_for_each(|script| script.load(conn).map(drop))
    }
}

/// The note script as the loader runs it, to prove a paper writable: with no
/// note, nothing is published, so the plain script serves every kind of Redis.
pub(super) fn write_notes_script() -> Script {
    Script::new(&format!("{READABLE}{WRITE_NOTES}"))
}

/// How many tombstones a paper keeps, and for how long (in versions).
#[derive(Debug, Clone, Copy)]
pub struct History {
    pub retention: u64,
    pub max_tombstones: usize,
}

/// What the writer learnt of one op.
#[derive(Debug, Clone)]
pub(super) enum Reported {
    Op(Outcome),
    /// A completion: the paper as sealed.
    Sealed {
        notes: String,
        by: String,
    },
    /// Refused for good, with Redis's error.
    Failed(String),
}

/// What the calls of one pipeline are written with.
pub(super) struct Context<'s> {
    pub scripts: &'s Scripts,
    /// A Redis Cluster: the stream is appended apart, messages go by `SPUBLISH`.
    pub redis_cluster: bool,
    /// With `--cluster`: this node's id, which prefixes what it relays.
    pub node: Option<&'s str>,
    pub now_ms: u64,
    pub history: History,
    pub retention_secs: u64,
    pub presence_ttl_ms: u64,
}

impl Context<'_> {
    fn channel(&self, paper: &str) -> String {
        if self.node.is_some() {
            keys::channel(paper)
        } else {
            String::new()
        }
    }
}

/// One command of a batch's pipeline.
pub(super) enum Call<'p, 'a> {
    /// A paper's note writes (and its tombstones past retention).
    Notes(&'p PaperWrites<'a>),
    Cover(&'p PaperWrites<'a>, &'p CoverWrite<'a>),
    /// The op, and who completes.
    Seal(&'p PaperWrites<'a>, usize, &'a str),
    /// An erase or a revocation: alone in its paper's call.
    Alone(&'p PaperWrites<'a>, usize),
    /// A member's presence entry, of a relayed op.
    Presence(usize),
    /// A relayed op's message to the other nodes.
    Publish(usize),
}

/// What a call's reply said.
#[derive(Default)]
pub(super) struct Read {
    /// Messages Redis published for the other nodes.
    pub relayed: u64,
    /// On a Cluster: a sealed paper's stream entry still to append (its op, the snapshot).
    pub handoff: Option<(usize, Vec<u8>)>,
}

impl<'p, 'a> Call<'p, 'a> {
    /// Every call of a plan, in the pipeline's order: per paper its notes, its
    /// cover, its seal (or its erase or revocation); then presence and relayed
    /// messages, in the order they were accepted, so that a node reading the
    /// paper on receipt finds the writes there.
    pub fn of(plan: &'p Plan<'a>, batch: &[Queued]) -> Vec<Call<'p, 'a>> {
        let mut calls = Vec::new();
        for writes in &plan.papers {
            if writes.runs_note_script() {
                calls.push(Call::Notes(writes));
            }
            if let Some(cover) = &writes.cover {
                calls.push(Call::Cover(writes, cover));
            }
            if let Some((i, by)) = writes.complete {
                calls.push(Call::Seal(writes, i, by));
            }
            if let Some(i) = writes.alone {
                calls.push(Call::Alone(writes, i));
            }
        }
        for &i in &plan.relays {
            let op = &batch[i].op;
            if matches!(op, Op::Relay { presence: Some(_), .. }) {
                calls.push(Call::Presence(i));
            }
            if op.relay().is_some() {
                calls.push(Call::Publish(i));
            }
        }
        calls
    }

    /// The paper the call writes: on a Cluster, its slot says its shard.
    pub fn paper<'b>(&self, batch: &'b [Queued]) -> &'b str
    where
        'a: 'b,
    {
        match self {
            Call::Notes(w) | Call::Cover(w, _) | Call::Seal(w, ..) | Call::Alone(w, _) => w.paper,
            Call::Presence(i) | Call::Publish(i) => batch[*i].op.paper(),
        }
    }

    /// The relayed op the call is part of, if it is one.
    pub fn relayed_op(&self) -> Option<usize> {
        match self {
            Call::Presence(i) | Call::Publish(i) => Some(*i),
            _ => None,
        }
    }

    /// The paper's writes the call is part of, if it is one.
    pub fn writes(&self) -> Option<&'p PaperWrites<'a>> {
        match self {
            Call::Notes(w) | Call::Cover(w, _) | Call::Seal(w, ..) | Call::Alone(w, _) => Some(w),
            Call::Presence(_) | Call::Publish(_) => None,
        }
    }

    /// Adds the call's command to `pipe`.
    pub fn encode(&self, pipe: &mut Pipeline, batch: &[Queued], ctx: &Context) {
        let scripts = ctx.scripts;
        match self {
            Call::Notes(writes) => {
                let paper = writes.paper;
                let cmd = pipe.cmd("EVALSHA").arg(scripts.write_notes.get_hash()).arg(4);
                cmd.arg(keys::notes(paper)).arg(keys::meta(paper)).arg(keys::tombstones(paper));
                cmd.arg(keys::erased(paper));
                cmd.arg(ctx.now_ms).arg(ctx.channel(paper)).arg(ctx.history.retention);
                cmd.arg(ctx.history.max_tombstones);
                for note in &writes.notes {
                    cmd.arg(note.kind).arg(note.id).arg(&note.value).arg(note.v).arg(note.node).arg(note.relay);
                    cmd.arg(note.held);
                }
            }
            Call::Cover(writes, cover) => {
                let paper = writes.paper;
                let cmd = pipe.cmd("EVALSHA").arg(scripts.write_cover.get_hash()).arg(2);
                cmd.arg(keys::meta(paper)).arg(keys::erased(paper));
                cmd.arg(&cover.value).arg(cover.v).arg(cover.node).arg(ctx.channel(paper)).arg(cover.relay);
                cmd.arg(ctx.now_ms);
            }
            Call::Seal(writes, _, by) => {
                let paper = writes.paper;
                let prefix = ctx.node.map_or_else(String::new, |node| format!("{node}\n"));
                let cmd = pipe.cmd("EVALSHA").arg(scripts.complete.get_hash());
                cmd.arg(if ctx.redis_cluster { 4 } else { 5 }).arg(keys::notes(paper)).arg(keys::meta(paper));
                cmd.arg(keys::tombstones(paper)).arg(keys::erased(paper));
                if !ctx.redis_cluster {
                    cmd.arg(keys::COMPLETED_STREAM);
                }
                cmd.arg(paper).arg(*by).arg(ctx.now_ms).arg(ctx.retention_secs).arg(ctx.channel(paper)).arg(prefix);
            }
            Call::Alone(writes, i) => {
                let paper = writes.paper;
                match &batch[*i].op {
                    Op::Erase { retention_ms, relay, .. } => {
                        let cmd = pipe.cmd("EVALSHA").arg(scripts.erase.get_hash()).arg(6);
                        cmd.arg(keys::notes(paper)).arg(keys::meta(paper)).arg(keys::tombstones(paper));
                        cmd.arg(keys::members(paper)).arg(keys::revoked(paper)).arg(keys::erased(paper));
                        cmd.arg(*retention_ms).arg(ctx.channel(paper)).arg(relay.as_deref().unwrap_or_default());
                    }
                    Op::Revoke { user, until, relay, .. } => {
                        let cmd = pipe.cmd("EVALSHA").arg(scripts.revoke.get_hash()).arg(2);
                        cmd.arg(keys::revoked(paper)).arg(keys::erased(paper));
                        cmd.arg(&**user).arg(*until).arg(ctx.now_ms / 1000).arg(ctx.channel(paper));
                        cmd.arg(relay.as_deref().unwrap_or_default());
                    }
                    _ => unreachable!("only erases and revocations go alone"),
                }
            }
            Call::Presence(i) => {
                let Op::Relay { paper, presence: Some(presence), .. } = &batch[*i].op else { return };
                let cmd = pipe.cmd("EVALSHA").arg(scripts.presence.get_hash()).arg(2);
                cmd.arg(keys::members(paper)).arg(keys::erased(paper)).arg(&*presence.member);
                cmd.arg(presence.entry.as_deref().unwrap_or_default()).arg(ctx.presence_ttl_ms);
            }
            Call::Publish(i) => {
                let op = &batch[*i].op;
                let publish = if ctx.redis_cluster { "SPUBLISH" } else { "PUBLISH" };
                pipe.cmd(publish).arg(keys::channel(op.paper())).arg(op.relay().unwrap_or_default());
            }
        }
    }

    /// Reads the call's reply into the outcomes of its ops.
    ///
    /// # Errors
    /// The call failed (Redis's error, or a reply the call does not give): the
    /// caller decides for its paper, or its relayed op.
    pub fn read(
        &self,
        reply: RedisResult<Value>,
        outcomes: &mut [Option<Reported>],
        ctx: &Context,
    ) -> RedisResult<Read> {
        let mut read = Read::default();
        match (self, reply?) {
            (Call::Notes(writes), Value::Array(codes)) if codes.len() == writes.notes.len() => {
                for &i in &writes.prune {
                    outcomes[i] = Some(Reported::Op(Outcome::Saved));
                }
                for (NoteWrite { ops, relay, .. }, code) in writes.notes.iter().zip(codes) {
                    read.relayed += u64::from(code == Value::Int(1) && !relay.is_empty());
                    let reported = match code {
                        Value::Int(3) => Reported::Op(Outcome::Sealed),
                        // Not applied, and nothing is wrong with the paper: its
                        // sender is told, its members corrected.
                        Value::Int(4) => Reported::Op(Outcome::BelowHorizon),
                        // Deleted meanwhile (another node's delete got there first).
                        Value::Int(5) => Reported::Op(Outcome::Gone),
                        Value::Int(6) => {
                            Reported::Failed("a patch of a note Redis does not hold or cannot read".into())
                        }
                        Value::Int(7) => Reported::Op(Outcome::Erased),
                        _ => Reported::Op(Outcome::Saved),
                    };
                    for &i in ops {
                        outcomes[i] = Some(reported.clone());
                    }
                }
            }
            (Call::Cover(_, cover), Value::Int(code)) => {
                let outcome = match code {
                    3 => Outcome::Sealed,
                    7 => Outcome::Erased,
                    _ => Outcome::Saved,
                };
                for &i in &cover.ops {
                    outcomes[i] = Some(Reported::Op(outcome));
                }
            }
            (Call::Seal(_, i, _), Value::Array(reply)) if reply.get(3).is_some() => {
                outcomes[*i] = Some(Reported::Op(Outcome::Erased));
            }
            (Call::Seal(_, i, _), Value::Array(reply)) => match (reply.first(), reply.get(1)) {
                (Some(Value::BulkString(notes)), Some(Value::BulkString(by))) => {
                    let notes = String::from_utf8_lossy(notes).into_owned();
                    let by = String::from_utf8_lossy(by).into_owned();
                    outcomes[*i] = Some(Reported::Sealed { notes, by });
                    if let Some(Value::BulkString(snapshot)) = reply.get(2).filter(|_| ctx.redis_cluster) {
                        if !snapshot.is_empty() {
                            read.handoff = Some((*i, snapshot.clone()));
                        }
                    }
                    read.relayed += u64::from(ctx.node.is_some());
                }
                _ => return Err(unexpected(Some(Ok(Value::Array(reply))))),
            },
            (Call::Alone(_, i), Value::Int(code)) => {
                read.relayed += u64::from(code == 1 && ctx.node.is_some());
                let outcome = if code == 7 { Outcome::Erased } else { Outcome::Saved };
                outcomes[*i] = Some(Reported::Op(outcome));
            }
            // A relayed op counts once all its calls are through (the writer's part).
            (Call::Presence(_) | Call::Publish(_), _) => {}
            (_, other) => return Err(unexpected(Some(Ok(other)))),
        }
        Ok(read)
    }
}

pub(super) fn unexpected(reply: Option<redis::RedisResult<Value>>) -> RedisError {
    let detail = format!("unexpected reply {reply:?}");
    RedisError::from((redis::ErrorKind::Io, "unexpected reply", detail))
}
