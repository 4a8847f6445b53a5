//! The loader thread: reads papers from Redis for the loops that asked, retrying
//! until the joiners' deadline, so that a loop never waits on Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use redis::Connection;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::writer::connect;
use super::{keys, LoadRequest};
use crate::paper::{Note, StoredPaper};
use crate::server::inbox::{InboxMsg, LoopHandle};

/// A Redis hash as its field/value pairs.
type Hash = Vec<(String, String)>;

pub struct Loader {
    client: redis::Client,
    conn: Option<Connection>,
    requests: Receiver<LoadRequest>,
    loops: Arc<[LoopHandle]>,
}

impl Loader {
    pub fn new(client: redis::Client, requests: Receiver<LoadRequest>, loops: Arc<[LoopHandle]>) -> Self {
        Loader { client, conn: None, requests, loops }
    }

    /// Serves requests until every loop has stopped.
    pub fn run(mut self) {
        while let Ok(request) = self.requests.recv() {
            if let Some(stored) = self.read_until(&request.paper, request.deadline) {
                self.loops[request.loop_index].send(InboxMsg::Loaded {
                    paper: request.paper,
                    attempt: request.attempt,
                    stored,
                });
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
                Err(e) => {
                    self.conn = None;
                    log::warn!("cannot read paper {paper} from Redis: {e}");
                }
            }
            std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn read(&mut self, paper: &str) -> redis::RedisResult<StoredPaper> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(connect(&self.client)?),
        };
        let (notes, meta): (Hash, Hash) =
            redis::pipe().cmd("HGETALL").arg(keys::notes(paper)).cmd("HGETALL").arg(keys::meta(paper)).query(conn)?;
        Ok(parse_paper(paper, notes, meta))
    }
}

#[derive(Deserialize)]
struct StoredNote<'a> {
    #[serde(default)]
    author: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    node: String,
    v: u64,
}

/// Builds a paper from its two hashes. A value this server cannot have written is
/// skipped with an error, rather than stopping every session of the paper.
pub fn parse_paper(paper: &str, notes: Hash, meta: Hash) -> StoredPaper {
    let mut stored = StoredPaper::default();
    for (id, value) in notes {
        match serde_json::from_str::<StoredNote>(&value) {
            Ok(note) if note.deleted => stored
                .notes
                .push((id, Note { author: Arc::from(note.author), data: None, v: note.v, node: Arc::from(note.node) })),
            Ok(StoredNote { author, data: Some(data), v, node, .. }) if data.get().starts_with('{') => {
                let data = Some(Arc::from(data.get()));
                stored.notes.push((id, Note { author: Arc::from(author), data, v, node: Arc::from(node) }))
            }
            _ => log::error!("skipping note {id} of paper {paper}: unreadable stored value {value:?}"),
        }
    }
    let field = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if field("completed") == Some("1") {
        stored.completed_by = Some(field("completed_by").unwrap_or_default().to_string());
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::stored_note;

    #[test]
    fn reads_back_what_the_writer_stores() {
        let notes = vec![
            ("n1".to_string(), stored_note("u1", Some(r#"{"text":"hi"}"#), "", 7)),
            ("n2".to_string(), stored_note("u2", None, "b", 9)),
            ("bad".to_string(), "not json".to_string()),
        ];
        let meta = vec![("completed".to_string(), "1".to_string()), ("completed_by".to_string(), "u1".to_string())];
        let stored = parse_paper("p1", notes, meta);
        assert_eq!(stored.notes.len(), 2);
        assert_eq!(stored.notes[0].1.data.as_deref(), Some(r#"{"text":"hi"}"#));
        assert_eq!(stored.notes[0].1.v, 7);
        assert_eq!(stored.notes[1].1.data, None);
        assert_eq!(&*stored.notes[1].1.node, "b");
        assert_eq!(stored.completed_by.as_deref(), Some("u1"));
    }
}
