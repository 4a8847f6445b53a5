//! The backend API's wire format (PROTOCOL.md section 7, 1.2): its routes, who
//! may call them, the request bodies, and the JSON answers. Knows nothing of
//! sockets or papers; the server's `api` module carries the calls out.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{Denied, Role, Verifier};
use crate::conn::http::Reply;
use crate::protocol::{is_valid_id, ErrorCode};

/// The OpenAPI 3.1 document of the routes below, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("web/openapi.json");

/// `author` of a note created through the API without one.
pub const DEFAULT_AUTHOR: &str = "service";
/// `from` of what an API write broadcasts.
pub const FROM: &str = "api";
/// The latest `until` a revocation may name: the last second of the year 9999
/// (Redis keeps expiries as 64-bit milliseconds; a later time is a mistake).
const MAX_UNTIL: u64 = 253_402_300_799;
/// Longest `author` or revoked `user`, in characters (as `user` from a query).
const MAX_USER_CHARS: usize = 128;

/// The route a request head names; its body is read next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PutNote,
    PatchNote,
    DeleteNote,
    PutMeta,
    Complete,
    Erase,
    Revoke,
    Presence,
}

impl Kind {
    /// The route's name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::PutNote => "put_note",
            Kind::PatchNote => "patch_note",
            Kind::DeleteNote => "delete_note",
            Kind::PutMeta => "put_meta",
            Kind::Complete => "complete",
            Kind::Erase => "erase",
            Kind::Revoke => "revoke",
            Kind::Presence => "presence",
        }
    }

    pub const ALL: [Kind; 8] = [
        Kind::PutNote,
        Kind::PatchNote,
        Kind::DeleteNote,
        Kind::PutMeta,
        Kind::Complete,
        Kind::Erase,
        Kind::Revoke,
        Kind::Presence,
    ];
}

/// An authorized API request whose head is read: `body_len` bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub kind: Kind,
    pub paper: String,
    /// The note of the note routes.
    pub note: Option<String>,
    pub body_len: usize,
    /// The client waits for `100 Continue` before it sends the body.
    pub expects_continue: bool,
}

/// A call of the API, its body read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `data` is compact JSON text of an object.
    PutNote {
        id: String,
        data: String,
        author: Arc<str>,
    },
    PatchNote {
        id: String,
        data: String,
    },
    DeleteNote {
        id: String,
    },
    PutMeta {
        data: String,
    },
    Complete,
    Erase,
    /// `until`: unix seconds, or `None` for now plus `--revoke-retention`.
    Revoke {
        user: Arc<str>,
        until: Option<u64>,
    },
    Presence,
}

impl Action {
    pub fn kind(&self) -> Kind {
        match self {
            Action::PutNote { .. } => Kind::PutNote,
            Action::PatchNote { .. } => Kind::PatchNote,
            Action::DeleteNote { .. } => Kind::DeleteNote,
            Action::PutMeta { .. } => Kind::PutMeta,
            Action::Complete => Kind::Complete,
            Action::Erase => Kind::Erase,
            Action::Revoke { .. } => Kind::Revoke,
            Action::Presence => Kind::Presence,
        }
    }

    /// Whether the call changes the paper's notes or cover: it needs the paper
    /// in memory, as a member's edit does.
    pub fn edits(&self) -> bool {
        matches!(
            self,
            Action::PutNote { .. } | Action::PatchNote { .. } | Action::DeleteNote { .. } | Action::PutMeta { .. }
        )
    }
}

/// Who may call the API (PROTOCOL.md 7): the key, or a `service` token of the paper.
pub struct Keys<'a> {
    pub api_key: &'a str,
    pub verifier: Option<&'a Verifier>,
}

/// Routes `/api/papers/{rest}` for `method`; `None` for a path or method that is
/// not a route (404).
pub fn route<'a>(method: &str, rest: &'a str) -> Option<(Kind, &'a str, Option<&'a str>)> {
    let mut parts = rest.split('/');
    let paper = parts.next()?;
    let kind = match (method, parts.next(), parts.next(), parts.next()) {
        ("DELETE", None, ..) => (Kind::Erase, None),
        ("PUT", Some("meta"), None, _) => (Kind::PutMeta, None),
        ("POST", Some("complete"), None, _) => (Kind::Complete, None),
        ("POST", Some("revoke"), None, _) => (Kind::Revoke, None),
        ("GET", Some("presence"), None, _) => (Kind::Presence, None),
        ("PUT", Some("notes"), Some(id), None) => (Kind::PutNote, Some(id)),
        ("PATCH", Some("notes"), Some(id), None) => (Kind::PatchNote, Some(id)),
        ("DELETE", Some("notes"), Some(id), None) => (Kind::DeleteNote, Some(id)),
        _ => return None,
    };
    Some((kind.0, paper, kind.1))
}

/// Checks the ids, then the caller (PROTOCOL.md 7's order: 400, then 401/403).
///
/// # Errors
/// The refusal to answer with.
pub fn admit(paper: &str, note: Option<&str>, authorization: Option<&str>, keys: &Keys) -> Result<(), Reply> {
    if !is_valid_id(paper) {
        return Err(error(400, "invalid_message", "paper id must match ^[A-Za-z0-9_-]{1,64}$"));
    }
    if note.is_some_and(|id| !is_valid_id(id)) {
        return Err(error(400, "invalid_message", "note id must match ^[A-Za-z0-9_-]{1,64}$"));
    }
    let token = authorization
        .map(str::trim)
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| error(401, "unauthorized", "send Authorization: Bearer <api key>"))?;
    if constant_time_eq(token.as_bytes(), keys.api_key.as_bytes()) {
        return Ok(());
    }
    let Some(verifier) = keys.verifier else {
        return Err(error(401, "unauthorized", "wrong API key"));
    };
    match verifier.verify(token) {
        Ok(grant) if grant.role == Role::Service && grant.paper == paper => Ok(()),
        Ok(_) => Err(error(403, "forbidden", "this token does not grant the API for this paper")),
        Err(Denied::Unauthorized | Denied::Forbidden) => Err(error(401, "unauthorized", "wrong API key or token")),
    }
}

/// Compares in time that depends only on the lengths, so that the key cannot
/// be guessed byte by byte from answer times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    author: Option<&'a RawValue>,
    #[serde(default, borrow)]
    user: Option<&'a RawValue>,
    #[serde(default, borrow)]
    until: Option<&'a RawValue>,
}

/// Reads the body of a call.
///
/// # Errors
/// `400 invalid_message` for a body that is not what the route takes, `413
/// too_large` for `data` over `max_note_bytes`.
pub fn action(head: &Head, body: &[u8], max_note_bytes: usize) -> Result<Action, Reply> {
    let invalid = |message: &str| error(400, "invalid_message", message);
    let id = || head.note.clone().unwrap_or_default();
    let needs_body = matches!(head.kind, Kind::PutNote | Kind::PatchNote | Kind::PutMeta | Kind::Revoke);
    if !needs_body {
        return Ok(match head.kind {
            Kind::DeleteNote => Action::DeleteNote { id: id() },
            Kind::Complete => Action::Complete,
            Kind::Erase => Action::Erase,
            _ => Action::Presence,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| invalid("the body is not UTF-8"))?;
    let body: Body = serde_json::from_str(text).map_err(|_| invalid("the body must be a JSON object"))?;
    let data = || -> Result<String, Reply> {
        let object: serde_json::Map<String, serde_json::Value> = body
            .data
            .and_then(|d| serde_json::from_str(d.get()).ok())
            .ok_or_else(|| invalid("data must be a JSON object"))?;
        let data = serde_json::to_string(&object).map_err(|_| invalid("data must be a JSON object"))?;
        if data.len() > max_note_bytes {
            let message = format!("data is {} bytes; the limit is {max_note_bytes}", data.len());
            return Err(error(413, "too_large", &message));
        }
        Ok(data)
    };
    let user = |raw: Option<&RawValue>, what: &str| -> Result<Option<Arc<str>>, Reply> {
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_str::<String>(raw.get()) {
            Ok(user) if !user.is_empty() && user.chars().count() <= MAX_USER_CHARS => Ok(Some(Arc::from(user))),
            _ => Err(invalid(&format!("{what} must be a string of 1 to {MAX_USER_CHARS} characters"))),
        }
    };
    Ok(match head.kind {
        Kind::PutNote => {
            let author = user(body.author, "author")?.unwrap_or_else(|| Arc::from(DEFAULT_AUTHOR));
            Action::PutNote { id: id(), data: data()?, author }
        }
        Kind::PatchNote => {
            let data = data()?;
            if data == "{}" {
                return Err(invalid("data must name at least one field"));
            }
            Action::PatchNote { id: id(), data }
        }
        Kind::PutMeta => Action::PutMeta { data: data()? },
        _ => {
            let user = user(body.user, "user")?.ok_or_else(|| invalid("user is missing"))?;
            let until = match body.until {
                None => None,
                // `null` is as absent: the default.
                Some(raw) if raw.get() == "null" => None,
                Some(raw) => Some(
                    serde_json::from_str::<u64>(raw.get())
                        .ok()
                        .filter(|until| *until <= MAX_UNTIL)
                        .ok_or_else(|| invalid("until must be unix seconds, a whole number up to 253402300799"))?,
                ),
            };
            Action::Revoke { user, until }
        }
    })
}

/// A refusal: `{"code","message"}` (PROTOCOL.md 7).
pub fn error(status: u16, code: &str, message: &str) -> Reply {
    let body = serde_json::json!({"code": code, "message": message}).to_string();
    let extra_headers = if status == 503 { "Retry-After: 1\r\n" } else { "" };
    Reply { status, extra_headers, content_type: "application/json", body }
}

/// The answer to a refused edit, by its code (PROTOCOL.md 7).
pub fn refusal(code: ErrorCode) -> Reply {
    let status = match code {
        ErrorCode::InvalidJson | ErrorCode::InvalidMessage => 400,
        ErrorCode::TooLarge => 413,
        ErrorCode::Forbidden => 403,
        ErrorCode::NotFound => 404,
        ErrorCode::PaperFull | ErrorCode::PaperCompleted => 409,
        ErrorCode::RateLimited | ErrorCode::Unavailable => 503,
        ErrorCode::WriteFailed => 500,
    };
    error(status, code.as_str(), code.default_message())
}

/// `410 Gone` for an erased paper.
pub fn gone() -> Reply {
    error(410, "gone", "this paper was erased")
}

/// `504`: Redis did not answer in time; the change may still be written.
pub fn timeout() -> Reply {
    error(504, "timeout", "Redis did not answer in time; the change may still be written: retry")
}

/// `200 {"v":V}`.
pub fn written(v: u64) -> Reply {
    Reply { status: 200, extra_headers: "", content_type: "application/json", body: format!("{{\"v\":{v}}}") }
}

/// `204`, no body.
pub fn done() -> Reply {
    Reply { status: 204, extra_headers: "", content_type: "application/json", body: String::new() }
}

/// `200`, the paper's members on every node.
pub fn presence<'a>(paper: &str, members: impl Iterator<Item = crate::protocol::MemberView<'a>>) -> Reply {
    let members: Vec<serde_json::Value> =
        members.map(|m| serde_json::json!({"id": m.id, "user": m.user, "name": m.name})).collect();
    let body = serde_json::json!({"paper": paper, "members": members}).to_string();
    Reply { status: 200, extra_headers: "", content_type: "application/json", body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(route("PUT", "p1/notes/n1"), Some((Kind::PutNote, "p1", Some("n1"))));
        assert_eq!(route("PATCH", "p1/notes/n1"), Some((Kind::PatchNote, "p1", Some("n1"))));
        assert_eq!(route("DELETE", "p1/notes/n1"), Some((Kind::DeleteNote, "p1", Some("n1"))));
        assert_eq!(route("DELETE", "p1"), Some((Kind::Erase, "p1", None)));
        assert_eq!(route("PUT", "p1/meta"), Some((Kind::PutMeta, "p1", None)));
        assert_eq!(route("POST", "p1/complete"), Some((Kind::Complete, "p1", None)));
        assert_eq!(route("POST", "p1/revoke"), Some((Kind::Revoke, "p1", None)));
        assert_eq!(route("GET", "p1/presence"), Some((Kind::Presence, "p1", None)));
        assert_eq!(route("GET", "p1/notes/n1"), None);
        assert_eq!(route("PUT", "p1/notes/n1/x"), None);
        assert_eq!(route("POST", "p1"), None);
        assert_eq!(route("GET", "p1/complete"), None);
    }

    #[test]
    fn the_key_is_compared_whole() {
        let keys = Keys { api_key: "k".repeat(32).leak(), verifier: None };
        let key = format!("Bearer {}", "k".repeat(32));
        assert!(admit("p1", None, Some(&key), &keys).is_ok());
        assert_eq!(admit("p1", None, Some("Bearer kkk"), &keys).unwrap_err().status, 401);
        assert_eq!(admit("p1", None, None, &keys).unwrap_err().status, 401);
        assert_eq!(admit("p 1", None, None, &keys).unwrap_err().status, 400, "ids before the key");
        assert_eq!(admit("p1", Some("n/1"), Some(&key), &keys).unwrap_err().status, 400);
    }

    #[test]
    fn bodies_are_checked() {
        let head =
            |kind| Head { kind, paper: "p1".into(), note: Some("n1".into()), body_len: 0, expects_continue: false };
        let put = action(&head(Kind::PutNote), br#"{"data":{"b":1, "a":2}}"#, 100).unwrap();
        assert_eq!(put, Action::PutNote { id: "n1".into(), data: r#"{"a":2,"b":1}"#.into(), author: "service".into() });
        assert_eq!(action(&head(Kind::PutNote), br#"{"data":"oops"}"#, 100).unwrap_err().status, 400);
        assert_eq!(action(&head(Kind::PutNote), br#"{"data":{"a":"xxxxxxxxxx"}}"#, 10).unwrap_err().status, 413);
        assert_eq!(action(&head(Kind::PutNote), b"", 100).unwrap_err().status, 400);
        assert_eq!(action(&head(Kind::PatchNote), br#"{"data":{}}"#, 100).unwrap_err().status, 400);
        assert_eq!(action(&head(Kind::Revoke), br#"{"user":"u1","until":-1}"#, 100).unwrap_err().status, 400);
        let huge = br#"{"user":"u1","until":18446744073709551615}"#;
        assert_eq!(action(&head(Kind::Revoke), huge, 100).unwrap_err().status, 400);
        assert_eq!(
            action(&head(Kind::Revoke), br#"{"user":"u1","until":null}"#, 100).unwrap(),
            Action::Revoke { user: "u1".into(), until: None }
        );
        assert_eq!(
            action(&head(Kind::Revoke), br#"{"user":"u1","until":5}"#, 100).unwrap(),
            Action::Revoke { user: "u1".into(), until: Some(5) }
        );
        assert_eq!(action(&head(Kind::Erase), b"ignored", 100).unwrap(), Action::Erase);
    }
}
