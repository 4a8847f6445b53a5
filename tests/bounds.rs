//! Bounded under hostile clients: every buffer, table and wait has a limit.
//! Each test plays one hostile (or unlucky) client against the real binary and
//! watches what the server holds: its descriptors, its gauges, Redis's keys,
//! and what the other clients receive. `soak` runs them all at once for minutes
//! and checks that memory, descriptors, papers and Redis stay flat.

use rollingpaper::store::keys;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use crate::common::{
    deadline, eventually, slow_reader_server, token, unix_now, upgrade_request, write_until_left, Client, Event, Redis,
    Server, PATIENCE, SECRET,
};

/// Descriptors the server process holds open.
fn open_descriptors(server: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid())).map_or(0, |dir| dir.count())
}

fn connect_raw(server: &Server, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// Fills a paper with `count` notes of `size` bytes through `writer`.
fn fill(writer: &mut Client, count: usize, size: usize) {
    let text = "x".repeat(size);
    for batch in 0..count / 50 {
        for i in 0..50 {
            writer.upsert(&format!("n{batch}-{i}"), json!({"t": text}));
        }
        for _ in 0..50 {
            writer.next_of("upsert");
        }
    }
}

/// Members listed in a paper's presence hash, by member id, with their node.
fn presence(redis: &Redis, paper: &str) -> Vec<(String, String)> {
    redis
        .hgetall(&keys::members(paper))
        .into_iter()
        .map(|(id, entry)| {
            let entry: Value = serde_json::from_str(&entry).unwrap();
            (id, entry["node"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

fn pttl(redis: &Redis, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(&mut redis.conn()).unwrap()
}

#[test]
fn a_snapshot_never_read_is_given_up_at_its_deadline() {
    let server = Server::memory(&["--handshake-timeout", "1", "--rate", "100000", "--burst", "100000"]);
    let mut writer = server.join("big-snapshot", "");
    // About 15 MB: more than the socket buffers take for a member that never reads.
    fill(&mut writer, 1000, 15_000);
    let mut never_reads = connect_raw(&server, upgrade_request("/ws/big-snapshot", "").as_bytes());
    let joined = writer.next_of("join");
    let id = joined["member"]["id"].as_str().unwrap().to_string();
    // Without a deadline the snapshot stays pinned until the idle timeout (75 s).
    let left = writer.next_of("leave");
    assert_eq!(left["member"], id.as_str());
    // What it finally reads ends with the slow consumer's close frame.
    never_reads.set_read_timeout(Some(PATIENCE)).unwrap();
    let close = [0x88, 0x0f, 0x03, 0xf5]; // close, 15 bytes: 1013 "slow_consumer"
    let mut tail = Vec::new();
    let mut chunk = [0u8; 65536];
    while !tail.windows(4).any(|w| w == close) {
        let n = never_reads.read(&mut chunk).unwrap();
        assert!(n > 0, "closed without the 1013 close frame");
        tail.drain(..tail.len().saturating_sub(3));
        tail.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_slow_consumer_that_reads_again_within_the_idle_timeout_gets_its_close_frame() {
    let server = slow_reader_server();
    let mut writer = server.join("p-late", "");
    let mut slow = server.join("p-late", "");
    writer.next_of("join");
    let slow_id = slow.you.clone();
    write_until_left(&mut writer, &slow_id);
    // Longer than the close handshake's 3 s, well within the idle timeout: the
    // time passing is what is tested.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(slow.closed(), (1013, "slow_consumer".to_string()));
}

#[test]
fn ping_frames_count_toward_the_rate_limit() {
    let server = Server::memory(&["--rate", "2", "--burst", "5"]);
    let mut flooder = server.join("p-pings", "");
    for _ in 0..300 {
        flooder.ws.send(Message::Ping(Vec::new().into())).unwrap();
    }
    let until = deadline();
    let mut pongs = 0;
    let code = loop {
        assert!(Instant::now() < until, "the ping flood was never closed");
        match flooder.ws.read() {
            Ok(Message::Pong(_)) => pongs += 1,
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("session failed: {e}"),
        }
    };
    assert_eq!(code, Some(1008), "a ping flood is sustained abuse");
    // The burst, and what the rate refilled while the flood was read.
    assert!(pongs <= 10, "{pongs} pongs answered past the allowance");
    assert!(server.metric("ping_frames_refused_total") > 0);
}

#[test]
fn sockets_still_sending_their_request_hold_a_slot() {
    let server = Server::memory(&["--max-sockets", "8", "--threads", "1"]);
    let baseline = open_descriptors(&server);
    let mut holders: Vec<TcpStream> = (0..8).map(|_| connect_raw(&server, b"GET /ws/p HTTP/1.1\r\n")).collect();
    eventually("the holders to be accepted", || (open_descriptors(&server) >= baseline + 8).then_some(()));
    // More wait in the kernel's queue, not in the server.
    let mut queued: Vec<TcpStream> = (0..8).map(|_| connect_raw(&server, b"GET /ws/p HTTP/1.1\r\n")).collect();
    let mut late = connect_raw(&server, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    late.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut byte = [0u8; 1];
    assert!(late.read(&mut byte).is_err(), "answered past --max-sockets");
    assert!(open_descriptors(&server) <= baseline + 8, "the server holds more sockets than --max-sockets");
    // Slots free up as sockets go: the queue is taken up without a new connection.
    holders.clear();
    queued.clear();
    late.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    late.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn accepting_resumes_when_descriptors_free_up() {
    let server = Server::memory(&["--threads", "1"]);
    let baseline = open_descriptors(&server);
    // Leave the server four descriptors (a real limit, from outside).
    let limit = libc::rlimit { rlim_cur: (baseline + 4) as libc::rlim_t, rlim_max: (baseline + 4) as libc::rlim_t };
    // SAFETY: prlimit reads `limit` and writes nothing back (null old limit).
    let set = unsafe { libc::prlimit(server.pid() as libc::pid_t, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(set, 0, "cannot lower the server's descriptor limit");
    let holders: Vec<TcpStream> = (0..6).map(|_| connect_raw(&server, b"GET /ws/p HTTP/1.1\r\n")).collect();
    eventually("the server to run out of descriptors", || (open_descriptors(&server) >= baseline + 4).then_some(()));
    let mut late = connect_raw(&server, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    drop(holders);
    // No new connection arrives to wake the listener: the server must retry itself.
    late.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    late.read_to_string(&mut answer).expect("the queued connection was never accepted");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_killed_nodes_presence_leaves_redis() {
    let redis = Redis::start();
    let a = Server::redis(&redis, &["--cluster", "--node-id", "na"]);
    let b = Server::redis(&redis, &["--cluster", "--node-id", "nb"]);
    let mut on_b = b.join("p-ghost", "");
    let _on_a = a.join("p-ghost", "");
    on_b.next_of("join");
    let key = &keys::members("p-ghost");
    eventually("both members in the presence hash", || (presence(&redis, "p-ghost").len() == 2).then_some(()));
    assert!(pttl(&redis, key) > 0, "the presence hash never expires");
    drop(a); // SIGKILL: the node says nothing
    on_b.next_of("leave");
    eventually("the killed node's entries to go", || {
        presence(&redis, "p-ghost").iter().all(|(_, node)| node != "na").then_some(())
    });
    // With no live node holding the paper, nothing refreshes the hash: it expires.
    drop(b);
    let ttl = pttl(&redis, key);
    assert!(ttl > 0 && ttl <= 60_000, "the presence hash lives on: PTTL {ttl}");
}

#[test]
fn a_presence_hash_nobody_refreshes_expires() {
    let redis = Redis::start();
    let node = Server::redis(&redis, &["--cluster", "--presence-ttl", "3"]);
    let _member = node.join("p-expire", "");
    let key = &keys::members("p-expire");
    eventually("the member in the presence hash", || (presence(&redis, "p-expire").len() == 1).then_some(()));
    // Refreshed while the node holds the paper (heartbeats every 2 s)...
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(pttl(&redis, key) > 0, "the hash expired while its node held the paper");
        std::thread::sleep(Duration::from_millis(200)); // watching it over time is the point
    }
    // ...and gone once the node is killed.
    drop(node);
    eventually("the presence hash to expire", || (pttl(&redis, key) == -2).then_some(()));
}

#[test]
fn a_node_declared_gone_and_back_is_seen_again() {
    let redis = Redis::start();
    let a = Server::redis(&redis, &["--cluster", "--node-id", "na"]);
    let b = Server::redis(&redis, &["--cluster", "--node-id", "nb"]);
    let mut on_b = b.join("p-back", "");
    let on_a = a.join("p-back", "");
    let joined = on_b.next_of("join");
    assert_eq!(joined["member"]["id"], on_a.you.as_str());
    a.signal("STOP");
    let left = on_b.next_of("leave");
    assert_eq!(left["member"], on_a.you.as_str());
    a.signal("CONT");
    let back = on_b.next_of("join");
    assert_eq!(back["member"]["id"], on_a.you.as_str(), "{back}");
}

#[test]
fn a_leave_is_relayed_even_with_the_backlog_full() {
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &["--cluster", "--node-id", "n1", "--backlog-limit", "2"]);
    let mut stays = server.join("p-leave", "");
    let goes = server.join("p-leave", "");
    let gone_id = goes.you.clone();
    eventually("both members in the presence hash", || (presence(&redis, "p-leave").len() == 2).then_some(()));
    redis.stop();
    // Edits fill the backlog while Redis is away.
    let mut i = 0;
    loop {
        stays.send(json!({"type": "upsert", "id": format!("n{i}"), "data": {}, "ref": format!("r{i}")}));
        i += 1;
        let until = deadline();
        let refused = loop {
            match stays.event(until) {
                Event::Msg(m) if m["type"] == "upsert" => break false,
                Event::Msg(m) if m["type"] == "error" => {
                    assert_eq!(m["code"], "unavailable", "{m}");
                    break true;
                }
                Event::Msg(_) => {}
                Event::Closed(frame) => panic!("closed: {frame:?}"),
            }
        };
        if refused {
            break;
        }
        assert!(i < 100, "the backlog never filled");
    }
    goes.close();
    assert_eq!(stays.next_of("leave")["member"], gone_id.as_str());
    // A join now is dropped (the backlog is full), and mended once it drains.
    let late = server.join("p-leave", "");
    redis.restart();
    eventually("the leave to reach Redis", || {
        presence(&redis, "p-leave").iter().all(|(id, _)| *id != gone_id).then_some(())
    });
    eventually("the dropped join to be announced again", || {
        presence(&redis, "p-leave").iter().any(|(id, _)| *id == late.you).then_some(())
    });
}

#[test]
fn token_expiries_of_ended_sessions_are_not_kept() {
    let server = Server::memory(&["--jwt-secret", SECRET, "--threads", "1"]);
    let exp = unix_now() + 3600;
    for i in 0..200 {
        let t = token(&format!("u{i}"), "p-exp", "writer", exp);
        server.join("p-exp", &format!("token={t}")).close();
    }
    let entries = server.metric("timer_entries");
    assert!(entries < 150, "{entries} timer entries kept for 200 sessions that ended");
}

#[test]
fn reads_of_papers_nobody_holds_keep_nothing() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--cluster"]);
    let _: () = redis::cmd("HSET")
        .arg(keys::notes("p-stored"))
        .arg("n1")
        .arg(r#"{"author":"u1","data":{"t":"hi"},"v":5}"#)
        .query(&mut redis.conn())
        .unwrap();
    let (status, _, body) = server.get("/papers/p-stored");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["notes"][0]["data"]["t"], "hi", "{doc}");
    for i in 0..100 {
        let (status, _, body) = server.get(&format!("/papers/p-fresh-{i}"));
        assert_eq!(status, 200);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["notes"], json!([]));
    }
    assert_eq!(server.metric("papers"), 0, "papers kept in memory for reads");
    let channels: Vec<String> =
        redis::cmd("PUBSUB").arg("CHANNELS").arg("rp:paper:*").query(&mut redis.conn()).unwrap();
    assert!(channels.is_empty(), "subscribed for reads: {channels:?}");
    // A paper someone holds is still answered from memory.
    let mut member = server.join("p-held", "");
    member.upsert("n1", json!({"t": "live"}));
    member.next_of("upsert");
    let (_, _, body) = server.get("/papers/p-held");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["notes"][0]["data"]["t"], "live");
}

#[test]
fn input_after_a_close_is_read_under_a_budget() {
    let server = Server::memory(&["--threads", "1", "--rate", "100000", "--burst", "100000"]);
    let mut live = server.join("p-budget", "");
    // Clients that break the framing (an unmasked frame) are closed, then flood
    // in large writes from threads of their own: without a per-turn budget the
    // loop reads one of them for as long as its writer keeps ahead.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let mut flooder = connect_raw(&server, upgrade_request("/ws/p-budget", "").as_bytes());
            flooder.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let chunk = vec![0u8; 4 << 20];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if flooder.write_all(&chunk).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    // The other session on the same loop keeps its pace meanwhile.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let asked = Instant::now();
        live.drain();
        assert!(asked.elapsed() < Duration::from_secs(2), "a flood after a close stalled the loop");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for flood in floods {
        let _ = flood.join();
    }
    // Turns stay short: unbudgeted, this flood made 6 to 12 turns last over
    // 100 ms (the loop's lag) in 5 s; two are allowed for a busy machine
    // preempting the loop.
    let long = turns_longer_than(&server, "0.1");
    assert!(long <= 2.0, "{long} loop turns took over 100 ms during the flood");
}

/// Turns of the loop that took longer than `le` seconds, from /metrics.
fn turns_longer_than(server: &Server, le: &str) -> f64 {
    let (_, _, body) = server.get("/metrics");
    let value = |pattern: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with("rollingpaper_loop_turn_seconds") && l.contains(pattern))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    value("_count") - value(&format!("le=\"{le}\""))
}

// ---- soak --------------------------------------------------------------------------

/// One sample of what the server holds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kb: f64,
    descriptors: f64,
    papers: f64,
    redis_bytes: f64,
}

/// A sampled series: its name, how to read it from a sample, and the rise
/// always allowed whatever its mean.
type Series = (&'static str, fn(&Sample) -> f64, f64);

fn rss_kb(server: &Server) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn redis_used_memory(redis: &Redis) -> f64 {
    let info: String = redis::cmd("INFO").arg("memory").query(&mut redis.conn()).unwrap();
    info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// Least-squares slope of `ys` per sample.
fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        num += (i as f64 - mean_x) * (y - mean_y);
        den += (i as f64 - mean_x).powi(2);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Runs `work` in a loop on its own thread until `stop`, a round every `every`
/// at most (on a fixed schedule, so that the load does not follow the machine's
/// other work); a failed round (a refused or dropped connection under churn) is
/// only counted.
fn churn(
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    errors: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    every: Duration,
    mut work: impl FnMut(u64) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let (stop, errors) = (stop.clone(), errors.clone());
    std::thread::spawn(move || {
        let mut round = 0;
        let mut next = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // A late round is not made up for: no bursts after a stall.
            next = (next + every).max(Instant::now());
            std::thread::sleep(next.saturating_duration_since(Instant::now())); // the schedule
            round += 1;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(round))).is_err() {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
}

/// Churn against one node with Redis for `RP_SOAK_SECONDS` (default 180): sessions
/// that come and go, papers opened and abandoned, notes created and deleted at
/// the default rate, slow and never-reading readers, reads handed between loops,
/// ping floods. Over the second half of the run, the least-squares line through
/// each of RSS, descriptors, papers in memory and Redis's `used_memory` may rise
/// by at most 20% of the series' mean, or a floor (8 MB, 32 descriptors, 50
/// papers, 1 MB), whichever is larger. Run by `scripts/soak.sh`.
///
/// Deleted notes stay as tombstones until a tombstone horizon prunes them, so
/// the note churn reuses a bounded pool of 50 note ids on 4 papers; fresh paper
/// ids are only opened (presence and cursors), never written.
#[test]
#[ignore]
fn soak() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let seconds: u64 = std::env::var("RP_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--cluster", "--paper-linger", "3", "--handshake-timeout", "2"]);
    let addr = server.addr;
    let url = move |path: &str| format!("ws://{addr}{path}");
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let connect = move |path: &str| -> Client {
        let (ws, _) = tungstenite::connect(url(path)).expect("handshake");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        }
        Client { ws, you: String::new(), snapshot: Value::Null }
    };
    let mut workers = Vec::new();
    // Sessions coming and going on fresh papers (abandoned) and on a pool of papers.
    for lane in 0..2 {
        workers.push(churn(&stop, &errors, Duration::from_millis(50), move |round| {
            let mut fresh = connect(&format!("/ws/fresh-{lane}-{round}"));
            fresh.next_of("snapshot");
            fresh.send(json!({"type": "cursor", "data": {"x": round}}));
            let mut pooled = connect(&format!("/ws/pool-{}", round % 20));
            pooled.next_of("snapshot");
            fresh.close();
            pooled.close();
        }));
    }
    // Notes created and deleted at about 40 a second (the default rate is 50).
    workers.push(churn(&stop, &errors, Duration::ZERO, move |round| {
        let mut editor = connect(&format!("/ws/notes-{}", round % 4));
        editor.next_of("snapshot");
        for i in 0..200 {
            let id = format!("n{}", i % 50);
            editor.upsert(&id, json!({"text": "x".repeat(200), "round": round}));
            editor.next_of("upsert");
            editor.send(json!({"type": "delete", "id": id}));
            editor.next_of("delete");
            std::thread::sleep(Duration::from_millis(50)); // the pace of the churn
        }
        editor.close();
    }));
    // Members that never read (their snapshot unwritten), and slow readers.
    workers.push(churn(&stop, &errors, Duration::from_secs(1), move |round| {
        let mut never = TcpStream::connect(addr).unwrap();
        never.write_all(upgrade_request(&format!("/ws/notes-{}", round % 4), "").as_bytes()).unwrap();
        let mut slow = connect(&format!("/ws/notes-{}", round % 4));
        std::thread::sleep(Duration::from_secs(3)); // holding them is the point
        let _ = slow.ws.read();
    }));
    // Reads of papers held and not held, handed between the loops.
    workers.push(churn(&stop, &errors, Duration::from_millis(50), move |round| {
        for path in [format!("/papers/read-{round}"), format!("/papers/notes-{}", round % 4)] {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            assert!(answer.starts_with(b"HTTP/1.1 200"));
        }
    }));
    // Ping floods, closed with 1008 each time.
    workers.push(churn(&stop, &errors, Duration::from_millis(500), move |round| {
        let mut flooder = connect(&format!("/ws/pool-{}", round % 20));
        flooder.next_of("snapshot");
        for _ in 0..400 {
            if flooder.ws.send(Message::Ping(Vec::new().into())).is_err() {
                break;
            }
        }
        let until = deadline();
        while Instant::now() < until {
            match flooder.ws.read() {
                Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
                Ok(_) => {}
            }
        }
    }));

    let mut samples = Vec::new();
    let started = Instant::now();
    let mut next = started;
    while started.elapsed() < Duration::from_secs(seconds) {
        next += Duration::from_secs(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now())); // the sampling period
        samples.push(Sample {
            rss_kb: rss_kb(&server),
            descriptors: open_descriptors(&server) as f64,
            papers: server.metric("papers") as f64,
            redis_bytes: redis_used_memory(&redis),
        });
        if samples.len() % 10 == 0 {
            eprintln!("soak: {:>4} s {:?}", samples.len(), samples.last().unwrap());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }

    let half = &samples[samples.len() / 2..];
    let series: [Series; 4] = [
        ("RSS (kB)", |s| s.rss_kb, 8.0 * 1024.0),
        ("descriptors", |s| s.descriptors, 32.0),
        ("papers", |s| s.papers, 50.0),
        ("Redis used_memory (bytes)", |s| s.redis_bytes, 1024.0 * 1024.0),
    ];
    let mut grew = Vec::new();
    for (name, value, floor) in series {
        let ys: Vec<f64> = half.iter().map(value).collect();
        let mean = ys.iter().sum::<f64>() / ys.len() as f64;
        let per_second = slope(&ys);
        let rise = per_second * ys.len() as f64;
        let allowed = (mean * 0.2).max(floor);
        let (min, max) = ys.iter().fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(*y), hi.max(*y)));
        eprintln!(
            "soak: {name}: second half min {min:.0} max {max:.0} mean {mean:.0}, slope {per_second:.1}/s, \
             fitted rise {rise:.0} (allowed {allowed:.0})"
        );
        if rise > allowed {
            grew.push(name);
        }
    }
    eprintln!(
        "soak: {seconds} s, {} samples, {} failed rounds (refused or dropped under churn)",
        samples.len(),
        errors.load(Ordering::Relaxed)
    );
    assert!(grew.is_empty(), "still growing over the second half: {grew:?}");
}
