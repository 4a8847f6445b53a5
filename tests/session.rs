//! PROTOCOL.md section 3: the WebSocket session, message by message.

use serde_json::{json, Value};
use tungstenite::Message;

use crate::common::{Client, Server};

fn refusal(client: &mut Client, msg: Value) -> Value {
    client.send(msg);
    let error = client.next_of("error");
    // The session goes on after any refusal.
    assert!(client.drain().iter().all(|m| m["type"] != "error"));
    error
}

#[test]
fn snapshot_comes_first_then_only_changes_to_every_member() {
    let server = Server::memory(&[]);
    let mut a = server.join("p1", "user=u1&name=Kim");
    assert_eq!(a.snapshot["paper"], "p1");
    assert_eq!(a.snapshot["completed"], false);
    assert_eq!(a.snapshot["notes"], json!([]));
    assert_eq!(a.snapshot["members"], json!([{"id": a.you, "user": "u1", "name": "Kim"}]));

    let mut b = server.join("p1", "user=u2");
    let join = a.next();
    assert_eq!(join, json!({"type": "join", "member": {"id": b.you, "user": "u2", "name": "u2"}}));
    assert_eq!(b.snapshot["members"].as_array().unwrap().len(), 2);
    assert_ne!(a.you, b.you);

    a.send(json!({"type": "upsert", "id": "n1", "data": {"text": "hi"}, "ref": "r1"}));
    let a_id = a.you.clone();
    for client in [&mut a, &mut b] {
        let upsert = client.next_of("upsert");
        assert_eq!(upsert["id"], "n1");
        assert_eq!(upsert["author"], "u1");
        assert_eq!(upsert["data"], json!({"text": "hi"}));
        assert_eq!(upsert["from"], a_id.as_str());
        assert_eq!(upsert["ref"], "r1");
        assert!(upsert["v"].as_u64().unwrap() > 0);
    }
    // b sees exactly one change, no snapshot again.
    assert!(b.drain().is_empty());

    let c = server.join("p1", "");
    let notes = c.snapshot["notes"].as_array().unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0]["id"], "n1");
    assert_eq!(notes[0]["author"], "u1");
    assert_eq!(notes[0]["data"], json!({"text": "hi"}));
    // Without a user, the user is the session id and the name the user.
    let me = c.snapshot["members"].as_array().unwrap().iter().find(|m| m["id"] == c.you.as_str()).unwrap().clone();
    assert_eq!(me, json!({"id": c.you, "user": c.you, "name": c.you}));
    c.close();
}

#[test]
fn from_names_the_sender_and_its_ref_reaches_everyone() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-ref", "");
    let mut b = server.join("p-ref", "");
    b.send(json!({"type": "upsert", "id": "n1", "data": {}, "ref": "mine"}));
    let seen_by_a = a.next_of("upsert");
    let seen_by_b = b.next_of("upsert");
    assert_eq!(seen_by_a, seen_by_b, "one encoded frame serves every member");
    assert_eq!(seen_by_a["from"], b.you.as_str());
    assert_eq!(seen_by_a["ref"], "mine");
    assert!(seen_by_a.get("ref").is_some());
    b.upsert("n2", json!({}));
    assert!(a.next_of("upsert").get("ref").is_none(), "no ref, no ref field");
}

#[test]
fn delete_reaches_every_member_and_a_second_delete_is_not_found() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-del", "");
    let mut b = server.join("p-del", "");
    a.upsert("n1", json!({"t": 1}));
    let created = b.next_of("upsert");
    b.send(json!({"type": "delete", "id": "n1", "ref": "d1"}));
    let b_id = b.you.clone();
    for client in [&mut a, &mut b] {
        let delete = client.next_of("delete");
        assert_eq!(delete["id"], "n1");
        assert_eq!(delete["from"], b_id.as_str());
        assert_eq!(delete["ref"], "d1");
        assert!(delete["v"].as_u64() > created["v"].as_u64());
    }
    let error = refusal(&mut a, json!({"type": "delete", "id": "n1", "ref": "again"}));
    assert_eq!(error["code"], "not_found");
    assert_eq!(error["ref"], "again");
    let error = refusal(&mut a, json!({"type": "delete", "id": "never"}));
    assert_eq!(error["code"], "not_found");
    assert!(error.get("ref").is_none());
    let late = server.join("p-del", "");
    assert_eq!(late.snapshot["notes"], json!([]));
}

#[test]
fn cursor_goes_to_everyone_but_the_sender() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-cur", "");
    let mut b = server.join("p-cur", "");
    a.send(json!({"type": "cursor", "data": {"x": 10, "y": 20}}));
    let cursor = b.next_of("cursor");
    assert_eq!(cursor, json!({"type": "cursor", "from": a.you, "data": {"x": 10, "y": 20}}));
    assert!(a.drain().iter().all(|m| m["type"] != "cursor"), "the sender gets no echo");
    let late = server.join("p-cur", "");
    assert_eq!(late.snapshot["notes"], json!([]), "cursors are never stored");
}

#[test]
fn join_and_leave_reach_the_others() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-presence", "user=ann");
    let b = server.join("p-presence", "user=bob&name=Bob%20B");
    let join = a.next_of("join");
    assert_eq!(join["member"], json!({"id": b.you, "user": "bob", "name": "Bob B"}));
    let b_id = b.you.clone();
    b.close();
    assert_eq!(a.next_of("leave"), json!({"type": "leave", "member": b_id}));
    // The joiner itself gets no join.
    let c = server.join("p-presence", "");
    assert!(c.snapshot["members"].as_array().unwrap().iter().any(|m| m["id"] == a.you.as_str()));
    drop(c); // a vanished peer, no close handshake: still a leave
    assert!(a.next_of("leave")["member"].as_str().is_some());
}

#[test]
fn a_close_from_the_client_is_echoed_with_1000() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-bye", "");
    let mut b = server.join("p-bye", "");
    let normal = tungstenite::protocol::CloseFrame { code: 1000.into(), reason: "bye".into() };
    a.ws.close(Some(normal)).unwrap();
    assert_eq!(a.closed().0, 1000);
    assert_eq!(b.next_of("leave")["member"], a.you.as_str());
}

#[test]
fn frames_sent_with_the_upgrade_request_are_read() {
    use std::io::{Read, Write};
    let server = Server::memory(&["--threads", "3"]);
    // Several papers, so that some are owned by a loop other than the one that
    // read the request and the early bytes travel with the hand-off.
    for paper in ["early-a", "early-b", "early-c", "early-d"] {
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(crate::common::PATIENCE)).unwrap();
        let mut bytes = format!(
            "GET /ws/{paper} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .into_bytes();
        let payload = br#"{"type":"ping"}"#;
        let mask = [1u8, 2, 3, 4];
        bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
        bytes.extend_from_slice(&mask);
        bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        stream.write_all(&bytes).unwrap();

        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&received).contains(r#"{"type":"pong"}"#) {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before the pong: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with("HTTP/1.1 101 "));
        assert!(text.find(r#""type":"snapshot""#).unwrap() < text.find(r#"{"type":"pong"}"#).unwrap());
    }
}

#[test]
fn ping_is_answered_with_pong() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-ping", "");
    a.send(json!({"type": "ping"}));
    assert_eq!(a.next(), json!({"type": "pong"}));
}

#[test]
fn every_refusal_code_changes_nothing_and_keeps_the_session() {
    let server = Server::memory(&["--max-note-bytes", "100", "--max-notes", "2"]);
    let mut a = server.join("p-refuse", "");
    let mut b = server.join("p-refuse", "");
    a.next_of("join");

    a.send_text("{not json");
    assert_eq!(a.next_of("error")["code"], "invalid_json");
    let cases = [
        (json!({"type": "shout", "ref": "r"}), "invalid_message"),
        (json!({"id": "n1", "data": {}}), "invalid_message"),
        (json!({"type": "upsert", "id": "bad id", "data": {}, "ref": "r"}), "invalid_message"),
        (json!({"type": "upsert", "id": "x".repeat(65), "data": {}}), "invalid_message"),
        (json!({"type": "upsert", "id": "n1", "data": "text", "ref": "r"}), "invalid_message"),
        (json!({"type": "upsert", "id": "n1", "ref": "r"}), "invalid_message"),
        (json!({"type": "cursor", "data": [1]}), "invalid_message"),
        (json!({"type": "ping", "ref": 5}), "invalid_message"),
        (json!({"type": "upsert", "id": "n1", "data": {"t": "x".repeat(93)}, "ref": "r"}), "too_large"),
        (json!({"type": "cursor", "data": {"t": "x".repeat(1017)}}), "too_large"),
        (json!({"type": "delete", "id": "nope", "ref": "r"}), "not_found"),
    ];
    for (msg, code) in cases {
        let had_ref = msg.get("ref").is_some_and(Value::is_string);
        let error = refusal(&mut a, msg.clone());
        assert_eq!(error["code"], code, "{msg}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        if had_ref {
            assert_eq!(error["ref"], "r", "{msg}");
        }
    }
    a.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(a.next_of("error")["code"], "invalid_message");

    // At the note limit: exactly 100 bytes pass, two notes fit, a third does not.
    a.upsert("n1", json!({"t": "x".repeat(92)}));
    a.upsert("n2", json!({}));
    let error = refusal(&mut a, json!({"type": "upsert", "id": "n3", "data": {}, "ref": "r3"}));
    assert_eq!((error["code"].as_str(), error["ref"].as_str()), (Some("paper_full"), Some("r3")));
    a.upsert("n2", json!({"replaced": true})); // replacing never hits it

    // Nothing refused reached the other member.
    let seen: Vec<Value> = b.drain();
    let ids: Vec<&str> = seen.iter().filter(|m| m["type"] == "upsert").map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["n1", "n2", "n2"]);
    assert!(seen.iter().all(|m| m["type"] != "error"));
}

#[test]
fn a_message_over_the_limit_closes_with_1009() {
    let server = Server::memory(&["--max-message-bytes", "2048", "--max-note-bytes", "1000"]);
    let mut a = server.join("p-big", "");
    let mut b = server.join("p-big", "");
    a.send_text(&format!(r#"{{"type":"upsert","id":"n","data":{{"t":"{}"}}}}"#, "x".repeat(2100)));
    assert_eq!(a.closed().0, 1009);
    assert_eq!(b.next_of("leave")["member"], a.you.as_str());
    // At the limit: refused as too_large, not closed.
    let (head, tail) = (r#"{"type":"upsert","id":"n","data":{"t":""#, r#""}}"#);
    let at = format!("{head}{}{tail}", "x".repeat(2048 - head.len() - tail.len()));
    assert_eq!(at.len(), 2048);
    b.send_text(&at);
    assert_eq!(b.next_of("error")["code"], "too_large");
}

#[test]
fn a_full_paper_closes_the_next_session_with_1013() {
    let server = Server::memory(&["--max-members", "2"]);
    let _a = server.join("p-full", "");
    let _b = server.join("p-full", "");
    let mut c = server.connect("/ws/p-full");
    assert_eq!(c.closed(), (1013, "paper_full".to_string()));
    let _d = server.join("p-other", "");
}

#[test]
fn completion_seals_the_paper_for_everyone() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-done", "user=owner");
    let mut b = server.join("p-done", "");
    a.upsert("n1", json!({"t": 1}));
    let n1 = b.next_of("upsert");
    b.send(json!({"type": "complete"}));
    // 1.1: `completed` carries the paper exactly as sealed.
    let sealed = json!([{"id": "n1", "author": "owner", "data": {"t": 1}, "v": n1["v"]}]);
    assert_eq!(a.next_of("completed"), json!({"type": "completed", "by": b.you, "notes": sealed}));
    assert_eq!(b.next_of("completed")["by"], b.you.as_str());

    let error = refusal(&mut a, json!({"type": "upsert", "id": "n1", "data": {}, "ref": "late"}));
    assert_eq!((error["code"].as_str(), error["ref"].as_str()), (Some("paper_completed"), Some("late")));
    assert_eq!(refusal(&mut a, json!({"type": "delete", "id": "n1"}))["code"], "paper_completed");
    let again = refusal(&mut a, json!({"type": "complete", "ref": "c1"}));
    assert_eq!((again["code"].as_str(), again["ref"].as_str()), (Some("paper_completed"), Some("c1")));
    // Cursors are still allowed.
    a.send(json!({"type": "cursor", "data": {"x": 1}}));
    assert_eq!(b.next_of("cursor")["from"], a.you.as_str());

    let c = server.join("p-done", "");
    assert_eq!(c.snapshot["completed"], true);
    assert_eq!(c.snapshot["notes"].as_array().unwrap().len(), 1);
}

#[test]
fn memory_store_confirms_each_edit_as_saved() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-saved", "");
    a.upsert("n1", json!({}));
    let v = a.next_of("upsert")["v"].as_u64().unwrap();
    assert_eq!(a.next_of("saved"), json!({"type": "saved", "v": v}));
}

#[test]
fn papers_on_every_loop_broadcast() {
    // With four loops, most papers live on a loop other than the one that accepted
    // some of their connections: the hand-off path carries them.
    let server = Server::memory(&["--threads", "4"]);
    let mut pairs: Vec<(Client, Client)> =
        (0..12).map(|i| (server.join(&format!("loop{i}"), ""), server.join(&format!("loop{i}"), ""))).collect();
    for (i, (a, _)) in pairs.iter_mut().enumerate() {
        a.upsert("n", json!({"paper": i}));
    }
    for (i, (a, b)) in pairs.iter_mut().enumerate() {
        assert_eq!(a.next_of("upsert")["data"]["paper"], i);
        assert_eq!(b.next_of("upsert")["data"]["paper"], i);
    }
}
