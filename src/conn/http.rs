//! The HTTP side of a connection (PROTOCOL.md section 1): the request is parsed
//! with httparse, routed, checked in the protocol's order, and either answered
//! with a plain reply or accepted as a WebSocket upgrade.

use std::fmt::Write as _;

use crate::auth::{Denied, Role, Verifier};
use crate::protocol::is_valid_id;

/// Largest request head a client may send before the upgrade.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// The rolling-paper page served at `/`: the reference client, in one file.
const PAGE: &str = include_str!("../web/index.html");
/// The page's protocol client, an ES module front ends may use too, and its types.
const CLIENT: &str = include_str!("../web/rollingpaper-client.js");
const CLIENT_TYPES: &str = include_str!("../web/rollingpaper-client.d.ts");
/// Lets pages of any origin read a public file (CORS).
const ANY_ORIGIN: &str = "Access-Control-Allow-Origin: *\r\n";
/// Headers a request may carry.
const MAX_HEADERS: usize = 48;
/// Longest `user` or `name` kept from the query; longer ones are cut.
const MAX_NAME_CHARS: usize = 128;

/// What the server checks before it answers: tokens and origins.
#[derive(Default)]
pub struct Policy {
    /// Set when auth is on (`--jwt-secret`).
    pub verifier: Option<Verifier>,
    /// Origins allowed to open sessions; empty allows all.
    pub allowed_origins: Vec<String>,
    /// Serve `/echo` (`--echo`).
    pub echo: bool,
    /// The backend API's key (`--api-key`, 1.2); without one, `/api` is 404.
    pub api_key: Option<String>,
    /// The largest API request body (`--max-message-bytes`).
    pub max_body: usize,
    /// `--internal-listen` is set: `/api`, `/metrics` and `/readyz` are served
    /// on that listener only (PROTOCOL.md 7).
    pub internal_listener: bool,
}

/// What a request asks for, once its head is complete.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket session on a paper, past every check but the node's capacity.
    Upgrade(Upgrade),
    /// `GET /papers/{paper}`, authorized: the snapshot as JSON.
    ReadPaper(String),
    /// `GET /readyz`.
    Ready,
    /// `GET /metrics`.
    Metrics,
    /// `GET /echo` with `--echo`: a WebSocket that sends back what it receives;
    /// carries the `Sec-WebSocket-Key`.
    Echo(String),
    /// 1.2: a backend API call (PROTOCOL.md 7), authorized; its body follows.
    Api(crate::api::Head),
    /// Everything answered right away, from the request alone.
    Reply(Reply),
}

/// An accepted upgrade request for `/ws/{paper}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub paper: String,
    /// `Sec-WebSocket-Key`, for the accept header.
    pub key: String,
    /// Who the client is: the token's `sub` with auth on, else `user` from the
    /// query (`None`: the session id).
    pub user: Option<String>,
    pub name: Option<String>,
    pub role: Role,
    /// The token's expiry (seconds since the epoch), with auth on.
    pub expires: Option<u64>,
    /// `?since=V`: the greatest version the client saw, to resume from
    /// (PROTOCOL.md 3.1, 1.1); a value that is not a version is ignored.
    pub since: Option<u64>,
    /// `X-Forwarded-For`, believed only from a trusted proxy.
    pub forwarded_for: Option<String>,
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
        let mut bytes = head(self.status, self.content_type, self.extra_headers, self.body.len()).into_bytes();
        bytes.reserve_exact(self.body.len());
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// A response head for a body of `content_length` bytes; the connection closes after it.
pub fn head(status: u16, content_type: &str, extra_headers: &str, content_length: usize) -> String {
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
        status,
        reason(status),
        content_type,
        content_length,
        extra_headers,
    );
    head
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

/// Where a request came in: the main port, or the internal listener
/// (`--internal-listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Internal,
}

/// Reads a request head.
///
/// # Errors
/// The reply for a request that cannot be read (400) or is too large (431).
pub fn parse(buf: &[u8], policy: &Policy, listener: Listener) -> Result<Parsed, Reply> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let mut route = route(&req, policy, listener);
            // A HEAD is answered as its GET, but never upgrades: what a GET that
            // passed every check gets short of 101 is the upgrade's own refusal.
            if req.method == Some("HEAD") && matches!(route, Route::Upgrade(_) | Route::Echo(_)) {
                route = Route::Reply(Reply {
                    extra_headers: "Upgrade: websocket\r\n",
                    ..Reply::text(426, "a HEAD request cannot upgrade; send GET with Upgrade: websocket")
                });
            }
            Ok(Parsed::Complete { len, route })
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            Err(Reply::text(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => Err(Reply::text(431, "too many headers")),
        Err(_) => Err(Reply::text(400, "malformed HTTP request")),
    }
}

/// Whether a request is a `HEAD`: answered as its `GET`, without the body
/// (PROTOCOL.md 1, 1.2).
pub fn is_head(buf: &[u8]) -> bool {
    buf.starts_with(b"HEAD ")
}

fn route(req: &httparse::Request, policy: &Policy, listener: Listener) -> Route {
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let method = match req.method {
        Some("HEAD") => "GET",
        method => method.unwrap_or(""),
    };
    let get = method == "GET";
    // With an internal listener, what is for operators is served there only,
    // and the internal listener serves nothing else.
    let internal_only = path.starts_with("/api/") || path == "/metrics" || path == "/readyz";
    let here = match listener {
        Listener::Internal => internal_only || path == "/healthz",
        Listener::Public => !(policy.internal_listener && internal_only),
    };
    if !here {
        return Route::Reply(Reply::text(404, "not found"));
    }
    if let Some(rest) = path.strip_prefix("/api/") {
        return api(req, method, rest, policy);
    }
    match path {
        // The body is exactly `ok` (PROTOCOL.md 1), for probes that compare it.
        "/healthz" if get => Route::Reply(Reply { body: "ok".to_string(), ..Reply::text(200, "") }),
        "/readyz" if get => Route::Ready,
        "/metrics" if get => Route::Metrics,
        "/echo" if get && policy.echo => match websocket_key(req) {
            Ok(key) => Route::Echo(key),
            Err(reply) => Route::Reply(reply),
        },
        "/" if get => Route::Reply(page(PAGE, "text/html; charset=utf-8")),
        // Front ends on other origins import the module from here: it is public.
        "/client.js" if get => {
            Route::Reply(Reply { extra_headers: ANY_ORIGIN, ..page(CLIENT, "text/javascript; charset=utf-8") })
        }
        "/client.d.ts" if get => {
            Route::Reply(Reply { extra_headers: ANY_ORIGIN, ..page(CLIENT_TYPES, "text/plain; charset=utf-8") })
        }
        _ if get && path.starts_with("/ws/") && !path[4..].contains('/') => upgrade(req, &path[4..], query, policy),
        _ if get && path.starts_with("/papers/") && !path[8..].contains('/') => read_paper(req, &path[8..], policy),
        _ => Route::Reply(Reply::text(404, "not found")),
    }
}

/// `/api/...` (PROTOCOL.md 7): 404 until a key is configured, then the route,
/// the ids, the caller, the body's size.
fn api(req: &httparse::Request, method: &str, rest: &str, policy: &Policy) -> Route {
    let Some(api_key) = &policy.api_key else { return Route::Reply(Reply::text(404, "not found")) };
    if rest == "openapi.json" && method == "GET" {
        return Route::Reply(page(crate::api::OPENAPI, "application/json"));
    }
    let Some((kind, paper, note)) = rest.strip_prefix("papers/").and_then(|rest| crate::api::route(method, rest))
    else {
        return Route::Reply(crate::api::error(404, "not_found", "no such route; see GET /api/openapi.json"));
    };
    let keys = crate::api::Keys { api_key, verifier: policy.verifier.as_ref() };
    if let Err(reply) = crate::api::admit(paper, note, header(req, "authorization"), &keys) {
        return Route::Reply(reply);
    }
    if header(req, "transfer-encoding").is_some() {
        let message = "send the body with a Content-Length, not chunked";
        return Route::Reply(crate::api::error(400, "invalid_message", message));
    }
    let body_len = match header(req, "content-length").map(|v| v.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(len)) => len,
        Some(Err(_)) => return Route::Reply(crate::api::error(400, "invalid_message", "bad Content-Length")),
    };
    if body_len > policy.max_body {
        let message = format!("the body is {body_len} bytes; the limit is {}", policy.max_body);
        return Route::Reply(crate::api::error(413, "too_large", &message));
    }
    let expects_continue = header(req, "expect").is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    Route::Api(crate::api::Head {
        kind,
        paper: paper.to_string(),
        note: note.map(str::to_string),
        body_len,
        expects_continue,
    })
}

/// A static file of the page, `200` (never cached, as every reply: `Reply::to_bytes`).
fn page(body: &str, content_type: &'static str) -> Reply {
    Reply { status: 200, extra_headers: "", content_type, body: body.to_string() }
}

fn header<'a>(req: &'a httparse::Request, name: &str) -> Option<&'a str> {
    req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
}

fn bad_paper_id() -> Route {
    Route::Reply(Reply::text(400, "paper id must match ^[A-Za-z0-9_-]{1,64}$"))
}

fn denied(denied: Denied) -> Route {
    Route::Reply(match denied {
        Denied::Unauthorized => Reply::text(401, "missing, invalid or expired token"),
        Denied::Forbidden => Reply::text(403, "this token does not grant that"),
    })
}

/// `GET /papers/{paper}`: a Bearer token of role owner or service with auth on.
fn read_paper(req: &httparse::Request, paper: &str, policy: &Policy) -> Route {
    if !is_valid_id(paper) {
        return bad_paper_id();
    }
    if let Some(verifier) = &policy.verifier {
        if let Err(e) = verifier.reader(header(req, "authorization"), paper) {
            return denied(e);
        }
    }
    Route::ReadPaper(paper.to_string())
}

/// Checks an upgrade request in the order of PROTOCOL.md section 1.
fn upgrade(req: &httparse::Request, paper: &str, query: &str, policy: &Policy) -> Route {
    // The path is matched as sent: `%` is not an id character, so an encoded id
    // is refused rather than decoded.
    if !is_valid_id(paper) {
        return bad_paper_id();
    }
    // Cross-site WebSocket hijacking: a browser always says where the page came from.
    if let Some(origin) = header(req, "origin") {
        let origin = origin.trim().trim_end_matches('/');
        if !policy.allowed_origins.is_empty() && !policy.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
        {
            return Route::Reply(Reply::text(403, "origin not allowed"));
        }
    }
    let key = match websocket_key(req) {
        Ok(key) => key,
        Err(reply) => return Route::Reply(reply),
    };
    let mut user = None;
    let mut name = None;
    let mut token = None;
    let mut since = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "since" => since = v.parse::<u64>().ok().filter(|v| (1..=crate::protocol::MAX_VERSION).contains(v)),
            "user" if !v.is_empty() => user = Some(cut(&v)),
            "name" if !v.is_empty() => name = Some(cut(&v)),
            "token" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    let paper = paper.to_string();
    let forwarded_for = header(req, "x-forwarded-for").map(str::to_string);
    match &policy.verifier {
        // Auth off: the client says who it is and may do everything.
        None => {
            Route::Upgrade(Upgrade { paper, key, user, name, role: Role::Owner, expires: None, since, forwarded_for })
        }
        Some(verifier) => match verifier.session(token.as_deref(), &paper) {
            Ok(grant) => Route::Upgrade(Upgrade {
                paper,
                key,
                name: grant.name.map(|n| cut(&n)),
                user: Some(grant.sub),
                role: grant.role,
                expires: Some(grant.exp),
                since,
                forwarded_for,
            }),
            Err(e) => denied(e),
        },
    }
}

/// Checks the upgrade headers (RFC 6455 4.2.1) and returns the client's key.
fn websocket_key(req: &httparse::Request) -> Result<String, Reply> {
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Reply {
            extra_headers: "Upgrade: websocket\r\n",
            ..Reply::text(426, "this endpoint speaks WebSocket only: send an Upgrade: websocket request")
        });
    }
    if header(req, "sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Reply {
            extra_headers: "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            ..Reply::text(426, "unsupported WebSocket version; use 13")
        });
    }
    match header(req, "sec-websocket-key").map(str::trim) {
        // 16 random bytes in base64.
        Some(key) if key.len() == 24 && key.ends_with("==") => Ok(key.to_string()),
        _ => Err(Reply::text(400, "missing or malformed Sec-WebSocket-Key")),
    }
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
        204 => "No Content",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn get(path: &str, headers: &str) -> Result<Parsed, Reply> {
        parse(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes(),
            &Policy::default(),
            Listener::Public,
        )
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
            Ok(Parsed::Complete { .. }) => 200,
            Ok(Parsed::Partial) => 0,
            Err(reply) => reply.status,
        }
    }

    #[test]
    fn the_page_and_its_client_module_are_served_with_their_types() {
        for (path, content_type, starts) in [
            ("/", "text/html; charset=utf-8", "<!doctype html>"),
            ("/client.js", "text/javascript; charset=utf-8", "// rollingpaper client"),
            ("/client.d.ts", "text/plain; charset=utf-8", "// Types of the rollingpaper client"),
        ] {
            let Ok(Parsed::Complete { route: Route::Reply(reply), .. }) = get(path, "") else {
                panic!("{path} is not served")
            };
            assert_eq!((reply.status, reply.content_type), (200, content_type), "{path}");
            assert!(reply.body.starts_with(starts), "{path}");
            let text = String::from_utf8_lossy(&reply.to_bytes()).into_owned();
            assert!(text.contains("Cache-Control: no-store\r\n"), "{path}");
            // The module may be imported by pages of other origins; the page itself not.
            assert_eq!(text.contains("Access-Control-Allow-Origin: *\r\n"), path != "/", "{path}");
        }
        assert_eq!(status(get("/client.mjs", "")), 404);
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
        assert_eq!(status(parse(b"POST /healthz HTTP/1.1\r\n\r\n", &Policy::default(), Listener::Public)), 404);
    }

    #[test]
    fn head_is_answered_as_get_and_never_upgrades() {
        let head = |path: &str, headers: &str| {
            let request = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
            assert!(is_head(request.as_bytes()));
            status(parse(request.as_bytes(), &Policy::default(), Listener::Public))
        };
        assert_eq!(head("/", ""), 200);
        assert_eq!(head("/healthz", ""), 200);
        assert_eq!(head("/client.js", ""), 200);
        assert_eq!(head("/nope", ""), 404);
        assert_eq!(head("/ws/p1", ""), 426);
        let upgrade = format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
        );
        assert_eq!(head("/ws/p1", &upgrade), 426, "a HEAD never upgrades");
        assert_eq!(head("/ws/p%31", &upgrade), 400);
        assert!(!is_head(b"GET / HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn an_internal_listener_takes_the_operators_routes_off_the_public_port() {
        let policy = Policy { api_key: Some("k".repeat(32)), internal_listener: true, ..Policy::default() };
        let on = |listener, path: &str| {
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            status(parse(request.as_bytes(), &policy, listener))
        };
        for path in ["/metrics", "/readyz", "/api/openapi.json"] {
            assert_eq!(on(Listener::Public, path), 404, "{path} on the main port");
            assert_eq!(on(Listener::Internal, path), 200, "{path} on the internal listener");
        }
        assert_eq!(on(Listener::Internal, "/healthz"), 200);
        assert_eq!(on(Listener::Internal, "/"), 404);
        assert_eq!(on(Listener::Public, "/"), 200);
        // Without an internal listener, the main port serves them all; /api needs a key.
        let open = Policy::default();
        let request = b"GET /api/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(status(parse(request, &open, Listener::Public)), 404, "no key, no API");
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
        let open = Policy::default();
        let public = Listener::Public;
        assert_eq!(parse(b"GET /healthz HTTP/1.1\r\nHost", &open, public), Ok(Parsed::Partial));
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(status(parse(huge.as_bytes(), &open, public)), 431);
        assert_eq!(status(parse(b"\x00\x01garbage\r\n\r\n", &open, public)), 400);
    }

    #[test]
    fn origins_and_tokens_are_checked_in_order() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let policy = Policy {
            verifier: Some(Verifier::new("0123456789abcdef")),
            allowed_origins: vec!["https://paper.example".into()],
            ..Policy::default()
        };
        let exp = crate::auth::tests::now() + 60;
        let claims = serde_json::json!({"sub": "u9", "paper": "p1", "role": "viewer", "exp": exp, "name": "Vi"});
        let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(b"0123456789abcdef")).unwrap();
        let ws_headers = format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
        );
        let request = |path: &str, extra: &str| {
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
            match parse(head.as_bytes(), &policy, Listener::Public) {
                Ok(Parsed::Complete { route, .. }) => route,
                other => panic!("{other:?}"),
            }
        };
        let code = |route: Route| match route {
            Route::Reply(reply) => reply.status,
            Route::Upgrade(_) => 101,
            _ => 200,
        };
        let with_token = format!("/ws/p1?token={token}");
        let Route::Upgrade(up) = request(&with_token, &ws_headers) else { panic!() };
        assert_eq!(
            (up.user.as_deref(), up.name.as_deref(), up.role, up.expires),
            (Some("u9"), Some("Vi"), Role::Viewer, Some(exp))
        );
        assert_eq!(code(request("/ws/p1", &ws_headers)), 401);
        assert_eq!(code(request("/ws/p2?token=x", &ws_headers)), 401);
        assert_eq!(code(request(&format!("/ws/p2?token={token}"), &ws_headers)), 403);
        let allowed = format!("{ws_headers}Origin: https://paper.example\r\n");
        assert_eq!(code(request(&with_token, &allowed)), 101);
        let evil = format!("{ws_headers}Origin: https://evil.example\r\n");
        assert_eq!(code(request(&with_token, &evil)), 403);
        // Origin comes before the upgrade and the token; the paper id before the origin.
        assert_eq!(code(request("/ws/p1", "Origin: https://evil.example\r\n")), 403);
        assert_eq!(code(request("/ws/p%31", "Origin: https://evil.example\r\n")), 400);
        assert_eq!(code(request("/ws/p1", "Origin: https://paper.example\r\n")), 426);
        // The papers API wants a Bearer token of an owner or the service.
        assert_eq!(code(request("/papers/p1", "")), 401);
        assert_eq!(code(request("/papers/p1", &format!("Authorization: Bearer {token}\r\n"))), 403);
        assert_eq!(code(request("/papers/p%31", "")), 400);
        assert_eq!(request("/readyz", ""), Route::Ready);
        assert_eq!(request("/metrics", ""), Route::Metrics);
    }

    #[test]
    fn accept_key_is_rfc_6455s() {
        let text = String::from_utf8(switching_protocols(KEY)).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
