//! What the load generator puts on the wire and reads back, by PROTOCOL.md only:
//! the upgrade request, masked client frames, server frames, and the marker a
//! sender writes into each note's `data` so that any receiver can tell which
//! send it sees and when it was made. Knows no sockets.

use memchr::memmem;

/// The fixed `Sec-WebSocket-Key`: the server only has to answer it correctly.
pub const KEY: &str = "cm9sbGluZ3BhcGVybG9hZA==";

/// The marker's opening, as it appears in any JSON the server sends back.
const MARKER: &[u8] = br#""lg":""#;

/// The upgrade request for one member of `paper`; with a token (auth on), the
/// server takes the user from it and ignores `user`. With `since` (PROTOCOL.md
/// 3.1, 1.1), a session that resumes from the greatest version it saw.
pub fn upgrade_request(host: &str, paper: &str, user: &str, token: Option<&str>, since: Option<u64>) -> Vec<u8> {
    let token = token.map_or(String::new(), |t| format!("token={t}&"));
    let since = since.map_or(String::new(), |v| format!("&since={v}"));
    format!(
        "GET /ws/{paper}?{token}user={user}{since} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// How far the upgrade response has come.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The head is not complete yet.
    Partial,
    /// `101` with the right accept key; the head took `len` bytes.
    Upgraded { len: usize },
    /// Anything else: the status line, or what was wrong.
    Refused(String),
}

/// Reads the server's answer to `upgrade_request`.
pub fn read_handshake(buf: &[u8], accept: &str) -> Handshake {
    let Some(end) = memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > 16 * 1024 {
            Handshake::Refused("response head over 16 KiB".into())
        } else {
            Handshake::Partial
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status = head.lines().next().unwrap_or("").trim().to_string();
    if !status.starts_with("HTTP/1.1 101") {
        return Handshake::Refused(format!("upgrade answered {status:?}"));
    }
    let accepted = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == accept
        })
    });
    if !accepted {
        return Handshake::Refused("101 without the right Sec-WebSocket-Accept".into());
    }
    Handshake::Upgraded { len: end + 4 }
}

/// A small, fast generator for mask keys (xorshift64*): masks must vary, they
/// need not be secret for a load test.
pub struct Masks(u64);

impl Masks {
    pub fn new(seed: u64) -> Self {
        Masks(seed | 1)
    }

    pub fn next(&mut self) -> [u8; 4] {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32).to_le_bytes()[..4].try_into().expect("4 bytes")
    }
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Appends one final client frame (masked, as RFC 6455 requires of clients).
pub fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// One frame read from the server.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFrame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// The frame at the start of `buf` and its total length, if it is all there.
///
/// # Errors
/// A frame no server may send (masked, or longer than `max_len`).
pub fn server_frame(buf: &[u8], max_len: usize) -> Result<Option<(ServerFrame<'_>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 != 0 {
        return Err("the server sent a masked frame".into());
    }
    let (header, len) = match b1 & 0x7F {
        126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as u64),
        127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"))),
        126 | 127 => return Ok(None),
        n => (2, n as u64),
    };
    if len > max_len as u64 {
        return Err(format!("a server frame of {len} bytes"));
    }
    let total = header + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((ServerFrame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0F, payload: &buf[header..total] }, total)))
}

/// What a sender writes as a note's `data`: the marker `"lg":"S.Q.T"` (sender
/// index in its paper, its sequence number, send time in microseconds since the
/// run began), padded to `note_bytes` of compact JSON.
pub fn note_data(out: &mut Vec<u8>, sender: u32, seq: u32, t_us: u64, note_bytes: usize) {
    let start = out.len();
    out.extend_from_slice(br#"{"lg":""#);
    push_number(out, sender as u64);
    out.push(b'.');
    push_number(out, seq as u64);
    out.push(b'.');
    push_number(out, t_us);
    out.extend_from_slice(br#"","pad":""#);
    let used = out.len() - start + 2;
    out.resize(out.len() + note_bytes.saturating_sub(used), b'x');
    out.extend_from_slice(br#""}"#);
}

/// The text of an `upsert` of note `note` with a marked `data`.
pub fn upsert_message(out: &mut Vec<u8>, note: u32, sender: u32, seq: u32, t_us: u64, note_bytes: usize) {
    out.extend_from_slice(br#"{"type":"upsert","id":"n"#);
    push_number(out, note as u64);
    out.extend_from_slice(br#"","data":"#);
    note_data(out, sender, seq, t_us, note_bytes);
    out.push(b'}');
}

/// One marker found in a server message.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Marker {
    pub sender: u32,
    pub seq: u32,
    pub t_us: u64,
}

/// Every marker in a server message: one in an `upsert`, one per marked note in
/// a message that carries a whole paper.
pub fn markers(text: &[u8]) -> impl Iterator<Item = Marker> + '_ {
    memmem::find_iter(text, MARKER).filter_map(move |at| parse_marker(&text[at + MARKER.len()..]))
}

fn parse_marker(rest: &[u8]) -> Option<Marker> {
    let mut fields = [0u64; 3];
    let mut i = 0;
    for (n, field) in fields.iter_mut().enumerate() {
        let start = i;
        while let Some(d) = rest.get(i).filter(|b| b.is_ascii_digit()) {
            *field = field.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            i += 1;
        }
        let end = if n == 2 { b'"' } else { b'.' };
        if i == start || rest.get(i) != Some(&end) {
            return None;
        }
        i += 1;
    }
    Some(Marker { sender: u32::try_from(fields[0]).ok()?, seq: u32::try_from(fields[1]).ok()?, t_us: fields[2] })
}

/// The `type` of a server message, without parsing it all.
pub fn message_type(text: &[u8]) -> &[u8] {
    const TYPE: &[u8] = br#""type":""#;
    let Some(at) = memmem::find(text, TYPE) else { return b"" };
    let rest = &text[at + TYPE.len()..];
    let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
    &rest[..end]
}

/// The greatest note version (`"v":N`) in a server message, 0 if none. Looks at
/// the text only, so it must not be given `data` that holds a `"v":` key of its
/// own (the generator's notes never do).
pub fn max_version(text: &[u8]) -> u64 {
    const V: &[u8] = br#""v":"#;
    memmem::find_iter(text, V)
        .filter_map(|at| {
            let digits = &text[at + V.len()..];
            let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
            std::str::from_utf8(&digits[..end]).ok()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// The `code` of an `error` message.
pub fn error_code(text: &[u8]) -> String {
    const CODE: &[u8] = br#""code":""#;
    let Some(at) = memmem::find(text, CODE) else { return "error".into() };
    let rest = &text[at + CODE.len()..];
    let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_data_is_compact_json_of_the_asked_size() {
        let mut out = Vec::new();
        note_data(&mut out, 1, 42, 123_456, 200);
        assert_eq!(out.len(), 200);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["lg"], "1.42.123456");
        // Too small a size still gives valid JSON.
        out.clear();
        note_data(&mut out, 0, 0, 0, 1);
        serde_json::from_slice::<serde_json::Value>(&out).unwrap();
    }

    #[test]
    fn markers_are_found_in_upserts_and_in_whole_papers() {
        let mut msg = Vec::new();
        upsert_message(&mut msg, 3, 1, 7, 99, 64);
        let parsed: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(parsed["id"], "n3");
        assert_eq!(markers(&msg).collect::<Vec<_>>(), vec![Marker { sender: 1, seq: 7, t_us: 99 }]);

        let paper =
            br#"{"type":"paper","notes":[{"data":{"lg":"0.1.5","pad":""}},{"data":{"lg":"1.2.6"}},{"lg":"x"}]}"#;
        let found: Vec<_> = markers(paper).collect();
        assert_eq!(found, vec![Marker { sender: 0, seq: 1, t_us: 5 }, Marker { sender: 1, seq: 2, t_us: 6 }]);
        assert_eq!(message_type(paper), b"paper");
        assert_eq!(error_code(br#"{"type":"error","code":"rate_limited"}"#), "rate_limited");
        let snapshot = br#"{"type":"snapshot","since":9,"notes":[{"id":"a","v":12},{"id":"b","deleted":true,"v":31}]}"#;
        assert_eq!(max_version(snapshot), 31);
        assert_eq!(max_version(br#"{"type":"pong"}"#), 0);
    }

    #[test]
    fn the_upgrade_request_carries_since() {
        let plain = String::from_utf8(upgrade_request("h", "p1", "u1", None, None)).unwrap();
        assert!(plain.starts_with("GET /ws/p1?user=u1 HTTP/1.1\r\n"));
        let resumed = String::from_utf8(upgrade_request("h", "p1", "u1", None, Some(42))).unwrap();
        assert!(resumed.starts_with("GET /ws/p1?user=u1&since=42 HTTP/1.1\r\n"));
    }

    #[test]
    fn client_frames_are_masked_and_read_back() {
        let mut masks = Masks::new(7);
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'a'; len];
            let mut out = Vec::new();
            let mask = masks.next();
            client_frame(&mut out, OP_TEXT, &payload, mask);
            assert_eq!(out[1] & 0x80, 0x80);
            // Unmask and read it as a server frame would be read.
            let header = out.len() - len - 4;
            let mut plain = out[..header].to_vec();
            plain[1] &= 0x7F;
            plain.extend(out[header + 4..].iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
            let (frame, total) = server_frame(&plain, 1 << 20).unwrap().unwrap();
            assert_eq!((frame.fin, frame.opcode, frame.payload.len(), total), (true, OP_TEXT, len, plain.len()));
            assert_eq!(server_frame(&plain[..plain.len() - 1], 1 << 20).unwrap(), None);
        }
    }

    #[test]
    fn handshake_answers_are_read() {
        let accept = tungstenite::handshake::derive_accept_key(KEY.as_bytes());
        let ok = format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {accept}\r\n\r\n\x01\x00");
        assert_eq!(read_handshake(ok.as_bytes(), &accept), Handshake::Upgraded { len: ok.len() - 2 });
        assert_eq!(read_handshake(&ok.as_bytes()[..20], &accept), Handshake::Partial);
        let full = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(read_handshake(full, &accept), Handshake::Refused(s) if s.contains("503")));
    }
}
