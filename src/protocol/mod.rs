//! The wire contract of PROTOCOL.md section 3: client messages parsed and
//! validated, server messages encoded into WebSocket text frames, refusal and
//! close codes. Knows nothing of sockets or of how papers change.

mod frame;
mod relayed;

pub use frame::{
    document_start, notes_json, paper_body, paper_document, snapshot_end, Frame, MemberView, NoteView, PaperView,
    DOCUMENT_END,
};
pub use relayed::{
    erased_message, parse_notes, parse_relayed, resume_floor_message, revoked_message, Relayed, SealedNote,
};

use std::borrow::Cow;

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
    /// 1013 with the reason `server_busy`: the node writes as many snapshot bytes
    /// as it may (`--max-snapshot-bytes-in-flight`); a joiner retries later.
    Busy,
    /// 4403 (1.2): the main backend revoked this user's access to the paper.
    Revoked,
    /// 4410 (1.2): the main backend erased the paper.
    Erased,
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
            CloseReason::PaperUnavailable | CloseReason::PaperFull | CloseReason::SlowConsumer | CloseReason::Busy => {
                CloseCode::Again
            }
            CloseReason::Revoked => CloseCode::Library(4403),
            CloseReason::Erased => CloseCode::Library(4410),
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
            CloseReason::Busy => "server_busy",
            CloseReason::Revoked => "revoked",
            CloseReason::Erased => "erased",
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
            // A patch sets the fields it names: one that names none is a mistake,
            // never an edit to retry.
            if &*data == "{}" {
                return Err(invalid("data must name at least one field"));
            }
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

/// Per-field versions of a note's `data` (PROTOCOL.md 2, 1.1): the version of
/// its last upsert (`base`, which every field has unless listed) and of each
/// field a patch changed after it (a removed field keeps its version here while
/// it is among the newest removals). 1.2: `floor`, the greatest version of a
/// removed field whose version was dropped: a field the note does not have is
/// taken to be at `floor` when it is above `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldVersions {
    pub base: (u64, std::sync::Arc<str>),
    pub changed: std::collections::BTreeMap<String, (u64, std::sync::Arc<str>)>,
    pub floor: Option<(u64, std::sync::Arc<str>)>,
}

#[cfg(test)]
mod tests;
