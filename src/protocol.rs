//! The wire contract of PROTOCOL.md section 3: client messages parsed and
//! validated, server messages encoded into WebSocket text frames, refusal and
//! close codes. Knows nothing of sockets or of how papers change.

use std::borrow::Cow;
use std::io::Write;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::CloseCode;

/// The greatest version a note may have: versions stay below 2^53 so that
/// JavaScript clients read them exactly (PROTOCOL.md 2).
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// Largest `cursor` data, serialized compactly (PROTOCOL.md 3.2).
pub const MAX_CURSOR_BYTES: usize = 1024;

/// A message a client may send (PROTOCOL.md 3.2), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// `data` is the compact JSON text of an object; `reference` the raw JSON string
    /// literal (quotes included) of `ref`, echoed as given.
    Upsert {
        id: String,
        data: String,
        reference: Option<String>,
    },
    Delete {
        id: String,
        reference: Option<String>,
    },
    Cursor {
        data: String,
    },
    Complete {
        reference: Option<String>,
    },
    /// 1.1: set some top-level fields of a note's `data` (`null` removes one).
    Patch {
        id: String,
        data: String,
        reference: Option<String>,
    },
    /// 1.1: replace the paper's cover; `data` as for an upsert.
    Meta {
        data: String,
        reference: Option<String>,
    },
    Ping,
}

impl ClientMsg {
    /// The message's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMsg::Upsert { .. } => "upsert",
            ClientMsg::Delete { .. } => "delete",
            ClientMsg::Cursor { .. } => "cursor",
            ClientMsg::Complete { .. } => "complete",
            ClientMsg::Meta { .. } => "meta",
            ClientMsg::Patch { .. } => "patch",
            ClientMsg::Ping => "ping",
        }
    }
}

/// The refusal codes of PROTOCOL.md 3.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidMessage,
    TooLarge,
    Forbidden,
    PaperCompleted,
    NotFound,
    PaperFull,
    RateLimited,
    Unavailable,
    WriteFailed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::PaperCompleted => "paper_completed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PaperFull => "paper_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::WriteFailed => "write_failed",
        }
    }

    /// The human half of the `error` message.
    pub fn default_message(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "the frame is not JSON",
            ErrorCode::InvalidMessage => "unknown type, missing or ill-typed field",
            ErrorCode::TooLarge => "data is over its size limit",
            ErrorCode::Forbidden => "not allowed for this member",
            ErrorCode::PaperCompleted => "the paper is completed",
            ErrorCode::NotFound => "no such note",
            ErrorCode::PaperFull => "the paper holds its maximum of notes",
            ErrorCode::RateLimited => "too many messages; slow down",
            ErrorCode::Unavailable => "storage is unavailable; retry later",
            ErrorCode::WriteFailed => "Redis refused to store this edit; it is not saved",
        }
    }
}

/// A refused client message: what to send back in the `error` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    /// The raw JSON string literal of the refused message's `ref`, if it had one.
    pub reference: Option<String>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Refusal { code, message: message.into(), reference: None }
    }

    pub fn with_ref(mut self, reference: Option<String>) -> Self {
        self.reference = reference;
        self
    }
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Self {
        Refusal::new(code, code.default_message())
    }
}

/// Why the server ends a session; maps one to one onto PROTOCOL.md's close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1000: the client asked to close.
    Normal,
    /// 1001: the server is shutting down.
    ShuttingDown,
    /// 1001: the session was silent past the idle timeout.
    Idle,
    /// 1002: the client broke RFC 6455.
    ProtocolError,
    /// 1007: a text frame that is not UTF-8.
    InvalidUtf8,
    /// 1008: the session's token expired.
    TokenExpired,
    /// 1008: the session went on flooding after repeated `rate_limited`.
    Abuse,
    /// 1009: a message over `max_message_bytes`.
    MessageTooBig,
    /// 1011: the server failed.
    InternalError,
    /// 1013: the paper could not be read in time.
    PaperUnavailable,
    /// 1013 with the reason `paper_full`: the paper is at `max_members`.
    PaperFull,
    /// 1013: the session could not keep up with its output.
    SlowConsumer,
}

impl CloseReason {
    pub fn code(self) -> CloseCode {
        match self {
            CloseReason::Normal => CloseCode::Normal,
            CloseReason::ShuttingDown | CloseReason::Idle => CloseCode::Away,
            CloseReason::TokenExpired | CloseReason::Abuse => CloseCode::Policy,
            CloseReason::ProtocolError => CloseCode::Protocol,
            CloseReason::InvalidUtf8 => CloseCode::Invalid,
            CloseReason::MessageTooBig => CloseCode::Size,
            CloseReason::InternalError => CloseCode::Error,
            CloseReason::PaperUnavailable | CloseReason::PaperFull | CloseReason::SlowConsumer => CloseCode::Again,
        }
    }

    /// The close frame's reason text (at most 123 bytes).
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Normal => "",
            CloseReason::ShuttingDown => "server shutting down",
            CloseReason::Idle => "idle",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Abuse => "rate_limited",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::InvalidUtf8 => "invalid utf-8",
            CloseReason::MessageTooBig => "message too big",
            CloseReason::InternalError => "internal error",
            CloseReason::PaperUnavailable => "paper_unavailable",
            CloseReason::PaperFull => "paper_full",
            CloseReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// `^[A-Za-z0-9_-]{1,64}$`: paper ids and note ids.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The fields the server reads, each kept raw so that one ill-typed field still
/// lets the refusal carry the message's `ref`. Unknown fields are ignored.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(rename = "ref", default, borrow, deserialize_with = "present")]
    reference: Option<&'a RawValue>,
}

/// `Some` for any present value, `null` included (serde's `Option` would read
/// `null` as absent, and a `null` ref is a ref that is not a string).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses and validates one text frame from a client.
///
/// # Errors
/// The refusal to send back (PROTOCOL.md 3.3); the session goes on.
pub fn parse_client_msg(text: &str, max_note_bytes: usize) -> Result<ClientMsg, Refusal> {
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            Refusal::new(ErrorCode::InvalidMessage, "a message is a JSON object with a string type")
        }
        _ => Refusal::new(ErrorCode::InvalidJson, "the frame is not JSON"),
    })?;

    let reference = match envelope.reference {
        None => None,
        Some(raw) if raw.get().starts_with('"') => Some(raw.get().to_owned()),
        Some(_) => return Err(Refusal::new(ErrorCode::InvalidMessage, "ref must be a string")),
    };
    let invalid = |message: &'static str| Refusal::new(ErrorCode::InvalidMessage, message).with_ref(reference.clone());

    let kind = envelope.kind.and_then(as_string).ok_or_else(|| invalid("type must be a string"))?;
    match kind.as_ref() {
        "upsert" => {
            let id = note_id(envelope.id).ok_or_else(|| invalid("id must match ^[A-Za-z0-9_-]{1,64}$"))?;
            let data = compact_object(envelope.data).ok_or_else(|| invalid("data must be a JSON object"))?;
            if data.len() > max_note_bytes {
                let message = format!("data is {} bytes; the limit is {max_note_bytes}", data.len());
                return Err(Refusal::new(ErrorCode::TooLarge, message).with_ref(reference));
            }
            Ok(ClientMsg::Upsert { id, data, reference })
        }
        "delete" => {
            let id = note_id(envelope.id).ok_or_else(|| invalid("id must match ^[A-Za-z0-9_-]{1,64}$"))?;
            Ok(ClientMsg::Delete { id, reference })
        }
        "cursor" => {
            let data = compact_object(envelope.data).ok_or_else(|| invalid("data must be a JSON object"))?;
            if data.len() > MAX_CURSOR_BYTES {
                let message = format!("cursor data is {} bytes; the limit is {MAX_CURSOR_BYTES}", data.len());
                return Err(Refusal::new(ErrorCode::TooLarge, message).with_ref(reference));
            }
            Ok(ClientMsg::Cursor { data })
        }
        "complete" => Ok(ClientMsg::Complete { reference }),
        "patch" => {
            let id = note_id(envelope.id).ok_or_else(|| invalid("id must match ^[A-Za-z0-9_-]{1,64}$"))?;
            let data = compact_object(envelope.data).ok_or_else(|| invalid("data must be a JSON object"))?;
            if data.len() > max_note_bytes {
                let message = format!("data is {} bytes; the limit is {max_note_bytes}", data.len());
                return Err(Refusal::new(ErrorCode::TooLarge, message).with_ref(reference));
            }
            Ok(ClientMsg::Patch { id, data, reference })
        }
        "meta" => {
            let data = compact_object(envelope.data).ok_or_else(|| invalid("data must be a JSON object"))?;
            if data.len() > max_note_bytes {
                let message = format!("data is {} bytes; the limit is {max_note_bytes}", data.len());
                return Err(Refusal::new(ErrorCode::TooLarge, message).with_ref(reference));
            }
            Ok(ClientMsg::Meta { data, reference })
        }
        "ping" => Ok(ClientMsg::Ping),
        _ => Err(invalid("unknown type")),
    }
}

/// The `ref` of a message refused before it is read whole (over the rate), so
/// that its `error` still names it.
pub fn reference_of(text: &str) -> Option<String> {
    let envelope: Envelope = serde_json::from_str(text).ok()?;
    envelope.reference.filter(|raw| raw.get().starts_with('"')).map(|raw| raw.get().to_owned())
}

fn as_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Cow<str>>(raw.get()).ok()
}

fn note_id(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(as_string).filter(|id| is_valid_id(id)).map(Cow::into_owned)
}

/// The object re-serialized compactly, as `serde_json::to_vec` writes it, which is
/// how PROTOCOL.md measures `data`.
fn compact_object(raw: Option<&RawValue>) -> Option<String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw?.get()).ok()?;
    serde_json::to_string(&object).ok()
}

/// A message another node relayed (PROTOCOL.md 6): the JSON its members were
/// sent, read back for what this node must apply before passing it on.
#[derive(Debug, PartialEq, Eq)]
pub enum Relayed {
    Upsert {
        id: String,
        author: String,
        data: String,
        v: u64,
    },
    Delete {
        id: String,
        v: u64,
    },
    /// `notes`: the sealed notes as a raw JSON array (1.1; absent from older nodes).
    Completed {
        by: String,
        notes: Option<String>,
    },
    Join {
        id: String,
        user: String,
        name: String,
    },
    Leave {
        id: String,
    },
    Cursor,
    /// The sending node's resume floor for the paper (between nodes only).
    ResumeFloor {
        v: u64,
    },
    /// 1.1: the paper's cover.
    Meta {
        data: String,
        v: u64,
    },
    /// 1.1: fields of a note (`null` removes one).
    Patch {
        id: String,
        data: String,
        v: u64,
    },
}

#[derive(Deserialize)]
struct RelayedEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    v: Option<u64>,
    #[serde(default)]
    by: Option<String>,
    #[serde(default, borrow)]
    notes: Option<&'a RawValue>,
    #[serde(default, borrow)]
    member: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RelayedMember {
    id: String,
    user: String,
    name: String,
}

/// Reads a relayed message; `None` for anything this server would not have sent,
/// a version outside [1, 2^53) included (PROTOCOL.md 2, 1.1).
pub fn parse_relayed(message: &str) -> Option<Relayed> {
    let e: RelayedEnvelope = serde_json::from_str(message).ok()?;
    let v = e.v.filter(|v| (1..=MAX_VERSION).contains(v));
    Some(match e.kind.as_ref() {
        "upsert" => Relayed::Upsert {
            id: e.id.filter(|id| is_valid_id(id))?,
            author: e.author?,
            data: e.data.filter(|d| d.get().starts_with('{'))?.get().to_string(),
            v: v?,
        },
        "delete" => Relayed::Delete { id: e.id.filter(|id| is_valid_id(id))?, v: v? },
        "completed" => Relayed::Completed {
            by: e.by?,
            notes: match e.notes {
                None => None,
                Some(notes) => Some(parse_notes(notes.get()).map(|_| notes.get().to_string())?),
            },
        },
        "join" => {
            let m: RelayedMember = serde_json::from_str(e.member?.get()).ok()?;
            Relayed::Join { id: m.id, user: m.user, name: m.name }
        }
        "leave" => Relayed::Leave { id: serde_json::from_str(e.member?.get()).ok()? },
        "cursor" => Relayed::Cursor,
        "resume_floor" => Relayed::ResumeFloor { v: v? },
        "patch" => Relayed::Patch {
            id: e.id.filter(|id| is_valid_id(id))?,
            data: e.data.filter(|d| d.get().starts_with('{'))?.get().to_string(),
            v: v?,
        },
        "meta" => Relayed::Meta { data: e.data.filter(|d| d.get().starts_with('{'))?.get().to_string(), v: v? },
        _ => return None,
    })
}

/// The message that relays a paper's resume floor to the other nodes (never
/// sent to clients).
pub fn resume_floor_message(v: u64) -> String {
    format!(r#"{{"type":"resume_floor","v":{v}}}"#)
}

/// Per-field versions of a note's `data` (PROTOCOL.md 2, 1.1): the version of
/// its last upsert (`base`, which every field has unless listed) and of each
/// field a patch changed after it (a removed field keeps its version here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldVersions {
    pub base: (u64, std::sync::Arc<str>),
    pub changed: std::collections::BTreeMap<String, (u64, std::sync::Arc<str>)>,
}

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
        b.extend_from_slice(if paper.completed { br#","completed":true"# } else { br#","completed":false"# });
        cover(b, paper);
        if let Some(since) = since {
            b.extend_from_slice(br#","since":"#);
            number(b, since);
        }
        b.extend_from_slice(br#","notes":"#);
        notes_array(b, notes);
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

/// A note of a sealed paper, as `completed` lists it.
#[derive(Debug, Deserialize)]
pub struct SealedNote<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub author: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
    pub v: u64,
}

/// Reads the notes of a sealed paper (a `completed` message's `notes`); `None`
/// when one of them is not a note this server would have sent.
pub fn parse_notes(json: &str) -> Option<Vec<SealedNote<'_>>> {
    let notes: Vec<SealedNote> = serde_json::from_str(json).ok()?;
    let valid =
        |n: &SealedNote| is_valid_id(&n.id) && (1..=MAX_VERSION).contains(&n.v) && n.data.get().starts_with('{');
    notes.iter().all(valid).then_some(notes)
}

/// A paper as one JSON document, `{"paper","completed","notes"}`: the body of
/// `GET /papers/{paper}` and the snapshot a completed paper is handed over as
/// (PROTOCOL.md 1 and 4).
pub fn paper_document<'a>(paper: &PaperView, notes: impl Iterator<Item = NoteView<'a>>) -> String {
    let mut b = Vec::new();
    b.extend_from_slice(br#"{"paper":"#);
    string(&mut b, paper.id);
    b.extend_from_slice(if paper.completed { br#","completed":true"# } else { br#","completed":false"# });
    cover(&mut b, paper);
    b.extend_from_slice(br#","notes":"#);
    notes_array(&mut b, notes);
    b.push(b'}');
    String::from_utf8(b).expect("JSON is UTF-8")
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(text: &str) -> Result<ClientMsg, Refusal> {
        parse_client_msg(text, 100)
    }

    fn code(text: &str) -> ErrorCode {
        parse(text).unwrap_err().code
    }

    fn paper(id: &str, completed: bool) -> PaperView<'_> {
        PaperView { id, completed, cover_data: "{}", cover_v: 0 }
    }

    fn payload_json(frame: &Frame) -> Value {
        serde_json::from_slice(frame.payload()).unwrap()
    }

    #[test]
    fn parses_every_client_message() {
        assert_eq!(
            parse(r#"{"type":"upsert","id":"n1","data":{ "text" : "hi" },"ref":"r1","extra":[1]}"#).unwrap(),
            ClientMsg::Upsert { id: "n1".into(), data: r#"{"text":"hi"}"#.into(), reference: Some(r#""r1""#.into()) }
        );
        assert_eq!(
            parse(r#"{"type":"delete","id":"n_1-x"}"#).unwrap(),
            ClientMsg::Delete { id: "n_1-x".into(), reference: None }
        );
        assert_eq!(
            parse(r#"{"type":"cursor","data":{"x":1}}"#).unwrap(),
            ClientMsg::Cursor { data: r#"{"x":1}"#.into() }
        );
        assert_eq!(parse(r#"{"type":"complete"}"#).unwrap(), ClientMsg::Complete { reference: None });
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientMsg::Ping);
    }

    #[test]
    fn refuses_with_the_codes_of_section_3_3() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"type":"upsert""#), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"id":"n1"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"shout"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"upsert","id":"n 1","data":{}}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"upsert","id":"n1","data":[1]}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"upsert","id":"n1"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"delete","id":5}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"ping","ref":5}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"ping","ref":null}"#), ErrorCode::InvalidMessage);
        let id65 = "a".repeat(65);
        assert_eq!(code(&format!(r#"{{"type":"delete","id":"{id65}"}}"#)), ErrorCode::InvalidMessage);
    }

    #[test]
    fn refusals_carry_the_ref() {
        let refusal = parse(r#"{"type":"upsert","id":"bad id","data":{},"ref":"r9"}"#).unwrap_err();
        assert_eq!(refusal.reference.as_deref(), Some(r#""r9""#));
        let refusal = parse(r#"{"type":"nope","ref":"r\"q"}"#).unwrap_err();
        assert_eq!(refusal.reference.as_deref(), Some(r#""r\"q""#));
    }

    #[test]
    fn note_size_is_measured_compactly_at_and_past_the_limit() {
        // {"t":"…"} is 8 bytes plus the text.
        let at = format!(r#"{{"type":"upsert","id":"n","data":{{ "t" : "{}" }}}}"#, "x".repeat(92));
        assert!(parse(&at).is_ok());
        let past = format!(r#"{{"type":"upsert","id":"n","data":{{"t":"{}"}}}}"#, "x".repeat(93));
        assert_eq!(code(&past), ErrorCode::TooLarge);
        let cursor = format!(r#"{{"type":"cursor","data":{{"t":"{}"}}}}"#, "x".repeat(1017));
        assert_eq!(code(&cursor), ErrorCode::TooLarge);
        let cursor = format!(r#"{{"type":"cursor","data":{{"t":"{}"}}}}"#, "x".repeat(1016));
        assert!(parse(&cursor).is_ok());
    }

    #[test]
    fn ids_follow_the_pattern() {
        assert!(is_valid_id("A-z_09"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id("p%31"));
        assert!(!is_valid_id("é"));
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
        f.snapshot(&paper("p1", false), "c7", notes.into_iter(), members.into_iter());
        assert_eq!(
            payload_json(&f),
            json!({"type":"snapshot","paper":"p1","you":"c7","completed":false,"meta":{"data":{},"v":0},
                   "notes":[{"id":"n1","author":"u1","data":{},"v":1}],
                   "members":[{"id":"c7","user":"u1","name":"Kim"}]})
        );
    }

    #[test]
    fn relayed_messages_read_back_what_was_sent() {
        let mut f = Frame::new();
        let text = |f: &Frame| std::str::from_utf8(f.payload()).unwrap().to_string();
        f.upsert("n1", "u1", r#"{"t":1}"#, 42, "c7", Some(r#""r""#));
        let expected = Relayed::Upsert { id: "n1".into(), author: "u1".into(), data: r#"{"t":1}"#.into(), v: 42 };
        assert_eq!(parse_relayed(&text(&f)), Some(expected));
        f.delete("n1", 43, "c7", None);
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Delete { id: "n1".into(), v: 43 }));
        f.join(&MemberView { id: "c7", user: "u", name: "N" });
        let join = Relayed::Join { id: "c7".into(), user: "u".into(), name: "N".into() };
        assert_eq!(parse_relayed(&text(&f)), Some(join));
        f.leave("c7");
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Leave { id: "c7".into() }));
        f.completed("u", "[]");
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Completed { by: "u".into(), notes: Some("[]".into()) }));
        let far = r#"{"type":"upsert","id":"n1","author":"a","data":{},"v":18446744073709551615}"#;
        assert_eq!(parse_relayed(far), None, "a version past 2^53 is corrupt");
        let at_limit = r#"{"type":"delete","id":"n1","v":9007199254740992}"#;
        assert_eq!(parse_relayed(at_limit), None);
        f.cursor("c7", "{}");
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Cursor));
        assert_eq!(parse_relayed(r#"{"type":"upsert","id":"bad id","author":"a","data":{},"v":1}"#), None);
        assert_eq!(parse_relayed("nonsense"), None);
        f.raw(r#"{"type":"pong"}"#);
        assert_eq!(f.payload(), br#"{"type":"pong"}"#);
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
    fn since_snapshots_list_deleted_notes() {
        let mut f = Frame::new();
        let notes = [NoteView { id: "n1", author: "u1", data: "{}", v: 7 }];
        let members = [MemberView { id: "c7", user: "u1", name: "Kim" }];
        let p1 = PaperView { id: "p1", completed: false, cover_data: r#"{"title":"Hi"}"#, cover_v: 4 };
        f.snapshot_since(&p1, "c7", Some(5), notes.into_iter(), [("n2", 8)].into_iter(), members.into_iter());
        assert_eq!(
            payload_json(&f),
            json!({"type":"snapshot","paper":"p1","you":"c7","completed":false,
                   "meta":{"data":{"title":"Hi"},"v":4},"since":5,
                   "notes":[{"id":"n1","author":"u1","data":{},"v":7},{"id":"n2","deleted":true,"v":8}],
                   "members":[{"id":"c7","user":"u1","name":"Kim"}]})
        );
        f.snapshot_since(&p1, "c7", Some(5), std::iter::empty(), [("n2", 8)].into_iter(), std::iter::empty());
        assert_eq!(payload_json(&f)["notes"], json!([{"id":"n2","deleted":true,"v":8}]));
    }

    #[test]
    fn paper_documents_list_live_notes() {
        let done =
            paper_document(&paper("p1", true), [NoteView { id: "n", author: "a", data: "{}", v: 3 }].into_iter());
        assert_eq!(
            serde_json::from_str::<Value>(&done).unwrap(),
            json!({"paper":"p1","completed":true,"meta":{"data":{},"v":0},"notes":[{"id":"n","author":"a","data":{},"v":3}]})
        );
    }
}
