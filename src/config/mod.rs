//! Every knob of the server, with its default, its flag and its `RP_*`
//! environment variable. Single values are parsed in `values`; the checks
//! across values, and the limits and ids derived from the ones set, in
//! `validate`. Validation errors say what is wrong and how to fix it.

mod validate;
mod values;

pub use values::{parse_cidr, ApiKey};

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::auth;
use crate::logging::{self, Format};
use validate::SetByUser;
use values::{parse_api_key, parse_jwt_secret, parse_listen, EnvBool};

const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
const DEFAULT_MAX_NOTE_BYTES: usize = 16 * 1024;
const DEFAULT_MAX_OUTBOUND_BYTES: usize = 4 * 1024 * 1024;
/// What a message needs around a note's `data`: `{"type":"upsert","id":"…",
/// "data":…,"ref":"…"}` with a 64-character id and a ref of 128 characters,
/// JSON quoting included. A note limit derived from the message limit leaves
/// this much room.
const MESSAGE_ENVELOPE_BYTES: usize = 256;
const DEFAULT_MAX_SNAPSHOT_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// The longest `--completed-retention`: 100 years, in seconds.
pub const MAX_RETENTION_SECS: u64 = 100 * 365 * 24 * 3600;

/// Where papers live between sessions.
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
    about = "Real-time server for rolling papers: shared greeting cards edited live over WebSocket.",
    // `--max-notes -3` is a value out of range (and says so), not an unknown flag.
    allow_negative_numbers = true
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

    /// Redis URL (with `--store redis`): redis://host:port/db,
    /// redis+sentinel://host:port,host:port/mastername to follow a Sentinel-watched master,
    /// or redis+cluster://host:port,host:port for a Redis Cluster; rediss... for TLS.
    #[arg(long, env = "RP_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,

    /// PEM file of the CA that signed the Redis certificate (rediss://), in place of
    /// the system's CA roots: for a private CA.
    #[arg(long, env = "RP_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

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
    /// follows --max-message-bytes (less 256 for a message's envelope, at most 16384).
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

    /// Bytes the edits waiting for Redis may hold (about: their notes, patches and
    /// relayed messages); whichever of this and --backlog-limit is reached first
    /// refuses new edits with `unavailable`.
    #[arg(long, env = "RP_BACKLOG_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub backlog_bytes: usize,

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

    /// Sessions one client address may hold at most, and request heads it may have
    /// unfinished at once (past it, its new connections are closed at accept; a
    /// trusted proxy's are not counted); 0 for no limit.
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

    /// Bytes of snapshots and `GET /papers` bodies being written, on the whole node;
    /// bytes shared by many readers of one paper version count once. Past it, a
    /// joiner that needs a new snapshot is closed with 1013 (`server_busy`) and a
    /// read gets 503, until some of it is written.
    #[arg(long, env = "RP_MAX_SNAPSHOT_BYTES_IN_FLIGHT", default_value_t = DEFAULT_MAX_SNAPSHOT_BYTES_IN_FLIGHT)]
    pub max_snapshot_bytes_in_flight: usize,

    /// The backend API's key (PROTOCOL.md 7), at least 32 bytes; unset, every
    /// `/api` route answers 404. Prefer --api-key-file, which keeps it out of `ps`.
    #[arg(long, env = "RP_API_KEY", hide_env_values = true, value_parser = parse_api_key)]
    pub api_key: Option<ApiKey>,

    /// A file holding the backend API's key (one line; a trailing newline is
    /// dropped), in place of --api-key.
    #[arg(long, env = "RP_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,

    /// Seconds an API call waits for Redis before it is answered 504 (its change
    /// may still be written; every API write can be retried).
    #[arg(long, env = "RP_API_TIMEOUT", default_value_t = 10.0)]
    pub api_timeout: f64,

    /// Seconds a revocation lasts when the API call names no `until`.
    #[arg(long, env = "RP_REVOKE_RETENTION", default_value_t = 24 * 3600)]
    pub revoke_retention: u64,

    /// Seconds an erased paper's id answers 410 and takes no write (default:
    /// --completed-retention).
    #[arg(long, env = "RP_ERASE_RETENTION")]
    pub erase_retention: Option<u64>,

    /// An address for operators only (e.g. 127.0.0.1:9090): `/api`, `/metrics`
    /// and `/readyz` are served there and no longer on --listen.
    #[arg(long, env = "RP_INTERNAL_LISTEN", value_parser = parse_listen)]
    pub internal_listen: Option<std::net::SocketAddr>,

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
        let matches = Config::command().try_get_matches_from(args).map_err(name_the_variable)?;
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

    pub fn load_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.load_timeout)
    }

    pub fn api_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.api_timeout)
    }

    /// How long an erase lasts (`--erase-retention`, else `--completed-retention`).
    pub fn erase_retention(&self) -> Duration {
        Duration::from_secs(self.erase_retention.unwrap_or(self.completed_retention))
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

/// clap's refusal of a value, said with the setting's variable (a value may
/// come from either) and, for a negative count, what is allowed.
fn name_the_variable(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::ValueValidation {
        return e;
    }
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let (Some(arg), Some(value)) = (context(ContextKind::InvalidArg), context(ContextKind::InvalidValue)) else {
        return e;
    };
    let flag = arg.split_whitespace().next().unwrap_or(&arg).to_string();
    let Some(name) = flag.strip_prefix("--") else { return e };
    let variable = format!("RP_{}", name.replace('-', "_").to_ascii_uppercase());
    let why = match std::error::Error::source(&e) {
        Some(source) if source.to_string().contains("invalid digit") => {
            "it must be a whole number (digits only, 0 or more)".to_string()
        }
        Some(source) => source.to_string(),
        None => "not a value it takes".to_string(),
    };
    Config::command()
        .error(ErrorKind::ValueValidation, format!("invalid value {value:?} for {flag} ({variable}): {why}"))
}

impl fmt::Display for Config {
    /// The one-line summary logged at start.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listen={} threads={} store={:?} cluster={} node_id={} redis={} redis_wait_replicas={} max_message_bytes={} max_note_bytes={} \
             max_notes={} max_members={} backlog_limit={} backlog_bytes={} load_timeout={}s paper_linger={}s \
             completed_retention={}s max_outbound_bytes={} drain_seconds={}s shutdown_timeout={}s auth={} allowed_origins={} \
             rate={}/s burst={} max_connections={} max_connections_per_address={} handshake_timeout={}s \
             ping_interval={}s idle_timeout={}s log_level={} log={} log_format={:?}",
            self.listen,
            self.threads,
            self.store,
            self.cluster,
            self.node_id.as_deref().unwrap_or(""),
            if self.store == StoreKind::Memory { "unused".to_string() } else { redact(&self.redis) },
            self.redis_wait_replicas,
            self.max_message_bytes,
            self.max_note_bytes,
            self.max_notes,
            self.max_members,
            self.backlog_limit,
            self.backlog_bytes,
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

    pub(super) fn parse(args: &[&str]) -> Result<Config, ConfigError> {
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
    fn passwords_stay_out_of_logs() {
        assert_eq!(redact("redis://:secret@db:6379/0"), "redis://***@db:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
