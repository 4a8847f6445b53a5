//! The original design, rebuilt faithfully for measurement only (never part of
//! the server): a thread per connection (the original ran a goroutine per
//! WebSocket), and for every received edit: take the paper's lock, read the
//! whole paper JSON from Redis, insert the edit, write the whole paper back,
//! read it again, and send the whole paper to every member, one blocking write
//! each, under the lock.
//!
//! It speaks enough of PROTOCOL.md for `rollingpaper-load` to drive it: a
//! `snapshot` on join, `ping`/`pong`, and every `upsert` answered by a `paper`
//! message holding the whole paper (`{"type":"paper","paper","notes"}`).
//!
//!     cargo run --release --example baseline -- --listen 127.0.0.1:0 --redis redis://127.0.0.1:6379

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

struct Member {
    id: String,
    out: Arc<Mutex<TcpStream>>,
}

struct Paper {
    id: String,
    redis: redis::Connection,
    members: Vec<Member>,
}

type Papers = Arc<Mutex<HashMap<String, Arc<Mutex<Paper>>>>>;

fn main() {
    let mut listen = "127.0.0.1:8081".to_string();
    let mut redis_url = "redis://127.0.0.1:6379".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR"),
            "--redis" => redis_url = args.next().expect("--redis URL"),
            other => {
                eprintln!("baseline: unknown argument {other} (--listen ADDR, --redis URL)");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&listen).expect("bind");
    eprintln!("baseline: listening on http://{}", listener.local_addr().expect("address"));
    let client = redis::Client::open(redis_url).expect("Redis URL");
    let papers: Papers = Arc::default();
    let mut serial = 0u64;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        serial += 1;
        let (papers, client) = (papers.clone(), client.clone());
        let spawned = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
            if let Err(e) = session(stream, serial, &papers, &client) {
                eprintln!("baseline: session c{serial}: {e}");
            }
        });
        if spawned.is_err() {
            eprintln!("baseline: cannot spawn a thread");
        }
    }
}

fn session(stream: TcpStream, serial: u64, papers: &Papers, client: &redis::Client) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut request = String::new();
    let mut key = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("closed during the request".into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("sec-websocket-key") {
                key = Some(value.trim().to_string());
            }
        } else if request.is_empty() {
            request = line;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let paper_id = path.strip_prefix("/ws/").unwrap_or("").split('?').next().unwrap_or("").to_string();
    let out = Arc::new(Mutex::new(stream));
    let (Some(key), true) = (key, rollingpaper::protocol::is_valid_id(&paper_id)) else {
        let _ = out.lock().unwrap().write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        return Ok(());
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    out.lock().unwrap().write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    let mut ws = WebSocket::from_partially_read(
        reader.get_ref().try_clone().map_err(|e| e.to_string())?,
        reader.buffer().to_vec(),
        Role::Server,
        None,
    );

    let member_id = format!("c{serial}");
    let paper = {
        let mut all = papers.lock().unwrap();
        match all.get(&paper_id) {
            Some(paper) => paper.clone(),
            None => {
                let redis = client.get_connection().map_err(|e| e.to_string())?;
                let paper = Arc::new(Mutex::new(Paper { id: paper_id.clone(), redis, members: Vec::new() }));
                all.insert(paper_id.clone(), paper.clone());
                paper
            }
        }
    };
    {
        let mut p = paper.lock().unwrap();
        let stored = read_paper(&mut p)?;
        let snapshot = json!({"type": "snapshot", "paper": paper_id, "you": member_id, "completed": false,
                              "notes": stored["notes"], "members": []});
        send(&out, snapshot.to_string().as_bytes()).map_err(|e| e.to_string())?;
        p.members.push(Member { id: member_id.clone(), out: out.clone() });
    }

    let result = loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let Ok(msg) = serde_json::from_str::<Value>(&text) else { continue };
                match msg["type"].as_str() {
                    Some("upsert") => {
                        if let Err(e) = edit(&paper, &member_id, &msg) {
                            break Err(e);
                        }
                    }
                    Some("ping") => {
                        let _ = send(&out, br#"{"type":"pong"}"#);
                    }
                    _ => {}
                }
            }
            Ok(Message::Close(_)) => break Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
    };
    paper.lock().unwrap().members.retain(|m| m.id != member_id);
    result
}

/// The original's edit path, every step under the paper's lock.
fn edit(paper: &Mutex<Paper>, author: &str, msg: &Value) -> Result<(), String> {
    let (Some(id), Some(data)) = (msg["id"].as_str(), msg.get("data")) else { return Ok(()) };
    let mut p = paper.lock().unwrap();
    let mut stored = read_paper(&mut p)?;
    let notes = stored["notes"].as_array_mut().ok_or("stored paper without notes")?;
    let v = notes.iter().filter_map(|n| n["v"].as_u64()).max().unwrap_or(0) + 1;
    match notes.iter_mut().find(|n| n["id"] == id) {
        Some(note) => {
            note["data"] = data.clone();
            note["v"] = json!(v);
        }
        None => notes.push(json!({"id": id, "author": author, "data": data, "v": v})),
    }
    let key = format!("baseline:paper:{{{}}}", p.id);
    redis::cmd("SET").arg(&key).arg(stored.to_string()).query::<()>(&mut p.redis).map_err(|e| e.to_string())?;
    let again = read_paper(&mut p)?;
    let message = json!({"type": "paper", "paper": p.id, "notes": again["notes"]}).to_string();
    // One blocking write per member, under the lock, as the original did.
    p.members.retain(|m| send(&m.out, message.as_bytes()).is_ok());
    Ok(())
}

fn read_paper(p: &mut Paper) -> Result<Value, String> {
    let key = format!("baseline:paper:{{{}}}", p.id);
    let text: Option<String> = redis::cmd("GET").arg(&key).query(&mut p.redis).map_err(|e| e.to_string())?;
    match text {
        Some(text) => serde_json::from_str(&text).map_err(|e| e.to_string()),
        None => Ok(json!({"paper": p.id, "notes": []})),
    }
}

/// One unmasked text frame, written whole.
fn send(out: &Mutex<TcpStream>, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x81);
    match payload.len() {
        n @ 0..=125 => frame.push(n as u8),
        n @ 126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    out.lock().unwrap().write_all(&frame)
}
