//! For operators: configuration that derives and explains itself, Redis
//! misconfiguration refused at start (exit 2), environment variables as
//! people write them, logs, `scripts/run.sh`, and the load tool's verdict.
//! Helpers live here: these tests run the binary with an environment of their
//! own, or expect it to exit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::common::{
    deadline, eventually, free_port, project_root, unix_now, upgrade_request, Redis, Sentinel, Server, TempDir, SECRET,
};

const BIN: &str = env!("CARGO_BIN_EXE_rollingpaper");

/// The binary with only these flags and variables (and a free port unless
/// `--listen` or `RP_LISTEN` is given).
fn command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if !args.contains(&"--listen") && !envs.iter().any(|(k, _)| *k == "RP_LISTEN") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(["--threads", "1"]).args(args).envs(envs.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// Runs the binary, which must exit within the deadline: its exit code and standard error.
fn exits(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = command(args, envs).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = eventually("the server to exit", || child.try_wait().unwrap());
    (status.code(), reader.join().unwrap())
}

/// A running binary and its log lines.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    addr: SocketAddr,
}

impl Running {
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Running {
        let mut child = command(args, envs).spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Running { child, lines, log: Vec::new(), addr: "127.0.0.1:1".parse().unwrap() };
        let line = running.wait_log("listening on http://");
        let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap();
        running.addr = addr.parse().unwrap();
        running
    }

    /// The first log line containing `needle`, logged already or within the
    /// deadline; every line read is kept in `log`.
    fn wait_log(&mut self, needle: &str) -> String {
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let until = deadline();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("the server never logged {needle:?}; it logged:\n{}", self.log.join("\n")),
            }
        }
    }

    fn status(&self, request: &str) -> u16 {
        let mut stream = std::net::TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(crate::common::PATIENCE)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head[9..12]).parse().unwrap()
    }

    fn get(&self, path: &str) -> u16 {
        self.status(&format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` with a password (the common helper pings without one).
struct LockedRedis {
    port: u16,
    child: Child,
    _dir: TempDir,
}

impl LockedRedis {
    fn start(password: &str) -> LockedRedis {
        let port = free_port();
        let dir = TempDir::new("locked-redis");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--requirepass", password])
            .args(["--dir", dir.0.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let url = format!("redis://:{password}@127.0.0.1:{port}");
        eventually("the locked redis-server to answer", || {
            let mut conn = redis::Client::open(url.as_str()).ok()?.get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut conn).ok()
        });
        LockedRedis { port, child, _dir: dir }
    }
}

impl Drop for LockedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_refused(args: &[&str], envs: &[(&str, &str)], wanted: &[&str], unwanted: &[&str]) -> String {
    let (code, stderr) = exits(args, envs);
    assert_eq!(code, Some(2), "{args:?} {envs:?} should exit 2; it said:\n{stderr}");
    for word in wanted {
        assert!(stderr.contains(word), "{args:?}: no {word:?} in:\n{stderr}");
    }
    for word in unwanted {
        assert!(!stderr.contains(word), "{args:?}: {word:?} leaked into:\n{stderr}");
    }
    stderr
}

// ---- Redis at start ---------------------------------------------------------------

#[test]
fn a_wrong_or_missing_password_stops_the_start() {
    let redis = LockedRedis::start("right-password-1");
    let port = redis.port;
    let url = format!("redis://127.0.0.1:{port}");
    let stderr = assert_refused(&["--redis", &url], &[], &[&url, "password"], &[]);
    assert_eq!(stderr.lines().filter(|l| l.contains("ERROR")).count(), 1, "one line:\n{stderr}");
    let wrong = format!("redis://:wrong-password-2@127.0.0.1:{port}");
    assert_refused(
        &[],
        &[("RP_REDIS", &wrong)],
        &[&format!("redis://***@127.0.0.1:{port}"), "password"],
        &["wrong-password-2"],
    );
    // The right one serves.
    let right = format!("redis://:right-password-1@127.0.0.1:{port}");
    let mut server = Running::start(&["--redis", &right], &[]);
    eventually("ready", || (server.get("/readyz") == 200).then_some(()));
    server.wait_log("answers");
}

#[test]
fn a_database_that_does_not_exist_stops_the_start() {
    let redis = Redis::start();
    let url = format!("{}/99999", redis.url());
    assert_refused(&["--redis", &url], &[], &[&url, "database", "16 by default"], &[]);
}

#[test]
fn something_that_is_not_redis_stops_the_start() {
    // A web server where Redis should be.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    assert_refused(&["--redis", &url], &[], &[&url, "does not speak Redis"], &[]);
}

#[test]
fn an_unknown_sentinel_master_or_rediss_stops_the_start() {
    let redis = Redis::start();
    let sentinel = Sentinel::start("papers", redis.port);
    let url = format!("redis+sentinel://127.0.0.1:{}/nosuchmaster", sentinel.port);
    assert_refused(&["--redis", &url], &[], &[&url, "nosuchmaster", "sentinel monitor"], &[]);
    // The right name serves.
    let good = format!("redis+sentinel://127.0.0.1:{}/papers", sentinel.port);
    let _server = Running::start(&["--redis", &good], &[]);
    // TLS to a port that speaks plain Redis: a permanent mistake, said at once.
    let tls_to_plain = format!("rediss://:pw@127.0.0.1:{}", redis.port);
    assert_refused(&["--redis", &tls_to_plain], &[], &["rediss://", "TLS"], &["pw@"]);
}

#[test]
fn a_redis_that_is_down_is_waited_for() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let mut server = Running::start(&["--redis", &url], &[]);
    server.wait_log("does not answer yet");
    assert_eq!(server.get("/healthz"), 200);
    assert_eq!(server.get("/readyz"), 503);
}

// ---- configuration ----------------------------------------------------------------

#[test]
fn one_limit_alone_moves_the_ones_that_depend_on_it() {
    let mut small = Running::start(&["--store", "memory", "--max-message-bytes", "4096"], &[]);
    let line = small.wait_log("starting:");
    // The note limit leaves room for the message's envelope: a 3,000-byte note fits.
    assert!(line.contains("max_message_bytes=4096 max_note_bytes=3840"), "{line}");
    let (mut ws, _) = tungstenite::connect(format!("ws://{}/ws/p1?user=ann", small.addr)).unwrap();
    let note = serde_json::json!({"type": "upsert", "id": "n1", "data": {"text": "x".repeat(3000)}});
    ws.send(tungstenite::Message::text(note.to_string())).unwrap();
    let answer = (0..3)
        .map(|_| ws.read().unwrap().into_text().unwrap().to_string())
        .find(|m| m.contains(r#""type":"upsert""#) || m.contains(r#""type":"error""#));
    assert!(answer.as_deref().is_some_and(|m| m.contains(r#""type":"upsert""#)), "{answer:?}");
    let mut big = Running::start(&["--store", "memory"], &[("RP_MAX_MESSAGE_BYTES", "20000000")]);
    let line = big.wait_log("starting:");
    assert!(line.contains("max_outbound_bytes=80000000"), "{line}");
    // Two values set that contradict each other are still an error.
    assert_refused(
        &["--store", "memory", "--max-message-bytes", "4096"],
        &[("RP_MAX_NOTE_BYTES", "8192")],
        &["--max-note-bytes (RP_MAX_NOTE_BYTES) 8192", "(4096)"],
        &[],
    );
}

#[test]
fn a_count_out_of_range_is_refused_naming_its_variable_and_what_is_allowed() {
    assert_refused(&["--max-notes", "-3"], &[], &["--max-notes (RP_MAX_NOTES)", "whole number"], &["unexpected"]);
    assert_refused(
        &["--store", "memory"],
        &[("RP_MAX_NOTES", "0")],
        &["--max-notes (RP_MAX_NOTES)", "at least 1"],
        &[],
    );
}

#[test]
fn the_memory_store_says_nothing_of_redis_or_written_edits() {
    let mut server = Running::start(&["--store", "memory"], &[]);
    let line = server.wait_log("starting:");
    assert!(line.contains("store=Memory") && line.contains("redis=unused"), "{line}");
    let _ = std::process::Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status();
    let line = server.wait_log("stopped;");
    assert!(line.contains("memory only") && !line.contains("every edit is written"), "{line}");
}

#[test]
fn environment_booleans_read_as_people_write_them() {
    let echo = |value: &str| {
        let server = Running::start(&["--store", "memory"], &[("RP_ECHO", value)]);
        server.status(&upgrade_request("/echo", ""))
    };
    assert_eq!(echo("Yes"), 101);
    assert_eq!(echo("on"), 101);
    assert_eq!(echo("0"), 404);
    assert_eq!(echo("FALSE"), 404);
    assert_refused(&["--store", "memory"], &[("RP_ECHO", "maybe")], &["RP_ECHO", "--echo", "yes/no"], &[]);
    assert_refused(&[], &[("RP_CLUSTER", "enabled")], &["RP_CLUSTER", "--cluster"], &[]);
}

#[test]
fn listen_takes_localhost_or_just_a_port() {
    let local = Running::start(&["--store", "memory"], &[("RP_LISTEN", "localhost:0")]);
    assert!(local.addr.ip().is_loopback(), "{}", local.addr);
    assert_eq!(local.get("/healthz"), 200);
    let mut every = Running::start(&["--store", "memory", "--listen", ":0"], &[]);
    every.wait_log("every interface");
    assert_refused(&["--store", "memory", "--listen", "8080"], &[], &["--listen", "for example 127.0.0.1:8080"], &[]);
}

#[test]
fn allowed_origins_must_be_origins() {
    assert_refused(
        &["--store", "memory", "--allowed-origins", "https://paper.example/app"],
        &[],
        &["--allowed-origins", "not an origin"],
        &[],
    );
}

fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn tokens_not_yet_valid_or_for_another_audience_are_refused() {
    let server = Server::memory(&["--jwt-secret", SECRET, "--jwt-audience", "rollingpaper"]);
    let status =
        |claims: Value| server.status_of(&upgrade_request(&format!("/ws/p1?token={}", token_with(claims)), ""));
    let base = json!({"sub": "u1", "paper": "p1", "role": "writer", "exp": unix_now() + 600});
    let with = |extra: Value| {
        let mut claims = base.clone();
        claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        claims
    };
    assert_eq!(status(with(json!({"aud": "rollingpaper"}))), 101);
    assert_eq!(status(with(json!({"aud": "billing"}))), 401);
    assert_eq!(status(base.clone()), 401, "no aud while an audience is configured");
    assert_eq!(status(with(json!({"aud": "rollingpaper", "nbf": unix_now() + 120}))), 401);
    assert_eq!(status(with(json!({"aud": "rollingpaper", "nbf": unix_now() + 2}))), 101, "within the leeway");
    // Without an audience configured, `aud` is not looked at.
    let open = Server::memory(&["--jwt-secret", SECRET]);
    let path = format!("/ws/p1?token={}", token_with(with(json!({"aud": "billing"}))));
    assert_eq!(open.status_of(&upgrade_request(&path, "")), 101);
}

#[test]
fn an_empty_jwt_secret_means_auth_off_and_says_so() {
    let mut server = Running::start(&["--store", "memory"], &[("RP_JWT_SECRET", "")]);
    server.wait_log("auth is off");
    assert_eq!(server.status(&upgrade_request("/ws/p1?user=ann", "")), 101);
}

// ---- logs -----------------------------------------------------------------------------

#[test]
fn the_first_line_names_the_version_and_json_lines_parse() {
    let server = Running::start(
        &["--store", "memory", "--log-format", "json"],
        &[("RP_LOG", "info,rollingpaper::server=debug")],
    );
    let first: Value = serde_json::from_str(&server.log[0]).unwrap();
    assert!(first["msg"].as_str().unwrap().starts_with(&format!("rollingpaper {}", env!("CARGO_PKG_VERSION"))));
    for line in &server.log {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(value[key].is_string(), "{key} in {line}");
        }
    }
    let text = Running::start(&["--store", "memory"], &[]);
    assert!(text.log[0].contains(&format!("rollingpaper {} starting", env!("CARGO_PKG_VERSION"))), "{}", text.log[0]);
    assert_refused(&["--store", "memory"], &[("RP_LOG", "rollingpaper=chatty")], &["RP_LOG", "chatty"], &[]);
}

// ---- scripts/run.sh -------------------------------------------------------------------

/// `scripts/run.sh` with the test's binary, a throwaway data directory, and a
/// bounded run: its output once it printed `until` or exited.
fn run_sh(args: &[&str], envs: &[(&str, &str)], until: &str) -> (Option<i32>, String) {
    let data = TempDir::new("run-sh");
    let mut child = Command::new("bash")
        .arg(project_root().join("scripts/run.sh"))
        .args(args)
        .env("RUN_BIN", BIN)
        .env("RUN_DATA_DIR", &data.0)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    for stream in
        [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut output = String::new();
    let until_at = deadline();
    while Instant::now() < until_at {
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(line) => {
                output += &line;
                output.push('\n');
                if line.contains(until) {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // run.sh forwards SIGTERM to the server and waits for it.
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = eventually("run.sh to exit", || child.try_wait().unwrap());
    output.extend(rx.try_iter().map(|l| l + "\n"));
    (status.code(), output)
}

#[test]
fn run_sh_never_starts_a_local_redis_for_a_remote_url() {
    let port = free_port().to_string();
    // TEST-NET-1: documentation only, nothing answers there.
    let (_, output) =
        run_sh(&["--listen", &format!("127.0.0.1:{port}")], &[("RP_REDIS", "redis://192.0.2.1:6379")], "listens on");
    assert!(output.contains("not on this machine"), "{output}");
    assert!(!output.contains("starting redis-server"), "{output}");
    assert!(output.contains(&format!("listens on http://127.0.0.1:{port}")), "{output}");
    // The flag wins over the variable, in both spellings.
    let redis = Redis::start();
    for flag in [vec!["--redis".to_string(), redis.url()], vec![format!("--redis={}", redis.url())]] {
        let mut args: Vec<&str> = flag.iter().map(String::as_str).collect();
        let listen = format!("127.0.0.1:{}", free_port());
        args.extend(["--listen", &listen]);
        let (_, output) = run_sh(&args, &[("RP_REDIS", "redis://192.0.2.1:6379")], "listens on");
        assert!(output.contains(&format!("using the Redis at {}", redis.url())), "{output}");
        assert!(output.contains("listens on"), "{output}");
    }
}

#[test]
fn run_sh_stops_the_redis_it_started_when_the_server_fails() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let (code, output) = run_sh(&["--redis", &url, "--max-note-bytes", "0"], &[], "\u{0}");
    assert!(output.contains(&format!("starting redis-server on 127.0.0.1:{port}")), "{output}");
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("stopping the redis-server it started"), "{output}");
    eventually("the started redis-server to be gone", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err().then_some(())
    });
}

// ---- the load tool --------------------------------------------------------------------

/// A short run of the load generator against `server`: exit code, JSON report, stderr.
#[cfg(feature = "load")]
fn load(server: &Server, args: &[&str]) -> (Option<i32>, Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_rollingpaper-load"))
        .args(["--quiet", "--json", "--connect-deadline", "20", "--target", &server.addr.to_string()])
        .args(["--papers", "2", "--members", "3", "--senders", "1", "--rate", "10"])
        .args(["--warmup", "0.5", "--duration", "1", "--drain", "2"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    (output.status.code(), report, stderr)
}

#[cfg(feature = "load")]
#[test]
fn the_load_tool_signs_tokens_and_fails_on_missed_thresholds() {
    let server = Server::memory(&["--jwt-secret", SECRET, "--jwt-audience", "rollingpaper"]);
    let auth = ["--token-secret", SECRET, "--token-audience", "rollingpaper"];
    let mut args = auth.to_vec();
    args.extend(["--min-delivered", "0.999", "--max-p99-ms", "5000"]);
    let (code, report, stderr) = load(&server, &args);
    assert_eq!(code, Some(0), "{stderr}\n{report}");
    assert_eq!(report["connections"]["ok"], 6, "{report}");
    assert_eq!(report["result"]["delivery_ratio"], 1.0, "{report}");
    assert_eq!(report["thresholds"]["passed"], true, "{report}");

    let mut args = auth.to_vec();
    args.extend(["--max-p99-ms", "0.0001"]);
    let (code, report, stderr) = load(&server, &args);
    assert_eq!(code, Some(3), "{stderr}\n{report}");
    assert_eq!(report["thresholds"]["passed"], false, "{report}");
    assert!(stderr.contains("threshold missed: p99"), "{stderr}");

    // Without tokens, auth refuses every member: nothing connects.
    let (code, report, _) = load(&server, &["--min-delivered", "0.999"]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["connections"]["ok"], 0, "{report}");
}

#[test]
fn loadtest_sh_help_lists_scenarios_and_knobs() {
    let output = Command::new("bash").arg(project_root().join("scripts/loadtest.sh")).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let words = ["classroom", "fanout-max", "compare", "rollingpaper-load api", "LOADTEST_SECONDS", "LOADTEST_QUICK"];
    for word in words.into_iter().chain(["--min-delivered"]) {
        assert!(help.contains(word), "no {word} in:\n{help}");
    }
}

#[test]
fn run_sh_never_claims_a_server_it_did_not_start() {
    // A server of someone else's holds the port and answers /healthz.
    let other = Running::start(&["--store", "memory"], &[]);
    let listen = other.addr.to_string();
    let (code, output) = run_sh(&["--store", "memory", "--listen", &listen], &[], "listens on");
    assert!(!output.contains("listens on"), "{output}");
    assert!(output.contains("Address already in use"), "{output}");
    assert_eq!(code, Some(2), "{output}");
    // A bad flag while that server is up: the error, and no claim either.
    let (code, output) = run_sh(&["--store", "memory", "--listen", &listen, "--max-notes", "0"], &[], "listens on");
    assert!(!output.contains("listens on") && output.contains("--max-notes"), "{output}");
    assert_eq!(code, Some(2), "{output}");
}

#[test]
fn run_sh_help_says_what_the_script_does_then_the_servers_flags() {
    let (code, output) = run_sh(&["--help"], &[], "--max-notes");
    assert_eq!(code, Some(0), "{output}");
    for word in ["RUN_BIN", "RUN_DATA_DIR", "redis-server", "--api-key", "--max-notes"] {
        assert!(output.contains(word), "no {word:?} in:\n{output}");
    }
}
