//! PROTOCOL.md section 5: tokens, roles and note ownership, with auth on.

use serde_json::{json, Value};

use crate::common::{token, unix_now, upgrade_request, Client, Server, SECRET};

fn server() -> Server {
    Server::memory(&["--jwt-secret", SECRET])
}

fn join(server: &Server, sub: &str, role: &str) -> Client {
    server.join("p1", &format!("token={}&user=spoofed", token(sub, "p1", role, unix_now() + 600)))
}

fn refused(client: &mut Client, msg: Value) -> String {
    client.send(msg);
    loop {
        let reply = client.next();
        match reply["type"].as_str() {
            Some("error") => return reply["code"].as_str().unwrap().to_string(),
            Some("upsert" | "delete" | "completed")
                if reply["from"] == client.you.as_str() || reply["type"] == "completed" =>
            {
                return "accepted".to_string()
            }
            _ => {}
        }
    }
}

#[test]
fn sessions_need_a_valid_token_for_their_paper() {
    let server = server();
    let status = |path: &str| server.status_of(&upgrade_request(path, ""));
    let later = unix_now() + 600;
    assert_eq!(status("/ws/p1"), 401);
    assert_eq!(status("/ws/p1?token=garbage"), 401);
    assert_eq!(status(&format!("/ws/p1?token={}", token("u1", "p1", "writer", unix_now() - 60))), 401, "expired");
    let forged = {
        let claims = json!({"sub": "u1", "paper": "p1", "role": "owner", "exp": later});
        let key = jsonwebtoken::EncodingKey::from_secret(b"another secret of some length");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    assert_eq!(status(&format!("/ws/p1?token={forged}")), 401, "badly signed");
    assert_eq!(status(&format!("/ws/p1?token={}", token("u1", "p2", "owner", later))), 403, "another paper");
    assert_eq!(status(&format!("/ws/p1?token={}", token("svc", "p1", "service", later))), 403, "service role");
    assert_eq!(status(&format!("/ws/p1?token={}", token("u1", "p1", "viewer", later))), 101);
    // Route and paper id come before the token.
    assert_eq!(status("/ws/p1/x"), 404);
    assert_eq!(status("/ws/p%201"), 400);
}

#[test]
fn the_token_says_who_the_member_is() {
    let server = server();
    let a = join(&server, "alice", "writer");
    let me = &a.snapshot["members"][0];
    assert_eq!((me["user"].as_str(), me["name"].as_str()), (Some("alice"), Some("alice name")));
}

#[test]
fn viewers_read_and_point_but_never_write() {
    let server = server();
    let mut owner = join(&server, "olga", "owner");
    let mut viewer = join(&server, "vic", "viewer");
    owner.upsert("n1", json!({"t": 1}));
    assert_eq!(viewer.next_of("upsert")["id"], "n1");
    assert_eq!(refused(&mut viewer, json!({"type": "upsert", "id": "n2", "data": {}})), "forbidden");
    assert_eq!(refused(&mut viewer, json!({"type": "upsert", "id": "n1", "data": {}})), "forbidden");
    assert_eq!(refused(&mut viewer, json!({"type": "delete", "id": "n1"})), "forbidden");
    assert_eq!(refused(&mut viewer, json!({"type": "complete"})), "forbidden");
    viewer.send(json!({"type": "cursor", "data": {"x": 1}}));
    assert_eq!(owner.next_of("cursor")["from"], viewer.you.as_str());
    viewer.send(json!({"type": "ping"}));
    assert_eq!(viewer.next_of("pong")["type"], "pong");
    // Nothing refused reached anyone.
    assert!(owner.drain().iter().all(|m| m["type"] != "upsert" && m["type"] != "delete"));
}

#[test]
fn writers_change_only_their_own_notes() {
    let server = server();
    let mut ann = join(&server, "ann", "writer");
    let mut bob = join(&server, "bob", "writer");
    ann.upsert("mine", json!({"t": "ann"}));
    let created = bob.next_of("upsert");
    assert_eq!(created["author"], "ann", "the author is the token's sub, never the query's user");
    assert_eq!(refused(&mut bob, json!({"type": "upsert", "id": "mine", "data": {"t": "bob"}})), "forbidden");
    assert_eq!(refused(&mut bob, json!({"type": "delete", "id": "mine", "ref": "x"})), "forbidden");
    assert_eq!(refused(&mut bob, json!({"type": "complete"})), "forbidden");
    assert_eq!(refused(&mut ann, json!({"type": "upsert", "id": "mine", "data": {"t": "ann 2"}})), "accepted");
    assert_eq!(refused(&mut ann, json!({"type": "delete", "id": "mine"})), "accepted");
    // Deleted, the id is free: bob creates it again and owns it.
    assert_eq!(refused(&mut bob, json!({"type": "upsert", "id": "mine", "data": {}})), "accepted");
}

#[test]
fn owners_moderate_any_note_and_complete() {
    let server = server();
    let mut ann = join(&server, "ann", "writer");
    let mut olga = join(&server, "olga", "owner");
    ann.upsert("n1", json!({"t": 1}));
    olga.next_of("upsert");
    ann.next_of("upsert");
    olga.upsert("n1", json!({"t": "moderated"}));
    let moderated = ann.next_of("upsert");
    assert_eq!((moderated["author"].as_str(), moderated["data"]["t"].as_str()), (Some("ann"), Some("moderated")));
    assert_eq!(refused(&mut olga, json!({"type": "delete", "id": "n1"})), "accepted");
    olga.send(json!({"type": "complete"}));
    assert_eq!(ann.next_of("completed")["by"], "olga");
}

#[test]
fn a_session_is_closed_with_1008_when_its_token_expires() {
    let server = server();
    let exp = unix_now() + 2;
    let mut a = server.join("p1", &format!("token={}", token("ann", "p1", "writer", exp)));
    let (code, _) = a.closed();
    assert_eq!(code, 1008);
    assert!(unix_now() >= exp && unix_now() <= exp + 5 + 1, "closed within 5 s of exp");
}

#[test]
fn papers_api_needs_an_owner_or_service_token() {
    let server = server();
    let later = unix_now() + 600;
    let get = |auth: &str| server.http(&format!("GET /papers/p1 HTTP/1.1\r\nHost: t\r\n{auth}\r\n"));
    assert_eq!(get("").0, 401);
    assert_eq!(get("Authorization: Bearer nope\r\n").0, 401);
    assert_eq!(get(&format!("Authorization: Bearer {}\r\n", token("w", "p1", "writer", later))).0, 403);
    assert_eq!(get(&format!("Authorization: Bearer {}\r\n", token("s", "p2", "service", later))).0, 403);
    let (status, _, body) = get(&format!("Authorization: Bearer {}\r\n", token("s", "p1", "service", later)));
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"paper": "p1", "completed": false, "meta": {"data": {}, "v": 0}, "notes": []})
    );
    let (status, _, _) = get(&format!("Authorization: Bearer {}\r\n", token("o", "p1", "owner", later)));
    assert_eq!(status, 200);
}
