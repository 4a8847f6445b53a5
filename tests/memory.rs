//! Memory bounded under clients that never read (issue 24): a slow consumer's
//! queue released at its close, request heads held to the per-address cap,
//! snapshots and `GET /papers` bodies shared between readers and bounded in
//! bytes. Each test watches what an operator sees: the server's RSS, its
//! gauges, and how fast another client is served.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{eventually, upgrade_request, Client, Redis, Server, PATIENCE};

const MIB: u64 = 1024 * 1024;
const NOTE_BYTES: usize = 16_000;
/// A paper of 6.4 MB: what a never-reading member is not sent of it (loopback's
/// socket buffers take about 4 MB) stays below `--max-outbound-bytes`.
const NOTES: usize = 400;
/// A paper of 9.6 MB, 600 notes: more than 5 MB of it stays unwritten for a
/// member that never reads.
const MANY_NOTES: usize = 600;

/// The server's resident memory, in bytes (`VmRSS` of `/proc/{pid}/status`).
fn rss(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/{pid}/status");
    kib * 1024
}

fn open_descriptors(server: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid())).map_or(0, |dir| dir.count())
}

fn connect_raw(server: &Server, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// A connection from another loopback address (all of 127.0.0.0/8 is loopback on Linux).
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else { panic!("IPv4 only") };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // addresses are valid `sockaddr_in` values that outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let from = sockaddr(source, 0);
        let bound = libc::bind(fd, std::ptr::addr_of!(from).cast(), len);
        assert_eq!(bound, 0, "bind {source}: {}", std::io::Error::last_os_error());
        let dest = sockaddr(*to.ip(), to.port());
        let connected = libc::connect(fd, std::ptr::addr_of!(dest).cast(), len);
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }
}

/// Reads a whole plain reply (the server closes after it).
fn read_reply(stream: &mut TcpStream, within: Duration) -> String {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// A Redis-backed server that lets one writer fill a paper quickly.
fn server(redis: &Redis, extra: &[&str]) -> Server {
    let mut args = vec!["--rate", "100000", "--burst", "100000"];
    args.extend_from_slice(extra);
    Server::redis(redis, &args)
}

/// Fills `paper` with `notes` large notes through a member that stays joined
/// (so that the paper stays in memory), and returns it.
fn large_paper(server: &Server, paper: &str, notes: usize) -> Client {
    let mut writer = server.join(paper, "");
    let text = "x".repeat(NOTE_BYTES);
    for batch in 0..notes / 50 {
        for i in 0..50 {
            writer.upsert(&format!("n{batch}-{i}"), json!({"t": text}));
        }
        for _ in 0..50 {
            writer.next_of("upsert");
        }
    }
    writer
}

/// Upgrades that never read a byte of their session.
fn never_reading_joiners(server: &Server, paper: &str, count: usize, writer: &mut Client) -> Vec<TcpStream> {
    let request = upgrade_request(&format!("/ws/{paper}"), "");
    let joiners: Vec<TcpStream> = (0..count).map(|_| connect_raw(server, request.as_bytes())).collect();
    for _ in 0..count {
        writer.next_of("join");
    }
    joiners
}

#[test]
fn a_slow_consumers_queue_is_released_when_it_is_closed() {
    let redis = Redis::start();
    let server = server(&redis, &["--handshake-timeout", "2"]);
    let mut writer = large_paper(&server, "p-release", NOTES);
    let before = rss(&server);
    let _joiners = never_reading_joiners(&server, "p-release", 30, &mut writer);
    // Closed as slow consumers at their snapshot deadline...
    for _ in 0..30 {
        writer.next_of("leave");
    }
    // ...what was queued for them goes at once, not at the idle timeout (75 s):
    // at most the frame begun on the wire stays, and that one is shared.
    eventually("the slow consumers' queues to be released", || {
        let grown = rss(&server).saturating_sub(before);
        (grown < 32 * MIB).then_some(())
    });
    assert!(server.metric("output_buffer_bytes") < 4 * MIB, "output buffers kept after the close");
    assert!(server.metric("snapshot_bytes_in_flight") < 8 * MIB, "more than one snapshot kept");
}

#[test]
fn request_heads_are_held_to_the_per_address_cap() {
    // A descriptor limit of 512, less the default reserve.
    let server = Server::memory(&["--threads", "1", "--max-sockets", "448", "--max-connections-per-address", "10"]);
    let baseline = open_descriptors(&server);
    // One address keeps opening unfinished heads, more than the node has sockets.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, opened, addr) = (stop.clone(), opened.clone(), server.addr);
        std::thread::spawn(move || {
            // At most 600 held at once (the oldest reopened), so that the test's
            // own descriptors stay bounded too.
            let mut heads = std::collections::VecDeque::new();
            let mut most = 0;
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if heads.len() == 600 {
                    heads.pop_front();
                }
                if let Ok(mut head) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    let _ = head.write_all(b"G");
                    heads.push_back(head);
                    most = most.max(heads.len());
                    opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            most
        })
    };
    eventually("the flood to pass the node's socket slots", || {
        (opened.load(Ordering::Relaxed) >= 448 + 50).then_some(())
    });
    let started = Instant::now();
    let mut health = connect_from(Ipv4Addr::new(127, 0, 0, 2), server.addr);
    health.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let answer = read_reply(&mut health, PATIENCE);
    let waited = started.elapsed();
    // Upgrades from another address go through too.
    let mut upgrade = connect_from(Ipv4Addr::new(127, 0, 0, 2), server.addr);
    upgrade.write_all(upgrade_request("/ws/p-heads", "").as_bytes()).unwrap();
    upgrade.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut status = [0u8; 12];
    let upgraded = upgrade.read_exact(&mut status).map(|()| status);
    let upgrade_waited = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert!(flood.join().unwrap() >= 448, "the flood never filled the node");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // A second on an idle machine; the margin is for a busy one. Past the cap the
    // heads would hold every slot until the handshake timeout (10 s).
    assert!(waited < Duration::from_secs(4), "/healthz from another address waited {waited:?}");
    assert_eq!(&upgraded.unwrap(), b"HTTP/1.1 101");
    assert!(upgrade_waited < Duration::from_secs(8), "an upgrade from another address waited {upgrade_waited:?}");
    // The flooding address holds at most its cap of sockets (and the session).
    eventually("the flood's extra sockets to be closed", || {
        (open_descriptors(&server) <= baseline + 10 + 1).then_some(())
    });
    // Read from the other address: the flooding one may still hold its cap.
    let refused = eventually("/metrics from another address", || {
        let mut metrics = connect_from(Ipv4Addr::new(127, 0, 0, 2), server.addr);
        metrics.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").ok()?;
        let reply = read_reply(&mut metrics, PATIENCE);
        reply
            .lines()
            .find_map(|l| l.strip_prefix("rollingpaper_request_heads_refused_total "))?
            .trim()
            .parse::<u64>()
            .ok()
    });
    assert!(refused > 0);
}

#[test]
fn never_reading_joiners_share_one_snapshot() {
    let redis = Redis::start();
    let server = server(&redis, &["--handshake-timeout", "60"]);
    let mut writer = large_paper(&server, "p-share", MANY_NOTES);
    let before = rss(&server);
    // Each would hold more than 5 MB of its own: 500 MB in all.
    let _joiners = never_reading_joiners(&server, "p-share", 100, &mut writer);
    let grown = rss(&server).saturating_sub(before);
    assert!(grown <= 64 * MIB, "100 joiners that never read added {} MiB", grown / MIB);
    // One copy of the paper, whatever the number of joiners.
    let in_flight = server.metric("snapshot_bytes_in_flight");
    assert!(in_flight < 12 * MIB, "{in_flight} snapshot bytes in flight");
}

#[test]
fn unread_paper_replies_share_one_body() {
    let redis = Redis::start();
    let server = server(&redis, &["--handshake-timeout", "60"]);
    let _writer = large_paper(&server, "p-read", MANY_NOTES);
    let before = rss(&server);
    let answered = server.metric("http_responses_total{status=\"200\"}");
    let _readers: Vec<TcpStream> =
        (0..100).map(|_| connect_raw(&server, b"GET /papers/p-read HTTP/1.1\r\nHost: t\r\n\r\n")).collect();
    // Every reply is queued (the /metrics requests themselves count too).
    eventually("the 100 replies to be queued", || {
        (server.metric("http_responses_total{status=\"200\"}") >= answered + 100).then_some(())
    });
    let grown = rss(&server).saturating_sub(before);
    assert!(grown <= 64 * MIB, "100 unread replies added {} MiB", grown / MIB);
    let in_flight = server.metric("snapshot_bytes_in_flight");
    assert!(in_flight < 12 * MIB, "{in_flight} snapshot bytes in flight");
}

#[test]
fn snapshot_bytes_in_flight_are_bounded() {
    let redis = Redis::start();
    // Room for one version of the 6.4 MB paper, not two.
    let server = server(&redis, &["--handshake-timeout", "60", "--max-snapshot-bytes-in-flight", "10000000"]);
    let mut writer = large_paper(&server, "p-bound", NOTES);
    let held = never_reading_joiners(&server, "p-bound", 1, &mut writer);
    // A new version: the next joiner cannot share the bytes of the last.
    writer.upsert("n0-0", json!({"t": "changed"}));
    writer.next_of("upsert");
    // Past the bound: the joiner is told to retry later, the reader too.
    let mut second = server.connect("/ws/p-bound");
    assert_eq!(second.closed(), (1013, "server_busy".to_string()));
    let (status, head, _) = server.get("/papers/p-bound");
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("Retry-After"), "{head}");
    assert!(server.metric("snapshot_bytes_in_flight") <= 10_000_000);
    assert_eq!(server.metric("snapshots_refused_total"), 2);
    // Once the snapshot in flight is gone, joiners and readers are served again.
    drop(held);
    eventually("the held snapshot to be released", || (server.metric("snapshot_bytes_in_flight") == 0).then_some(()));
    let late = server.join("p-bound", "");
    assert_eq!(late.snapshot["notes"].as_array().unwrap().len(), NOTES);
    let (status, _, body) = server.get("/papers/p-bound");
    assert_eq!(status, 200);
    let read: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(read["notes"], late.snapshot["notes"], "the reply and the snapshot hold the same notes");
    let changed = read["notes"].as_array().unwrap().iter().find(|n| n["id"] == "n0-0").cloned();
    assert_eq!(changed.map(|n| n["data"].clone()), Some(json!({"t": "changed"})), "a reply of the old version");
}

#[test]
fn a_large_broadcast_is_shared_by_its_recipients() {
    let redis = Redis::start();
    let server = server(&redis, &["--handshake-timeout", "60"]);
    let mut writer = large_paper(&server, "p-seal", NOTES);
    // Members that read their snapshot, then stop reading.
    let _members: Vec<Client> = (0..20).map(|_| server.join("p-seal", "")).collect();
    for _ in 0..20 {
        writer.next_of("join");
    }
    let before = rss(&server);
    // `completed` carries the whole paper (6.4 MB) to every member.
    writer.send(json!({"type": "complete"}));
    writer.next_of("completed");
    let grown = rss(&server).saturating_sub(before);
    assert!(grown <= 32 * MIB, "one completed message to 20 members added {} MiB", grown / MIB);
    let in_flight = server.metric("snapshot_bytes_in_flight");
    assert!(in_flight < 12 * MIB, "{in_flight} bytes in flight: the message was copied");
}
