//! RFC 6455 conformance through the real server, over raw sockets: the ground
//! the Autobahn|Testsuite case groups cover (framing, reserved bits and opcodes,
//! control frames, fragmentation, UTF-8, the close handshake, limits). Most run on
//! `/echo` (`--echo`), which uses the sessions' framing and output path.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::common::{upgrade_request, Server, PATIENCE};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A client that writes frames by hand, right or wrong.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

impl Raw {
    fn open(server: &Server, path: &str) -> Raw {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(upgrade_request(path, "").as_bytes()).unwrap();
        let mut raw = Raw { stream, buf: Vec::new() };
        let end = loop {
            if let Some(at) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill(), "closed during the handshake");
        };
        let head: Vec<u8> = raw.buf.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&head));
        raw
    }

    fn echo() -> (Server, Raw) {
        let server = Server::memory(&["--echo", "--max-message-bytes", "2048", "--max-note-bytes", "1024"]);
        let raw = Raw::open(&server, "/echo");
        (server, raw)
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Writes one frame; `masked` as a client must, unless the test says otherwise.
    fn send(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => frame.push(mask_bit | n as u8),
            n @ 126..=0xFFFF => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        if masked {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        // The server may close before reading all of it; that is an answer too.
        let _ = self.stream.write_all(&frame);
    }

    fn text(&mut self, payload: &[u8]) {
        self.send(true, 0, TEXT, payload, true);
    }

    /// The next frame from the server, or `None` once the connection is closed.
    fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are never masked");
                let (header, len) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize),
                    127 if self.buf.len() >= 10 => {
                        (10, u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n as usize),
                };
                if header != usize::MAX && self.buf.len() >= header + len {
                    let frame = Frame {
                        fin: self.buf[0] & 0x80 != 0,
                        opcode: self.buf[0] & 0x0F,
                        payload: self.buf[header..header + len].to_vec(),
                    };
                    self.buf.drain(..header + len);
                    return Some(frame);
                }
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Reads until the server's close frame; returns its code.
    fn close_code(&mut self) -> u16 {
        loop {
            let frame = self.frame().expect("the connection ended without a close frame");
            if frame.opcode == CLOSE {
                assert!(frame.payload.len() >= 2, "close without a code");
                return u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
            }
        }
    }

    /// After the close handshake the server closes the TCP connection.
    fn expect_eof(&mut self) {
        if let Some(frame) = self.frame() {
            panic!("a frame after the close: {frame:?}");
        }
    }
}

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Option<Frame> {
    Some(Frame { fin, opcode, payload: payload.to_vec() })
}

#[test]
fn text_and_binary_messages_come_back_whole() {
    let (_server, mut c) = Raw::echo();
    c.text(b"hello");
    assert_eq!(c.frame(), frame(true, TEXT, b"hello"));
    c.send(true, 0, BINARY, &[0, 1, 2, 255], true);
    assert_eq!(c.frame(), frame(true, BINARY, &[0, 1, 2, 255]));
    let medium = vec![b'm'; 300];
    c.text(&medium);
    assert_eq!(c.frame(), frame(true, TEXT, &medium));
    c.text(b"");
    assert_eq!(c.frame(), frame(true, TEXT, b""));
}

#[test]
fn unmasked_client_frames_are_refused_with_1002() {
    let (_server, mut c) = Raw::echo();
    c.send(true, 0, TEXT, b"hello", false);
    assert_eq!(c.close_code(), 1002);
}

#[test]
fn reserved_bits_and_opcodes_are_refused_with_1002() {
    for (rsv, opcode) in [(4, TEXT), (2, TEXT), (1, BINARY), (0, 0x3), (0, 0x7), (0, 0xB), (0, 0xF)] {
        let (_server, mut c) = Raw::echo();
        c.send(true, rsv, opcode, b"x", true);
        assert_eq!(c.close_code(), 1002, "rsv {rsv} opcode {opcode:#x}");
    }
}

#[test]
fn pings_get_pongs_with_the_same_payload() {
    let (_server, mut c) = Raw::echo();
    c.send(true, 0, PING, b"are you there", true);
    assert_eq!(c.frame(), frame(true, PONG, b"are you there"));
    c.send(true, 0, PING, &[], true);
    assert_eq!(c.frame(), frame(true, PONG, b""));
    let max = vec![7u8; 125];
    c.send(true, 0, PING, &max, true);
    assert_eq!(c.frame(), frame(true, PONG, &max));
    // An unsolicited pong is fine and gets no answer.
    c.send(true, 0, PONG, b"hi", true);
    c.text(b"after");
    assert_eq!(c.frame(), frame(true, TEXT, b"after"));
}

#[test]
fn control_frames_over_125_bytes_or_fragmented_are_refused() {
    let (_server, mut c) = Raw::echo();
    c.send(true, 0, PING, &[0u8; 126], true);
    assert_eq!(c.close_code(), 1002);
    let (_server, mut c) = Raw::echo();
    c.send(false, 0, PING, b"half", true);
    assert_eq!(c.close_code(), 1002);
}

#[test]
fn fragments_are_reassembled_with_control_frames_in_between() {
    let (_server, mut c) = Raw::echo();
    c.send(false, 0, TEXT, b"he", true);
    c.send(false, 0, CONTINUATION, b"ll", true);
    c.send(true, 0, PING, b"mid", true);
    c.send(true, 0, CONTINUATION, b"o", true);
    assert_eq!(c.frame(), frame(true, PONG, b"mid"));
    assert_eq!(c.frame(), frame(true, TEXT, b"hello"));
}

#[test]
fn a_continuation_without_a_start_is_refused() {
    let (_server, mut c) = Raw::echo();
    c.send(true, 0, CONTINUATION, b"orphan", true);
    assert_eq!(c.close_code(), 1002);
}

#[test]
fn a_new_message_before_the_last_one_ended_is_refused() {
    let (_server, mut c) = Raw::echo();
    c.send(false, 0, TEXT, b"first", true);
    c.send(true, 0, TEXT, b"second", true);
    assert_eq!(c.close_code(), 1002);
}

#[test]
fn text_must_be_utf8_even_split_across_fragments() {
    let (_server, mut c) = Raw::echo();
    // "é" split between two fragments is valid.
    c.send(false, 0, TEXT, &[b'c', b'a', b'f', 0xC3], true);
    c.send(true, 0, CONTINUATION, &[0xA9], true);
    assert_eq!(c.frame(), frame(true, TEXT, "café".as_bytes()));
    c.text(&[0xF0, 0x9F, 0x8E, 0x89]);
    assert_eq!(c.frame(), frame(true, TEXT, "🎉".as_bytes()));

    c.text(&[b'a', 0xFF, b'b']);
    assert_eq!(c.close_code(), 1007);

    let (_server, mut c) = Raw::echo();
    c.send(false, 0, TEXT, &[0xC3], true);
    c.send(true, 0, CONTINUATION, b"A", true);
    assert_eq!(c.close_code(), 1007);

    let (_server, mut c) = Raw::echo();
    c.text(&[0xED, 0xA0, 0x80]); // a UTF-16 surrogate, not a code point
    assert_eq!(c.close_code(), 1007);
}

#[test]
fn the_close_handshake_echoes_the_code_and_then_nothing_is_read() {
    let (_server, mut c) = Raw::echo();
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    c.send(true, 0, CLOSE, &payload, true);
    c.text(b"too late");
    assert_eq!(c.close_code(), 1000);
    c.expect_eof();

    let (_server, mut c) = Raw::echo();
    c.send(true, 0, CLOSE, &3000u16.to_be_bytes(), true);
    assert_eq!(c.close_code(), 3000, "application codes are echoed too");
    c.expect_eof();

    let (_server, mut c) = Raw::echo();
    c.send(true, 0, CLOSE, &[], true);
    let reply = loop {
        let f = c.frame().expect("a close reply");
        if f.opcode == CLOSE {
            break f;
        }
    };
    assert!(reply.payload.is_empty() || reply.payload[..2] == 1000u16.to_be_bytes(), "{reply:?}");
    c.expect_eof();
}

#[test]
fn invalid_close_codes_and_payloads_are_refused() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let (_server, mut c) = Raw::echo();
        c.send(true, 0, CLOSE, &code.to_be_bytes(), true);
        assert_eq!(c.close_code(), 1002, "close code {code}");
    }
    let (_server, mut c) = Raw::echo();
    c.send(true, 0, CLOSE, &[0x03], true);
    assert_eq!(c.close_code(), 1002, "a one-byte close payload");
    let (_server, mut c) = Raw::echo();
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0xFF, 0xFE]);
    c.send(true, 0, CLOSE, &payload, true);
    let code = c.close_code();
    assert!(code == 1007 || code == 1002, "a reason that is not UTF-8: {code}");
}

#[test]
fn messages_over_the_limit_close_with_1009_whole_or_fragmented() {
    let (_server, mut c) = Raw::echo();
    let at_limit = vec![b'x'; 2048];
    c.text(&at_limit);
    assert_eq!(c.frame(), frame(true, TEXT, &at_limit));
    c.text(&vec![b'x'; 2049]);
    assert_eq!(c.close_code(), 1009);

    let (_server, mut c) = Raw::echo();
    c.send(false, 0, TEXT, &[b'y'; 1500], true);
    c.send(true, 0, CONTINUATION, &[b'y'; 1500], true);
    assert_eq!(c.close_code(), 1009);

    let (_server, mut c) = Raw::echo();
    // A length field far beyond any limit is refused from the header alone.
    c.stream.write_all(&[0x81, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4]).unwrap();
    assert_eq!(c.close_code(), 1009);
}

#[test]
fn sessions_apply_the_same_rules() {
    let server = Server::memory(&[]);
    let mut c = Raw::open(&server, "/ws/p-raw");
    let snapshot = c.frame().unwrap();
    assert_eq!(snapshot.opcode, TEXT);
    c.send(true, 0, TEXT, br#"{"type":"ping"}"#, false);
    assert_eq!(c.close_code(), 1002);

    let mut c = Raw::open(&server, "/ws/p-raw");
    c.frame().unwrap();
    c.text(&[b'{', 0xFF, b'}']);
    assert_eq!(c.close_code(), 1007);

    let mut c = Raw::open(&server, "/ws/p-raw");
    c.frame().unwrap();
    c.send(false, 0, TEXT, br#"{"type":"#, true);
    c.send(true, 0, CONTINUATION, br#""ping"}"#, true);
    assert_eq!(c.frame(), frame(true, TEXT, br#"{"type":"pong"}"#));
}

#[test]
fn echo_is_off_unless_asked_for() {
    let server = Server::memory(&[]);
    assert_eq!(server.status_of(&upgrade_request("/echo", "")), 404);
}

#[test]
fn the_rest_of_an_oversized_message_is_dropped_and_the_loop_serves_on() {
    // One loop, so that the session after it lives where the refused one did.
    let server = Server::memory(&["--threads", "1", "--max-message-bytes", "2048", "--max-note-bytes", "1024"]);
    let mut c = Raw::open(&server, "/ws/p-big");
    c.frame().unwrap();
    let payload = vec![b'x'; 70_000];
    c.send(true, 0, TEXT, &payload, true);
    // More frames behind it, as a client that has not seen the close yet sends them.
    for _ in 0..20 {
        c.text(br#"{"type":"ping"}"#);
    }
    assert_eq!(c.close_code(), 1009);
    c.expect_eof();
    let mut other = server.join("p-big", "");
    assert!(other.drain().is_empty());
}
