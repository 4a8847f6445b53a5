//! PROTOCOL.md section 7 (1.2): the backend API, on real nodes and a real Redis.
//! Every route on two `--cluster` nodes (called on one node, its members on the
//! other), on an internal listener and on the main port; the refusal table in
//! the protocol's order; `HEAD`; the OpenAPI document; erase against an outage,
//! a late relay and a paper being read; revoke across a restart; the key's
//! configuration; the API's metrics.

use rollingpaper::store::keys;
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::proxy::{Direction, Mode, Proxy};
use crate::common::{
    eventually, eventually_eq, free_port, project_root, token, unix_now, upgrade_request, Client, Paused, Redis,
    Server, TempDir, PATIENCE, SECRET,
};

/// The API key the nodes run with: 32 bytes, the shortest allowed.
const KEY: &str = "api-key-0123456789abcdef01234567";

// ---- HTTP ----------------------------------------------------------------------------

/// An HTTP answer: the status, the head, the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn v(&self) -> u64 {
        assert_eq!(self.status, 200, "{self:?}");
        self.json()["v"].as_u64().unwrap_or_else(|| panic!("no v: {self:?}"))
    }
}

/// Reads an answer until the server closes the connection (every answer
/// closes it), within the patience.
fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // The server may close with bytes of the request unread: a reset after the answer.
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !bytes.is_empty() => break,
            Err(e) => panic!("no answer ({e}); read so far: {:?}", String::from_utf8_lossy(&bytes)),
        }
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete head: {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    Answer { status: status.unwrap_or_else(|| panic!("no status: {head:?}")), head: head.into(), body: body.into() }
}

/// Sends a raw request to `addr` and reads its answer.
fn exchange(addr: SocketAddr, request: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    read_answer(&mut stream)
}

/// A request with an optional `Authorization` value and an optional JSON body.
fn request(method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
    if let Some(auth) = auth {
        request += &format!("Authorization: {auth}\r\n");
    }
    match body {
        Some(body) => {
            request += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        }
        None => request += "\r\n",
    }
    request
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A call with the API key.
fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Answer {
    let body = body.map(|b| b.to_string());
    exchange(addr, &request(method, path, Some(&bearer(KEY)), body.as_deref()))
}

/// A call with any `Authorization` (or none) and a body as sent.
fn call(addr: SocketAddr, auth: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Answer {
    exchange(addr, &request(method, path, auth, body))
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(addr, &request("GET", path, None, None))
}

/// A refusal of PROTOCOL.md 7: the status, and `{"code","message"}` as JSON.
fn assert_refused(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"), "{answer:?}");
    let body = answer.json();
    let fields: BTreeSet<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(fields, BTreeSet::from(["code", "message"]), "{answer:?}");
    assert_eq!(body["code"], code, "{answer:?}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer:?}");
    if status == 503 {
        assert_eq!(answer.header("retry-after"), Some("1"), "{answer:?}");
    }
}

/// The status of an upgrade request for `/ws/{path_and_query}` on a node's main port.
fn ws_status(node: &Server, path_and_query: &str) -> u16 {
    node.status_of(&upgrade_request(&format!("/ws/{path_and_query}"), ""))
}

// ---- nodes and Redis -----------------------------------------------------------------------

/// A `--cluster` node with the API key on `redis_url`.
fn node(redis_url: &str, id: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--store", "redis", "--redis", redis_url, "--cluster", "--node-id", id, "--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The same with `--internal-listen` on a free port: the node and that address.
fn node_with_internal_listener(redis_url: &str, id: &str) -> (Server, SocketAddr) {
    let internal: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let internal_text = internal.to_string();
    (node(redis_url, id, &["--internal-listen", &internal_text]), internal)
}

/// The keys Redis holds for a paper.
fn keys_of(redis: &Redis, paper: &str) -> BTreeSet<String> {
    redis::cmd("KEYS").arg(format!("rp:paper:{{{paper}}}*")).query(&mut redis.conn()).unwrap()
}

/// Redis holds nothing of the paper but its `erased` marker, with a TTL.
fn assert_erased_in_redis(redis: &Redis, paper: &str) {
    let marker = keys::erased(paper);
    assert_eq!(keys_of(redis, paper), BTreeSet::from([marker.clone()]), "only the erased marker of {paper}");
    let ttl: i64 = redis::cmd("PTTL").arg(&marker).query(&mut redis.conn()).unwrap();
    assert!(ttl > 0, "the erased marker has a TTL: {ttl}");
}

/// `/ws`, `/papers` and the API answer 410 for an erased paper on every node.
fn assert_gone_everywhere(nodes: &[(&Server, SocketAddr)], paper: &str) {
    for (node, api_at) in nodes {
        assert_eq!(ws_status(node, &format!("{paper}?user=zed")), 410, "/ws on {}", node.addr);
        assert_eq!(node.get(&format!("/papers/{paper}")).0, 410, "/papers on {}", node.addr);
        let put = api(*api_at, "PUT", &format!("/api/papers/{paper}/notes/n9"), Some(json!({"data": {}})));
        assert_refused(&put, 410, "gone");
        assert_refused(&api(*api_at, "GET", &format!("/api/papers/{paper}/presence"), None), 410, "gone");
    }
}

/// A note as Redis holds it, without the id of the node that wrote it (`--cluster`).
fn stored_note(redis: &Redis, paper: &str, id: &str) -> Option<Value> {
    let mut note = redis.note(paper, id)?;
    note.as_object_mut().unwrap().remove("node");
    Some(note)
}

/// Waits for a member's `saved` covering `v`.
fn saved_up_to(client: &mut Client, v: u64) {
    let until = Instant::now() + PATIENCE;
    while client.next_of("saved")["v"].as_u64().unwrap() < v {
        assert!(Instant::now() < until, "no saved up to {v}");
    }
}

/// The members of a presence answer as `(id, user, name)`.
fn presence_of(body: &Value) -> BTreeSet<(String, String, String)> {
    let members = body["members"].as_array().unwrap_or_else(|| panic!("no members: {body}"));
    members
        .iter()
        .map(|m| {
            let field = |f: &str| m[f].as_str().unwrap_or_else(|| panic!("member without {f}: {m}")).to_string();
            (field("id"), field("user"), field("name"))
        })
        .collect()
}

/// The snapshot of a paper's entry in the completion stream, if there is one.
fn stream_entry(redis: &Redis, paper: &str) -> Option<Value> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("rp:papers:completed").arg("-").arg("+").query(&mut redis.conn()).unwrap();
    entries.into_iter().find_map(|(_, fields)| {
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        (get("paper").as_deref() == Some(paper)).then(|| serde_json::from_str(&get("snapshot").unwrap()).unwrap())
    })
}

// ---- 1. every route --------------------------------------------------------------------------

/// Calls every route of PROTOCOL.md 7 at `api_at` (on node `near`) while
/// members sit on node `far` (and, for presence, one on `near`): each write is
/// in Redis when its answer comes, and far's members see it `from: "api"`.
fn every_route(api_at: SocketAddr, near: &Server, far: &Server, redis: &Redis, paper: &str) {
    let path = |rest: &str| format!("/api/papers/{paper}{rest}");
    let mut bob = far.join(paper, "user=bob&name=Bob");
    let mut eve = far.join(paper, "user=eve");

    // PUT a note, with an author and without one.
    let v1 =
        api(api_at, "PUT", &path("/notes/n1"), Some(json!({"data": {"text": "hi", "x": 1}, "author": "team"}))).v();
    assert_eq!(
        stored_note(redis, paper, "n1"),
        Some(json!({"author": "team", "data": {"text": "hi", "x": 1}, "v": v1}))
    );
    let seen = bob.next_of("upsert");
    assert_eq!(
        seen,
        json!({"type": "upsert", "id": "n1", "author": "team", "data": {"text": "hi", "x": 1}, "v": v1, "from": "api"})
    );
    let v2 = api(api_at, "PUT", &path("/notes/n2"), Some(json!({"data": {"t": 2}}))).v();
    assert_eq!(stored_note(redis, paper, "n2"), Some(json!({"author": "service", "data": {"t": 2}, "v": v2})));
    let seen = bob.next_of("upsert");
    assert_eq!(
        (&seen["id"], &seen["author"], &seen["from"], &seen["v"]),
        (&json!("n2"), &json!("service"), &json!("api"), &json!(v2))
    );

    // PATCH fields (null removes one).
    let v3 = api(api_at, "PATCH", &path("/notes/n1"), Some(json!({"data": {"x": null, "color": "yellow"}}))).v();
    let stored = stored_note(redis, paper, "n1").unwrap();
    assert_eq!((&stored["author"], &stored["data"]), (&json!("team"), &json!({"text": "hi", "color": "yellow"})));
    assert_eq!(stored["v"], v3, "{stored}");
    let seen = bob.next_of("patch");
    assert_eq!(
        seen,
        json!({"type": "patch", "id": "n1", "data": {"x": null, "color": "yellow"}, "v": v3, "from": "api"})
    );

    // PUT the cover.
    let cover = json!({"title": "Happy birthday, Kim", "to": "Kim"});
    let v4 = api(api_at, "PUT", &path("/meta"), Some(json!({"data": cover}))).v();
    let stored: Value = serde_json::from_str(&redis.hget(&keys::meta(paper), "cover").unwrap()).unwrap();
    assert_eq!((&stored["data"], &stored["v"]), (&cover, &json!(v4)), "{stored}");
    assert_eq!(bob.next_of("meta"), json!({"type": "meta", "data": cover, "v": v4, "from": "api"}));

    // DELETE a note.
    let v5 = api(api_at, "DELETE", &path("/notes/n2"), None).v();
    assert_eq!(stored_note(redis, paper, "n2"), Some(json!({"deleted": true, "v": v5})));
    assert_eq!(bob.next_of("delete"), json!({"type": "delete", "id": "n2", "v": v5, "from": "api"}));
    assert!(v1 < v2 && v2 < v3 && v3 < v4 && v4 < v5, "versions increase: {v1} {v2} {v3} {v4} {v5}");

    // Presence lists the members of both nodes.
    let mut ann = near.join(paper, "user=ann&name=Ann");
    let everyone = BTreeSet::from([
        (bob.you.clone(), "bob".to_string(), "Bob".to_string()),
        (eve.you.clone(), "eve".to_string(), "eve".to_string()),
        (ann.you.clone(), "ann".to_string(), "Ann".to_string()),
    ]);
    eventually("presence to list the members of both nodes", || {
        let answer = api(api_at, "GET", &path("/presence"), None);
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert_eq!(body["paper"], paper);
        (presence_of(&body) == everyone).then_some(())
    });

    // Revoke a user: stored when the 204 comes, its session on the far node closed with 4403.
    let revoked = api(api_at, "POST", &path("/revoke"), Some(json!({"user": "eve"})));
    assert_eq!((revoked.status, revoked.body.as_str()), (204, ""), "{revoked:?}");
    let until: u64 = redis.hget(&keys::revoked(paper), "eve").expect("the revocation in Redis").parse().unwrap();
    let day = unix_now() + 86_400;
    assert!((day - 10..=day + 1).contains(&until), "until defaults to now + --revoke-retention: {until}");
    assert_eq!(eve.closed().0, 4403);
    assert_eq!(bob.next_of("leave")["member"], eve.you.as_str());
    assert_eq!(ws_status(far, &format!("{paper}?user=eve")), 403);
    assert_eq!(ws_status(near, &format!("{paper}?user=eve")), 403);

    // Complete: the sealed snapshot, sealed in Redis and in the stream when it comes; the same again.
    let sealed = api(api_at, "POST", &path("/complete"), None);
    assert_eq!(sealed.status, 200, "{sealed:?}");
    assert_eq!(sealed.header("content-type"), Some("application/json"));
    let sealed = sealed.json();
    assert_eq!((&sealed["paper"], &sealed["completed"]), (&json!(paper), &json!(true)), "{sealed}");
    assert_eq!(sealed["meta"], json!({"data": cover, "v": v4}), "{sealed}");
    assert_eq!(
        sealed["notes"],
        json!([{"id": "n1", "author": "team", "data": {"text": "hi", "color": "yellow"}, "v": v3}]),
        "{sealed}"
    );
    assert_eq!(redis.hget(&keys::meta(paper), "completed").as_deref(), Some("1"));
    let entry = stream_entry(redis, paper).expect("the stream entry when the 200 comes");
    assert_eq!(entry["notes"], sealed["notes"]);
    let completed = bob.next_of("completed");
    assert_eq!(completed["notes"], sealed["notes"], "{completed}");
    let again = api(api_at, "POST", &path("/complete"), None);
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json(), sealed, "complete again: the same sealed snapshot");

    // Erase: keys gone and the marker set when the 204 comes; members of both nodes closed with 4410.
    let erased = api(api_at, "DELETE", &path(""), None);
    assert_eq!((erased.status, erased.body.as_str()), (204, ""), "{erased:?}");
    assert_erased_in_redis(redis, paper);
    let ttl: i64 = redis::cmd("PTTL").arg(keys::erased(paper)).query(&mut redis.conn()).unwrap();
    assert!(ttl > 7 * 86_400_000 - 60_000 && ttl <= 7 * 86_400_000, "erase_retention defaults to 7 days: {ttl}");
    assert_eq!(bob.closed().0, 4410);
    assert_eq!(ann.closed().0, 4410);
    // The members' leaves wrote nothing back.
    assert_erased_in_redis(redis, paper);
    assert_gone_everywhere(&[(near, api_at)], paper);
    for node in [near, far] {
        assert_eq!(ws_status(node, &format!("{paper}?user=bob")), 410);
        assert_eq!(node.get(&format!("/papers/{paper}")).0, 410);
    }
}

#[test]
fn every_route_across_two_nodes_on_the_internal_listener_and_on_the_main_port() {
    let redis = Redis::start();
    let (a, internal) = node_with_internal_listener(&redis.url(), "a");
    let b = node(&redis.url(), "b", &[]);

    // With --internal-listen, the main port has no API, metrics or readiness.
    for path in ["/api/openapi.json", "/api/papers/p1/presence", "/metrics", "/readyz"] {
        assert_eq!(a.get(path).0, 404, "{path} on the main port");
    }
    let put = api(a.addr, "PUT", "/api/papers/p1/notes/n1", Some(json!({"data": {}})));
    assert_eq!(put.status, 404, "{put:?}");
    assert_eq!(a.get("/healthz").0, 200);
    // The internal listener serves them and /healthz, and nothing else.
    let health = get(internal, "/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    let metrics = get(internal, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("rollingpaper_api_requests_total"));
    assert_eq!(get(internal, "/api/openapi.json").status, 200);
    eventually("readiness on the internal listener", || (get(internal, "/readyz").status == 200).then_some(()));
    for path in ["/papers/p1", "/", "/client.js", "/ws/p1"] {
        assert_eq!(get(internal, path).status, 404, "{path} on the internal listener");
    }
    assert_eq!(exchange(internal, &upgrade_request("/ws/p1", "")).status, 404, "no sessions on the internal listener");

    // The call on a's internal listener, the members on b.
    every_route(internal, &a, &b, &redis, "p-internal");
    // No --internal-listen: the same routes on b's main port, the members on a.
    every_route(b.addr, &b, &a, &redis, "p-main");
}

// ---- 2. refusals ---------------------------------------------------------------------------

#[test]
fn refusals_follow_the_table_in_the_protocols_order() {
    let redis = Redis::start();
    let limits = ["--max-notes", "1", "--max-message-bytes", "4096", "--max-note-bytes", "1024"];
    let mut args = vec!["--api-key", KEY, "--jwt-secret", SECRET];
    args.extend_from_slice(&limits);
    let server = Server::redis(&redis, &args);
    let at = server.addr;
    let key = bearer(KEY);
    let key = Some(key.as_str());
    let later = unix_now() + 600;
    let note = Some(r#"{"data":{"t":1}}"#);

    // 400: ids, checked before the caller.
    let (long_paper, long_note) =
        (format!("/api/papers/{}/notes/n1", "x".repeat(65)), format!("/api/papers/p1/notes/{}", "x".repeat(65)));
    for path in [
        "/api/papers/bad.id/notes/n1",
        "/api/papers/p%31/notes/n1",
        long_paper.as_str(),
        "/api/papers/p1/notes/bad.id",
        long_note.as_str(),
    ] {
        assert_refused(&call(at, key, "PUT", path, note), 400, "invalid_message");
        assert_refused(&call(at, None, "PUT", path, note), 400, "invalid_message");
    }
    // 401: no caller, a wrong key, a bad token.
    let put = |auth: Option<&str>| call(at, auth, "PUT", "/api/papers/p1/notes/n1", note);
    assert_refused(&put(None), 401, "unauthorized");
    for wrong in [
        bearer(&"k".repeat(32)),
        bearer(&KEY[..31]),
        bearer(&format!("{KEY}x")),
        format!("Basic {KEY}"),
        KEY.to_string(),
        bearer("garbage.token.here"),
        bearer(&token("svc", "p1", "service", unix_now() - 60)),
    ] {
        assert_refused(&put(Some(&wrong)), 401, "unauthorized");
    }
    // 403: a service token for another paper, an owner's or a writer's token for this one.
    for denied in
        [token("svc", "p2", "service", later), token("kim", "p1", "owner", later), token("w", "p1", "writer", later)]
    {
        assert_refused(&put(Some(&bearer(&denied))), 403, "forbidden");
    }
    // A service token for this paper is a caller, as the key is.
    assert_eq!(put(Some(&bearer(&token("svc", "p1", "service", later)))).status, 200);

    // 400: chunked bodies (after the caller), bodies that are not what the route takes.
    let chunked = |auth: &str| {
        format!(
            "PUT /api/papers/p1/notes/n1 HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n10\r\n{{\"data\":{{\"a\":1}}}}\r\n0\r\n\r\n"
        )
    };
    assert_refused(&exchange(at, &chunked(&format!("Authorization: Bearer {KEY}\r\n"))), 400, "invalid_message");
    assert_refused(&exchange(at, &chunked("")), 401, "unauthorized");
    for body in [r#"{"data":"#, r#"{"data":"oops"}"#, r#"{"data":[1]}"#, r#"{"data":null}"#, "{}", "", "[]", "not json"]
    {
        assert_refused(&call(at, key, "PUT", "/api/papers/p1/notes/n1", Some(body)), 400, "invalid_message");
        assert_refused(&call(at, key, "PUT", "/api/papers/p1/meta", Some(body)), 400, "invalid_message");
    }
    assert_refused(&call(at, key, "PATCH", "/api/papers/p1/notes/n1", Some(r#"{"data":5}"#)), 400, "invalid_message");
    for body in [
        r#"{"user":"eve","until":"tomorrow"}"#,
        r#"{"user":"eve","until":1.5}"#,
        r#"{"user":"eve","until":-1}"#,
        r#"{"until":1}"#,
        r#"{"user":5}"#,
        r#"{"user":""}"#,
    ] {
        assert_refused(&call(at, key, "POST", "/api/papers/p1/revoke", Some(body)), 400, "invalid_message");
    }
    // 413: a Content-Length over --max-message-bytes (answered from the head, after the caller), data over --max-note-bytes.
    let huge =
        |auth: &str| format!("PUT /api/papers/p1/notes/n1 HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: 4097\r\n\r\n");
    assert_refused(&exchange(at, &huge(&format!("Authorization: Bearer {KEY}\r\n"))), 413, "too_large");
    assert_refused(&exchange(at, &huge("")), 401, "unauthorized");
    let big = json!({"data": {"t": "x".repeat(1100)}}).to_string();
    assert!(big.len() < 4096);
    assert_refused(&call(at, key, "PUT", "/api/papers/p1/notes/n1", Some(&big)), 413, "too_large");
    assert_refused(&call(at, key, "PUT", "/api/papers/p1/meta", Some(&big)), 413, "too_large");
    assert_refused(&call(at, key, "PATCH", "/api/papers/p1/notes/n1", Some(&big)), 413, "too_large");

    // The limits are inclusive: data of exactly --max-note-bytes, a body of exactly --max-message-bytes.
    let exact = json!({"data": {"t": "x".repeat(1016)}});
    assert_eq!(exact["data"].to_string().len(), 1024);
    api(at, "PUT", "/api/papers/p-size/notes/n1", Some(exact)).v();
    let padded = format!("{:<4096}", r#"{"data":{"t":1}}"#);
    assert_eq!(call(at, key, "PUT", "/api/papers/p-size/notes/n1", Some(&padded)).v(), {
        let stored = redis.note("p-size", "n1").unwrap();
        assert_eq!(stored["data"], json!({"t": 1}));
        stored["v"].as_u64().unwrap()
    });

    // 404: no such route; a note that is not there.
    for (method, path) in [
        ("GET", "/api/papers/p1/notes/n1"),
        ("POST", "/api/papers/p1"),
        ("PUT", "/api/papers/p1/notes/n1/x"),
        ("GET", "/api/papers/p1/complete"),
        ("GET", "/api/nope"),
        ("POST", "/api/openapi.json"),
    ] {
        let answer = call(at, key, method, path, None);
        assert_eq!(answer.status, 404, "{method} {path}: {answer:?}");
    }
    assert_refused(&call(at, key, "GET", "/api/papers/p1/notes/n1", None), 404, "not_found");
    assert_refused(&call(at, key, "DELETE", "/api/papers/p1/notes/missing", None), 404, "not_found");
    assert_refused(
        &call(at, key, "PATCH", "/api/papers/p1/notes/missing", Some(r#"{"data":{"a":1}}"#)),
        404,
        "not_found",
    );
    assert!(api(at, "DELETE", "/api/papers/p1/notes/n1", None).v() > 0);
    assert_refused(&api(at, "DELETE", "/api/papers/p1/notes/n1", None), 404, "not_found");
    assert_refused(&api(at, "PATCH", "/api/papers/p1/notes/n1", Some(json!({"data": {"a": 1}}))), 404, "not_found");

    // 409 paper_full at --max-notes 1: only a new note hits it.
    let put_note = |id: &str| api(at, "PUT", &format!("/api/papers/p-full/notes/{id}"), Some(json!({"data": {}})));
    put_note("n1").v();
    assert_refused(&put_note("n2"), 409, "paper_full");
    put_note("n1").v();
    api(at, "DELETE", "/api/papers/p-full/notes/n1", None).v();
    put_note("n2").v();

    // 409 paper_completed once sealed; completing again is not refused.
    api(at, "PUT", "/api/papers/p-sealed/notes/n1", Some(json!({"data": {}}))).v();
    assert_eq!(api(at, "POST", "/api/papers/p-sealed/complete", None).status, 200);
    assert_refused(&api(at, "PUT", "/api/papers/p-sealed/notes/n1", Some(json!({"data": {}}))), 409, "paper_completed");
    assert_refused(&api(at, "PUT", "/api/papers/p-sealed/notes/n2", Some(json!({"data": {}}))), 409, "paper_completed");
    assert_refused(
        &api(at, "PATCH", "/api/papers/p-sealed/notes/n1", Some(json!({"data": {"a": 1}}))),
        409,
        "paper_completed",
    );
    assert_refused(&api(at, "DELETE", "/api/papers/p-sealed/notes/n1", None), 409, "paper_completed");
    assert_refused(&api(at, "PUT", "/api/papers/p-sealed/meta", Some(json!({"data": {}}))), 409, "paper_completed");
    assert_eq!(api(at, "POST", "/api/papers/p-sealed/complete", None).status, 200);

    // 410 once erased: every route, the erase itself included, and /ws and /papers.
    api(at, "PUT", "/api/papers/p-gone/notes/n1", Some(json!({"data": {}}))).v();
    assert_eq!(api(at, "DELETE", "/api/papers/p-gone", None).status, 204);
    for (method, rest, body) in [
        ("PUT", "/notes/n1", Some(json!({"data": {}}))),
        ("PATCH", "/notes/n1", Some(json!({"data": {"a": 1}}))),
        ("DELETE", "/notes/n1", None),
        ("PUT", "/meta", Some(json!({"data": {}}))),
        ("POST", "/complete", None),
        ("POST", "/revoke", Some(json!({"user": "eve"}))),
        ("GET", "/presence", None),
        ("DELETE", "", None),
    ] {
        assert_refused(&api(at, method, &format!("/api/papers/p-gone{rest}"), body), 410, "gone");
    }
    let service = bearer(&token("svc", "p-gone", "service", later));
    assert_eq!(call(at, Some(&service), "GET", "/papers/p-gone", None).status, 410);
    let writer = token("w", "p-gone", "writer", later);
    assert_eq!(ws_status(&server, &format!("p-gone?token={writer}")), 410);

    // 404 for every /api route while no key is configured.
    let off = Server::redis(&redis, &[]);
    for (method, path) in
        [("GET", "/api/openapi.json"), ("GET", "/api/papers/p1/presence"), ("PUT", "/api/papers/p1/notes/n1")]
    {
        let answer = call(off.addr, key, method, path, note);
        assert_eq!(answer.status, 404, "{method} {path} without a key: {answer:?}");
    }
}

#[test]
fn a_full_backlog_is_503_with_retry_after_and_a_retry_is_taken_once_redis_is_back() {
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY, "--backlog-limit", "1", "--api-timeout", "3"]);
    let mut member = server.join("p-backlog", "user=ann");
    redis.stop();
    // The member's edit fills the backlog; the next one is refused.
    member.send(json!({"type": "upsert", "id": "n0", "data": {}, "ref": "r0"}));
    assert_eq!(member.next_of("upsert")["ref"], "r0");
    member.send(json!({"type": "upsert", "id": "n1", "data": {}, "ref": "r1"}));
    let refused = member.next_of("error");
    assert_eq!((&refused["code"], &refused["ref"]), (&json!("unavailable"), &json!("r1")));

    let path = "/api/papers/p-backlog/notes/n2";
    let answer = api(server.addr, "PUT", path, Some(json!({"data": {"by": "api"}})));
    assert_refused(&answer, 503, "unavailable");
    // Nothing was done: the member never sees it.
    assert!(member.drain().iter().all(|m| m["id"] != "n2"), "a refused call is not applied");

    redis.restart();
    let v = eventually("a retry to be taken once Redis is back", || {
        let answer = api(server.addr, "PUT", path, Some(json!({"data": {"by": "api"}})));
        match answer.status {
            200 => Some(answer.v()),
            503 => {
                assert_refused(&answer, 503, "unavailable");
                None
            }
            _ => panic!("{answer:?}"),
        }
    });
    assert_eq!(redis.note("p-backlog", "n2"), Some(json!({"author": "service", "data": {"by": "api"}, "v": v})));
    assert!(redis.note("p-backlog", "n0").is_some(), "the member's edit was written from the backlog");
    assert_eq!(member.next_of("upsert")["id"], "n2");
}

#[test]
fn a_write_redis_does_not_answer_in_time_is_504_then_written_and_a_retry_ends_the_same() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY, "--api-timeout", "1"]);
    let mut member = server.join("p-slow", "user=ann");
    let path = "/api/papers/p-slow/notes/n1";
    let body = json!({"data": {"text": "late"}});

    let frozen = Paused::redis(&redis);
    let started = Instant::now();
    assert_refused(&api(server.addr, "PUT", path, Some(body.clone())), 504, "timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "--api-timeout 1: {took:?}");
    // Applied and broadcast as any write is; not yet in Redis.
    let seen = member.next_of("upsert");
    assert_eq!((&seen["from"], &seen["data"]), (&json!("api"), &json!({"text": "late"})));
    drop(frozen);
    let stored = eventually("the timed-out write in Redis once it answers", || redis.note("p-slow", "n1"));
    assert_eq!(stored, json!({"author": "service", "data": {"text": "late"}, "v": seen["v"]}));
    // The retry ends in the same state, with a new version.
    let v = api(server.addr, "PUT", path, Some(body)).v();
    assert!(v > seen["v"].as_u64().unwrap());
    assert_eq!(redis.note("p-slow", "n1"), Some(json!({"author": "service", "data": {"text": "late"}, "v": v})));

    // A note's DELETE: 504, deleted once Redis answers, and the retry finds it gone.
    let frozen = Paused::redis(&redis);
    assert_refused(&api(server.addr, "DELETE", path, None), 504, "timeout");
    drop(frozen);
    eventually("the timed-out delete in Redis", || {
        redis.note("p-slow", "n1").filter(|n| n["deleted"] == true).map(|_| ())
    });
    assert_refused(&api(server.addr, "DELETE", path, None), 404, "not_found");
}

// An erase answered 504 is written once Redis answers, and the node that took
// it carries it out then: its members go, and it stops serving the paper.
#[test]
fn an_erase_answered_504_is_carried_out_once_redis_holds_it() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY, "--api-timeout", "1"]);
    let mut member = server.join("p-slow-erase", "user=ann");
    api(server.addr, "PUT", "/api/papers/p-slow-erase/notes/n1", Some(json!({"data": {}}))).v();
    let frozen = Paused::redis(&redis);
    assert_refused(&api(server.addr, "DELETE", "/api/papers/p-slow-erase", None), 504, "timeout");
    drop(frozen);
    eventually("the erase in Redis", || (keys_of(&redis, "p-slow-erase").len() == 1).then_some(()));
    assert_erased_in_redis(&redis, "p-slow-erase");
    // What Redis holds is what the node does: 410, and its members closed with 4410.
    eventually_eq("GET /papers of the erased paper", 410, || server.get("/papers/p-slow-erase").0);
    assert_eq!(member.closed().0, 4410);
    assert_refused(&api(server.addr, "DELETE", "/api/papers/p-slow-erase", None), 410, "gone");
}

// A revocation answered 504 is written once Redis answers, and the node that
// took it carries it out then: the user's session closes, new ones are refused.
#[test]
fn a_revocation_answered_504_is_carried_out_once_redis_holds_it() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY, "--api-timeout", "1"]);
    let mut eve = server.join("p-slow-revoke", "user=eve");
    let _bob = server.join("p-slow-revoke", "user=bob");
    let frozen = Paused::redis(&redis);
    let answer = api(server.addr, "POST", "/api/papers/p-slow-revoke/revoke", Some(json!({"user": "eve"})));
    assert_refused(&answer, 504, "timeout");
    drop(frozen);
    eventually("the revocation in Redis", || redis.hget(&keys::revoked("p-slow-revoke"), "eve"));
    eventually_eq("a new session of eve", 403, || ws_status(&server, "p-slow-revoke?user=eve"));
    assert_eq!(eve.closed().0, 4403);
}

// An `until` Redis cannot expire at (2^64 - 1) is refused before anything is
// stored, and the paper stays revocable.
#[test]
fn an_until_redis_cannot_hold_is_refused_and_leaves_the_paper_revocable() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY]);
    let mut amy = server.join("p-until", "user=amy");
    let path = "/api/papers/p-until/revoke";
    let answer = api(server.addr, "POST", path, Some(json!({"user": "eve", "until": u64::MAX})));
    match answer.status {
        400 => {
            assert_refused(&answer, 400, "invalid_message");
            assert_eq!(redis.hget(&keys::revoked("p-until"), "eve"), None, "a refused revocation is not stored");
        }
        204 => assert!(redis.hget(&keys::revoked("p-until"), "eve").is_some()),
        _ => panic!("until = 2^64 - 1: 400 or 204, not {answer:?}"),
    }
    // Another revocation of the paper goes through, and is carried out.
    let answer = api(server.addr, "POST", path, Some(json!({"user": "amy"})));
    assert_eq!(answer.status, 204, "{answer:?}");
    assert_eq!(amy.closed().0, 4403);
}

// ---- 3 and 4. HEAD, the OpenAPI document -----------------------------------------------------

#[test]
fn head_answers_what_get_would_without_the_body_and_never_upgrades() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY]);
    let at = server.addr;
    let _member = server.join("p-head", "user=ann");
    api(at, "PUT", "/api/papers/p-head/notes/n1", Some(json!({"data": {"text": "hi"}}))).v();
    let key = bearer(KEY);
    for (path, auth, status) in [
        ("/healthz", None, 200),
        ("/papers/p-head", None, 200),
        ("/papers/p-empty", None, 200),
        ("/api/papers/p-head/presence", Some(key.as_str()), 200),
        ("/api/openapi.json", None, 200),
        ("/api/papers/p-head/presence", None, 401),
        ("/api/papers/bad.id/presence", Some(key.as_str()), 400),
        ("/nope", None, 404),
    ] {
        let got = call(at, auth, "GET", path, None);
        let head = call(at, auth, "HEAD", path, None);
        assert_eq!((got.status, head.status), (status, status), "{path}: {got:?} {head:?}");
        let length = got.header("content-length").unwrap_or_else(|| panic!("{path}: no Content-Length"));
        assert_eq!(length.parse::<usize>().unwrap(), got.body.len(), "{path}");
        assert_eq!(head.header("content-length"), Some(length), "{path}: HEAD has the GET's Content-Length");
        assert_eq!(head.header("content-type"), got.header("content-type"), "{path}");
        assert_eq!(head.body, "", "{path}: HEAD has no body");
    }
    // HEAD of /ws with the upgrade headers: what GET would answer short of the upgrade.
    let sessions = server.metric("sessions");
    let head = exchange(at, &upgrade_request("/ws/p-head?user=hal", "").replacen("GET", "HEAD", 1));
    assert_eq!(head.status, 426, "{head:?}");
    assert_eq!(head.body, "");
    assert!(head.header("sec-websocket-accept").is_none(), "{head:?}");
    assert_eq!(server.metric("sessions"), sessions, "a HEAD opens no session");
    let plain = exchange(at, "HEAD /ws/p-head HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((plain.status, plain.body.as_str()), (426, ""));
    assert_eq!(ws_status(&server, "p-head?user=hal"), 101, "the same request as GET upgrades");
}

#[test]
fn the_openapi_document_is_the_file_served_verbatim_and_names_real_routes() {
    let server = Server::memory(&["--api-key", KEY]);
    let file = std::fs::read_to_string(project_root().join("src/web/openapi.json")).unwrap();
    let served = get(server.addr, "/api/openapi.json");
    assert_eq!(served.status, 200, "no key needed: {served:?}");
    assert_eq!(served.header("content-type"), Some("application/json"));
    assert!(served.body == file, "the served document differs from src/web/openapi.json");
    let doc: Value = serde_json::from_str(&file).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    // Every operation it names is a route of this server: without a key, 401, not 404.
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path.replace("{paper}", "p-doc").replace("{id}", "n1");
        for method in ["get", "put", "patch", "post", "delete", "head"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let method = method.to_uppercase();
            let body = matches!(method.as_str(), "PUT" | "PATCH" | "POST").then_some("{}");
            let answer = call(server.addr, None, &method, &concrete, body);
            let expected = if path == "/api/openapi.json" { 200 } else { 401 };
            assert_eq!(answer.status, expected, "{method} {path}: {answer:?}");
        }
    }
    assert_eq!(operations, 11, "PROTOCOL.md 7's nine routes and a HEAD beside each GET: {paths:?}");
}

// ---- 5. erase against an outage, a late relay, a paper being read --------------------------------

#[test]
fn an_erase_during_an_outage_stores_nothing_of_the_backlog_replayed_after_it() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let a = node(&redis.url(), "a", &[]);
    let b = node(&proxy.redis_url(), "b", &[]);
    let paper = "p-outage";
    let mut ann = a.join(paper, "user=ann");
    let mut bob = b.join(paper, "user=bob");
    bob.send(json!({"type": "upsert", "id": "n1", "data": {"t": "before"}, "ref": "r1"}));
    let v1 = bob.next_of("upsert")["v"].as_u64().unwrap();
    saved_up_to(&mut bob, v1);
    assert_eq!(ann.next_of("upsert")["id"], "n1");

    // b is cut from Redis; its member edits, and the edits wait in b's backlog.
    proxy.set(Mode::Cut);
    bob.send(json!({"type": "upsert", "id": "n2", "data": {"t": "while cut"}, "ref": "r2"}));
    bob.send(json!({"type": "patch", "id": "n1", "data": {"color": "red"}, "ref": "r3"}));
    bob.send(json!({"type": "meta", "data": {"title": "while cut"}, "ref": "r4"}));
    bob.send(json!({"type": "delete", "id": "n1", "ref": "r5"}));
    let mut last_v = 0;
    for kind in ["upsert", "patch", "meta", "delete"] {
        last_v = last_v.max(bob.next_of(kind)["v"].as_u64().unwrap());
    }
    eventually("b's edits to wait in its backlog", || (b.metric("backlog") >= 4).then_some(()));

    // Meanwhile the paper is erased through a.
    let erased = api(a.addr, "DELETE", &format!("/api/papers/{paper}"), None);
    assert_eq!(erased.status, 204, "{erased:?}");
    assert_eq!(ann.closed().0, 4410);
    assert_erased_in_redis(&redis, paper);

    // b is reconnected: its backlog is replayed and none of it is stored.
    proxy.set(Mode::Pass);
    assert_eq!(bob.closed().0, 4410, "b's member is closed once b learns of the erase");
    eventually("b's backlog to drain", || (b.metric("backlog") == 0).then_some(()));
    assert_erased_in_redis(&redis, paper);
    assert_gone_everywhere(&[(&a, a.addr), (&b, b.addr)], paper);

    // A relayed change arriving late (as a node that missed the erase would send
    // it) at a node that is reading the paper: node c, new, subscribed to the
    // paper but with its read still on the way (its link to Redis is slow).
    let c_proxy = Proxy::start(redis.port);
    let c = node(&c_proxy.redis_url(), "c", &[]);
    c_proxy.set_direction(Direction::Up, Mode::Delay(Duration::from_millis(500)));
    let joiner = join_in_thread(&c, &format!("/ws/{paper}?user=cat"));
    let channel = keys::channel(paper);
    let mut conn = redis.conn();
    eventually("c to subscribe to the paper", || {
        let numsub: (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query(&mut conn).unwrap();
        (numsub.1 == 1).then_some(())
    });
    let late = [
        json!({"type": "upsert", "id": "n3", "author": "bob", "data": {"t": "late"}, "v": last_v + 1000, "from": "c9-b"}),
        json!({"type": "meta", "data": {"title": "late"}, "v": last_v + 1001, "from": "c9-b"}),
    ];
    for message in &late {
        let heard: i64 = redis::cmd("PUBLISH").arg(&channel).arg(format!("b\n{message}")).query(&mut conn).unwrap();
        assert_eq!(heard, 1, "c hears the late relay");
    }
    match joiner.join().unwrap() {
        Err(status) => assert_eq!(status, 410, "c's joiner is refused"),
        Ok(code) => assert_eq!(code, 4410, "c's joiner let in is closed"),
    }
    c_proxy.set(Mode::Pass);
    assert_gone_everywhere(&[(&a, a.addr), (&b, b.addr), (&c, c.addr)], paper);
    assert_erased_in_redis(&redis, paper);
}

/// Opens a session on `node` in a thread, with a read deadline: the joiner's
/// outcome is its HTTP refusal, or the close code after its session opened.
fn join_in_thread(node: &Server, path: &str) -> std::thread::JoinHandle<Result<u16, u16>> {
    let (addr, url) = (node.addr, node.url(path));
    std::thread::spawn(move || {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        match tungstenite::client(url, stream) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("handshake: {e}"),
            Ok((mut ws, _)) => {
                let until = Instant::now() + PATIENCE;
                loop {
                    assert!(Instant::now() < until, "the session was not closed in time");
                    match ws.read() {
                        Ok(tungstenite::Message::Close(frame)) => return Ok(frame.map_or(0, |f| u16::from(f.code))),
                        Ok(_) => {}
                        Err(e) => panic!("session without a close frame: {e}"),
                    }
                }
            }
        }
    })
}

#[test]
fn an_erase_while_a_node_reads_the_paper_leaves_nothing() {
    let redis = Redis::start();
    let a = node(&redis.url(), "a", &[]);
    let b = node(&redis.url(), "b", &[]);
    let paper = "p-loading";
    api(a.addr, "PUT", &format!("/api/papers/{paper}/notes/n1"), Some(json!({"data": {"t": 1}}))).v();
    api(a.addr, "PUT", &format!("/api/papers/{paper}/meta"), Some(json!({"data": {"title": "t"}}))).v();
    assert_eq!(b.metric("papers"), 0);

    // b reads the paper for a joiner while Redis is stopped; the erase goes through a meanwhile.
    let frozen = Paused::redis(&redis);
    let joiner = join_in_thread(&b, &format!("/ws/{paper}?user=cat"));
    eventually("b to read the paper for its joiner", || (b.metric("papers") == 1).then_some(()));
    let a_addr = a.addr;
    let eraser = std::thread::spawn(move || api(a_addr, "DELETE", "/api/papers/p-loading", None));
    eventually("a's erase to wait for Redis", || (a.metric("backlog") >= 1).then_some(()));
    drop(frozen);

    let erased = eraser.join().unwrap();
    assert_eq!(erased.status, 204, "{erased:?}");
    match joiner.join().unwrap() {
        Err(status) => assert_eq!(status, 410, "the joiner is refused"),
        Ok(code) => assert_eq!(code, 4410, "the joiner let in before the erase is closed"),
    }
    assert_erased_in_redis(&redis, paper);
    assert_gone_everywhere(&[(&a, a.addr), (&b, b.addr)], paper);
    eventually("b to hold nothing of the paper", || (b.metric("papers") == 0).then_some(()));
    assert_erased_in_redis(&redis, paper);
}

// ---- 6. revoke across a restart ------------------------------------------------------------------

#[test]
fn a_revocation_closes_the_user_on_every_node_and_survives_a_restart_until_it_ends() {
    let redis = Redis::start();
    // Node a reaches Redis through a fault proxy, to hear the relay late at the end.
    let proxy = Proxy::start(redis.port);
    let start = || (node(&proxy.redis_url(), "a", &[]), node(&redis.url(), "b", &[]));
    let paper = "p-revoke";
    let revoke = |node: &Server, body: Value| {
        let answer = api(node.addr, "POST", &format!("/api/papers/{paper}/revoke"), Some(body));
        assert_eq!(answer.status, 204, "{answer:?}");
    };
    let (a, b) = start();
    let mut eve = b.join(paper, "user=eve");
    let mut bob = b.join(paper, "user=bob");
    revoke(&a, json!({"user": "eve"}));
    assert_eq!(eve.closed().0, 4403, "eve's session on the other node");
    assert_eq!(bob.next_of("leave")["member"], eve.you.as_str(), "bob stays");
    for node in [&a, &b] {
        assert_eq!(ws_status(node, &format!("{paper}?user=eve")), 403);
    }

    // Both nodes restart on the same Redis: the revocation is read back with the paper.
    drop(bob);
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let (a, b) = start();
    for node in [&a, &b] {
        assert_eq!(ws_status(node, &format!("{paper}?user=eve")), 403, "after the restart");
        let dan = node.join(paper, "user=dan");
        assert_eq!(dan.snapshot["paper"], paper, "another user joins");
    }
    let _dan = b.join(paper, "user=dan");

    // A revocation that ended lets eve in again, on both nodes.
    revoke(&a, json!({"user": "eve", "until": unix_now() - 10}));
    assert_eq!(redis.hget(&keys::revoked(paper), "eve"), None, "an expired one is removed");
    eventually("eve to join again on both nodes", || {
        [&a, &b].iter().all(|node| ws_status(node, &format!("{paper}?user=eve")) == 101).then_some(())
    });

    // One that ends in a few seconds, taken by b while a hears b's relay late:
    // refused at once on b; on a, refused, or let in until the relay comes and
    // then closed with 4403; refused on both once heard, let in once it ends.
    proxy.set_direction(Direction::Down, Mode::Delay(Duration::from_millis(300)));
    revoke(&b, json!({"user": "fay", "until": unix_now() + 3}));
    assert_eq!(ws_status(&b, &format!("{paper}?user=fay")), 403, "on the node that took the call");
    match join_in_thread(&a, &format!("/ws/{paper}?user=fay")).join().unwrap() {
        Err(status) => assert_eq!(status, 403, "fay on a"),
        Ok(code) => assert_eq!(code, 4403, "fay on a, let in before the relay came"),
    }
    proxy.set(Mode::Pass);
    assert_eq!(ws_status(&a, &format!("{paper}?user=fay")), 403, "fay on a, once it heard");
    eventually("fay to join once her revocation ends", || {
        [&a, &b].iter().all(|node| ws_status(node, &format!("{paper}?user=fay")) == 101).then_some(())
    });
}

#[test]
fn the_retention_flags_bound_revocations_and_erasures() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY, "--erase-retention", "2", "--revoke-retention", "5"]);
    let _amy = server.join("p-retention", "user=amy");
    // A revocation without `until` lasts --revoke-retention.
    let before = unix_now();
    assert_eq!(api(server.addr, "POST", "/api/papers/p-retention/revoke", Some(json!({"user": "eve"}))).status, 204);
    let until: u64 = redis.hget(&keys::revoked("p-retention"), "eve").unwrap().parse().unwrap();
    assert!((before + 5..=unix_now() + 5).contains(&until), "until {until}, asked at {before}");
    // An erasure lasts --erase-retention: the marker's TTL, then the id is free again.
    assert_eq!(api(server.addr, "DELETE", "/api/papers/p-retention", None).status, 204);
    let ttl: i64 = redis::cmd("PTTL").arg(keys::erased("p-retention")).query(&mut redis.conn()).unwrap();
    assert!(ttl > 1_000 && ttl <= 2_000, "PTTL {ttl}");
    assert_eq!(server.get("/papers/p-retention").0, 410);
    let erased_at = Instant::now();
    eventually("the paper id to be free once --erase-retention passed", || {
        let put = api(server.addr, "PUT", "/api/papers/p-retention/notes/n1", Some(json!({"data": {}})));
        match put.status {
            410 => None,
            200 => Some(()),
            _ => panic!("{put:?}"),
        }
    });
    assert!(erased_at.elapsed() >= Duration::from_millis(900), "410 for the retention: {:?}", erased_at.elapsed());
    assert_eq!(server.get("/papers/p-retention").0, 200);
    assert_eq!(ws_status(&server, "p-retention?user=zed"), 101);
}

// ---- 7. the key ------------------------------------------------------------------------------

/// Runs the binary with these flags and waits for it to exit (it is killed if
/// it does not): its status and what it wrote to stderr.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Command::new(env!("CARGO_BIN_EXE_rollingpaper"))
        .args(["--listen", "127.0.0.1:0", "--store", "memory"])
        .args(args)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let status = eventually("the server to exit", || child.0.try_wait().unwrap());
    let mut stderr = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn the_key_may_come_from_a_file_and_a_short_one_stops_the_server() {
    let dir = TempDir::new("api-key");
    let file = dir.0.join("key");
    std::fs::write(&file, format!("{KEY}\n")).unwrap();
    let server = Server::memory(&["--api-key-file", file.to_str().unwrap()]);
    api(server.addr, "PUT", "/api/papers/p1/notes/n1", Some(json!({"data": {}}))).v();
    let reversed: String = KEY.chars().rev().collect();
    let wrong = call(server.addr, Some(&bearer(&reversed)), "GET", "/api/papers/p1/presence", None);
    assert_refused(&wrong, 401, "unauthorized");

    let short = dir.0.join("short");
    std::fs::write(&short, "0123456789abcdef0123456789abcde\n").unwrap();
    for (args, flag) in [
        (["--api-key", "0123456789abcdef0123456789abcde"], "--api-key"),
        (["--api-key-file", short.to_str().unwrap()], "--api-key-file"),
    ] {
        let (status, stderr) = run_to_exit(&args);
        assert!(!status.success(), "{args:?} must stop the server");
        assert!(stderr.contains(flag) && stderr.contains("32 bytes"), "{args:?}: the error names the flag: {stderr}");
    }
}

// ---- 8. metrics, and 100 Continue --------------------------------------------------------------

/// A PUT sent as curl sends it: the head with `Expect: 100-continue`, the body
/// only once the server said `100 Continue`.
fn put_after_continue(addr: SocketAddr, path: &str, body: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before 100 Continue");
        interim.push(byte[0]);
    }
    assert_eq!(String::from_utf8(interim).unwrap(), "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    read_answer(&mut stream)
}

#[test]
fn api_calls_are_counted_by_route_and_status_and_timed() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY]);
    let metric = |route: &str, status: u16| {
        server.metric(&format!("api_requests_total{{route=\"{route}\",status=\"{status}\"}}"))
    };
    assert_eq!(metric("put_note", 200), 0);
    for i in 0..3 {
        api(server.addr, "PUT", &format!("/api/papers/p-metrics/notes/n{i}"), Some(json!({"data": {"i": i}}))).v();
    }
    // Replacing a note never changes its author (PROTOCOL.md 2).
    api(server.addr, "PUT", "/api/papers/p-metrics/notes/n0", Some(json!({"data": {"i": 0}, "author": "other"}))).v();
    assert_eq!(redis.note("p-metrics", "n0").unwrap()["author"], "service");
    let put = put_after_continue(server.addr, "/api/papers/p-metrics/notes/n3", r#"{"data":{"i":3}}"#);
    let v = put.v();
    assert_eq!(redis.note("p-metrics", "n3"), Some(json!({"author": "service", "data": {"i": 3}, "v": v})));
    assert_refused(&api(server.addr, "DELETE", "/api/papers/p-metrics/notes/missing", None), 404, "not_found");
    assert_eq!(api(server.addr, "GET", "/api/papers/p-metrics/presence", None).status, 200);

    assert_eq!(metric("put_note", 200), 5);
    assert_eq!(metric("delete_note", 404), 1);
    assert_eq!(metric("presence", 200), 1);
    assert_eq!(metric("delete_note", 200), 0);
    let (_, _, text) = server.get("/metrics");
    assert!(text.contains("# TYPE rollingpaper_api_request_seconds histogram\n"), "{text}");
    let count = server.metric("api_request_seconds_count");
    assert!(count >= 7, "every call is timed: {count}");
}

// ---- a node keeps no paper for the API alone -----------------------------------------

#[test]
fn a_paper_written_through_the_api_leaves_memory_after_the_linger() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY, "--paper-linger", "1"]);
    api(server.addr, "PUT", "/api/papers/p-linger/notes/n1", Some(json!({"data": {"text": "hi"}}))).v();
    api(server.addr, "PUT", "/api/papers/p-linger/meta", Some(json!({"data": {"title": "T"}}))).v();
    assert_eq!(server.metric("papers"), 1, "held while it is written");
    eventually_eq("papers in memory once the linger is over", 0, || server.metric("papers"));
    // Presence of a paper nobody holds is read, not loaded.
    assert_eq!(api(server.addr, "GET", "/api/papers/p-other/presence", None).status, 200);
    assert_eq!(server.metric("papers"), 0);
}

// ---- a body larger than a request head -------------------------------------------------

#[test]
fn a_body_larger_than_a_request_head_is_read_whole_at_once_or_in_parts() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY]);
    // 15,000 bytes of text: the body is past the 8 KiB a request head may take.
    let text = "x".repeat(15_000);
    let body = json!({"data": {"text": text}}).to_string();
    let at_once = request("PUT", "/api/papers/p-big/notes/n1", Some(&bearer(KEY)), Some(&body));
    assert_eq!(exchange(server.addr, &at_once).status, 200);
    assert_eq!(stored_note(&redis, "p-big", "n1").unwrap()["data"]["text"], json!(text));
    // The head and some of the body, then the rest: the call waits for it.
    let in_parts = request("PUT", "/api/papers/p-big/notes/n2", Some(&bearer(KEY)), Some(&body));
    let (first, rest) = in_parts.split_at(in_parts.len() - 5_000);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(first.as_bytes()).unwrap();
    stream.flush().unwrap();
    stream.write_all(rest.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut stream).status, 200);
    assert_eq!(stored_note(&redis, "p-big", "n2").unwrap()["data"]["text"], json!(text));
}
