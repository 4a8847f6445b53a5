//! Server messages encoded as WebSocket text frames, once per broadcast, and
//! the JSON documents of a paper (`GET /papers`, the sealed snapshot).

use std::io::Write;

use super::Refusal;

/// What a snapshot says of the paper itself.
pub struct PaperView<'a> {
    pub id: &'a str,
    pub completed: bool,
    /// The cover (1.1): `{}` at version 0 until someone sets it.
    pub cover_data: &'a str,
    pub cover_v: u64,
}

/// A member as listed in snapshots and `join` messages.
pub struct MemberView<'a> {
    pub id: &'a str,
    pub user: &'a str,
    pub name: &'a str,
}

/// A live note as listed in snapshots; `data` is compact JSON text.
pub struct NoteView<'a> {
    pub id: &'a str,
    pub author: &'a str,
    pub data: &'a str,
    pub v: u64,
}

/// Room kept in front of the JSON for the largest WebSocket frame header.
const HEADER_ROOM: usize = 10;

/// One server message being encoded as a WebSocket text frame, written once and
/// then copied as the same bytes to every recipient.
///
/// The buffer is reused from message to message, so encoding allocates only
/// while it grows.
#[derive(Default)]
pub struct Frame {
    buf: Vec<u8>,
    start: usize,
}

impl Frame {
    pub fn new() -> Self {
        Frame::default()
    }

    /// The encoded frame: header and JSON payload.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The JSON payload alone.
    pub fn payload(&self) -> &[u8] {
        &self.buf[HEADER_ROOM..]
    }

    fn begin(&mut self) -> &mut Vec<u8> {
        self.buf.clear();
        self.buf.resize(HEADER_ROOM, 0);
        &mut self.buf
    }

    /// Writes the frame header right in front of the payload.
    fn finish(&mut self) -> &[u8] {
        self.finish_before(0)
    }

    /// Writes the header of a frame whose payload is what was encoded here and
    /// `rest` more bytes, queued after it from elsewhere.
    fn finish_before(&mut self, rest: usize) -> &[u8] {
        let len = self.buf.len() - HEADER_ROOM + rest;
        let header = header_len(len);
        self.start = HEADER_ROOM - header;
        let h = &mut self.buf[self.start..HEADER_ROOM];
        h[0] = 0x81; // FIN, text; server frames are never masked
        match header {
            2 => h[1] = len as u8,
            4 => {
                h[1] = 126;
                h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h[1] = 127;
                h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            }
        }
        self.bytes()
    }

    /// A full snapshot.
    pub fn snapshot<'a>(
        &mut self,
        paper: &PaperView,
        you: &str,
        notes: impl Iterator<Item = NoteView<'a>>,
        members: impl Iterator<Item = MemberView<'a>>,
    ) -> &[u8] {
        self.snapshot_since(paper, you, None, notes, std::iter::empty(), members)
    }

    /// The start of a full snapshot that goes on with the paper's shared body
    /// (`paper_body`) and this joiner's `snapshot_end`, `rest` bytes in all: the
    /// frame header and `{"type":"snapshot","paper","you"`. Together they are the
    /// bytes `snapshot` writes.
    pub fn snapshot_start(&mut self, paper_id: &str, you: &str, rest: usize) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"snapshot","paper":"#);
        string(b, paper_id);
        b.extend_from_slice(br#","you":"#);
        string(b, you);
        self.finish_before(rest)
    }

    /// A snapshot; with `since`, of the notes that may have changed after it,
    /// `deleted` (id, version) listed as `{"id","deleted":true,"v"}`
    /// (PROTOCOL.md 3.1, 1.1).
    pub fn snapshot_since<'a>(
        &mut self,
        paper: &PaperView,
        you: &str,
        since: Option<u64>,
        notes: impl Iterator<Item = NoteView<'a>>,
        deleted: impl Iterator<Item = (&'a str, u64)>,
        members: impl Iterator<Item = MemberView<'a>>,
    ) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"snapshot","paper":"#);
        string(b, paper.id);
        b.extend_from_slice(br#","you":"#);
        string(b, you);
        if let Some(since) = since {
            b.extend_from_slice(if paper.completed { br#","completed":true"# } else { br#","completed":false"# });
            cover(b, paper);
            b.extend_from_slice(br#","since":"#);
            number(b, since);
            b.extend_from_slice(br#","notes":"#);
            notes_array(b, notes);
        } else {
            body(b, paper, notes);
        }
        for (id, v) in deleted {
            b.pop(); // the array's closing bracket
            if b.last() != Some(&b'[') {
                b.push(b',');
            }
            b.extend_from_slice(br#"{"id":"#);
            string(b, id);
            b.extend_from_slice(br#","deleted":true,"v":"#);
            number(b, v);
            b.extend_from_slice(b"}]");
        }
        members_end(b, members);
        self.finish()
    }

    pub fn upsert(&mut self, id: &str, author: &str, data: &str, v: u64, from: &str, reference: Option<&str>) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"upsert","id":"#);
        string(b, id);
        b.extend_from_slice(br#","author":"#);
        string(b, author);
        b.extend_from_slice(br#","data":"#);
        b.extend_from_slice(data.as_bytes());
        version_from_ref(b, v, from, reference);
        self.finish()
    }

    /// 1.1: fields of a note changed; `data` holds only them (`null`: removed).
    pub fn patch(&mut self, id: &str, data: &str, v: u64, from: &str, reference: Option<&str>) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"patch","id":"#);
        string(b, id);
        b.extend_from_slice(br#","data":"#);
        b.extend_from_slice(data.as_bytes());
        version_from_ref(b, v, from, reference);
        self.finish()
    }

    /// 1.1: the paper's cover changed.
    pub fn meta(&mut self, data: &str, v: u64, from: &str, reference: Option<&str>) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"meta","data":"#);
        b.extend_from_slice(data.as_bytes());
        version_from_ref(b, v, from, reference);
        self.finish()
    }

    pub fn delete(&mut self, id: &str, v: u64, from: &str, reference: Option<&str>) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"delete","id":"#);
        string(b, id);
        version_from_ref(b, v, from, reference);
        self.finish()
    }

    pub fn cursor(&mut self, from: &str, data: &str) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"cursor","from":"#);
        string(b, from);
        b.extend_from_slice(br#","data":"#);
        b.extend_from_slice(data.as_bytes());
        b.push(b'}');
        self.finish()
    }

    pub fn join(&mut self, m: &MemberView) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"join","member":"#);
        member(b, m);
        b.push(b'}');
        self.finish()
    }

    pub fn leave(&mut self, member_id: &str) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"leave","member":"#);
        string(b, member_id);
        b.push(b'}');
        self.finish()
    }

    /// `notes`: the sealed notes, a JSON array as `notes_json` writes it.
    pub fn completed(&mut self, by: &str, notes: &str) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"completed","by":"#);
        string(b, by);
        b.extend_from_slice(br#","notes":"#);
        b.extend_from_slice(notes.as_bytes());
        b.push(b'}');
        self.finish()
    }

    pub fn saved(&mut self, v: u64) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"saved","v":"#);
        number(b, v);
        b.push(b'}');
        self.finish()
    }

    /// A message already encoded as JSON elsewhere (relayed by another node).
    pub fn raw(&mut self, json: &str) -> &[u8] {
        self.begin().extend_from_slice(json.as_bytes());
        self.finish()
    }

    pub fn pong(&mut self) -> &[u8] {
        self.begin().extend_from_slice(br#"{"type":"pong"}"#);
        self.finish()
    }

    pub fn error(&mut self, refusal: &Refusal) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"error","code":""#);
        b.extend_from_slice(refusal.code.as_str().as_bytes());
        b.extend_from_slice(br#"","message":"#);
        string(b, &refusal.message);
        if let Some(reference) = &refusal.reference {
            b.extend_from_slice(br#","ref":"#);
            b.extend_from_slice(reference.as_bytes());
        }
        b.push(b'}');
        self.finish()
    }
}

/// Notes as a JSON array, as snapshots list them.
pub fn notes_json<'a>(notes: impl Iterator<Item = NoteView<'a>>) -> String {
    let mut b = Vec::new();
    notes_array(&mut b, notes);
    String::from_utf8(b).expect("JSON is UTF-8")
}

/// A paper as one JSON document, `{"paper","completed","notes"}`: the body of
/// `GET /papers/{paper}` and the snapshot a completed paper is handed over as
/// (PROTOCOL.md 1 and 4).
pub fn paper_document<'a>(paper: &PaperView, notes: impl Iterator<Item = NoteView<'a>>) -> String {
    let mut b = document_start(paper.id);
    body(&mut b, paper, notes);
    b.extend_from_slice(DOCUMENT_END);
    String::from_utf8(b).expect("JSON is UTF-8")
}

/// What every full snapshot of a paper version and its `GET /papers` document
/// have in common, `,"completed":..,"meta":{..},"notes":[..]`: encoded once and
/// shared by all of them.
pub fn paper_body<'a>(paper: &PaperView, notes: impl Iterator<Item = NoteView<'a>>) -> Vec<u8> {
    let mut b = Vec::new();
    body(&mut b, paper, notes);
    b
}

/// The start of a paper's document before its shared body: `{"paper":P`.
pub fn document_start(paper_id: &str) -> Vec<u8> {
    let mut b = br#"{"paper":"#.to_vec();
    string(&mut b, paper_id);
    b
}

/// The end of a paper's document after its shared body.
pub const DOCUMENT_END: &[u8] = b"}";

/// A joiner's end of a full snapshot after the shared body: `,"members":[..]}`.
pub fn snapshot_end<'a>(members: impl Iterator<Item = MemberView<'a>>) -> Vec<u8> {
    let mut b = Vec::new();
    members_end(&mut b, members);
    b
}

fn body<'a>(b: &mut Vec<u8>, paper: &PaperView, notes: impl Iterator<Item = NoteView<'a>>) {
    b.extend_from_slice(if paper.completed { br#","completed":true"# } else { br#","completed":false"# });
    cover(b, paper);
    b.extend_from_slice(br#","notes":"#);
    notes_array(b, notes);
}

fn members_end<'a>(b: &mut Vec<u8>, members: impl Iterator<Item = MemberView<'a>>) {
    b.extend_from_slice(br#","members":["#);
    for (i, m) in members.enumerate() {
        if i > 0 {
            b.push(b',');
        }
        member(b, &m);
    }
    b.extend_from_slice(b"]}");
}

/// `,"meta":{"data","v"}`: the paper's cover (1.1).
fn cover(b: &mut Vec<u8>, paper: &PaperView) {
    b.extend_from_slice(br#","meta":{"data":"#);
    b.extend_from_slice(paper.cover_data.as_bytes());
    b.extend_from_slice(br#","v":"#);
    number(b, paper.cover_v);
    b.push(b'}');
}

fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn notes_array<'a>(b: &mut Vec<u8>, notes: impl Iterator<Item = NoteView<'a>>) {
    b.push(b'[');
    for (i, n) in notes.enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(br#"{"id":"#);
        string(b, n.id);
        b.extend_from_slice(br#","author":"#);
        string(b, n.author);
        b.extend_from_slice(br#","data":"#);
        b.extend_from_slice(n.data.as_bytes());
        b.extend_from_slice(br#","v":"#);
        number(b, n.v);
        b.push(b'}');
    }
    b.push(b']');
}

fn member(b: &mut Vec<u8>, m: &MemberView) {
    b.extend_from_slice(br#"{"id":"#);
    string(b, m.id);
    b.extend_from_slice(br#","user":"#);
    string(b, m.user);
    b.extend_from_slice(br#","name":"#);
    string(b, m.name);
    b.push(b'}');
}

fn version_from_ref(b: &mut Vec<u8>, v: u64, from: &str, reference: Option<&str>) {
    b.extend_from_slice(br#","v":"#);
    number(b, v);
    b.extend_from_slice(br#","from":"#);
    string(b, from);
    if let Some(reference) = reference {
        b.extend_from_slice(br#","ref":"#);
        b.extend_from_slice(reference.as_bytes());
    }
    b.push(b'}');
}

fn string(b: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *b, s).expect("writing to a Vec cannot fail");
}

fn number(b: &mut Vec<u8>, n: u64) {
    write!(b, "{n}").expect("writing to a Vec cannot fail");
}
