//! Where Redis is: one server (`redis://...`), or the master of a Sentinel-watched
//! group (`redis+sentinel://host:port,host:port/mastername`), asked of the
//! sentinels at every (re)connection so that a failover is followed by itself.

use std::fmt;
use std::time::Duration;

use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Connection, ErrorKind, RedisError};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one Redis call may take before the connection counts as broken.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `--redis` value; each thread makes its own `Endpoint` from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Server(String),
    Sentinel { sentinels: Vec<String>, master: String },
}

/// A `--redis` value that cannot work, and why.
#[derive(Debug)]
pub struct BadUrl(String);

impl fmt::Display for BadUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why Redis cannot be used right now, as found by [`Target::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// Nothing answers (refused, timed out): it may come up later, and the server
    /// serves meanwhile (edits wait in the backlog, `/readyz` answers 503).
    Down(String),
    /// Something answers but it can never work as configured (a wrong password,
    /// database or master name, not Redis at all): the operator must fix the URL.
    Misconfigured(String),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Down(why) | Unusable::Misconfigured(why) => f.write_str(why),
        }
    }
}

/// How long the start-up check may take in all; past it, Redis counts as down.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl Target {
    /// # Errors
    /// A URL that is neither a Redis URL nor a Sentinel one.
    pub fn parse(url: &str) -> Result<Target, BadUrl> {
        if url.starts_with("rediss://") || url.starts_with("rediss+sentinel://") {
            // The redis crate's TLS features are not compiled in.
            return Err(BadUrl(
                "this build does not support rediss:// (TLS) yet; use redis:// on a private network, \
                 or a local TLS tunnel (such as stunnel) to the managed Redis"
                    .into(),
            ));
        }
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (hosts, master) = rest.split_once('/').unwrap_or((rest, ""));
            let master = master.trim_end_matches('/');
            if master.is_empty() || hosts.is_empty() {
                return Err(BadUrl("a Sentinel URL names its sentinels and the master: redis+sentinel://host:26379,host:26379/mymaster".into()));
            }
            let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
            for sentinel in &sentinels {
                redis::Client::open(sentinel.as_str()).map_err(|e| BadUrl(format!("sentinel {sentinel}: {e}")))?;
            }
            return Ok(Target::Sentinel { sentinels, master: master.to_string() });
        }
        redis::Client::open(url).map_err(|e| {
            BadUrl(format!(
                "not a Redis URL ({e}); use for example redis://127.0.0.1:6379/0, redis://:PASSWORD@host:6379 \
                 or redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"
            ))
        })?;
        Ok(Target::Server(url.to_string()))
    }

    /// Connects once (through the sentinels for a Sentinel URL), authenticates,
    /// selects the database and sends `PING`, within [`CHECK_TIMEOUT`], so that a
    /// configuration that can never work is reported at start rather than retried
    /// forever by the writer.
    ///
    /// # Errors
    /// `Misconfigured` for what only the operator can fix, `Down` for the rest.
    pub fn check(&self) -> Result<(), Unusable> {
        let (tx, rx) = std::sync::mpsc::channel();
        let target = self.clone();
        // A blackholed sentinel may hold a connection attempt far past our
        // timeouts; the thread is left to finish on its own then.
        std::thread::Builder::new()
            .name("redis-check".into())
            .spawn(move || {
                let _ = tx.send(target.check_now());
            })
            .map_err(|e| Unusable::Down(format!("cannot start the check: {e}")))?;
        rx.recv_timeout(CHECK_TIMEOUT)
            .unwrap_or_else(|_| Err(Unusable::Down(format!("no answer within {} s", CHECK_TIMEOUT.as_secs()))))
    }

    fn check_now(&self) -> Result<(), Unusable> {
        match self {
            Target::Server(url) => ping(&redis::Client::open(url.as_str()).expect("checked by parse")),
            Target::Sentinel { sentinels, master } => {
                let mut sentinel =
                    SentinelClient::build(sentinels.clone(), master.clone(), None, SentinelServerType::Master)
                        .expect("checked by parse");
                match sentinel.get_client() {
                    Ok(client) => ping(&client),
                    Err(e) if e.kind() == ErrorKind::MasterNameNotFoundBySentinel => {
                        Err(unknown_master(sentinels, master).unwrap_or_else(|| {
                            Unusable::Down(format!("the sentinels know {master:?} but name no live master ({e})"))
                        }))
                    }
                    Err(e) => Err(classify(&e)),
                }
            }
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        match self {
            Target::Server(url) => Endpoint::Server(redis::Client::open(url.as_str()).expect("checked by parse")),
            Target::Sentinel { sentinels, master } => Endpoint::Sentinel(
                SentinelClient::build(sentinels.clone(), master.clone(), None, SentinelServerType::Master)
                    .expect("checked by parse"),
            ),
        }
    }
}

/// Connects, authenticates, selects and pings.
fn ping(client: &redis::Client) -> Result<(), Unusable> {
    let mut conn = client.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(|e| classify(&e))?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| classify(&e))?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| classify(&e))?;
    redis::cmd("PING").query::<String>(&mut conn).map(drop).map_err(|e| classify(&e))
}

/// `Misconfigured` when every sentinel that answers says it watches no master by
/// that name; `None` when one knows it (a failover in progress) or none answers.
fn unknown_master(sentinels: &[String], master: &str) -> Option<Unusable> {
    let mut answered = Vec::new();
    for url in sentinels {
        let Ok(client) = redis::Client::open(url.as_str()) else { continue };
        let Ok(mut conn) = client.get_connection_with_timeout(CONNECT_TIMEOUT) else { continue };
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let addr: Option<Vec<String>> =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(master).query(&mut conn).ok()?;
        if addr.is_some() {
            return None;
        }
        answered.push(url.trim_start_matches("redis://"));
    }
    (!answered.is_empty()).then(|| {
        Unusable::Misconfigured(format!(
            "no sentinel ({}) watches a master named {master:?}; use the name of their \
             `sentinel monitor <name> ...` line (SENTINEL MASTERS lists them)",
            answered.join(", ")
        ))
    })
}

/// Sorts a failed connection or command into what waiting cures and what it does not.
fn classify(e: &RedisError) -> Unusable {
    let text = e.to_string();
    let has = |needle: &str| e.code() == Some(needle) || text.contains(needle);
    if e.kind() == ErrorKind::AuthenticationFailed || has("WRONGPASS") || has("NOAUTH") || has("invalid password") {
        Unusable::Misconfigured(format!(
            "Redis refused to let us in ({text}); put the right password in the URL: \
             redis://:PASSWORD@host:port (or redis://USER:PASSWORD@host:port for an ACL user)"
        ))
    } else if has("NOPERM") {
        Unusable::Misconfigured(format!(
            "the Redis user may not run what the server needs ({text}); grant it +@all on ~rp:* or use another user"
        ))
    } else if text.contains("DB index is out of range") {
        Unusable::Misconfigured(format!(
            "that database does not exist on this Redis ({text}); use an index below its `databases` \
             setting (16 by default), for example redis://host:6379/0"
        ))
    } else if e.kind() == ErrorKind::Parse {
        Unusable::Misconfigured(format!(
            "what answers there does not speak Redis ({text}): another service, or a TLS-only port \
             (this build speaks plain redis:// only); check the host and port"
        ))
    } else {
        Unusable::Down(text)
    }
}

pub enum Endpoint {
    Server(redis::Client),
    Sentinel(SentinelClient),
}

impl Endpoint {
    /// A connection to the master, with timeouts, so that a hung Redis cannot stall
    /// the calling thread for longer than `IO_TIMEOUT`.
    ///
    /// # Errors
    /// Redis (or every sentinel) cannot be reached.
    pub fn connect(&mut self) -> redis::RedisResult<Connection> {
        let client = match self {
            Endpoint::Server(client) => client.clone(),
            Endpoint::Sentinel(sentinel) => sentinel.get_client()?,
        };
        let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_sentinel_urls() {
        assert_eq!(Target::parse("redis://127.0.0.1:6379").unwrap(), Target::Server("redis://127.0.0.1:6379".into()));
        assert_eq!(
            Target::parse("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/main").unwrap(),
            Target::Sentinel {
                sentinels: vec!["redis://10.0.0.1:26379".into(), "redis://10.0.0.2:26380".into()],
                master: "main".into()
            }
        );
        assert!(Target::parse("redis+sentinel://10.0.0.1:26379").is_err());
        assert!(Target::parse("http://x").is_err());
    }
}
