//! Tests of the wire contract: parsing, refusals, frames, relayed messages.

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
    assert_eq!(parse(r#"{"type":"cursor","data":{"x":1}}"#).unwrap(), ClientMsg::Cursor { data: r#"{"x":1}"#.into() });
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
    let done = paper_document(&paper("p1", true), [NoteView { id: "n", author: "a", data: "{}", v: 3 }].into_iter());
    assert_eq!(
        serde_json::from_str::<Value>(&done).unwrap(),
        json!({"paper":"p1","completed":true,"meta":{"data":{},"v":0},"notes":[{"id":"n","author":"a","data":{},"v":3}]})
    );
}

#[test]
fn a_snapshot_in_parts_is_the_snapshot_whole() {
    let data = format!(r#"{{"t":"{}"}}"#, "x".repeat(500));
    for count in [0, 1, 200] {
        let ids: Vec<String> = (0..count).map(|i| format!("n{i}")).collect();
        let notes =
            || ids.iter().enumerate().map(|(i, id)| NoteView { id, author: "u1", data: &data, v: i as u64 + 1 });
        let members = [MemberView { id: "c7", user: "u1", name: "Kim" }];
        let view = paper("p1", count == 1);
        let mut whole = Frame::new();
        whole.snapshot(&view, "c7", notes(), members.iter().map(|m| MemberView { ..*m }));
        let body = crate::protocol::frame::paper_body(&view, notes());
        let end = crate::protocol::frame::snapshot_end(members.iter().map(|m| MemberView { ..*m }));
        let mut parts = Frame::new();
        let mut joined = parts.snapshot_start("p1", "c7", body.len() + end.len()).to_vec();
        joined.extend_from_slice(&body);
        joined.extend_from_slice(&end);
        assert!(joined == whole.bytes(), "{count} notes: the parts differ from the snapshot");
        let mut document = crate::protocol::frame::document_start("p1");
        document.extend_from_slice(&body);
        document.extend_from_slice(crate::protocol::frame::DOCUMENT_END);
        assert_eq!(document, paper_document(&view, notes()).into_bytes());
    }
}
