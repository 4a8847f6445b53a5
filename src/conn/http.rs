//! The HTTP side of a connection (PROTOCOL.md section 1): the request is parsed
//! with httparse, routed, checked in the protocol's order, and either answered
//! with a plain reply or accepted as a WebSocket upgrade.

use std::fmt::Write as _;

use crate::protocol::is_valid_id;

/// Largest request head a client may send before the upgrade.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// The rolling-paper page served at `/`: the reference client, in one file.
const PAGE: &str = include_str!("../web/index.html");
/// Headers a request may carry.
const MAX_HEADERS: usize = 48;
/// Longest `user` or `name` kept from the query; longer ones are cut.
const MAX_NAME_CHARS: usize = 128;

/// What a request asks for, once its head is complete.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket session on a paper.
    Upgrade(Upgrade),
    /// Everything answered right away on this connection.
    Reply(Reply),
}

/// An accepted upgrade request for `/ws/{paper}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub paper: String,
    /// `Sec-WebSocket-Key`, for the accept header.
    pub key: String,
    /// `user` and `name` from the query (auth off).
    pub user: Option<String>,
    pub name: Option<String>,
}

/// A plain HTTP answer; the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub extra_headers: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: &str) -> Reply {
        Reply { status, extra_headers: "", content_type: "text/plain; charset=utf-8", body: format!("{body}\n") }
    }

    /// The whole response, head and body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = String::with_capacity(160 + self.body.len());
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.extra_headers,
        );
        head.push_str(&self.body);
        head.into_bytes()
    }
}

/// The outcome of reading the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// The head is complete and takes `len` bytes; what follows belongs to the
    /// WebSocket session.
    Complete { len: usize, route: Route },
}

/// Reads a request head.
///
/// # Errors
/// The reply for a request that cannot be read (400) or is too large (431).
pub fn parse(buf: &[u8]) -> Result<Parsed, Reply> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Parsed::Complete { len, route: route(&req) }),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            Err(Reply::text(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => Err(Reply::text(431, "too many headers")),
        Err(_) => Err(Reply::text(400, "malformed HTTP request")),
    }
}

fn route(req: &httparse::Request) -> Route {
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let get = req.method == Some("GET");
    match path {
        "/healthz" if get => Route::Reply(Reply::text(200, "ok")),
        "/" if get => Route::Reply(Reply {
            status: 200,
            extra_headers: "",
            content_type: "text/html; charset=utf-8",
            body: PAGE.to_string(),
        }),
        _ if get && path.starts_with("/ws/") && !path[4..].contains('/') => upgrade(req, &path[4..], query),
        _ => Route::Reply(Reply::text(404, "not found")),
    }
}

/// Checks an upgrade request in the order of PROTOCOL.md section 1.
fn upgrade(req: &httparse::Request, paper: &str, query: &str) -> Route {
    // The path is matched as sent: `%` is not an id character, so an encoded id
    // is refused rather than decoded.
    if !is_valid_id(paper) {
        return Route::Reply(Reply::text(400, "paper id must match ^[A-Za-z0-9_-]{1,64}$"));
    }
    let header = |name: &str| {
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Route::Reply(Reply {
            extra_headers: "Upgrade: websocket\r\n",
            ..Reply::text(426, "this endpoint speaks WebSocket only: send an Upgrade: websocket request")
        });
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Route::Reply(Reply {
            extra_headers: "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            ..Reply::text(426, "unsupported WebSocket version; use 13")
        });
    }
    let key = match header("sec-websocket-key").map(str::trim) {
        // 16 random bytes in base64.
        Some(key) if key.len() == 24 && key.ends_with("==") => key.to_string(),
        _ => return Route::Reply(Reply::text(400, "missing or malformed Sec-WebSocket-Key")),
    };
    let mut user = None;
    let mut name = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "user" if !v.is_empty() => user = Some(cut(&v)),
            "name" if !v.is_empty() => name = Some(cut(&v)),
            _ => {}
        }
    }
    Route::Upgrade(Upgrade { paper: paper.to_string(), key, user, name })
}

fn cut(s: &str) -> String {
    s.chars().take(MAX_NAME_CHARS).collect()
}

/// The `101` answer that opens the WebSocket session.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )
    .into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn get(path: &str, headers: &str) -> Result<Parsed, Reply> {
        parse(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes())
    }

    fn ws(path: &str) -> Result<Parsed, Reply> {
        get(
            path,
            &format!("Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"),
        )
    }

    fn status(parsed: Result<Parsed, Reply>) -> u16 {
        match parsed {
            Ok(Parsed::Complete { route: Route::Reply(reply), .. }) => reply.status,
            Ok(Parsed::Complete { route: Route::Upgrade(_), .. }) => 101,
            Ok(Parsed::Partial) => 0,
            Err(reply) => reply.status,
        }
    }

    #[test]
    fn routes_in_the_protocols_order() {
        assert_eq!(status(get("/healthz", "")), 200);
        assert_eq!(status(ws("/ws/p1")), 101);
        assert_eq!(status(ws("/ws/p1/extra")), 404);
        assert_eq!(status(ws("/nope")), 404);
        assert_eq!(status(ws("/ws/")), 400);
        assert_eq!(status(ws("/ws/p%31")), 400);
        assert_eq!(status(ws(&format!("/ws/{}", "a".repeat(65)))), 400);
        assert_eq!(status(get("/ws/p1", "")), 426);
        assert_eq!(status(get("/ws/bad%20id", "")), 400, "paper id before upgrade");
        assert_eq!(
            status(get("/ws/p1", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n")),
            426
        );
        assert_eq!(
            status(get("/ws/p1", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n")),
            400
        );
        assert_eq!(status(parse(b"POST /healthz HTTP/1.1\r\n\r\n")), 404);
    }

    #[test]
    fn the_426_says_how_to_upgrade() {
        let Ok(Parsed::Complete { route: Route::Reply(reply), .. }) = get("/ws/p1", "") else { panic!() };
        let text = String::from_utf8(reply.to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("\r\nUpgrade: websocket\r\n"));
        assert_eq!(text.split("\r\n\r\n").nth(1).unwrap().lines().count(), 1);
    }

    #[test]
    fn query_gives_user_and_name_decoded() {
        let Ok(Parsed::Complete { route: Route::Upgrade(up), .. }) = ws("/ws/p1?user=u%201&name=Kim+L&x=1") else {
            panic!()
        };
        assert_eq!(up.paper, "p1");
        assert_eq!(up.user.as_deref(), Some("u 1"));
        assert_eq!(up.name.as_deref(), Some("Kim L"));
        assert_eq!(up.key, KEY);
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(parse(b"GET /healthz HTTP/1.1\r\nHost"), Ok(Parsed::Partial));
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(status(parse(huge.as_bytes())), 431);
        assert_eq!(status(parse(b"\x00\x01garbage\r\n\r\n")), 400);
    }

    #[test]
    fn accept_key_is_rfc_6455s() {
        let text = String::from_utf8(switching_protocols(KEY)).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
