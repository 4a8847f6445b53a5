//! Real parts for the integration tests: a `redis-server` on a free loopback port
//! with its own data directory, the `rollingpaper` binary, and WebSocket clients.
//! Every wait has a deadline; nothing sleeps to synchronise.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};
pub mod cluster;
pub mod proxy;

/// How long any single expected event may take on a busy 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn deadline() -> Instant {
    Instant::now() + PATIENCE
}

/// A port nobody listens on right now (the kernel's choice).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh directory under the target directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rp-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
/// For state that has no event to wait on (a process accepting connections, a
/// key appearing in Redis).
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let until = deadline();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it returns `expected`; at the deadline, panics with
/// the last value it returned.
pub fn eventually_eq<T: PartialEq + std::fmt::Debug>(what: &str, expected: T, mut check: impl FnMut() -> T) {
    let until = deadline();
    loop {
        let got = check();
        if got == expected {
            return;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}: expected {expected:?}, still {got:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- Redis -------------------------------------------------------------------------

pub struct Redis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

/// A process stopped with SIGSTOP: a Redis keeps every connection and answers
/// nothing until this is dropped (SIGCONT), a test that fails included.
pub struct Paused(u32);

impl Paused {
    pub fn process(pid: u32) -> Paused {
        let status = Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -STOP {pid}");
        Paused(pid)
    }

    pub fn redis(redis: &Redis) -> Paused {
        Paused::process(redis.pid())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

impl Redis {
    /// The redis-server's process id, as it reports it (`INFO server`).
    pub fn pid(&self) -> u32 {
        let info: String = redis::cmd("INFO").arg("server").query(&mut self.conn()).unwrap();
        info.lines().find_map(|l| l.strip_prefix("process_id:")).unwrap().trim().parse().unwrap()
    }

    /// Starts `redis-server` with append-only persistence, as in production.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts `redis-server` with more arguments (`--replicaof ...`).
    pub fn start_with(extra: &[&str]) -> Redis {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut redis = Redis { port: free_port(), dir: TempDir::new("redis"), child: None, extra };
        redis.spawn();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", self.dir.0.to_str().unwrap()])
            .args(["--appendonly", "yes", "--save", "", "--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        eventually("redis-server to answer PING", || {
            let mut conn = redis::Client::open(self.url()).ok()?.get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut conn).ok()
        });
    }

    /// Kills the server (its data stays in its directory).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    pub fn hgetall(&self, key: &str) -> Vec<(String, String)> {
        redis::cmd("HGETALL").arg(key).query(&mut self.conn()).unwrap()
    }

    pub fn hget(&self, key: &str, field: &str) -> Option<String> {
        redis::cmd("HGET").arg(key).arg(field).query(&mut self.conn()).unwrap()
    }

    /// A note as stored, parsed.
    pub fn note(&self, paper: &str, id: &str) -> Option<Value> {
        self.hget(&format!("rp:paper:{{{paper}}}:notes"), id).map(|s| serde_json::from_str(&s).unwrap())
    }
}

/// A `redis-sentinel` (the `redis-server` binary in sentinel mode) watching a master.
pub struct Sentinel {
    pub port: u16,
    _dir: TempDir,
    child: Child,
}

impl Sentinel {
    pub fn start(master_name: &str, master_port: u16) -> Sentinel {
        let port = free_port();
        let dir = TempDir::new("sentinel");
        let conf = dir.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master_name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {master_name} 1000\nsentinel failover-timeout {master_name} 5000\n\
                 sentinel parallel-syncs {master_name} 1\n",
                dir.0.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let sentinel = Sentinel { port, _dir: dir, child };
        eventually("the sentinel to answer", || sentinel.master_port(master_name).map(|_| ()));
        sentinel
    }

    /// The port of the master this sentinel currently names.
    pub fn master_port(&self, master_name: &str) -> Option<u16> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        let mut conn = client.get_connection().ok()?;
        let addr: Vec<String> =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(master_name).query(&mut conn).ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- the server ----------------------------------------------------------------------

pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Server {
    /// Starts the binary on a free port with `--store memory` and two loops.
    pub fn memory(args: &[&str]) -> Server {
        let mut all = vec!["--store", "memory"];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    /// Starts the binary against a Redis.
    pub fn redis(redis: &Redis, args: &[&str]) -> Server {
        let url = redis.url();
        let mut all = vec!["--store", "redis", "--redis", url.as_str()];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    /// Starts the binary with these flags (two loops unless `--threads` says otherwise).
    pub fn start(args: &[&str]) -> Server {
        let threads: &[&str] = if args.contains(&"--threads") { &[] } else { &["--threads", "2"] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_rollingpaper"))
            .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
            .args(threads)
            .args(args)
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RP_TEST_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server { addr: "127.0.0.1:1".parse().unwrap(), child, log };
        let line = server.wait_log("listening on http://");
        let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap();
        server.addr = addr.parse().unwrap();
        server
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_log(&mut self, needle: &str) -> String {
        let until = deadline();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("the server never logged {needle:?}"),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Opens a session on a paper and reads its snapshot.
    pub fn join(&self, paper: &str, query: &str) -> Client {
        let mut client = self.connect(&format!("/ws/{paper}?{query}"));
        let snapshot = client.next();
        assert_eq!(snapshot["type"], "snapshot", "first message: {snapshot}");
        client.you = snapshot["you"].as_str().unwrap().to_string();
        client.snapshot = snapshot;
        client
    }

    /// Completes the WebSocket handshake only.
    pub fn connect(&self, path: &str) -> Client {
        let (ws, _) = tungstenite::connect(self.url(path)).expect("WebSocket handshake");
        if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
            stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        }
        Client { ws, you: String::new(), snapshot: Value::Null }
    }

    /// A plain HTTP/1.1 request; returns the status, the head and the body.
    pub fn http(&self, request: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    pub fn get(&self, path: &str) -> (u16, String, String) {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"))
    }

    /// A gauge or counter of its `/metrics`, named as the text writes it (labels
    /// included: `http_responses_total{status="200"}`).
    pub fn metric(&self, name: &str) -> u64 {
        let (_, _, body) = self.get("/metrics");
        let prefix = format!("rollingpaper_{name} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no metric {name} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        self.wait()
    }

    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    pub fn wait(&mut self) -> ExitStatus {
        eventually("the server to exit", || self.child.try_wait().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

// ---- clients --------------------------------------------------------------------------

pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
    /// The session id from the snapshot.
    pub you: String,
    pub snapshot: Value,
}

/// What the next event on a session was.
#[derive(Debug)]
pub enum Event {
    Msg(Value),
    Closed(Option<(u16, String)>),
}

impl Client {
    pub fn send(&mut self, msg: Value) {
        self.ws.send(Message::text(msg.to_string())).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }

    pub fn upsert(&mut self, id: &str, data: Value) {
        self.send(json!({"type": "upsert", "id": id, "data": data}));
    }

    /// The next message or close, within the deadline.
    pub fn event(&mut self, until: Instant) -> Event {
        loop {
            assert!(Instant::now() < until, "timed out waiting for a message");
            match self.ws.read() {
                Ok(Message::Text(text)) => return Event::Msg(serde_json::from_str(&text).unwrap()),
                Ok(Message::Close(frame)) => {
                    return Event::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Event::Closed(None)
                }
                Err(e) => panic!("session failed: {e}"),
            }
        }
    }

    /// The next message; panics on a close.
    pub fn next(&mut self) -> Value {
        match self.event(deadline()) {
            Event::Msg(msg) => msg,
            Event::Closed(frame) => panic!("closed instead of a message: {frame:?}"),
        }
    }

    /// The next message of a type, skipping others (presence, `saved`).
    pub fn next_of(&mut self, kind: &str) -> Value {
        let until = deadline();
        loop {
            match self.event(until) {
                Event::Msg(msg) if msg["type"] == kind => return msg,
                Event::Msg(_) => {}
                Event::Closed(frame) => panic!("closed while waiting for {kind}: {frame:?}"),
            }
        }
    }

    /// Waits for the server's close frame, skipping messages; returns code and reason.
    pub fn closed(&mut self) -> (u16, String) {
        let until = deadline();
        loop {
            match self.event(until) {
                Event::Msg(_) => {}
                Event::Closed(Some(frame)) => return frame,
                Event::Closed(None) => panic!("closed without a close frame"),
            }
        }
    }

    /// Sends a ping and returns everything received before its pong: a barrier
    /// that proves nothing else was queued for this session.
    pub fn drain(&mut self) -> Vec<Value> {
        self.send(json!({"type": "ping"}));
        let mut seen = Vec::new();
        loop {
            let msg = self.next();
            if msg["type"] == "pong" {
                return seen;
            }
            seen.push(msg);
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(Some(tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "".into() }));
        let until = deadline();
        while Instant::now() < until {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    }
}

// ---- tokens -------------------------------------------------------------------------

/// The secret the auth tests run the server with.
pub const SECRET: &str = "test-secret-0123456789";

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token as the main backend issues it.
pub fn token(sub: &str, paper: &str, role: &str, exp: u64) -> String {
    let claims = json!({"sub": sub, "paper": paper, "role": role, "exp": exp, "name": format!("{sub} name")});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A raw upgrade request for `path`, with extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

impl Server {
    /// The status line's code of a raw request (the connection is dropped after
    /// the head: a 101 is not followed).
    pub fn status_of(&self, request: &str) -> u16 {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before a status line");
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

pub fn project_root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl Client {
    /// The next message of any of these types, skipping others.
    pub fn next_of_any(&mut self, kinds: &[&str]) -> Value {
        let until = deadline();
        loop {
            match self.event(until) {
                Event::Msg(msg) if kinds.iter().any(|k| msg["type"] == *k) => return msg,
                Event::Msg(_) => {}
                Event::Closed(frame) => panic!("closed while waiting for {kinds:?}: {frame:?}"),
            }
        }
    }
}

// ---- slow readers ----------------------------------------------------------------------

/// A server with small limits, where a member that stops reading falls behind fast.
pub fn slow_reader_server() -> Server {
    Server::memory(&[
        "--max-message-bytes",
        "4096",
        "--max-note-bytes",
        "4096",
        "--max-outbound-bytes",
        "65536",
        "--rate",
        "1000000",
        "--burst",
        "1000000",
    ])
}

/// Writes 3 KB notes (bounded: 400 rounds of 50) until the member `slow_id`, who
/// never reads, is seen leaving; panics if it never is.
pub fn write_until_left(writer: &mut Client, slow_id: &str) {
    let text = "x".repeat(3000);
    for round in 0..400 {
        for i in 0..50 {
            writer.upsert(&format!("n{}", i % 10), json!({"t": text, "round": round}));
        }
        let mut echoes = 0;
        let mut left = false;
        while echoes < 50 {
            let m = writer.next();
            match m["type"].as_str() {
                Some("upsert") => echoes += 1,
                Some("leave") if m["member"] == slow_id => left = true,
                _ => {}
            }
        }
        if left {
            return;
        }
    }
    panic!("the slow member was never closed");
}
