//! What every event loop of this node shares: settings, the HTTP policy, the
//! session cap, metrics and the store's health. Read on every loop; written with
//! atomics (the per-address table, touched once per session, takes a lock).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tungstenite::protocol::WebSocketConfig;

use crate::auth::Verifier;
use crate::config::{parse_cidr, Config, StoreKind};
use crate::conn::{self, http::Policy};
use crate::metrics::{self, LoopMetrics, StoreView, WriterMetrics};
use crate::paper::PaperLimits;
use crate::shared::InFlight;
use crate::store::{BacklogLevel, BacklogLimits};

/// What every loop needs to know of the configuration.
pub struct Settings {
    pub limits: PaperLimits,
    pub max_note_bytes: usize,
    pub max_outbound_bytes: usize,
    pub load_timeout: Duration,
    /// `None`: papers stay in memory for good (the memory store).
    pub paper_linger: Option<Duration>,
    pub ws_config: WebSocketConfig,
    pub rate: f64,
    pub burst: u32,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// Time over which a stopping loop closes its sessions.
    pub drain: Duration,
    /// How long a presence hash lives unless refreshed (`--presence-ttl`).
    pub presence_ttl: Duration,
    /// How long an API call waits for Redis (`--api-timeout`).
    pub api_timeout: Duration,
    /// A revocation's length when the call names no `until` (`--revoke-retention`).
    pub revoke_retention: Duration,
    /// How long an erased paper stays erased (`--erase-retention`).
    pub erase_retention: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Settings {
            limits: PaperLimits {
                max_notes: config.max_notes,
                max_members: config.max_members,
                max_note_bytes: config.max_note_bytes,
                max_tombstones: config.max_tombstones,
                tombstone_retention: (config.tombstone_retention * 1000) << 10,
            },
            max_note_bytes: config.max_note_bytes,
            max_outbound_bytes: config.max_outbound_bytes,
            load_timeout: config.load_timeout(),
            paper_linger: (config.store == StoreKind::Redis).then(|| config.paper_linger()),
            ws_config: conn::websocket_config(config.max_message_bytes),
            rate: config.rate,
            burst: config.burst,
            handshake_timeout: config.handshake_timeout(),
            ping_interval: config.ping_interval(),
            idle_timeout: config.idle_timeout(),
            drain: config.drain(),
            presence_ttl: Duration::from_secs(config.presence_ttl.max(1)),
            api_timeout: config.api_timeout(),
            revoke_retention: Duration::from_secs(config.revoke_retention),
            erase_retention: config.erase_retention(),
        }
    }
}

/// The store as `/readyz` and `/metrics` see it.
pub struct StoreStatus {
    pub writer: Arc<WriterMetrics>,
    pub backlog: Arc<BacklogLevel>,
    pub backlog_limits: BacklogLimits,
    /// With `--cluster`: the relay's canary came back in time.
    pub relay_healthy: Option<Arc<AtomicBool>>,
}

pub struct Node {
    /// Stamped on versions and relayed messages; empty on a single node, so that
    /// stored notes keep the plain `{"author","data","v"}` layout.
    pub node_id: Arc<str>,
    pub cluster: bool,
    pub settings: Settings,
    pub policy: Policy,
    /// Connection serials: unique for the process, also the member ids.
    pub serials: AtomicU64,
    /// Per loop, indexed by the loop's index.
    pub loop_metrics: Box<[Arc<LoopMetrics>]>,
    /// `None` with the memory store.
    pub store: Option<StoreStatus>,
    sessions: AtomicUsize,
    max_sessions: usize,
    /// Every socket accepted and not yet closed, in any phase, on every loop.
    sockets: AtomicUsize,
    pub max_sockets: usize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
    /// Request heads still being read, per peer address; held to the same cap, so
    /// that one address cannot take every socket slot with unfinished heads.
    heads: Mutex<HashMap<IpAddr, usize>>,
    /// Snapshot and `GET /papers` bytes being written, and their bound.
    pub in_flight: Arc<InFlight>,
    trusted_proxies: Vec<(IpAddr, u8)>,
    /// Papers Redis refuses to write, with its error (for `/readyz` and the log).
    failing: Mutex<std::collections::BTreeMap<Arc<str>, String>>,
}

impl Node {
    pub fn new(config: &Config, store: Option<StoreStatus>) -> Self {
        Node {
            node_id: Arc::from(if config.cluster { config.node_id.as_deref().unwrap_or_default() } else { "" }),
            cluster: config.cluster,
            settings: Settings::from_config(config),
            policy: Policy {
                verifier: config.jwt_secret.as_deref().map(Verifier::new),
                allowed_origins: config.allowed_origins.clone(),
                echo: config.echo,
                api_key: config.api_key.as_ref().map(|key| key.0.clone()),
                max_body: config.max_message_bytes,
                internal_listener: config.internal_listen.is_some(),
            },
            serials: AtomicU64::new(1),
            loop_metrics: (0..config.threads).map(|_| Arc::new(LoopMetrics::default())).collect(),
            store,
            sessions: AtomicUsize::new(0),
            max_sessions: config.max_connections,
            sockets: AtomicUsize::new(0),
            max_sockets: if config.max_sockets > 0 {
                config.max_sockets
            } else {
                descriptor_limit().saturating_sub(config.descriptor_reserve).max(1)
            },
            per_address: Mutex::new(HashMap::new()),
            max_per_address: config.max_connections_per_address,
            heads: Mutex::new(HashMap::new()),
            in_flight: Arc::new(InFlight::new(config.max_snapshot_bytes_in_flight)),
            trusted_proxies: config.trusted_proxies.iter().filter_map(|p| parse_cidr(p)).collect(),
            failing: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the
    /// last address in `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let Some(chain) = forwarded_for else { return peer };
        for hop in chain.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(addr) if self.is_trusted(addr) => continue,
                Ok(addr) => return addr,
                Err(_) => return peer,
            }
        }
        peer
    }

    fn is_trusted(&self, addr: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|&(net, prefix)| in_block(addr, net, prefix))
    }

    /// Takes a session slot for a client, or says the node (or that address) is full.
    pub fn admit(&self, address: IpAddr) -> bool {
        if self.sessions.fetch_add(1, Ordering::AcqRel) >= self.max_sessions {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.max_per_address > 0 {
            let mut table = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let count = table.entry(address).or_insert(0);
            if *count >= self.max_per_address {
                drop(table);
                self.sessions.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            *count += 1;
        }
        true
    }

    /// Takes one of a peer's request-head slots for a socket just accepted:
    /// `None` when the address holds `--max-connections-per-address` unfinished
    /// heads already (the socket is closed at once, before it takes a slot for
    /// long), else whether a slot was taken (trusted proxies and an unset cap take
    /// none) and must be given back with `release_head`.
    pub fn take_head(&self, peer: IpAddr) -> Option<bool> {
        if self.max_per_address == 0 || self.is_trusted(peer) {
            return Some(false);
        }
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        let count = heads.entry(peer).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(true)
    }

    /// Gives back a slot taken by `take_head`: the head is read, or the socket closed.
    pub fn release_head(&self, peer: IpAddr) {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = heads.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                heads.remove(&peer);
            }
        }
    }

    /// Takes a socket slot before `accept`; false when the node holds
    /// `--max-sockets` already (the connection waits in the kernel's queue).
    pub fn take_socket(&self) -> bool {
        if self.sockets.fetch_add(1, Ordering::AcqRel) >= self.max_sockets {
            self.sockets.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back a slot taken by `take_socket` (the socket is closed, or was never accepted).
    pub fn release_socket(&self) {
        self.sockets.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open_sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    /// Gives back a slot taken by `admit`.
    pub fn release(&self, address: IpAddr) {
        self.sessions.fetch_sub(1, Ordering::AcqRel);
        if self.max_per_address > 0 {
            let mut table = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = table.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    table.remove(&address);
                }
            }
        }
    }

    /// A paper Redis refuses to write (`Some(error)`), or that it takes again.
    pub fn paper_failing(&self, paper: &Arc<str>, error: Option<&str>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(error) => failing.insert(paper.clone(), error.to_string()),
            None => failing.remove(paper),
        };
    }

    /// `GET /readyz`: `None` when ready, else why not.
    pub fn unready_reason(&self) -> Option<&'static str> {
        let store = self.store.as_ref()?;
        if !store.writer.redis_up.load(Ordering::Relaxed) {
            return Some("redis unreachable");
        }
        if store.backlog.ops() >= store.backlog_limits.ops || store.backlog.bytes() >= store.backlog_limits.bytes {
            return Some("write backlog full");
        }
        if store.relay_healthy.as_ref().is_some_and(|h| !h.load(Ordering::Relaxed)) {
            return Some("relay canary not received");
        }
        None
    }

    /// What `/readyz` adds while the node serves: papers Redis refuses to write.
    /// They do not make the node unready (Redis answers, other papers go on).
    pub fn failing_papers(&self) -> String {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.iter().map(|(paper, error)| format!("; paper {paper} cannot be written: {error}")).collect()
    }

    /// `GET /metrics`.
    pub fn render_metrics(&self) -> String {
        let store = self.store.as_ref().map(|s| StoreView {
            writer: &s.writer,
            backlog: s.backlog.ops(),
            backlog_limit: s.backlog_limits.ops,
            backlog_bytes: s.backlog.bytes(),
            backlog_bytes_limit: s.backlog_limits.bytes,
        });
        let mut text =
            metrics::render(&self.loop_metrics, store, self.sessions.load(Ordering::Relaxed), self.open_sockets());
        metrics::render_memory(&mut text, &self.loop_metrics, &self.in_flight);
        text
    }
}

/// The process's descriptor limit (the soft `RLIMIT_NOFILE`); a modest guess if
/// it cannot be read.
fn descriptor_limit() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok && limit.rlim_cur != libc::RLIM_INFINITY {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else if ok {
        usize::MAX
    } else {
        1024
    }
}

fn in_block(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn node(args: &[&str]) -> Node {
        let mut all = vec!["rollingpaper", "--store", "memory"];
        all.extend_from_slice(args);
        Node::new(&Config::try_parse_from(all).unwrap().validate().unwrap(), None)
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = node(&["--trusted-proxies", "10.0.0.0/8,127.0.0.1"]);
        assert_eq!(n.client_address(ip("10.1.2.3"), Some("203.0.113.9")), ip("203.0.113.9"));
        // A client may prepend anything; the proxies' own entries are on the right.
        assert_eq!(n.client_address(ip("127.0.0.1"), Some("1.1.1.1, 203.0.113.9, 10.0.0.7")), ip("203.0.113.9"));
        assert_eq!(n.client_address(ip("192.0.2.1"), Some("203.0.113.9")), ip("192.0.2.1"), "not a trusted peer");
        assert_eq!(n.client_address(ip("10.1.2.3"), None), ip("10.1.2.3"));
        assert_eq!(n.client_address(ip("10.1.2.3"), Some("garbage")), ip("10.1.2.3"));
        assert_eq!(node(&[]).client_address(ip("127.0.0.1"), Some("203.0.113.9")), ip("127.0.0.1"));
    }

    #[test]
    fn the_session_cap_counts_per_address() {
        let n = node(&["--max-connections", "3", "--max-connections-per-address", "2"]);
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(n.admit(a) && n.admit(a));
        assert!(!n.admit(a));
        assert!(n.admit(b));
        assert!(!n.admit(b), "the node is full");
        n.release(a);
        assert!(n.admit(b));
    }

    #[test]
    fn request_heads_count_per_address_but_not_for_trusted_proxies() {
        let n = node(&["--max-connections-per-address", "2", "--trusted-proxies", "10.0.0.1"]);
        let (a, b, proxy) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap(), "10.0.0.1".parse().unwrap());
        assert_eq!(n.take_head(a), Some(true));
        assert_eq!(n.take_head(a), Some(true));
        assert_eq!(n.take_head(a), None, "a third unfinished head from one address");
        assert_eq!(n.take_head(b), Some(true));
        assert!((0..10).all(|_| n.take_head(proxy) == Some(false)), "a trusted proxy speaks for many clients");
        n.release_head(a);
        assert_eq!(n.take_head(a), Some(true));
        assert_eq!(node(&[]).take_head(a), Some(false), "no cap, no count");
    }
}
