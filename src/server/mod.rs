//! Starting and stopping: bind, spawn the event loops, the writer and the loader,
//! wait for SIGTERM or SIGINT, then stop in order: loops close their sessions,
//! the writer flushes the backlog, the process exits.

mod admission;
mod api;
mod cluster;
mod conns;
mod edits;
pub mod event_loop;
pub mod inbox;
pub mod node;
mod reads;
mod session;
mod snapshots;
mod stored;
mod timers;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, StoreKind};
use crate::metrics::WriterMetrics;
use crate::store::loader::Loader;
use crate::store::relay::Relay;
use crate::store::target::Target;
use crate::store::writer::{History, Writer};
use crate::store::{Backlog, BacklogLimits, Loads, Loops, StoreHandle};
use event_loop::{EventLoop, WAKER};
use inbox::{InboxMsg, LoopHandle, LoopHandles};
use node::{Node, StoreStatus};

/// Loader threads (and Redis connections) reading papers: enough that one
/// large or slow paper does not delay the others, few enough to stay light.
const LOADERS: usize = 4;

/// A failure to start, said so that the operator knows what to change.
#[derive(Debug)]
pub struct StartError(String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// How the server ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every edit is written.
    Clean,
    /// Redis stayed unreachable past `--shutdown-timeout`; this many edits are lost.
    Lost(usize),
}

/// Runs the server until SIGTERM or SIGINT.
///
/// # Errors
/// The listening address cannot be bound, or a thread cannot be started.
pub fn run(config: Config) -> Result<Outcome, StartError> {
    let fail = |what: &str, e: &dyn fmt::Display| StartError(format!("{what}: {e}"));
    // Before anything starts, so that an early SIGTERM still stops the server in order.
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| fail("cannot handle signals", &e))?;
    let listener = std::net::TcpListener::bind(config.listen).map_err(|e| {
        StartError(format!(
            "cannot listen on {} ({e}); choose another address with --listen or RP_LISTEN",
            config.listen
        ))
    })?;
    listener.set_nonblocking(true).map_err(|e| fail("cannot make the listener non-blocking", &e))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| fail("cannot read the listening address", &e))?;
    let internal = match config.internal_listen {
        None => None,
        Some(addr) => {
            let internal = std::net::TcpListener::bind(addr).map_err(|e| {
                StartError(format!(
                    "cannot listen on {addr} ({e}); choose another address with --internal-listen or RP_INTERNAL_LISTEN"
                ))
            })?;
            internal.set_nonblocking(true).map_err(|e| fail("cannot make the listener non-blocking", &e))?;
            Some(internal)
        }
    };

    // Polls and wakers first: the writer and loader need every loop's handle.
    let mut polls = Vec::with_capacity(config.threads);
    let mut handles = Vec::with_capacity(config.threads);
    let mut inboxes = Vec::with_capacity(config.threads);
    for _ in 0..config.threads {
        let poll = Poll::new().map_err(|e| fail("cannot create an event loop", &e))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| fail("cannot create an event loop waker", &e))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        handles.push(LoopHandle { tx, waker: Arc::new(waker) });
        inboxes.push(rx);
        polls.push(poll);
    }
    let loops: Arc<[LoopHandle]> = handles.into();
    let reports: Arc<dyn Loops> = Arc::new(LoopHandles(loops.clone()));

    let give_up_at = Arc::new(OnceLock::new());
    let (store, status, threads) = match config.store {
        StoreKind::Memory => {
            log::warn!("--store memory: papers live in this process only and are lost when it exits; completed papers are not handed to any stream");
            (StoreHandle::Memory, None, None)
        }
        StoreKind::Redis => {
            let started = start_redis_store(&config, &reports, &give_up_at)?;
            (started.handle, Some(started.status), Some(started.threads))
        }
    };

    let node = Arc::new(Node::new(&config, status));
    let mut loop_threads = Vec::with_capacity(config.threads);
    for (index, (poll, inbox)) in polls.into_iter().zip(inboxes).enumerate() {
        let listener = listener.try_clone().map_err(|e| fail("cannot share the listener", &e))?;
        let internal = match &internal {
            Some(internal) => Some(internal.try_clone().map_err(|e| fail("cannot share the internal listener", &e))?),
            None => None,
        };
        let event_loop = EventLoop::new(
            index,
            poll,
            (mio::net::TcpListener::from_std(listener), internal.map(mio::net::TcpListener::from_std)),
            inbox,
            loops.clone(),
            store.clone(),
            node.clone(),
        )
        .map_err(|e| fail("cannot start an event loop", &e))?;
        let thread = spawn(&format!("rp-loop-{index}"), move || event_loop.run())
            .map_err(|e| fail("cannot start an event loop", &e))?;
        loop_threads.push(thread);
    }
    drop(listener);
    if let Some(internal) = internal {
        let addr = internal.local_addr().map_err(|e| fail("cannot read the internal address", &e))?;
        log::info!("backend API, /metrics and /readyz on http://{addr} only (--internal-listen)");
    }
    // Only the loops hold the store from here on: when they return, the writer's
    // and loader's channels close behind the last op.
    drop(store);

    log::info!("rollingpaper listening on http://{local} (WebSocket: ws://{local}/ws/{{paper}})");
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    log::info!(
        "{} received: closing sessions and flushing the backlog",
        if signal == SIGINT { "SIGINT" } else { "SIGTERM" }
    );
    // A second signal means: do not wait.
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            log::warn!("second signal: exiting without waiting for the backlog");
            std::process::exit(1);
        }
    });

    for handle in loops.iter() {
        handle.send(InboxMsg::Stop);
    }
    for thread in loop_threads {
        let _ = thread.join();
    }
    let _ = give_up_at.set(Instant::now() + config.shutdown_timeout());
    drop(loops);
    drop(reports);
    let lost = threads.map_or(0, StoreThreads::join);
    if lost > 0 {
        return Ok(Outcome::Lost(lost));
    }
    if config.store == StoreKind::Memory {
        log::info!("stopped; the papers lived in this process's memory only (--store memory) and are gone");
    } else {
        log::info!("stopped; every edit is written");
    }
    Ok(Outcome::Clean)
}

/// The threads behind a Redis store: the writer (which returns the ops it
/// could not write), the loaders, and the relay with `--cluster`.
struct StoreThreads {
    writer: JoinHandle<usize>,
    loaders: Vec<JoinHandle<()>>,
    relay: Option<JoinHandle<()>>,
}

impl StoreThreads {
    /// Waits for them all once the loops are gone; returns the ops lost.
    fn join(self) -> usize {
        let lost = self.writer.join().unwrap_or(0);
        if let Some(relay) = self.relay {
            let _ = relay.join();
        }
        for loader in self.loaders {
            let _ = loader.join();
        }
        lost
    }
}

/// A Redis store started: what the loops hold of it, what `/readyz` and
/// `/metrics` see of it, and its threads.
struct RedisStore {
    handle: StoreHandle,
    status: StoreStatus,
    threads: StoreThreads,
}

/// Starts the writer, the loaders and (with `--cluster`) the relay.
fn start_redis_store(
    config: &Config,
    reports: &Arc<dyn Loops>,
    give_up_at: &Arc<OnceLock<Instant>>,
) -> Result<RedisStore, StartError> {
    let fail = |what: &str, e: &dyn fmt::Display| StartError(format!("{what}: {e}"));
    let node_id = config.node_id.clone().unwrap_or_default();
    let target =
        Target::configured(&config.redis, config.redis_ca_file.as_deref()).map_err(|e| fail("bad --redis URL", &e))?;
    let limits = BacklogLimits { ops: config.backlog_limit, bytes: config.backlog_bytes };
    let (backlog, ops, pending) = Backlog::new(limits);
    let (loads_tx, loads_rx) = crossbeam_channel::unbounded();
    let metrics = Arc::new(WriterMetrics::default());
    let relay_healthy = config.cluster.then(|| Arc::new(AtomicBool::new(false)));
    let status = StoreStatus {
        writer: metrics.clone(),
        backlog: pending.clone(),
        backlog_limits: limits,
        relay_healthy: relay_healthy.clone(),
    };
    let presence_ttl = Duration::from_secs(config.presence_ttl.max(1));
    let mut writer = Writer::new(
        target.endpoint(),
        ops,
        pending,
        metrics.clone(),
        reports.clone(),
        config.completed_retention,
        give_up_at.clone(),
    )
    .waiting_for_replicas(config.redis_wait_replicas)
    .sizing_calls_for(config.max_note_bytes)
    .with_presence_ttl(presence_ttl)
    .keeping_tombstones(History {
        retention: (config.tombstone_retention * 1000) << 10,
        max_tombstones: config.max_tombstones,
    });
    // Several loaders, each with its connection, take requests from one
    // queue: a large paper's read does not hold up every other paper's.
    let loaders: Vec<Loader> = (0..LOADERS)
        .map(|_| {
            let loader = Loader::new(target.endpoint(), loads_rx.clone(), reports.clone(), metrics.clone());
            if config.cluster {
                loader.with_presence(&node_id)
            } else {
                loader
            }
        })
        .collect();
    let mut relay_thread = None;
    let loads = match relay_healthy {
        Some(healthy) => {
            writer = writer.relaying_as(&node_id);
            let (relay_tx, relay_rx) = crossbeam_channel::unbounded();
            let relay = Relay::new(target.endpoint(), &node_id, relay_rx, loads_tx, reports.clone(), healthy)
                .with_presence_ttl(presence_ttl)
                .counting_in(metrics);
            relay_thread =
                Some(spawn("rp-relay", move || relay.run()).map_err(|e| fail("cannot start the relay", &e))?);
            Loads::Subscribed(relay_tx)
        }
        None => Loads::Direct(loads_tx),
    };
    let writer = spawn("rp-writer", move || writer.run()).map_err(|e| fail("cannot start the writer", &e))?;
    let mut loader_threads = Vec::with_capacity(LOADERS);
    for loader in loaders {
        loader_threads.push(spawn("rp-loader", move || loader.run()).map_err(|e| fail("cannot start a loader", &e))?);
    }
    Ok(RedisStore {
        handle: StoreHandle::Redis { backlog, loads },
        status,
        threads: StoreThreads { writer, loaders: loader_threads, relay: relay_thread },
    })
}

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}
