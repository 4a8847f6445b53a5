//! Every knob of the server, with its default, its flag and its `RP_*`
//! environment variable. Validation errors say what is wrong and how to fix it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::auth;
use crate::logging::{self, Format};

const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
const DEFAULT_MAX_NOTE_BYTES: usize = 16 * 1024;
const DEFAULT_MAX_OUTBOUND_BYTES: usize = 4 * 1024 * 1024;

/// Where papers live between sessions.
/// The longest `--completed-retention`: 100 years, in seconds.
pub const MAX_RETENTION_SECS: u64 = 100 * 365 * 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Redis at `--redis`: papers survive restarts; completed papers go to the stream.
    Redis,
    /// Process memory only: everything is lost at exit (development, tests, demos).
    Memory,
}

/// Command line and environment of the `rollingpaper` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "rollingpaper",
    version,
    about = "Real-time server for rolling papers: shared greeting cards edited live over WebSocket."
)]
pub struct Config {
    /// Address to listen on (HTTP/1.1 and WebSocket on one port): 127.0.0.1:8080,
    /// localhost:8080, or :8080 for every interface.
    #[arg(long, env = "RP_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Event loop threads; every paper lives on exactly one of them. 0 means one per core.
    #[arg(long, env = "RP_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Where papers are kept.
    #[arg(long, env = "RP_STORE", value_enum, default_value_t = StoreKind::Redis)]
    pub store: StoreKind,

    /// Redis URL (with `--store redis`): redis://host:port/db, or
    /// redis+sentinel://host:port,host:port/mastername to follow a Sentinel-watched master.
    #[arg(long, env = "RP_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,

    /// With N >= 1, an edit counts as written (and `saved`) only once N replicas
    /// have it (Redis `WAIT`).
    #[arg(long, env = "RP_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: usize,

    /// Largest WebSocket message a client may send, all fragments together (bytes); over it
    /// the session is closed with 1009. Unset, it follows --max-note-bytes (4 times it, at
    /// least 65536).
    #[arg(long, env = "RP_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Largest note `data`, serialized compactly (bytes); over it, `too_large`. Unset, it
    /// follows --max-message-bytes (a quarter of it, at most 16384).
    #[arg(long, env = "RP_MAX_NOTE_BYTES", default_value_t = DEFAULT_MAX_NOTE_BYTES)]
    pub max_note_bytes: usize,

    /// Live notes a paper may hold; creating one more is refused with `paper_full`.
    #[arg(long, env = "RP_MAX_NOTES", default_value_t = 1000)]
    pub max_notes: usize,

    /// Deleted notes a paper keeps at most (PROTOCOL.md 4, the tombstone horizon);
    /// past it the oldest are dropped.
    #[arg(long, env = "RP_MAX_TOMBSTONES", default_value_t = 1000)]
    pub max_tombstones: usize,

    /// Seconds a deleted note is kept as a tombstone before the horizon drops it.
    #[arg(long, env = "RP_TOMBSTONE_RETENTION", default_value_t = 3600)]
    pub tombstone_retention: u64,

    /// Members a paper may have on this node; one more is closed with 1013 `paper_full`.
    #[arg(long, env = "RP_MAX_MEMBERS", default_value_t = 5000)]
    pub max_members: usize,

    /// Edits that may wait for Redis; when full, new edits are refused with `unavailable`.
    #[arg(long, env = "RP_BACKLOG_LIMIT", default_value_t = 100_000)]
    pub backlog_limit: usize,

    /// Seconds a joiner waits for its paper to be read from Redis before 1013.
    #[arg(long, env = "RP_LOAD_TIMEOUT", default_value_t = 10.0)]
    pub load_timeout: f64,

    /// Seconds a paper stays in memory after its last member left.
    #[arg(long, env = "RP_PAPER_LINGER", default_value_t = 30.0)]
    pub paper_linger: f64,

    /// Seconds the notes and meta of a completed paper are kept in Redis.
    #[arg(long, env = "RP_COMPLETED_RETENTION", default_value_t = 7 * 24 * 3600)]
    pub completed_retention: u64,

    /// Bytes that may wait in one session's output before it counts as a slow consumer
    /// and is closed with 1013. Unset, it follows --max-message-bytes (4 times it, at
    /// least 4194304).
    #[arg(long, env = "RP_MAX_OUTBOUND_BYTES", default_value_t = DEFAULT_MAX_OUTBOUND_BYTES)]
    pub max_outbound_bytes: usize,

    /// Seconds over which a stopping server closes its sessions (with 1001), so that
    /// thousands of clients do not reconnect elsewhere in the same instant.
    #[arg(long, env = "RP_DRAIN_SECONDS", default_value_t = 0.0)]
    pub drain_seconds: f64,

    /// Seconds a stopping server keeps trying to write its backlog to Redis before it
    /// gives up (and exits with status 1, saying how many edits were lost).
    #[arg(long, env = "RP_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,

    /// Relay every change, join, leave and cursor through Redis pub/sub, so that
    /// members of one paper may sit on different nodes (PROTOCOL.md 6).
    #[arg(long, env = "RP_CLUSTER", value_parser = EnvBool("RP_CLUSTER"))]
    pub cluster: bool,

    /// This node's id in relayed messages and note versions (`[A-Za-z0-9_-]`, at
    /// most 32). Default: random at start.
    #[arg(long, env = "RP_NODE_ID")]
    pub node_id: Option<String>,

    /// Secret of the HS256 tokens the main backend issues. Set, it turns auth on:
    /// `/ws/{paper}` needs `?token=`, `/papers/{paper}` a Bearer token. Empty means unset.
    // Boxed with the audience (filled in by `validate`): the server builds its
    // verifier from `jwt_secret.as_deref()`, which so hands it the whole key.
    #[arg(long, env = "RP_JWT_SECRET", hide_env_values = true, value_parser = parse_jwt_secret)]
    pub jwt_secret: Option<Box<auth::Key>>,

    /// The audience (`aud`) tokens must be issued for. Unset, `aud` is not checked.
    #[arg(long, env = "RP_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Origins allowed to open sessions, comma-separated scheme://host[:port]
    /// (e.g. https://paper.example). Unset, every origin is; a request without
    /// `Origin` is not a browser and passes.
    #[arg(long, env = "RP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Messages a second a session may send, on average (every type counts).
    #[arg(long, env = "RP_RATE", default_value_t = 50.0)]
    pub rate: f64,

    /// Messages a session may send at once above its rate.
    #[arg(long, env = "RP_BURST", default_value_t = 200)]
    pub burst: u32,

    /// Connections this node holds at most; past it, upgrades get 503.
    #[arg(long, env = "RP_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Connections one client address may hold at most; 0 for no limit.
    #[arg(long, env = "RP_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 0)]
    pub max_connections_per_address: usize,

    /// Proxies (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For`
    /// names the client, for logs and the per-address limit. Others' is ignored.
    #[arg(long, env = "RP_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Seconds a client may take to send its request head.
    #[arg(long, env = "RP_HANDSHAKE_TIMEOUT", default_value_t = 10.0)]
    pub handshake_timeout: f64,

    /// Seconds between the server's pings to each session.
    #[arg(long, env = "RP_PING_INTERVAL", default_value_t = 30.0)]
    pub ping_interval: f64,

    /// Seconds of silence (no message, no pong) after which a session is closed.
    #[arg(long, env = "RP_IDLE_TIMEOUT", default_value_t = 75.0)]
    pub idle_timeout: f64,

    // Bounds under hostile clients (sockets, presence); read by `server::node`.
    /// Sockets this node holds at most, whatever their phase (a request head still
    /// being sent counts too); past it, new connections wait in the kernel's queue
    /// until one is released. 0: the descriptor limit (`ulimit -n`) minus
    /// `--descriptor-reserve`.
    #[arg(long, env = "RP_MAX_SOCKETS", default_value_t = 0)]
    pub max_sockets: usize,

    /// Descriptors kept out of the default `--max-sockets` for Redis connections,
    /// the listener, the loops' own descriptors and logs.
    #[arg(long, env = "RP_DESCRIPTOR_RESERVE", default_value_t = 64)]
    pub descriptor_reserve: usize,

    /// Seconds a paper's presence hash (`--cluster`) outlives the last node that
    /// holds the paper (live nodes refresh it), so that members of a killed node
    /// never stay in Redis for good.
    #[arg(long, env = "RP_PRESENCE_TTL", default_value_t = 60)]
    pub presence_ttl: u64,

    /// Adds `/echo`, a WebSocket echo endpoint on the same I/O path, for
    /// conformance tests. Never on in production.
    #[arg(long, env = "RP_ECHO", value_parser = EnvBool("RP_ECHO"))]
    pub echo: bool,

    /// Log level of the server's own logs: error, warn, info, debug or trace
    /// (libraries stay at warn; see --log).
    #[arg(long, env = "RP_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// Levels per module, comma-separated, e.g. info,rollingpaper::store=debug,redis=debug;
    /// a bare level applies to every module, libraries included, in place of --log-level.
    #[arg(long, env = "RP_LOG")]
    pub log: Option<String>,

    /// Log lines as text, or as one JSON object each (ts, level, target, msg) for log shippers.
    #[arg(long, env = "RP_LOG_FORMAT", value_enum, default_value_t = Format::Text)]
    pub log_format: Format,

    /// Which of the dependent limits the user set (flag or environment); the
    /// others follow them. All set when the origin is unknown (`Config::parse`).
    #[arg(skip = SetByUser::ALL)]
    set_by_user: SetByUser,
}

/// The limits whose defaults depend on each other, and whether the user set each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SetByUser {
    max_message_bytes: bool,
    max_note_bytes: bool,
    max_outbound_bytes: bool,
}

impl SetByUser {
    const ALL: SetByUser = SetByUser { max_message_bytes: true, max_note_bytes: true, max_outbound_bytes: true };

    fn from_matches(matches: &ArgMatches) -> SetByUser {
        let set = |id: &str| !matches!(matches.value_source(id), Some(ValueSource::DefaultValue) | None);
        SetByUser {
            max_message_bytes: set("max_message_bytes"),
            max_note_bytes: set("max_note_bytes"),
            max_outbound_bytes: set("max_outbound_bytes"),
        }
    }
}

/// A boolean from a flag (`--cluster`) or its variable (`RP_CLUSTER=yes`). The flag
/// itself takes no value, so a value that does not parse always comes from the
/// variable, which the error names.
#[derive(Debug, Clone, Copy)]
struct EnvBool(&'static str);

impl clap::builder::TypedValueParser for EnvBool {
    type Value = bool;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<bool, clap::Error> {
        let text = value.to_string_lossy();
        parse_bool(&text).ok_or_else(|| {
            let flag = arg.and_then(clap::Arg::get_long).map_or(String::new(), |l| format!(" (--{l})"));
            cmd.clone().error(
                clap::error::ErrorKind::InvalidValue,
                format!("{}={text:?}{flag} is not a boolean; use 1/0, true/false, yes/no or on/off", self.0),
            )
        })
    }
}

/// `1/0`, `true/false`, `yes/no`, `on/off`, in any case.
fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, or `:8080` (every interface).
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let example = "use for example 127.0.0.1:8080, localhost:8080, or :8080 for every interface";
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("{text:?} has no valid port; {example}"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?} is not host:port; {example}"))?;
    if port.parse::<u16>().is_err() || host.is_empty() {
        return Err(format!("{text:?} is not host:port; {example}"));
    }
    let addrs: Vec<SocketAddr> =
        text.to_socket_addrs().map_err(|e| format!("{text:?} does not resolve ({e}); {example}"))?.collect();
    // `localhost` resolves to ::1 and 127.0.0.1: IPv4 first, which every client reaches.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to nothing; {example}"))
}

/// An empty secret (`RP_JWT_SECRET=` in an environment file) is no secret: auth off.
fn parse_jwt_secret(text: &str) -> Result<Box<auth::Key>, String> {
    Ok(Box::new(auth::Key { secret: text.to_string(), audience: None }))
}

/// Whether `text` is an origin as browsers send it: scheme://host[:port], nothing more.
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else { return false };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 host holds colons of its own; its port follows the bracket.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    };
    scheme_ok && host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

/// A configuration that cannot work, with the flag to change.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses flags and `RP_*` variables (`args` starts with the program name),
    /// noting which limits the user set, so that `validate` derives the others.
    ///
    /// # Errors
    /// clap's error for a flag or variable that does not parse (`--help` too).
    pub fn from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Config::command().try_get_matches_from(args)?;
        let mut config = Config::from_arg_matches(&matches)?;
        config.set_by_user = SetByUser::from_matches(&matches);
        Ok(config)
    }

    /// The levels the logger applies.
    ///
    /// # Errors
    /// `--log` does not parse.
    pub fn log_filter(&self) -> Result<logging::Filter, ConfigError> {
        logging::Filter::new(self.log_level, self.log.as_deref())
            .map_err(|e| ConfigError(format!("--log (RP_LOG) {e}")))
    }

    /// A limit the user did not set follows the ones they did: the defaults keep
    /// their ratios (a note a quarter of a message, output four messages) within
    /// what was set, so one flag alone never contradicts a default.
    fn derive_limits(&mut self) {
        let set = self.set_by_user;
        if !set.max_message_bytes {
            let mut message = DEFAULT_MAX_MESSAGE_BYTES;
            if set.max_note_bytes {
                message = message.max(self.max_note_bytes.saturating_mul(4));
            }
            if set.max_outbound_bytes {
                message = message.min(self.max_outbound_bytes);
            }
            if set.max_note_bytes {
                message = message.max(self.max_note_bytes);
            }
            self.max_message_bytes = message;
        }
        if !set.max_note_bytes {
            self.max_note_bytes = DEFAULT_MAX_NOTE_BYTES.min(self.max_message_bytes / 4).max(1);
        }
        if !set.max_outbound_bytes {
            self.max_outbound_bytes = DEFAULT_MAX_OUTBOUND_BYTES.max(self.max_message_bytes.saturating_mul(4));
        }
    }

    /// Checks the values that clap cannot check alone and fills in `threads`,
    /// the limits the user did not set, and the node id.
    ///
    /// # Errors
    /// A message naming the flag and a value that works.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let err = |msg: String| Err(ConfigError(msg));
        self.derive_limits();
        // Where a derived --max-message-bytes came from, for the errors below.
        let derived = match (self.set_by_user.max_message_bytes, self.set_by_user.max_note_bytes) {
            (true, _) => String::new(),
            (false, true) => format!(", following --max-note-bytes {}", self.max_note_bytes),
            (false, false) => format!(", following --max-outbound-bytes {}", self.max_outbound_bytes),
        };
        if self.threads == 0 {
            self.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        if self.threads > 1024 {
            return err(format!("--threads {} is too many; use at most 1024 (0 means one per core)", self.threads));
        }
        if self.max_message_bytes < 1024 {
            return err(format!(
                "--max-message-bytes {}{} is too small for any message; use at least 1024",
                self.max_message_bytes, derived
            ));
        }
        if self.max_note_bytes == 0 || self.max_note_bytes > self.max_message_bytes {
            return err(format!(
                "--max-note-bytes {} must be between 1 and --max-message-bytes ({}{})",
                self.max_note_bytes, self.max_message_bytes, derived
            ));
        }
        for (flag, value) in [
            ("--max-notes", self.max_notes),
            ("--max-members", self.max_members),
            ("--backlog-limit", self.backlog_limit),
        ] {
            if value == 0 {
                return err(format!("{flag} must be at least 1"));
            }
        }
        for (flag, value) in [
            ("--load-timeout", self.load_timeout),
            ("--paper-linger", self.paper_linger),
            ("--shutdown-timeout", self.shutdown_timeout),
            ("--drain-seconds", self.drain_seconds),
            ("--handshake-timeout", self.handshake_timeout),
            ("--ping-interval", self.ping_interval),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if !(0.0..1e9).contains(&value) {
                return err(format!("{flag} {value} is not a number of seconds; use for example 10"));
            }
        }
        // Redis refuses an EXPIRE whose time in milliseconds overflows; a century
        // is far inside that and far beyond any retention anyone means.
        if !(1..=MAX_RETENTION_SECS).contains(&self.completed_retention) {
            return err(format!(
                "--completed-retention {} must be between 1 and {MAX_RETENTION_SECS} seconds (100 years); \
                 the default is 604800 (7 days)",
                self.completed_retention
            ));
        }
        if self.max_tombstones == 0 || !(1..=MAX_RETENTION_SECS).contains(&self.tombstone_retention) {
            return err(format!(
                "--max-tombstones {} must be at least 1 and --tombstone-retention {} between 1 and {MAX_RETENTION_SECS} seconds",
                self.max_tombstones, self.tombstone_retention
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0) || self.burst == 0 {
            return err(format!("--rate {} and --burst {} must both be above 0", self.rate, self.burst));
        }
        if self.ping_interval <= 0.0 || self.idle_timeout <= self.ping_interval {
            return err(format!(
                "--idle-timeout {} must be longer than --ping-interval {} (above 0), or live sessions are closed",
                self.idle_timeout, self.ping_interval
            ));
        }
        if self.jwt_secret.as_deref().is_some_and(|key| key.secret.is_empty()) {
            self.jwt_secret = None;
        }
        if self.jwt_secret.as_deref().is_some_and(|key| key.secret.len() < 16) {
            return err("--jwt-secret (RP_JWT_SECRET) is shorter than 16 bytes; use a long random secret, \
                 for example the output of: openssl rand -hex 32"
                .to_string());
        }
        self.jwt_audience = self.jwt_audience.take().map(|a| a.trim().to_string()).filter(|a| !a.is_empty());
        match (&mut self.jwt_secret, &self.jwt_audience) {
            (Some(key), audience) => key.audience.clone_from(audience),
            (None, Some(_)) => {
                return err("--jwt-audience needs --jwt-secret: without a secret, auth is off".to_string());
            }
            (None, None) => {}
        }
        match &self.node_id {
            Some(id) if !(id.len() <= 32 && crate::protocol::is_valid_id(id)) => {
                return err(format!("--node-id {id:?} must match ^[A-Za-z0-9_-]{{1,32}}$"));
            }
            Some(_) => {}
            None => self.node_id = Some(random_node_id()),
        }
        if self.cluster && self.store == StoreKind::Memory {
            return err("--cluster relays through Redis: it needs --store redis".to_string());
        }
        for proxy in &self.trusted_proxies {
            if parse_cidr(proxy).is_none() {
                return err(format!(
                    "--trusted-proxies: {proxy:?} is not an address or CIDR block; use for example 10.0.0.5 or 10.0.0.0/8"
                ));
            }
        }
        self.allowed_origins.retain(|o| !o.trim().is_empty());
        for origin in &mut self.allowed_origins {
            // Browsers send an origin without a trailing slash.
            *origin = origin.trim().strip_suffix('/').unwrap_or(origin.trim()).to_string();
            if !is_origin(origin) {
                return err(format!(
                    "--allowed-origins: {origin:?} is not an origin (scheme://host[:port], no path); \
                     use for example https://paper.example,http://localhost:8080"
                ));
            }
        }
        if self.max_outbound_bytes < self.max_message_bytes {
            return err(format!(
                "--max-outbound-bytes {} must be at least --max-message-bytes ({}{}), or no broadcast fits",
                self.max_outbound_bytes, self.max_message_bytes, derived
            ));
        }
        if self.store == StoreKind::Redis {
            if let Err(e) = crate::store::endpoint::Target::parse(&self.redis) {
                return err(format!("--redis {:?}: {e}", redact(&self.redis)));
            }
        }
        self.log_filter()?;
        Ok(self)
    }

    pub fn load_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.load_timeout)
    }

    pub fn paper_linger(&self) -> Duration {
        Duration::from_secs_f64(self.paper_linger)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_seconds)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs_f64(self.ping_interval)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout)
    }
}

impl fmt::Display for Config {
    /// The one-line summary logged at start.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listen={} threads={} store={:?} cluster={} node_id={} redis={} redis_wait_replicas={} max_message_bytes={} max_note_bytes={} \
             max_notes={} max_members={} backlog_limit={} load_timeout={}s paper_linger={}s \
             completed_retention={}s max_outbound_bytes={} drain_seconds={}s shutdown_timeout={}s auth={} allowed_origins={} \
             rate={}/s burst={} max_connections={} max_connections_per_address={} handshake_timeout={}s \
             ping_interval={}s idle_timeout={}s log_level={} log={} log_format={:?}",
            self.listen,
            self.threads,
            self.store,
            self.cluster,
            self.node_id.as_deref().unwrap_or(""),
            redact(&self.redis),
            self.redis_wait_replicas,
            self.max_message_bytes,
            self.max_note_bytes,
            self.max_notes,
            self.max_members,
            self.backlog_limit,
            self.load_timeout,
            self.paper_linger,
            self.completed_retention,
            self.max_outbound_bytes,
            self.drain_seconds,
            self.shutdown_timeout,
            match (&self.jwt_secret, &self.jwt_audience) {
                (None, _) => "off (no --jwt-secret: every client names itself)".to_string(),
                (Some(_), None) => "on".to_string(),
                (Some(_), Some(audience)) => format!("on aud={audience}"),
            },
            if self.allowed_origins.is_empty() { "any".to_string() } else { self.allowed_origins.join(",") },
            self.rate,
            self.burst,
            self.max_connections,
            self.max_connections_per_address,
            self.handshake_timeout,
            self.ping_interval,
            self.idle_timeout,
            self.log_level,
            self.log.as_deref().unwrap_or("-"),
            self.log_format,
        )
    }
}

/// Eight hex digits from the standard library's random hasher keys.
fn random_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.write_u32(std::process::id());
    format!("{:08x}", hasher.finish() as u32)
}

/// `10.0.0.5` or `10.0.0.0/8` (IPv6 too) as an address and a prefix length.
pub fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let text = text.trim();
    let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() { max } else { prefix.parse().ok()? };
    (prefix <= max).then_some((addr, prefix))
}

/// The Redis URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["rollingpaper"];
        all.extend_from_slice(args);
        Config::from_args(all).expect("flags parse").validate()
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).unwrap();
        assert!(config.threads >= 1);
        assert_eq!(config.max_note_bytes, 16 * 1024);
        assert_eq!(config.load_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn errors_name_the_flag() {
        let e = parse(&["--max-note-bytes", "100000", "--max-message-bytes", "65536"]).unwrap_err().to_string();
        assert!(e.contains("--max-note-bytes"), "{e}");
        let e = parse(&["--redis", "http://x"]).unwrap_err().to_string();
        assert!(e.contains("--redis"), "{e}");
        let e = parse(&["--load-timeout", "NaN"]).unwrap_err().to_string();
        assert!(e.contains("--load-timeout"), "{e}");
    }

    fn limits(args: &[&str]) -> (usize, usize, usize) {
        let c = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        (c.max_message_bytes, c.max_note_bytes, c.max_outbound_bytes)
    }

    #[test]
    fn limits_not_set_follow_the_ones_set() {
        assert_eq!(limits(&[]), (65536, 16384, 4 << 20));
        assert_eq!(limits(&["--max-message-bytes", "4096"]), (4096, 1024, 4 << 20));
        assert_eq!(limits(&["--max-message-bytes", "20000000"]), (20_000_000, 16384, 80_000_000));
        assert_eq!(limits(&["--max-note-bytes", "100000"]), (400_000, 100_000, 4 << 20));
        assert_eq!(limits(&["--max-note-bytes", "2000000"]), (8_000_000, 2_000_000, 32_000_000));
        assert_eq!(limits(&["--max-outbound-bytes", "10000"]), (10_000, 2500, 10_000));
        assert_eq!(limits(&["--max-note-bytes", "5000", "--max-outbound-bytes", "10000"]), (10_000, 5000, 10_000));
        assert_eq!(limits(&["--max-message-bytes", "4096", "--max-note-bytes", "4096"]), (4096, 4096, 4 << 20));
    }

    #[test]
    fn only_two_limits_set_can_contradict() {
        let e = parse(&["--max-message-bytes", "4096", "--max-note-bytes", "8192"]).unwrap_err().to_string();
        assert!(e.contains("--max-note-bytes 8192") && e.contains("--max-message-bytes (4096)"), "{e}");
        let e = parse(&["--max-message-bytes", "20000000", "--max-outbound-bytes", "4194304"]).unwrap_err().to_string();
        assert!(e.contains("--max-outbound-bytes 4194304"), "{e}");
        let e = parse(&["--max-note-bytes", "50000", "--max-outbound-bytes", "10000"]).unwrap_err().to_string();
        assert!(e.contains("--max-outbound-bytes 10000") && e.contains("following --max-note-bytes 50000"), "{e}");
        let e = parse(&["--max-outbound-bytes", "500"]).unwrap_err().to_string();
        assert!(e.contains("--max-message-bytes 500, following --max-outbound-bytes 500"), "{e}");
        // Through the derive API (origin unknown) every value counts as set.
        let strict = Config::try_parse_from(["rollingpaper", "--max-message-bytes", "4096"]).unwrap().validate();
        assert!(strict.is_err());
    }

    #[test]
    fn booleans_read_as_people_write_them() {
        for yes in ["1", "true", "TRUE", "yes", "Yes", "on", " ON "] {
            assert_eq!(parse_bool(yes), Some(true), "{yes}");
        }
        for no in ["0", "false", "False", "no", "NO", "off"] {
            assert_eq!(parse_bool(no), Some(false), "{no}");
        }
        for neither in ["", "2", "flase", "y", "enabled"] {
            assert_eq!(parse_bool(neither), None, "{neither}");
        }
    }

    #[test]
    fn listen_takes_a_host_name_or_just_a_port() {
        assert_eq!(parse_listen("127.0.0.1:8080"), Ok("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_listen("[::1]:8080"), Ok("[::1]:8080".parse().unwrap()));
        assert_eq!(parse_listen("localhost:8080"), Ok("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_listen(":8080"), Ok("0.0.0.0:8080".parse().unwrap()));
        for bad in ["8080", "localhost", ":http", "127.0.0.1:99999", ":"] {
            let e = parse_listen(bad).unwrap_err();
            assert!(e.contains("for example 127.0.0.1:8080"), "{bad}: {e}");
        }
    }

    #[test]
    fn allowed_origins_are_origins() {
        let c =
            parse(&["--allowed-origins", "https://paper.example/, http://localhost:8080,http://[::1]:3000"]).unwrap();
        assert_eq!(c.allowed_origins, ["https://paper.example", "http://localhost:8080", "http://[::1]:3000"]);
        for bad in [
            "paper.example",
            "https://paper.example/app",
            "*",
            "https://",
            "https://a.example:port",
            "https://u@a.example",
        ] {
            let e = parse(&["--allowed-origins", bad]).unwrap_err().to_string();
            assert!(e.contains("--allowed-origins") && e.contains("is not an origin"), "{bad}: {e}");
        }
    }

    #[test]
    fn an_empty_secret_is_no_secret_and_the_audience_joins_the_key() {
        let c = parse(&["--jwt-secret", ""]).unwrap();
        assert!(c.jwt_secret.is_none());
        assert!(c.to_string().contains("auth=off"), "{c}");
        assert!(parse(&["--jwt-secret", "short"]).unwrap_err().to_string().contains("16 bytes"));
        let c = parse(&["--jwt-secret", "0123456789abcdef", "--jwt-audience", "rollingpaper"]).unwrap();
        assert_eq!(c.jwt_secret.as_deref().unwrap().audience.as_deref(), Some("rollingpaper"));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        assert!(parse(&["--jwt-audience", "rollingpaper"]).unwrap_err().to_string().contains("--jwt-secret"));
    }

    #[test]
    fn a_bad_log_filter_is_refused_at_start() {
        let e = parse(&["--log", "rollingpaper=chatty"]).unwrap_err().to_string();
        assert!(e.contains("--log") && e.contains("chatty"), "{e}");
        assert!(parse(&["--log", "warn,rollingpaper::store=debug", "--log-format", "json"]).is_ok());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_blocks() {
        assert!(parse(&["--trusted-proxies", "127.0.0.1,10.0.0.0/8,::1"]).is_ok());
        let e = parse(&["--trusted-proxies", "10.0.0.0/33"]).unwrap_err().to_string();
        assert!(e.contains("--trusted-proxies"), "{e}");
        assert!(parse(&["--trusted-proxies", "nginx"]).is_err());
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redact("redis://:secret@db:6379/0"), "redis://***@db:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
