//! A loader thread (the server runs four): reads papers from Redis for the loops that asked, retrying
//! until the joiners' deadline, so that a loop never waits on Redis.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde::Deserialize;

use super::codec::{parse_paper, Hash};
use super::endpoint::{Endpoint, RedisConn};
use super::{keys, LoadPurpose, LoadRequest, Loops, PresenceMember, StoreEvent, StoredPaper};
use crate::metrics::WriterMetrics;

pub struct Loader {
    metrics: Arc<WriterMetrics>,
    /// With `--cluster`: this node, whose own entries in presence hashes are stale.
    presence_of_others: Option<String>,
    endpoint: Endpoint,
    conn: Option<RedisConn>,
    requests: Receiver<LoadRequest>,
    loops: Arc<dyn Loops>,
    /// The note script, run with no note and nothing to drop: a write that
    /// changes nothing, to prove a paper writable again.
    write_notes: redis::Script,
}

impl Loader {
    pub fn new(
        endpoint: Endpoint,
        requests: Receiver<LoadRequest>,
        loops: Arc<dyn Loops>,
        metrics: Arc<WriterMetrics>,
    ) -> Self {
        let write_notes = super::writer::write_notes_script();
        Loader { metrics, presence_of_others: None, endpoint, conn: None, requests, loops, write_notes }
    }

    /// With `--cluster`: also read who is on the paper on other live nodes.
    pub fn with_presence(mut self, node: &str) -> Self {
        self.presence_of_others = Some(node.to_string());
        self
    }

    /// Serves requests until every loop has stopped.
    pub fn run(mut self) {
        while let Ok(request) = self.requests.recv() {
            if let Some(stored) = self.read_until(&request.paper, request.deadline) {
                // A paper Redis refused to write is taken back only once it can be
                // written too (PROTOCOL.md 3.3): reading alone would let it take
                // edits that fail again, and again.
                if request.purpose == LoadPurpose::Probe {
                    if let Err(e) = self.write_nothing(&request.paper) {
                        log::warn!("paper {} can be read but not written: {e}", request.paper);
                        continue;
                    }
                }
                let event = StoreEvent::Loaded { paper: request.paper, purpose: request.purpose, stored };
                self.loops.report(request.loop_index, event);
            }
        }
    }

    /// Reads a paper, retrying until `deadline`; `None` when Redis could not be read
    /// in time (the loop sends the joiners away with 1013).
    fn read_until(&mut self, paper: &str, deadline: Instant) -> Option<StoredPaper> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if Instant::now() >= deadline {
                return None;
            }
            match self.read(paper) {
                Ok(stored) => return Some(stored),
                Err(e) if super::is_transient(&e) => {
                    self.conn = None;
                    log::warn!("cannot read paper {paper} from Redis: {e}");
                }
                // Retrying cannot cure it (a key of the wrong type): the joiners are
                // sent away at their deadline, and the loader serves other papers.
                Err(e) => {
                    log::warn!("cannot read paper {paper} from Redis: {e}");
                    return None;
                }
            }
            std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs the note script on the paper's keys with no note and nothing to drop:
    /// it touches every key a write touches, of the type a write needs, and
    /// changes nothing.
    fn write_nothing(&mut self, paper: &str) -> redis::RedisResult<()> {
        let script = self.write_notes.clone();
        let conn = self.connection()?;
        let mut call = script.key(keys::notes(paper));
        call.key(keys::meta(paper)).key(keys::tombstones(paper)).key(keys::erased(paper));
        // now 0 and retention 0: no tombstone is past retention; no cap is reached.
        call.arg(0).arg("").arg(0).arg(crate::protocol::MAX_VERSION);
        call.invoke::<redis::Value>(conn).map(drop).inspect_err(|e| {
            if super::is_transient(e) {
                self.conn = None;
            }
        })
    }

    fn connection(&mut self) -> redis::RedisResult<&mut RedisConn> {
        if self.conn.is_none() {
            let mut conn = self.endpoint.connect()?;
            if !conn.is_cluster() {
                redis::cmd("CLIENT").arg("SETNAME").arg("rp-loader").exec(&mut conn)?;
            }
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn read(&mut self, paper: &str) -> redis::RedisResult<StoredPaper> {
        self.connection()?;
        let conn = self.conn.as_mut().expect("connected");
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(keys::notes(paper)).cmd("HGETALL").arg(keys::meta(paper));
        pipe.cmd("PTTL").arg(keys::erased(paper)).cmd("HGETALL").arg(keys::revoked(paper));
        let (notes, meta, erased_ms, revoked): (Hash, Hash, i64, Hash) = pipe.query(conn)?;
        let (mut stored, skipped) = parse_paper(paper, notes, meta);
        // -2: no marker; -1: a marker without expiry (set by hand): erased for good.
        stored.erased_for = match erased_ms {
            -2 => None,
            ms if ms < 0 => Some(Duration::MAX),
            ms => Some(Duration::from_millis(ms as u64)),
        };
        stored.revoked = super::codec::parse_revoked(revoked);
        self.metrics.corrupt_values.fetch_add(skipped, Ordering::Relaxed);
        if let Some(own) = &self.presence_of_others {
            let entries: Hash = redis::cmd("HGETALL").arg(keys::members(paper)).query(conn)?;
            stored.remote_members = live_members(conn, own, entries)?;
        }
        Ok(stored)
    }
}

#[derive(Deserialize)]
struct PresenceEntry {
    user: String,
    name: String,
    node: String,
}

/// The presence entries of nodes that are alive (their `rp:node:{id}` key exists)
/// and not this one.
fn live_members(conn: &mut RedisConn, own: &str, entries: Hash) -> redis::RedisResult<Vec<PresenceMember>> {
    let parsed: Vec<(String, PresenceEntry)> = entries
        .into_iter()
        .filter_map(|(id, json)| {
            Some((String::from_utf8(id).ok()?, serde_json::from_slice::<PresenceEntry>(&json).ok()?))
        })
        .filter(|(_, e)| e.node != own)
        .collect();
    let mut nodes: Vec<&str> = parsed.iter().map(|(_, e)| e.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut alive = Vec::new();
    for node in nodes {
        let exists: bool = redis::cmd("EXISTS").arg(keys::node_alive(node)).query(conn)?;
        if exists {
            alive.push(node.to_string());
        }
    }
    Ok(parsed
        .into_iter()
        .filter(|(_, e)| alive.contains(&e.node))
        .map(|(id, e)| PresenceMember {
            id: Arc::from(id),
            user: Arc::from(e.user),
            name: Arc::from(e.name),
            node: Arc::from(e.node),
        })
        .collect())
}
