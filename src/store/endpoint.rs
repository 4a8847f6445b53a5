//! Where Redis is: one server (`redis://...`), or the master of a Sentinel-watched
//! group (`redis+sentinel://host:port,host:port/mastername`), asked of the
//! sentinels at every (re)connection so that a failover is followed by itself.

use std::fmt;
use std::time::Duration;

use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::Connection;

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

impl Target {
    /// # Errors
    /// A URL that is neither a Redis URL nor a Sentinel one.
    pub fn parse(url: &str) -> Result<Target, BadUrl> {
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
        redis::Client::open(url).map_err(|e| BadUrl(e.to_string()))?;
        Ok(Target::Server(url.to_string()))
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
