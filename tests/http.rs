//! PROTOCOL.md section 1: the HTTP surface.

use crate::common::Server;

#[test]
fn healthz_answers_ok() {
    let server = Server::memory(&[]);
    let (status, _, body) = server.get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok"));
}

#[test]
fn ws_without_upgrade_is_426_with_the_upgrade_header() {
    let server = Server::memory(&[]);
    let (status, head, body) = server.get("/ws/p1");
    assert_eq!(status, 426);
    assert!(head.to_ascii_lowercase().contains("\r\nupgrade: websocket"), "{head}");
    assert_eq!(body.lines().count(), 1, "one-line body: {body:?}");
}

#[test]
fn paper_ids_are_checked_as_sent() {
    let server = Server::memory(&[]);
    let upgrade = |path: &str| {
        server
            .http(&format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ))
            .0
    };
    assert_eq!(upgrade("/ws/p%31"), 400);
    assert_eq!(upgrade("/ws/"), 400);
    assert_eq!(upgrade(&format!("/ws/{}", "x".repeat(65))), 400);
    assert_eq!(upgrade("/ws/bad.id"), 400);
    // The paper id is checked before the upgrade headers.
    assert_eq!(server.get("/ws/bad.id").0, 400);
    // The longest valid id opens a session.
    let long = "x".repeat(64);
    let client = server.join(&long, "");
    assert_eq!(client.snapshot["paper"], long.as_str());
}

#[test]
fn everything_else_is_404() {
    let server = Server::memory(&[]);
    for path in ["/ws/p1/extra", "/ws", "/healthz/x", "/papersx"] {
        assert_eq!(server.get(path).0, 404, "{path}");
    }
    let (status, _, _) = server.http("POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 404);
}

#[test]
fn garbage_gets_400_and_the_server_goes_on() {
    let server = Server::memory(&[]);
    assert_eq!(server.http("\u{1}\u{2} nonsense\r\n\r\n").0, 400);
    assert_eq!(server.get("/healthz").0, 200);
}
