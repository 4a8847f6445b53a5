//! The notes a session holds, kept from what it receives, and a full snapshot
//! read for comparison.

use super::*;

/// An `upsert` of note `id` with generated `data`.
pub(super) fn note_upsert(out: &mut Vec<u8>, id: &str, seq: u32, t_us: u64, note_bytes: usize) {
    out.extend_from_slice(br#"{"type":"upsert","id":"#);
    out.extend_from_slice(serde_json::to_string(id).expect("a string").as_bytes());
    out.extend_from_slice(br#","data":"#);
    wire::note_data(out, 0, seq, t_us, note_bytes);
    out.push(b'}');
}

/// A snapshot applied to what a session holds: one with `since` is merged
/// (deleted notes removed), one without replaces it all (PROTOCOL.md 3.1).
pub(super) fn apply_snapshot(notes: &mut Notes, snapshot: &Value) {
    if snapshot.get("since").is_none() {
        notes.clear();
    }
    for note in snapshot["notes"].as_array().into_iter().flatten() {
        apply_note(notes, note);
    }
}

pub(super) fn apply_note(notes: &mut Notes, note: &Value) {
    let Some(id) = note["id"].as_str() else { return };
    if note["deleted"] == Value::Bool(true) {
        notes.remove(id);
    } else {
        notes.insert(id.to_string(), (note["v"].as_u64().unwrap_or(0), note["data"].clone()));
    }
}

/// An `upsert` or `delete` applied to what a session holds.
pub(super) fn apply_change(notes: &mut Notes, msg: &Value) {
    let Some(id) = msg["id"].as_str() else { return };
    match msg["type"].as_str() {
        Some("upsert") => {
            notes.insert(id.to_string(), (msg["v"].as_u64().unwrap_or(0), msg["data"].clone()));
        }
        Some("delete") => {
            notes.remove(id);
        }
        _ => {}
    }
}

pub(super) fn describe_difference(paper: &str, held: &Notes, full: &Notes) -> String {
    let missing = full.keys().find(|id| !held.contains_key(*id));
    let extra = held.keys().find(|id| !full.contains_key(*id));
    let changed = held.iter().find(|(id, n)| full.get(*id).is_some_and(|f| f != *n)).map(|(id, _)| id);
    format!(
        "{paper}: held {} notes, a full snapshot {}; first missing {missing:?}, first extra {extra:?}, first different {changed:?}",
        held.len(),
        full.len()
    )
}

/// A full snapshot of `paper` on a blocking connection of its own (bounded: 10 s).
///
/// # Errors
/// Anything that keeps the snapshot from arriving whole in time.
pub(super) fn full_snapshot(
    target: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    paper: &str,
    user: &str,
) -> Result<Notes, String> {
    let mut tcp = std::net::TcpStream::connect_timeout(&target.addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
    match (&target.transport, tls) {
        (crate::target::Transport::Tls { server_name }, Some(config)) => {
            let tls = rustls::ClientConnection::new(config.clone(), server_name.clone())
                .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
            read_full_snapshot(&mut rustls::StreamOwned::new(tls, tcp), &target.authority, paper, user)
        }
        _ => read_full_snapshot(&mut tcp, &target.authority, paper, user),
    }
}

fn read_full_snapshot(stream: &mut (impl Read + Write), host: &str, paper: &str, user: &str) -> Result<Notes, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    stream.write_all(&wire::upgrade_request(host, paper, user, None, None)).map_err(|e| format!("write: {e}"))?;
    let accept = tungstenite::handshake::derive_accept_key(wire::KEY.as_bytes());
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    let mut upgraded = false;
    let mut frag = Vec::new();
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
        if !upgraded {
            match wire::read_handshake(&buf, &accept) {
                Handshake::Partial => continue,
                Handshake::Refused(why) => return Err(why),
                Handshake::Upgraded { len } => {
                    buf.drain(..len);
                    upgraded = true;
                }
            }
        }
        while let Some((frame, len)) = wire::server_frame(&buf, MAX_FRAME)? {
            if matches!(frame.opcode, wire::OP_TEXT | wire::OP_CONTINUATION) {
                frag.extend_from_slice(frame.payload);
                if frame.fin {
                    let value: Value = serde_json::from_slice(&frag).map_err(|e| format!("snapshot: {e}"))?;
                    if value["type"] != "snapshot" || value.get("since").is_some() {
                        return Err(format!("first message was not a full snapshot: {}", value["type"]));
                    }
                    let mut notes = Notes::new();
                    apply_snapshot(&mut notes, &value);
                    let mut close = Vec::new();
                    wire::client_frame(&mut close, wire::OP_CLOSE, &1000u16.to_be_bytes(), [1, 2, 3, 4]);
                    let _ = stream.write_all(&close);
                    return Ok(notes);
                }
            }
            buf.drain(..len);
        }
    }
    Err("no snapshot within 10 s".into())
}
