//! The load generator against a real server and Redis: a short run where every
//! delivery must arrive, with a report a machine can read. Bounded: a few
//! seconds of sending, every phase with a deadline.

use std::process::Command;

use serde_json::Value;

use crate::common::{Redis, Server};

fn load(args: &[&str]) -> (std::process::Output, Option<Value>) {
    let output = Command::new(env!("CARGO_BIN_EXE_rollingpaper-load"))
        .args(["--quiet", "--json", "--connect-deadline", "20", "--connect-timeout", "10"])
        .args(args)
        .output()
        .expect("the load generator runs");
    let report = serde_json::from_slice(&output.stdout).ok();
    (output, report)
}

#[test]
fn a_smoke_run_delivers_every_edit_to_every_member() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let target = server.addr.to_string();
    let pid = server.pid().to_string();
    let (output, report) = load(&[
        "--target",
        &target,
        "--server-pid",
        &pid,
        "--watch-pid",
        &format!("same-server={pid}"),
        "--papers",
        "4",
        "--members",
        "8",
        "--senders",
        "2",
        "--rate",
        "20",
        "--notes",
        "6",
        "--warmup",
        "1",
        "--duration",
        "3",
        "--drain",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}: {stderr}", output.status);
    let report = report.unwrap_or_else(|| panic!("the JSON report parses: {stderr}"));

    assert_eq!(report["connections"]["ok"], 32, "{report}");
    assert_eq!(report["connections"]["failed"], 0, "{report}");
    let result = &report["result"];
    let sent = result["messages_sent"].as_u64().unwrap();
    // 4 papers x 2 senders x 20/s x 3 s, give or take one send each at the edges.
    assert_eq!(result["messages_planned"], 480);
    assert!((472..=488).contains(&sent), "sent {sent}: {result}");
    assert_eq!(result["deliveries_expected"].as_u64().unwrap(), sent * 8, "{result}");
    assert_eq!(result["deliveries_received"], result["deliveries_expected"], "{result}");
    assert_eq!(result["delivery_ratio"], 1.0);
    assert_eq!(result["errors"], serde_json::json!({}));
    let p99 = result["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p99 > 0.0 && p99 <= result["latency_ms"]["max"].as_f64().unwrap(), "{result}");
    assert!(result["server_cpu_us_per_delivery"].as_f64().unwrap() > 0.0, "{result}");
    assert!(result["server_rss_kib"].as_u64().unwrap() > 0, "{result}");
    // --watch-pid measures another process over the same window: here the server again.
    let watched = &result["watched"]["same-server"];
    assert_eq!(watched["pid"].as_u64(), Some(u64::from(server.pid())), "{result}");
    assert!(watched["cpu_seconds"].as_f64().unwrap() > 0.0, "{result}");
    assert!(watched["rss_kib"].as_u64().unwrap() > 0, "{result}");
    // Each edit reaches 8 members as an upsert of a 200-byte note, and more.
    assert!(result["bytes_received_per_edit"].as_f64().unwrap() > 8.0 * 200.0, "{result}");
}

#[test]
fn targets_outside_loopback_are_refused_before_connecting() {
    for target in ["10.0.0.1:8080", "192.168.0.1:80", "[2001:db8::1]:80"] {
        let (output, report) = load(&["--target", target]);
        assert_eq!(output.status.code(), Some(2), "{target}");
        assert!(report.is_none());
        assert!(String::from_utf8_lossy(&output.stderr).contains("refusing"), "{target}");
    }
}

/// `rollingpaper-load abuse`, briefly and gently: the sending kinds that cannot
/// wedge anything (ping floods, delete storms) and a few unfinished heads,
/// against a server with its default limits. The report says what each side
/// did, the honest edits are all saved, the samplers read Redis from outside,
/// and a threshold no run can meet fails it with exit 3.
#[test]
fn the_abuse_mode_reports_and_judges_its_thresholds() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let target = server.addr.to_string();
    let pid = server.pid().to_string();
    let redis_addr = format!("127.0.0.1:{}", redis.port);
    let abuse = |thresholds: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_rollingpaper-load"))
            .args(["abuse", "--quiet", "--json", "--target", &target, "--server-pid", &pid, "--redis", &redis_addr])
            .args(["--duration", "3", "--drain", "2", "--interval", "1", "--kinds", "pings,deletes,heads"])
            .args(["--ping-sessions", "1", "--delete-sessions", "1", "--heads", "5"])
            .args(["--honest-papers", "2", "--honest-members", "3", "--honest-senders", "1", "--honest-rate", "5"])
            .args(thresholds)
            .output()
            .expect("the load generator runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
        (output.status.code(), report, stderr)
    };

    // Thresholds any machine meets, however busy: the run passes.
    let (code, report, stderr) = abuse(&["--max-ping-p99-ms", "5000", "--max-saved-p99-ms", "5000"]);
    assert_eq!(code, Some(0), "{stderr}\n{report}");
    assert_eq!(report["honest"]["joined"], 6, "{report}");
    let summary = &report["summary"];
    let edits = summary["honest_edits"].as_u64().unwrap();
    assert!((25..=35).contains(&edits), "2 senders x 5/s x 3 s: {summary}");
    assert_eq!(summary["honest_unsaved"], 0, "{summary}");
    // 10 PINGs a second over the window, every one answered.
    assert_eq!(summary["redis_ping_ms"]["n"], 30, "{summary}");
    assert_eq!(summary["redis_ping_failed"], 0, "{summary}");
    assert!(summary["server_rss"]["q4_max_mib"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(summary["redis_used_memory"]["q4_max_mib"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(summary["backlog_max"]["rollingpaper_backlog"].is_number(), "{summary}");
    // As fast as the allowance lets: a burst of 190, then about 47.5 a second.
    let hostile = &report["hostile"];
    for kind in ["pings", "deletes"] {
        let sent = hostile[kind]["sent"].as_u64().unwrap();
        assert!(sent > 190, "{kind}: {hostile}");
    }
    // A delete of an id never created is refused, one of every three messages.
    assert!(hostile["deletes"]["events"]["error not_found"].as_u64().unwrap() > 50, "{hostile}");
    assert!(hostile["heads"]["opened"].as_u64().unwrap() >= 5, "{hostile}");
    assert_eq!(report["timeline"].as_array().unwrap().len(), 5, "3 s of window and 2 of drain, 1 s rows");
    assert_eq!(report["thresholds"]["passed"], true, "{report}");

    // A PING p99 no run can meet: exit 3, and the miss is named.
    let (code, report, stderr) = abuse(&["--max-ping-p99-ms", "0.000001", "--max-saved-p99-ms", "5000"]);
    assert_eq!(code, Some(3), "{stderr}\n{report}");
    assert_eq!(report["thresholds"]["passed"], false, "{report}");
    assert!(stderr.contains("threshold missed: Redis PING p99"), "{stderr}");
}

/// `rollingpaper-load api`, briefly: API writers PUT notes (one connection per
/// request) while members edit the same papers. Every API write in the window
/// is answered 200, every member edit is saved, and both latencies are
/// reported side by side; a run without the key's length is refused.
#[test]
fn the_api_mode_measures_api_writes_beside_member_edits() {
    const KEY: &str = "load-test-api-key-0123456789abcdef";
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--api-key", KEY]);
    let target = server.addr.to_string();
    let pid = server.pid().to_string();
    let api = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rollingpaper-load"))
            .args(["api", "--quiet", "--json", "--target", &target, "--server-pid", &pid])
            .args(["--papers", "3", "--members", "4", "--senders", "2", "--rate", "5", "--writers", "2"])
            .args(["--warmup", "1", "--duration", "2", "--drain", "2"])
            .args(extra)
            .output()
            .expect("the load generator runs")
    };
    let output = api(&["--api-key", KEY]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}: {stderr}", output.status);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));

    assert_eq!(report["members_joined"], 12, "{report}");
    let writes = &report["api"];
    let ok = writes["ok"].as_u64().unwrap();
    assert!(ok > 0, "{writes}");
    assert_eq!(writes["answered"].as_u64(), Some(ok), "every API write answered 200: {writes}");
    assert_eq!(writes["statuses"], serde_json::json!({"200": ok}), "{writes}");
    assert!(writes["per_second"].as_f64().unwrap() > 0.0, "{writes}");
    let latency = &writes["latency_ms"];
    assert!(latency["p50"].as_f64().unwrap() > 0.0, "{writes}");
    assert!(latency["p99"].as_f64().unwrap() <= latency["max"].as_f64().unwrap(), "{writes}");
    // 3 papers x 2 senders x 5/s over the 2 s window, give or take one each at its edges.
    let edits = &report["edits"];
    let sent = edits["sent"].as_u64().unwrap();
    assert!((54..=66).contains(&sent), "{edits}");
    assert_eq!(edits["unsaved"], 0, "{edits}");
    assert_eq!(edits["saved_ms"]["n"].as_u64(), Some(sent), "{edits}");
    assert!(report["server"]["cpu_cores"].as_f64().unwrap() > 0.0, "{report}");
    // The API writes reached Redis: the notes api0.. of each paper.
    let paper = format!("{}-0", report["paper_prefix"].as_str().unwrap());
    let note = redis.note(&paper, "api0").expect("an API write in Redis");
    assert!(note["data"]["text"].as_str().unwrap().starts_with("api write"), "{note}");

    let output = api(&["--api-key", "short"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--api-key"));
}
