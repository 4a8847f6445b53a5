//! What nobody can do to the server: flooding, too many connections, foreign
//! origins, slow reading, silence, slow requests (PROTOCOL.md 1 and 3.3).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{deadline, slow_reader_server, upgrade_request, write_until_left, Server, PATIENCE};

#[test]
fn a_session_over_its_rate_is_refused_then_recovers() {
    let server = Server::memory(&["--rate", "2", "--burst", "5"]);
    let mut a = server.join("p-rate", "");
    for i in 0..8 {
        a.send(json!({"type": "ping", "ref": format!("r{i}")}));
    }
    let replies: Vec<String> = (0..8)
        .map(|_| {
            let m = a.next();
            if m["type"] == "error" {
                assert!(m["ref"].is_string(), "{m}");
                m["code"].as_str().unwrap().to_string()
            } else {
                m["type"].as_str().unwrap().to_string()
            }
        })
        .collect();
    assert_eq!(replies.iter().filter(|r| *r == "pong").count(), 5, "{replies:?}");
    assert_eq!(replies.iter().filter(|r| *r == "rate_limited").count(), 3, "{replies:?}");
    // The allowance comes back with time: 2 a second.
    let until = deadline();
    loop {
        a.send(json!({"type": "ping"}));
        let m = a.next();
        if m["type"] == "pong" {
            break;
        }
        assert_eq!(m["code"], "rate_limited");
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(100)); // the refill is time itself
    }
}

#[test]
fn sustained_flooding_closes_with_1008() {
    let server = Server::memory(&["--rate", "1", "--burst", "1"]);
    let mut a = server.join("p-flood", "");
    for _ in 0..300 {
        a.send(json!({"type": "cursor", "data": {}}));
    }
    assert_eq!(a.closed().0, 1008);
}

#[test]
fn the_node_answers_503_at_its_connection_limit() {
    let server = Server::memory(&["--max-connections", "2"]);
    let a = server.join("p-cap", "");
    let _b = server.join("p-cap2", "");
    assert_eq!(server.status_of(&upgrade_request("/ws/p-cap", "")), 503);
    // Checks before the capacity still answer first.
    assert_eq!(server.status_of(&upgrade_request("/ws/bad.id", "")), 400);
    assert_eq!(server.get("/healthz").0, 200);
    a.close();
    crate::common::eventually("a free slot", || {
        (server.status_of(&upgrade_request("/ws/p-cap", "")) == 101).then_some(())
    });
}

#[test]
fn one_address_holds_at_most_its_share() {
    let server = Server::memory(&["--max-connections-per-address", "1"]);
    let _a = server.join("p-addr", "");
    assert_eq!(server.status_of(&upgrade_request("/ws/p-addr", "")), 503);
}

#[test]
fn origins_outside_the_allow_list_get_403() {
    let server = Server::memory(&["--allowed-origins", "https://paper.example,https://other.example/"]);
    let status = |extra: &str| server.status_of(&upgrade_request("/ws/p-origin", extra));
    assert_eq!(status("Origin: https://evil.example\r\n"), 403);
    assert_eq!(status("Origin: null\r\n"), 403);
    assert_eq!(status("Origin: https://paper.example\r\n"), 101);
    assert_eq!(status("Origin: https://other.example\r\n"), 101);
    assert_eq!(status(""), 101, "no Origin: not a browser");
}

#[test]
fn a_slow_reader_is_closed_with_1013_and_slows_nobody() {
    let server = slow_reader_server();
    let mut writer = server.join("p-slow", "");
    let mut slow = server.join("p-slow", "");
    writer.next_of("join");
    let slow_id = slow.you.clone();
    // The slow member never reads; the kernel's buffers fill, then its queue.
    write_until_left(&mut writer, &slow_id);
    // The writer kept its own pace and is still served.
    assert!(writer.drain().iter().all(|m| m["type"] != "error"));
    // What the slow member finally reads ends with the close frame, not the backlog.
    assert_eq!(slow.closed(), (1013, "slow_consumer".to_string()));
}

#[test]
fn a_silent_session_is_closed_after_the_idle_timeout() {
    let server = Server::memory(&["--ping-interval", "0.3", "--idle-timeout", "1"]);
    // Raw socket: completes the handshake, then never answers pings.
    let mut silent = TcpStream::connect(server.addr).unwrap();
    silent.write_all(upgrade_request("/ws/p-idle", "").as_bytes()).unwrap();
    let mut live = server.join("p-idle", "");
    silent.set_read_timeout(Some(PATIENCE)).unwrap();
    // The server pings, then gives up on the silent one and closes it (1001).
    let silent = std::thread::spawn(move || {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = silent.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                return received;
            }
            received.extend_from_slice(&chunk[..n]);
        }
    });
    // Meanwhile the live client reads, and so answers the pings (tungstenite does).
    let until = deadline();
    while !silent.is_finished() {
        assert!(Instant::now() < until, "the silent session was never closed");
        match live.ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("the live session failed: {e}"),
        }
    }
    let received = silent.join().unwrap();
    let close = received.windows(4).any(|w| w == [0x88, 0x06, 0x03, 0xe9]); // close, 6 bytes: 1001 "idle"
    assert!(close, "no 1001 close frame in {:?}", &received[received.len().saturating_sub(16)..]);
    // The live session stays.
    live.drain();
}

#[test]
fn a_request_trickled_too_slowly_is_dropped() {
    let server = Server::memory(&["--handshake-timeout", "0.5"]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.write_all(b"GET /ws/p1 HTTP/1.1\r\nHost: t\r\n").unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    assert_eq!(stream.read(&mut byte).unwrap_or(0), 0, "closed without an answer");
    assert!(started.elapsed() < PATIENCE);
}

#[test]
fn behind_a_trusted_proxy_the_limit_is_per_forwarded_client() {
    let xff = |addr: &str| format!("X-Forwarded-For: {addr}\r\n");
    let trusting = Server::memory(&["--max-connections-per-address", "1", "--trusted-proxies", "127.0.0.1"]);
    let mut open = Vec::new();
    for client in ["203.0.113.1", "203.0.113.2"] {
        let mut stream = TcpStream::connect(trusting.addr).unwrap();
        stream.write_all(upgrade_request("/ws/p-proxy", &xff(client)).as_bytes()).unwrap();
        open.push(stream);
    }
    // Each session holds its client's one slot once its upgrade is answered.
    for stream in &mut open {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
    }
    assert_eq!(trusting.status_of(&upgrade_request("/ws/p-proxy", &xff("203.0.113.1"))), 503);
    assert_eq!(trusting.status_of(&upgrade_request("/ws/p-proxy", &xff("203.0.113.3"))), 101);

    // Without the flag the header is the client's word, and not believed.
    let wary = Server::memory(&["--max-connections-per-address", "1"]);
    let _a = wary.join("p-proxy", "");
    assert_eq!(wary.status_of(&upgrade_request("/ws/p-proxy", &xff("203.0.113.9"))), 503);
}
