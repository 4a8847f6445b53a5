//! A connection's lifecycle: whatever phase a client leaves in, its socket is
//! released, and every phase that waits on the client has a deadline, on the
//! loop that accepted it or on the one it was handed to.

use std::io::{Read, Write};
use std::net::TcpStream;

use serde_json::json;

use crate::common::{eventually, upgrade_request, Server, PATIENCE};

/// Descriptors the server process holds open.
fn open_descriptors(server: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid())).map_or(0, |dir| dir.count())
}

fn connect(server: &Server, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

#[test]
fn connections_that_end_in_any_phase_are_released() {
    let server = Server::memory(&["--threads", "2"]);
    let baseline = open_descriptors(&server);
    let mut streams = Vec::new();
    for i in 0..10 {
        // A request head never finished, an upgrade and a read dropped before
        // their answer (some handed to the other loop): each paper id lands on
        // either loop.
        streams.push(connect(&server, b"GET /ws/p HTTP/1.1\r\nHost: t\r\n"));
        streams.push(connect(&server, upgrade_request(&format!("/ws/early-{i}"), "").as_bytes()));
        streams.push(connect(&server, format!("GET /papers/early-{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()));
        // A member gone without a close frame, and one that broke the framing
        // (an unmasked client frame) before going.
        let member = server.join(&format!("early-{i}"), "");
        let mut broken = server.join(&format!("early-{i}"), "");
        drop(member);
        if let tungstenite::stream::MaybeTlsStream::Plain(stream) = broken.ws.get_mut() {
            stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
        }
        streams.push(connect(&server, upgrade_request(&format!("/ws/early-{i}"), "").as_bytes()));
    }
    eventually("the held connections to be open", || (open_descriptors(&server) >= baseline + 20).then_some(()));
    drop(streams);
    eventually("the server to release every connection", || (open_descriptors(&server) <= baseline).then_some(()));
}

#[test]
fn a_reply_nobody_reads_is_dropped_at_the_handshake_deadline_on_either_loop() {
    let server =
        Server::memory(&["--threads", "2", "--handshake-timeout", "1", "--rate", "100000", "--burst", "100000"]);
    // About 15 MB of notes: more than the socket buffers take for a reader that
    // never reads (4 MiB of send buffer at most here).
    let mut writer = server.join("big", "");
    let text = "x".repeat(15_000);
    for batch in 0..20 {
        for i in 0..50 {
            writer.upsert(&format!("n{batch}-{i}"), json!({"t": text}));
        }
        for _ in 0..50 {
            writer.next_of("upsert");
        }
    }
    let baseline = open_descriptors(&server);
    // The accepting loop is whichever wakes first: with six requests, some are
    // handed to the loop that owns the paper.
    let mut readers: Vec<TcpStream> =
        (0..6).map(|_| connect(&server, b"GET /papers/big HTTP/1.1\r\nHost: t\r\n\r\n")).collect();
    eventually("the readers to be connected", || (open_descriptors(&server) >= baseline + 6).then_some(()));
    eventually("every unread reply to be dropped", || (open_descriptors(&server) <= baseline).then_some(()));
    for reader in &mut readers {
        reader.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = Vec::new();
        let _ = reader.read_to_end(&mut got);
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("a reply head") + 4;
        let head = String::from_utf8_lossy(&got[..head_end]).to_string();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.trim().parse().ok()).unwrap();
        assert!(got.len() - head_end < length, "the whole reply was held for a reader that did not read");
    }
}
