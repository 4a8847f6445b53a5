//! `/metrics` as an on-call reads it: the Prometheus text format (a HELP and a
//! TYPE per family, `name{labels} value` samples, cumulative histogram buckets
//! ending in `+Inf` with `_sum` and `_count`), and every family moving with
//! what happened: a join, an edit, a refusal, closes with a code, an HTTP 404,
//! Redis writes, and messages relayed between two nodes.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use crate::common::{eventually, Redis, Server};

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape, checked against the text format as it is parsed.
struct Scrape {
    kinds: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    fn of(server: &Server) -> Scrape {
        let (status, head, body) = server.get("/metrics");
        assert_eq!(status, 200);
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        Scrape::parse(&body)
    }

    fn parse(text: &str) -> Scrape {
        let mut kinds: HashMap<String, String> = HashMap::new();
        let mut helps: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        // The family whose samples may follow: each family's samples are together.
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
                assert!(valid_name(name), "{line}");
                assert!(!help.trim().is_empty(), "{line}");
                assert!(helps.insert(name.to_string(), help.to_string()).is_none(), "a second HELP: {line}");
                current = None;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE without a type: {line}"));
                assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
                assert!(helps.contains_key(name), "TYPE before HELP: {line}");
                assert!(kinds.insert(name.to_string(), kind.to_string()).is_none(), "a second TYPE: {line}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "a counter's name ends in _total: {line}");
                }
                current = Some(name.to_string());
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line: {line:?}");
                let sample = parse_sample(line);
                let family = current.as_deref().unwrap_or_else(|| panic!("a sample outside its family: {line}"));
                let suffix = sample.name.strip_prefix(family).unwrap_or_else(|| panic!("not of {family}: {line}"));
                let allowed: &[&str] =
                    if kinds[family] == "histogram" { &["_bucket", "_sum", "_count"] } else { &[""] };
                assert!(allowed.contains(&suffix), "not of {family}: {line}");
                samples.push(sample);
            }
        }
        assert_eq!(helps.len(), kinds.len(), "a HELP without a TYPE");
        for (name, kind) in &kinds {
            assert!(samples.iter().any(|s| s.name.starts_with(name.as_str())), "family {name} has no sample");
            if kind == "histogram" {
                check_histogram(name, &samples);
            }
        }
        Scrape { kinds, samples }
    }

    /// The value of the sample with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .unwrap_or_else(|| panic!("no {name} {labels:?}"))
            .value
    }

    fn kind(&self, family: &str) -> &str {
        self.kinds.get(family).unwrap_or_else(|| panic!("no family {family}"))
    }
}

fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{label="value",...} value`, label values escaped as the format says.
fn parse_sample(line: &str) -> Sample {
    let end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
    let name = &line[..end];
    assert!(valid_name(name), "bad name: {line}");
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = inner.find("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
            let label = &inner[..eq];
            assert!(valid_name(label) && !label.contains(':'), "bad label name: {line}");
            let mut value = String::new();
            let mut chars = inner[eq + 2..].char_indices();
            let closing = loop {
                match chars.next().unwrap_or_else(|| panic!("unclosed label value: {line}")) {
                    (i, '"') => break eq + 2 + i,
                    (_, '\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => panic!("bad escape {other:?}: {line}"),
                    },
                    (_, c) => value.push(c),
                }
            };
            assert!(labels.insert(label.to_string(), value).is_none(), "a label twice: {line}");
            inner = &inner[closing + 1..];
            if !inner.starts_with('}') {
                inner = inner.strip_prefix(',').unwrap_or_else(|| panic!("labels not separated by commas: {line}"));
            }
        }
    }
    let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value: {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
    };
    Sample { name: name.to_string(), labels, value }
}

/// Buckets with increasing bounds and cumulative counts, the last `+Inf` and
/// equal to `_count`, and a `_sum`.
fn check_histogram(name: &str, samples: &[Sample]) {
    let bucket = format!("{name}_bucket");
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == bucket)
        .map(|s| {
            assert_eq!(s.labels.len(), 1, "{name}: a bucket's one label is le");
            let le = &s.labels["le"];
            (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, s.value)
        })
        .collect();
    assert!(buckets.len() >= 2, "{name} has too few buckets");
    for pair in buckets.windows(2) {
        assert!(pair[0].0 < pair[1].0, "{name}: bounds not increasing: {pair:?}");
        assert!(pair[0].1 <= pair[1].1, "{name}: buckets not cumulative: {pair:?}");
    }
    let (last_bound, total) = *buckets.last().unwrap();
    assert_eq!(last_bound, f64::INFINITY, "{name}: the last bucket is +Inf");
    let single = |suffix: &str| {
        let found: Vec<&Sample> = samples.iter().filter(|s| s.name == format!("{name}{suffix}")).collect();
        assert_eq!(found.len(), 1, "{name}{suffix} once");
        found[0].value
    };
    assert_eq!(single("_count"), total, "{name}: _count is the +Inf bucket");
    assert!(single("_sum") >= 0.0);
}

#[test]
fn metrics_parse_as_prometheus_text_and_every_family_moves() {
    let redis = Redis::start();
    let a = Server::redis(&redis, &["--cluster", "--node-id", "na", "--max-message-bytes", "4096"]);
    let b = Server::redis(&redis, &["--cluster", "--node-id", "nb"]);
    let before = Scrape::of(&a);
    assert_eq!(before.value("rollingpaper_edit_broadcast_seconds_count", &[]), 0.0);

    // A join (its paper read from Redis), one on each node, and an edit relayed across.
    let mut ann = a.join("p-metrics", "user=ann");
    let mut bob = b.join("p-metrics", "user=bob");
    ann.upsert("n1", json!({"text": "hi"}));
    let v = ann.next_of("upsert")["v"].as_u64().unwrap();
    assert_eq!(bob.next_of("upsert")["v"].as_u64(), Some(v), "relayed to the other node");
    while ann.next_of("saved")["v"].as_u64() < Some(v) {}
    // A refusal, a close by the server (1009) and one by the client (1000), an HTTP 404.
    ann.send_text("not json");
    assert_eq!(ann.next_of("error")["code"], "invalid_json");
    let mut big = a.join("p-metrics", "user=big");
    big.send_text(&format!(r#"{{"type":"cursor","data":{{"t":"{}"}}}}"#, "x".repeat(5000)));
    assert_eq!(big.closed().0, 1009);
    let quiet = a.join("p-other", "user=quiet");
    quiet.close();
    assert_eq!(a.get("/no-such-route").0, 404);

    let moved = |s: &Scrape, name: &str, labels: &[(&str, &str)]| s.value(name, labels) > 0.0;
    let scrape = eventually("every count to arrive", || {
        let s = Scrape::of(&a);
        let done = moved(&s, "rollingpaper_closes_total", &[("code", "1000")])
            && moved(&s, "rollingpaper_relayed_messages_total", &[("direction", "out")]);
        done.then_some(s)
    });
    let histograms = [
        "rollingpaper_edit_broadcast_seconds",
        "rollingpaper_load_wait_seconds",
        "rollingpaper_loop_turn_seconds",
        "rollingpaper_write_behind_seconds",
        "rollingpaper_backlog_wait_seconds",
        "rollingpaper_redis_round_trip_seconds",
    ];
    for name in histograms {
        assert_eq!(scrape.kind(name), "histogram");
        assert!(moved(&scrape, &format!("{name}_count"), &[]), "{name} did not move");
        assert!(moved(&scrape, &format!("{name}_bucket"), &[("le", "+Inf")]), "{name} did not move");
    }
    for (name, labels) in [
        ("rollingpaper_refusals_total", [("code", "invalid_json")]),
        ("rollingpaper_closes_total", [("code", "1009")]),
        ("rollingpaper_closes_total", [("code", "1000")]),
        ("rollingpaper_http_responses_total", [("status", "101")]),
        ("rollingpaper_http_responses_total", [("status", "404")]),
        ("rollingpaper_http_responses_total", [("status", "200")]),
        ("rollingpaper_failed_ops_total", [("reason", "refused")]),
        ("rollingpaper_relayed_messages_total", [("direction", "out")]),
    ] {
        assert_eq!(scrape.kind(name), "counter");
        if name != "rollingpaper_failed_ops_total" {
            assert!(moved(&scrape, name, &labels), "{name} {labels:?} did not move");
        }
    }
    for name in ["rollingpaper_received_bytes_total", "rollingpaper_sent_bytes_total"] {
        assert_eq!(scrape.kind(name), "counter");
        assert!(moved(&scrape, name, &[]), "{name} did not move");
    }
    for old in ["rollingpaper_bytes_in_total", "rollingpaper_bytes_out_total"] {
        assert!(!scrape.kinds.contains_key(old), "{old} is renamed");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(scrape.value("rollingpaper_build_info", &[("version", version)]), 1.0);

    // The process, as /proc says.
    assert_eq!(scrape.kind("process_cpu_seconds_total"), "counter");
    // The kernel counts CPU time in clock ticks, and a quick run may not have
    // spent one yet: the figure must lie between two reads of /proc taken
    // around the scrape.
    let spent_before = cpu_seconds_of(a.pid());
    let cpu = Scrape::of(&a).value("process_cpu_seconds_total", &[]);
    let spent_after = cpu_seconds_of(a.pid());
    assert!(
        spent_before - 1e-9 <= cpu && cpu <= spent_after + 1e-9,
        "process_cpu_seconds_total {cpu} outside what /proc said around it: {spent_before}..{spent_after}"
    );
    for gauge in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_start_time_seconds"]
    {
        assert_eq!(scrape.kind(gauge), "gauge");
        assert!(moved(&scrape, gauge, &[]), "{gauge} is 0");
    }
    assert!(scrape.value("process_max_fds", &[]) >= scrape.value("process_open_fds", &[]));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = scrape.value("process_start_time_seconds", &[]);
    assert!(started <= now + 1.0 && started > now - 600.0, "started at {started}, now {now}");

    // The other node received what this one published.
    eventually("the relay thread to count what it received", || {
        moved(&Scrape::of(&b), "rollingpaper_relayed_messages_total", &[("direction", "in")]).then_some(())
    });
}

/// User and system CPU time of a process, as `/proc/{pid}/stat` counts it.
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server's /proc/{pid}/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); `fields` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second as f64
}

#[test]
#[should_panic(expected = "buckets not cumulative")]
fn the_checker_refuses_buckets_that_are_not_cumulative() {
    Scrape::parse("# HELP h_seconds h\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_sum 1\nh_seconds_count 1\n");
}

#[test]
#[should_panic(expected = "a sample outside its family")]
fn the_checker_refuses_a_sample_without_help_and_type() {
    Scrape::parse("x_total{a=\"b\"} 1\n");
}
