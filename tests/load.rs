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
