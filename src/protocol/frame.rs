//! Server messages (PROTOCOL.md 3.1) encoded once as WebSocket text frames,
//! and a paper as one JSON document (`GET /papers`, the sealed snapshot).

use std::io::Write;

use super::Refusal;

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
        let len = self.buf.len() - HEADER_ROOM;
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

    pub fn snapshot<'a>(
        &mut self,
        paper: &str,
        you: &str,
        completed: bool,
        notes: impl Iterator<Item = NoteView<'a>>,
        members: impl Iterator<Item = MemberView<'a>>,
    ) -> &[u8] {
        let b = self.begin();
        b.extend_from_slice(br#"{"type":"snapshot","paper":"#);
        string(b, paper);
        b.extend_from_slice(br#","you":"#);
        string(b, you);
        b.extend_from_slice(if completed { br#","completed":true"# } else { br#","completed":false"# });
        b.extend_from_slice(br#","notes":"#);
        notes_array(b, notes);
        b.extend_from_slice(br#","members":["#);
        for (i, m) in members.enumerate() {
            if i > 0 {
                b.push(b',');
            }
            member(b, &m);
        }
        b.extend_from_slice(b"]}");
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
pub fn paper_document<'a>(paper: &str, completed: bool, notes: impl Iterator<Item = NoteView<'a>>) -> String {
    let mut b = Vec::new();
    b.extend_from_slice(br#"{"paper":"#);
    string(&mut b, paper);
    b.extend_from_slice(if completed { br#","completed":true,"notes":"# } else { br#","completed":false,"notes":"# });
    notes_array(&mut b, notes);
    b.push(b'}');
    String::from_utf8(b).expect("JSON is UTF-8")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;
    use serde_json::{json, Value};

    fn payload_json(frame: &Frame) -> Value {
        serde_json::from_slice(frame.payload()).unwrap()
    }

    #[test]
    fn server_messages_are_the_json_of_section_3_1() {
        let mut f = Frame::new();
        f.upsert("n1", "u\"1", r#"{"text":"hi"}"#, 42, "c7", Some(r#""r1""#));
        assert_eq!(
            payload_json(&f),
            json!({"type":"upsert","id":"n1","author":"u\"1","data":{"text":"hi"},"v":42,"from":"c7","ref":"r1"})
        );
        f.delete("n1", 43, "c7", None);
        assert_eq!(payload_json(&f), json!({"type":"delete","id":"n1","v":43,"from":"c7"}));
        f.cursor("c7", r#"{"x":1}"#);
        assert_eq!(payload_json(&f), json!({"type":"cursor","from":"c7","data":{"x":1}}));
        f.join(&MemberView { id: "c7", user: "u1", name: "Kim" });
        assert_eq!(payload_json(&f), json!({"type":"join","member":{"id":"c7","user":"u1","name":"Kim"}}));
        f.leave("c7");
        assert_eq!(payload_json(&f), json!({"type":"leave","member":"c7"}));
        f.completed("u1", r#"[{"id":"n1","author":"u1","data":{},"v":4}]"#);
        assert_eq!(
            payload_json(&f),
            json!({"type":"completed","by":"u1","notes":[{"id":"n1","author":"u1","data":{},"v":4}]})
        );
        f.saved(9);
        assert_eq!(payload_json(&f), json!({"type":"saved","v":9}));
        f.pong();
        assert_eq!(payload_json(&f), json!({"type":"pong"}));
        f.error(&Refusal::from(ErrorCode::NotFound).with_ref(Some(r#""r2""#.into())));
        assert_eq!(payload_json(&f)["ref"], json!("r2"));
        assert_eq!(payload_json(&f)["code"], json!("not_found"));
        let notes = [NoteView { id: "n1", author: "u1", data: "{}", v: 1 }];
        let members = [MemberView { id: "c7", user: "u1", name: "Kim" }];
        f.snapshot("p1", "c7", false, notes.into_iter(), members.into_iter());
        assert_eq!(
            payload_json(&f),
            json!({"type":"snapshot","paper":"p1","you":"c7","completed":false,
                   "notes":[{"id":"n1","author":"u1","data":{},"v":1}],
                   "members":[{"id":"c7","user":"u1","name":"Kim"}]})
        );
    }

    #[test]
    fn frames_match_tungstenite_for_every_header_size() {
        let mut f = Frame::new();
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let text = "x".repeat(len);
            f.cursor("c", &format!(r#"{{"t":"{text}"}}"#));
            let payload = f.payload().to_vec();
            let mut expected = Vec::new();
            tungstenite::protocol::frame::Frame::message(
                payload,
                tungstenite::protocol::frame::coding::OpCode::Data(tungstenite::protocol::frame::coding::Data::Text),
                true,
            )
            .format(&mut expected)
            .unwrap();
            assert_eq!(f.bytes(), &expected[..], "payload of {len}");
        }
    }

    #[test]
    fn paper_documents_list_live_notes() {
        let done = paper_document("p1", true, [NoteView { id: "n", author: "a", data: "{}", v: 3 }].into_iter());
        assert_eq!(
            serde_json::from_str::<Value>(&done).unwrap(),
            json!({"paper":"p1","completed":true,"notes":[{"id":"n","author":"a","data":{},"v":3}]})
        );
    }
}
