//! The checks across values, and what follows from the values set: the
//! limits the user did not set, the thread count, the node id.

use clap::parser::ValueSource;
use clap::ArgMatches;

use super::values::{is_origin, parse_cidr};
use super::{
    redact, Config, ConfigError, StoreKind, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_NOTE_BYTES,
    DEFAULT_MAX_OUTBOUND_BYTES, MAX_RETENTION_SECS, MESSAGE_ENVELOPE_BYTES,
};

/// The limits whose defaults depend on each other, and whether the user set each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SetByUser {
    max_message_bytes: bool,
    max_note_bytes: bool,
    max_outbound_bytes: bool,
}

impl SetByUser {
    pub(super) const ALL: SetByUser =
        SetByUser { max_message_bytes: true, max_note_bytes: true, max_outbound_bytes: true };

    pub(super) fn from_matches(matches: &ArgMatches) -> SetByUser {
        let set = |id: &str| !matches!(matches.value_source(id), Some(ValueSource::DefaultValue) | None);
        SetByUser {
            max_message_bytes: set("max_message_bytes"),
            max_note_bytes: set("max_note_bytes"),
            max_outbound_bytes: set("max_outbound_bytes"),
        }
    }
}

/// Names the variable of each flag a message names (`--max-notes
/// (RP_MAX_NOTES)`), once, unless it does already: a setting may come from
/// either, and the operator must find it.
fn with_variables(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 32);
    let mut named: Vec<String> = Vec::new();
    let mut rest = message;
    while let Some(at) = rest.find("--") {
        let (before, flag_on) = rest.split_at(at);
        out.push_str(before);
        let len = flag_on[2..].find(|c: char| !(c.is_ascii_lowercase() || c == '-')).map_or(flag_on.len() - 2, |l| l);
        let (flag, after) = flag_on.split_at(2 + len);
        out.push_str(flag);
        let variable = format!("RP_{}", flag[2..].trim_end_matches('-').replace('-', "_").to_ascii_uppercase());
        if len > 0 && !message.contains(&variable) && !named.contains(&variable) {
            out.push_str(&format!(" ({variable})"));
            named.push(variable);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// A configuration refused, with the message naming each flag's variable.
fn refuse<T>(message: String) -> Result<T, ConfigError> {
    Err(ConfigError(with_variables(&message)))
}

impl Config {
    /// A limit the user did not set follows the ones they did: the defaults keep
    /// their ratios (a message four notes, output four messages) within what was
    /// set, and a note fits a message with its envelope, so one flag alone never
    /// contradicts a default.
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
            let room = self.max_message_bytes.saturating_sub(MESSAGE_ENVELOPE_BYTES);
            self.max_note_bytes = DEFAULT_MAX_NOTE_BYTES.min(room).max(1);
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
    /// The API key from --api-key or --api-key-file (one of them), checked.
    fn read_api_key(&mut self) -> Result<(), ConfigError> {
        let err = refuse;
        if self.api_key.as_ref().is_some_and(|key| key.0.is_empty()) {
            self.api_key = None;
        }
        if let Some(path) = &self.api_key_file {
            if self.api_key.is_some() {
                return err("--api-key and --api-key-file are both set; keep one (the file keeps the key out of ps)"
                    .to_string());
            }
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    return err(format!(
                    "--api-key-file (RP_API_KEY_FILE) {}: cannot read it ({e}); it must hold the API key on one line",
                    path.display()
                ))
                }
            };
            let key = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
            self.api_key = Some(super::ApiKey(key.to_string()));
        }
        if self.api_key.as_ref().is_some_and(|key| key.0.len() < 32) {
            return err("the API key (--api-key, RP_API_KEY, or --api-key-file) is shorter than 32 bytes; use a long \
                 random key, for example the output of: openssl rand -hex 32"
                .to_string());
        }
        Ok(())
    }

    pub fn validate(mut self) -> Result<Self, ConfigError> {
        self.derive_limits();
        self.check_limits()?;
        self.check_durations()?;
        self.check_auth()?;
        self.check_nodes_and_clients()?;
        self.log_filter()?;
        Ok(self)
    }

    /// The threads, and every limit in bytes or counts.
    fn check_limits(&mut self) -> Result<(), ConfigError> {
        let err = refuse;
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
            ("--backlog-bytes", self.backlog_bytes),
        ] {
            if value == 0 {
                return err(format!("{flag} must be at least 1 (a whole number from 1 up), not 0"));
            }
        }
        if self.max_outbound_bytes < self.max_message_bytes {
            return err(format!(
                "--max-outbound-bytes {} must be at least --max-message-bytes ({}{}), or no broadcast fits",
                self.max_outbound_bytes, self.max_message_bytes, derived
            ));
        }
        Ok(())
    }

    /// Timeouts, retentions and the rate, in seconds and per second.
    fn check_durations(&self) -> Result<(), ConfigError> {
        let err = refuse;
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
        if self.max_tombstones == 0 || !(1..=MAX_RETENTION_SECS).contains(&self.tombstone_retention) {
            return err(format!(
                "--max-tombstones {} must be at least 1 and --tombstone-retention {} between 1 and {MAX_RETENTION_SECS} seconds",
                self.max_tombstones, self.tombstone_retention
            ));
        }
        if !(1..=MAX_RETENTION_SECS).contains(&self.completed_retention) {
            return err(format!(
                "--completed-retention {} must be between 1 and {MAX_RETENTION_SECS} seconds (100 years); \
                 the default is 604800 (7 days)",
                self.completed_retention
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
        if !(self.api_timeout.is_finite() && self.api_timeout > 0.0) {
            return err(format!(
                "--api-timeout (RP_API_TIMEOUT) must be a positive number of seconds, not {}",
                self.api_timeout
            ));
        }
        Ok(())
    }

    /// The token secret and audience, and the API key.
    fn check_auth(&mut self) -> Result<(), ConfigError> {
        let err = refuse;
        if self.jwt_secret.as_deref().is_some_and(|key| key.secret.is_empty()) {
            self.jwt_secret = None;
        }
        if self.jwt_secret.as_deref().is_some_and(|key| key.secret.len() < 16) {
            return err("--jwt-secret (RP_JWT_SECRET) is shorter than 16 bytes; use a long random secret, \
                 for example the output of: openssl rand -hex 32"
                .to_string());
        }
        self.read_api_key()?;
        self.jwt_audience = self.jwt_audience.take().map(|a| a.trim().to_string()).filter(|a| !a.is_empty());
        match (&mut self.jwt_secret, &self.jwt_audience) {
            (Some(key), audience) => key.audience.clone_from(audience),
            (None, Some(_)) => {
                return err("--jwt-audience needs --jwt-secret: without a secret, auth is off".to_string());
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// The node, Redis, the listeners, proxies and origins.
    fn check_nodes_and_clients(&mut self) -> Result<(), ConfigError> {
        let err = refuse;
        if self.internal_listen.is_some_and(|internal| internal == self.listen) {
            return err("--internal-listen (RP_INTERNAL_LISTEN) must differ from --listen: the internal listener \
                 keeps /api, /metrics and /readyz off the public port"
                .to_string());
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
        if self.store == StoreKind::Redis {
            if let Err(e) = crate::store::target::Target::configured(&self.redis, self.redis_ca_file.as_deref()) {
                return err(format!("--redis {:?}: {e}", redact(&self.redis)));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;
    use crate::config::Config;
    use clap::Parser;

    #[test]
    fn errors_name_the_flag_its_variable_and_what_is_allowed() {
        let e = parse(&["--max-notes", "0"]).unwrap_err().to_string();
        assert!(e.contains("--max-notes (RP_MAX_NOTES) must be at least 1"), "{e}");
        let e = Config::from_args(["rollingpaper", "--max-notes", "-3"]).unwrap_err().to_string();
        assert!(e.contains(r#"invalid value "-3" for --max-notes (RP_MAX_NOTES): it must be a whole number (digits only, 0 or more)"#), "{e}");
        assert_eq!(
            super::with_variables("--idle-timeout 1 must be longer than --ping-interval 2 and --idle-timeout"),
            "--idle-timeout (RP_IDLE_TIMEOUT) 1 must be longer than --ping-interval (RP_PING_INTERVAL) 2 and --idle-timeout"
        );
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
        // A 3,000-byte note fits a 4,096-byte message with its envelope.
        assert_eq!(limits(&["--max-message-bytes", "4096"]), (4096, 3840, 4 << 20));
        assert_eq!(limits(&["--max-message-bytes", "20000000"]), (20_000_000, 16384, 80_000_000));
        assert_eq!(limits(&["--max-note-bytes", "100000"]), (400_000, 100_000, 4 << 20));
        assert_eq!(limits(&["--max-note-bytes", "2000000"]), (8_000_000, 2_000_000, 32_000_000));
        assert_eq!(limits(&["--max-outbound-bytes", "10000"]), (10_000, 9744, 10_000));
        assert_eq!(limits(&["--max-note-bytes", "5000", "--max-outbound-bytes", "10000"]), (10_000, 5000, 10_000));
        assert_eq!(limits(&["--max-message-bytes", "4096", "--max-note-bytes", "4096"]), (4096, 4096, 4 << 20));
    }

    #[test]
    fn only_two_limits_set_can_contradict() {
        let e = parse(&["--max-message-bytes", "4096", "--max-note-bytes", "8192"]).unwrap_err().to_string();
        assert!(e.contains("--max-note-bytes (RP_MAX_NOTE_BYTES) 8192") && e.contains("(4096)"), "{e}");
        let e = parse(&["--max-message-bytes", "20000000", "--max-outbound-bytes", "4194304"]).unwrap_err().to_string();
        assert!(e.contains("--max-outbound-bytes (RP_MAX_OUTBOUND_BYTES) 4194304"), "{e}");
        let e = parse(&["--max-note-bytes", "50000", "--max-outbound-bytes", "10000"]).unwrap_err().to_string();
        assert!(e.contains("--max-outbound-bytes (RP_MAX_OUTBOUND_BYTES) 10000"), "{e}");
        assert!(e.contains("following --max-note-bytes (RP_MAX_NOTE_BYTES) 50000"), "{e}");
        let e = parse(&["--max-outbound-bytes", "500"]).unwrap_err().to_string();
        assert!(
            e.contains("(RP_MAX_MESSAGE_BYTES) 500, following --max-outbound-bytes (RP_MAX_OUTBOUND_BYTES) 500"),
            "{e}"
        );
        // Through the derive API (origin unknown) every value counts as set.
        let strict = Config::try_parse_from(["rollingpaper", "--max-message-bytes", "4096"]).unwrap().validate();
        assert!(strict.is_err());
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
    fn the_api_key_is_long_comes_from_one_place_and_is_never_shown() {
        let key = "k".repeat(32);
        let c = parse(&["--api-key", &key]).unwrap();
        assert_eq!(c.api_key.as_ref().unwrap().0, key);
        assert!(!format!("{c:?}").contains(&key));
        assert!(parse(&["--api-key", "short"]).unwrap_err().to_string().contains("32 bytes"));
        let dir = std::env::temp_dir().join(format!("rp-api-key-{}", std::process::id()));
        std::fs::write(&dir, format!("{key}\n")).unwrap();
        let file = dir.to_str().unwrap();
        assert_eq!(parse(&["--api-key-file", file]).unwrap().api_key.unwrap().0, key);
        assert!(parse(&["--api-key-file", file, "--api-key", &key]).unwrap_err().to_string().contains("both"));
        std::fs::remove_file(&dir).unwrap();
        assert!(parse(&["--api-key-file", file]).unwrap_err().to_string().contains("cannot read"));
        assert!(parse(&["--api-timeout", "0"]).unwrap_err().to_string().contains("--api-timeout"));
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
}
