//! The hot path of one edit, without sockets: parsing and validating the client
//! message, encoding the server message once, copying it into the output queue
//! of every member, and timing it (`edit_broadcast_seconds`: two clock reads and
//! one histogram observation per edit, none per member). The broadcast also
//! counts heap allocations per member with a counting global allocator: once
//! the queues have grown there must be none (the run stops with a panic
//! otherwise).
//!
//!     cargo bench --bench hot_path

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rollingpaper::conn::Outbox;
use rollingpaper::metrics::Histogram;
use rollingpaper::protocol::{parse_client_msg, Frame};

/// The system allocator, counting every allocation and reallocation.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MAX_NOTE_BYTES: usize = 16 * 1024;

/// A typical edit: a 200-byte note as the reference page writes it.
fn upsert_text() -> String {
    let text = "x".repeat(120);
    format!(
        r#"{{"type":"upsert","id":"n-42","data":{{"kind":"text","x":120,"y":340,"width":200,"height":80,"color":"yellow","text":"{text}"}},"ref":"r-1"}}"#
    )
}

fn parse(c: &mut Criterion) {
    let text = upsert_text();
    let mut group = c.benchmark_group("parse_client_msg");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("upsert_200B", |b| b.iter(|| parse_client_msg(black_box(&text), MAX_NOTE_BYTES).unwrap()));
    let ping = r#"{"type":"ping"}"#;
    group.bench_function("ping", |b| b.iter(|| parse_client_msg(black_box(ping), MAX_NOTE_BYTES).unwrap()));
    group.finish();
}

fn encode(c: &mut Criterion) {
    let data = r#"{"kind":"text","x":120,"y":340,"width":200,"height":80,"color":"yellow","text":"hello"}"#;
    let mut frame = Frame::new();
    c.bench_function("encode/Frame::upsert", |b| {
        b.iter(|| {
            let bytes = frame.upsert("n-42", "user-7", black_box(data), 1_797_352_612_340_736, "c7", Some(r#""r-1""#));
            black_box(bytes.len())
        })
    });
}

/// Queues one frame to every member and flushes every queue, as a loop turn does.
fn broadcast_once(outboxes: &mut [Outbox], bytes: &[u8]) {
    for out in outboxes.iter_mut() {
        out.queue(bytes);
    }
    for out in outboxes.iter_mut() {
        out.write_to(&mut std::io::sink()).expect("a sink takes everything");
    }
}

fn broadcast(c: &mut Criterion) {
    let mut frame = Frame::new();
    let data = format!(r#"{{"text":"{}"}}"#, "x".repeat(189));
    let bytes = frame.upsert("n-42", "user-7", &data, 1_797_352_612_340_736, "c7", None).to_vec();
    let mut group = c.benchmark_group("broadcast");
    for members in [10usize, 100, 1000] {
        let mut outboxes: Vec<Outbox> = (0..members).map(|_| Outbox::default()).collect();
        // Let the queues grow once, then count.
        broadcast_once(&mut outboxes, &bytes);
        let rounds = 100u64;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..rounds {
            broadcast_once(&mut outboxes, &bytes);
        }
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        let per_member = allocations as f64 / (rounds * members as u64) as f64;
        eprintln!("broadcast to {members} members: {per_member} allocations per member ({} B frame)", bytes.len());
        assert_eq!(allocations, 0, "a broadcast allocated once the queues had grown");

        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter(|| broadcast_once(&mut outboxes, black_box(&bytes)))
        });
    }
    group.finish();
}

/// What the metrics add to an edit (and to a loop turn): the clock read when the
/// message is read, and one at the end with its observation.
fn timing(c: &mut Criterion) {
    let histogram = Histogram::default();
    c.bench_function("metrics/Histogram::observe", |b| {
        b.iter(|| histogram.observe(black_box(std::time::Duration::from_micros(37))))
    });
    c.bench_function("metrics/timed_edit", |b| {
        b.iter(|| {
            let read_at = std::time::Instant::now();
            histogram.observe(black_box(read_at).elapsed());
        })
    });
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..1000 {
        histogram.observe(std::time::Instant::now().elapsed());
    }
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), before, "an observation allocated");
}

criterion_group!(benches, parse, encode, broadcast, timing);
criterion_main!(benches);
