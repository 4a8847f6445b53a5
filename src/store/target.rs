//! What `--redis` names, and whether it works: one server (`redis://...`), the
//! master of a Sentinel-watched group (`redis+sentinel://host:port,host:port/
//! mastername`), or a Redis Cluster (`redis+cluster://host:port,host:port`),
//! each maybe over TLS (`rediss...`) with the system's CA roots or the PEM file
//! of `--redis-ca-file`. The start-up check tells an operator what is wrong
//! (down, a wrong password, a TLS mismatch, not Redis) before anything runs.

use std::fmt;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ErrorKind, RedisError, RedisResult, TlsCertificates, TlsMode};

use super::endpoint::{Endpoint, CONNECT_TIMEOUT, IO_TIMEOUT};

/// A parsed `--redis` value (and `--redis-ca-file`); each thread makes its own
/// `Endpoint` from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    /// The PEM roots that replace the system's for `rediss` (a private CA).
    ca: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Server(String),
    /// `tls`: the sentinels and the master are reached over TLS.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        tls: bool,
    },
    /// The seed nodes (`redis://` or `rediss://` URLs); the rest is learnt from them.
    Cluster {
        nodes: Vec<String>,
    },
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
    /// A URL that is neither a Redis URL, a Sentinel one nor a Cluster one.
    pub fn parse(url: &str) -> Result<Target, BadUrl> {
        Ok(Target { kind: Kind::parse(url)?, ca: None })
    }

    /// `--redis` with `--redis-ca-file`.
    ///
    /// # Errors
    /// A bad URL, or a CA file that cannot be read or holds no PEM certificate.
    pub fn configured(url: &str, ca_file: Option<&std::path::Path>) -> Result<Target, BadUrl> {
        let mut target = Target::parse(url)?;
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| BadUrl(format!("cannot read --redis-ca-file {}: {e}", path.display())))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(BadUrl(format!(
                    "--redis-ca-file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                )));
            }
            target.ca = Some(pem);
        }
        Ok(target)
    }

    /// Whether Redis is a Redis Cluster (sharded pub/sub, the two-step hand-off).
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        self.ca.clone().map(|pem| TlsCertificates { client_tls: None, root_cert: Some(pem) })
    }

    fn client(&self, url: &str) -> RedisResult<redis::Client> {
        match self.certificates() {
            Some(certs) if url.starts_with("rediss://") => redis::Client::build_with_tls(url, certs),
            _ => redis::Client::open(url),
        }
    }

    fn sentinel(&self, sentinels: &[String], master: &str, tls: bool) -> RedisResult<SentinelClient> {
        if !tls {
            return SentinelClient::build(sentinels.to_vec(), master, None, SentinelServerType::Master);
        }
        let mut addrs = Vec::new();
        for url in sentinels {
            addrs.push(redis::IntoConnectionInfo::into_connection_info(url.as_str())?.addr().clone());
        }
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certs) = self.certificates() {
            builder =
                builder.set_client_to_redis_certificates(certs.clone()).set_client_to_sentinel_certificates(certs);
        }
        builder.build()
    }

    fn cluster(&self, nodes: &[String]) -> RedisResult<ClusterClient> {
        let mut builder = ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(IO_TIMEOUT)
            // Slot moves and failovers are retried by the store threads themselves.
            .retries(2);
        if let Some(certs) = self.certificates() {
            builder = builder.certs(certs);
        }
        builder.build()
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
        match &self.kind {
            Kind::Server(url) => {
                let client = self.client(url).map_err(|e| classify(&e, &host_of(url)))?;
                match ping(&client, &host_of(url)) {
                    // The port took the connection but never answered the TLS
                    // handshake: it speaks plain Redis (a server merely down refuses).
                    Err(Unusable::Down(why)) if url.starts_with("rediss://") && answers_tcp(url) => {
                        Err(Unusable::Misconfigured(format!(
                            "{why}: the port accepts connections but not a TLS handshake; a plain Redis \
                             port needs redis://, not rediss://"
                        )))
                    }
                    other => other,
                }
            }
            Kind::Sentinel { sentinels, master, tls } => {
                let hosts = sentinels.iter().map(|s| host_of(s)).collect::<Vec<_>>().join(", ");
                let mut sentinel = self.sentinel(sentinels, master, *tls).map_err(|e| classify(&e, &hosts))?;
                match sentinel.get_client() {
                    Ok(client) => {
                        let host = match &client.get_connection_info().addr() {
                            redis::ConnectionAddr::Tcp(h, p)
                            | redis::ConnectionAddr::TcpTls { host: h, port: p, .. } => {
                                format!("{h}:{p}")
                            }
                            other => other.to_string(),
                        };
                        ping(&client, &format!("master {master} at {host}"))
                    }
                    Err(e) if e.kind() == ErrorKind::MasterNameNotFoundBySentinel => {
                        Err(unknown_master(sentinels, master).unwrap_or_else(|| {
                            Unusable::Down(format!("the sentinels know {master:?} but name no live master ({e})"))
                        }))
                    }
                    Err(e) => Err(classify(&e, &hosts)),
                }
            }
            Kind::Cluster { nodes } => {
                // Each seed node on its own first, so that an error names the node.
                for node in nodes {
                    let client = self.client(node).map_err(|e| classify(&e, &host_of(node)))?;
                    match ping(&client, &host_of(node)) {
                        Ok(()) => {}
                        Err(Unusable::Down(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                let hosts = nodes.iter().map(|n| host_of(n)).collect::<Vec<_>>().join(", ");
                let mut conn = self
                    .cluster(nodes)
                    .and_then(|c| c.get_connection())
                    .map_err(|e| classify(&e, &format!("the cluster at {hosts}")))?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut conn)
                    .map_err(|e| classify(&e, &format!("the cluster at {hosts}")))?;
                if !info.contains("cluster_state:ok") {
                    return Err(Unusable::Down(format!("the cluster at {hosts} is not ok yet (CLUSTER INFO)")));
                }
                Ok(())
            }
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        match &self.kind {
            Kind::Server(url) => Endpoint::Server(self.client(url).expect("checked by parse")),
            Kind::Sentinel { sentinels, master, tls } => {
                Endpoint::Sentinel(self.sentinel(sentinels, master, *tls).expect("checked by parse"))
            }
            Kind::Cluster { nodes } => Endpoint::Cluster {
                client: self.cluster(nodes).expect("checked by parse"),
                nodes: nodes.iter().map(|n| self.client(n).expect("checked by parse")).collect(),
            },
        }
    }
}

impl Kind {
    fn parse(url: &str) -> Result<Kind, BadUrl> {
        for (scheme, tls) in [("redis+cluster://", false), ("rediss+cluster://", true)] {
            let Some(rest) = url.strip_prefix(scheme) else { continue };
            // A password (redis+cluster://:PASSWORD@host:port,...) applies to every node.
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.trim_end_matches('/');
            if hosts.is_empty() || hosts.contains('/') {
                return Err(BadUrl(
                    "a Cluster URL names some of its nodes (no database): redis+cluster://host:7000,host:7001".into(),
                ));
            }
            let plain = if tls { "rediss" } else { "redis" };
            let nodes: Vec<String> = hosts.split(',').map(|h| format!("{plain}://{auth}{h}")).collect();
            for node in &nodes {
                redis::Client::open(node.as_str())
                    .map_err(|e| BadUrl(format!("cluster node {h}: {e}", h = redact_node(node))))?;
            }
            return Ok(Kind::Cluster { nodes });
        }
        for (scheme, tls) in [("redis+sentinel://", false), ("rediss+sentinel://", true)] {
            let Some(rest) = url.strip_prefix(scheme) else { continue };
            let (hosts, master) = rest.split_once('/').unwrap_or((rest, ""));
            let master = master.trim_end_matches('/');
            if master.is_empty() || hosts.is_empty() {
                return Err(BadUrl("a Sentinel URL names its sentinels and the master: redis+sentinel://host:26379,host:26379/mymaster".into()));
            }
            let plain = if tls { "rediss" } else { "redis" };
            let sentinels: Vec<String> = hosts.split(',').map(|h| format!("{plain}://{h}")).collect();
            for sentinel in &sentinels {
                redis::Client::open(sentinel.as_str()).map_err(|e| BadUrl(format!("sentinel {sentinel}: {e}")))?;
            }
            return Ok(Kind::Sentinel { sentinels, master: master.to_string(), tls });
        }
        redis::Client::open(url).map_err(|e| {
            BadUrl(format!(
                "not a Redis URL ({e}); use for example redis://127.0.0.1:6379/0, redis://:PASSWORD@host:6379, \
                 rediss://host:6380 (TLS), redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster \
                 or redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
            ))
        })?;
        Ok(Kind::Server(url.to_string()))
    }
}

/// A node URL without its password, for messages.
fn redact_node(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.rsplit_once('@').map_or(rest, |(_, h)| h)),
        None => url.to_string(),
    }
}

/// The `host:port` of a URL, for messages.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Connects (with TLS, verifies the certificate), authenticates, selects and pings.
fn ping(client: &redis::Client, host: &str) -> Result<(), Unusable> {
    let classify = |e: RedisError| classify(&e, host);
    let mut conn = client.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(classify)?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(classify)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(classify)?;
    redis::cmd("PING").query::<String>(&mut conn).map(drop).map_err(classify)
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

/// Sorts a failed connection or command into what waiting cures and what it does
/// not; `host` says where it failed.
/// Whether the host and port of a URL accept a TCP connection.
fn answers_tcp(url: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(mut addrs) = host_of(url).to_socket_addrs() else { return false };
    addrs
        .next()
        .is_some_and(|addr| std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_ok())
}

fn classify(e: &RedisError, host: &str) -> Unusable {
    let text = format!("{host}: {e}");
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
    } else if is_tls_error(e) {
        Unusable::Misconfigured(format!(
            "the TLS handshake with {host} failed ({e}): the certificate must be signed by a CA the \
             server trusts (the system's roots, or the PEM file of --redis-ca-file) and name the host \
             of the URL; a plain port needs redis://, not rediss://"
        ))
    } else if e.kind() == ErrorKind::Parse {
        Unusable::Misconfigured(format!(
            "what answers there does not speak Redis ({text}): another service, or a TLS-only port \
             (use rediss:// for TLS); check the host and port"
        ))
    } else {
        Unusable::Down(text)
    }
}

/// A certificate or handshake failure, which waiting does not cure.
fn is_tls_error(e: &RedisError) -> bool {
    let text = e.to_string();
    ["certificate", "Certificate", "CertificateUnknown", "HandshakeFailure", "InvalidCertificate", "UnknownIssuer"]
        .iter()
        .any(|needle| text.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_sentinel_urls() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379").unwrap().kind,
            Kind::Server("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            Target::parse("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/main").unwrap().kind,
            Kind::Sentinel {
                sentinels: vec!["redis://10.0.0.1:26379".into(), "redis://10.0.0.2:26380".into()],
                master: "main".into(),
                tls: false,
            }
        );
        assert_eq!(
            Target::parse("rediss+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001").unwrap().kind,
            Kind::Cluster { nodes: vec!["rediss://:pw@10.0.0.1:7000".into(), "rediss://:pw@10.0.0.2:7001".into()] }
        );
        assert!(Target::parse("rediss://10.0.0.1:6380").is_ok());
        assert!(Target::parse("redis+cluster://10.0.0.1:7000/0").is_err());
        assert!(Target::parse("redis+sentinel://10.0.0.1:26379").is_err());
        assert!(Target::parse("http://x").is_err());
    }
}
