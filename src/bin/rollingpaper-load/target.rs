//! Where the generator connects: a `--target` value (`host:port`,
//! `ws://host[:port]` or `wss://host[:port]`), resolved, on loopback only, and
//! for `wss://` the name the server's certificate must carry.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use rustls::pki_types::ServerName;

/// One server (or TLS terminator) to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where the TCP connection goes.
    pub addr: SocketAddr,
    /// `host[:port]` as given: the upgrade request's `Host`, and the name in errors.
    pub authority: String,
    /// How the bytes travel over the connection.
    pub transport: Transport,
}

#[derive(Debug, Clone)]
pub enum Transport {
    /// `ws://` or a bare `host:port`: WebSocket frames straight on TCP.
    Plain,
    /// `wss://`: TLS first; the certificate must name `server_name` (a DNS name,
    /// also sent as SNI, or an IP address, matched against the IP SANs).
    Tls { server_name: ServerName<'static> },
}

impl Target {
    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls { .. })
    }
}

impl fmt::Display for Target {
    /// A plain target as its address (as reports always showed it), a TLS one as its URL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Plain => write!(f, "{}", self.addr),
            Transport::Tls { .. } => write!(f, "wss://{}", self.authority),
        }
    }
}

/// A `--target` value, if every address it resolves to is on loopback.
///
/// # Errors
/// An unknown scheme, a path, no port where one is needed, a name that does not
/// resolve, or an address outside 127.0.0.0/8 and ::1.
pub fn parse(text: &str) -> Result<Target, String> {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, text),
    };
    let (tls, default_port) = match scheme.as_deref() {
        None => (false, None),
        Some("ws") => (false, Some(80)),
        Some("wss") => (true, Some(443)),
        Some(other) => return Err(format!("--target {text}: the scheme {other}:// is not ws:// or wss://")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!("--target {text}: give host and port only (the generator asks for /ws/{{paper}} itself)"));
    }
    let (host, port) = split_host_port(authority).map_err(|why| format!("--target {text}: {why}"))?;
    let port = match (port, default_port) {
        (Some(port), _) => port,
        (None, Some(port)) => port,
        (None, None) => return Err(format!("--target {text}: give a port (host:port), or a ws:// or wss:// URL")),
    };
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(|e| format!("--target {text}: {e}"))?.collect();
    let Some(&addr) = addrs.first() else { return Err(format!("--target {text} resolves to nothing")) };
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!("refusing --target {text}: {} is not a loopback address (127.0.0.0/8, ::1)", bad.ip()));
    }
    let transport = if tls {
        let server_name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_string())
                .map_err(|e| format!("--target {text}: {host} is not a name a certificate can carry: {e}"))?,
        };
        Transport::Tls { server_name }
    } else {
        Transport::Plain
    };
    Ok(Target { addr, authority: authority.to_string(), transport })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`: the host (without brackets) and the port if given.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or("an IPv6 address without its closing ]")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("something other than :port after ]")?)),
        }
    } else {
        match authority.split_once(':') {
            Some((_, rest)) if rest.contains(':') => return Err("an IPv6 address goes in brackets: [::1]:port".into()),
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = port.map(|p| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"))).transpose()?;
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert!(parse("127.0.0.1:8080").is_ok());
        assert!(parse("127.1.2.3:80").is_ok());
        assert!(parse("[::1]:80").is_ok());
        for bad in ["10.0.0.1:80", "192.168.1.1:80", "8.8.8.8:53", "[::2]:80", "0.0.0.0:80", "wss://10.0.0.1"] {
            assert!(parse(bad).unwrap_err().contains("refusing"), "{bad}");
        }
    }

    #[test]
    fn urls_choose_the_transport_and_default_port() {
        let plain = parse("127.0.0.1:8080").unwrap();
        assert!(!plain.is_tls());
        assert_eq!(plain.to_string(), "127.0.0.1:8080");
        let ws = parse("ws://127.0.0.1").unwrap();
        assert_eq!((ws.addr.port(), ws.is_tls()), (80, false));

        let wss = parse("WSS://127.0.0.1:8443/").unwrap();
        assert_eq!((wss.addr.to_string().as_str(), wss.authority.as_str()), ("127.0.0.1:8443", "127.0.0.1:8443"));
        assert_eq!(wss.to_string(), "wss://127.0.0.1:8443");
        // An IP address is checked against the certificate's IP SANs, not sent as SNI.
        assert!(matches!(&wss.transport, Transport::Tls { server_name: ServerName::IpAddress(_) }));
        let v6 = parse("wss://[::1]").unwrap();
        assert_eq!(v6.addr.port(), 443);
        assert!(matches!(&v6.transport, Transport::Tls { server_name: ServerName::IpAddress(_) }));
        let named = parse("wss://localhost:8443").unwrap();
        assert!(named.addr.ip().is_loopback());
        assert!(matches!(&named.transport, Transport::Tls { server_name: ServerName::DnsName(_) }));
    }

    #[test]
    fn malformed_targets_are_explained() {
        for (bad, why) in [
            ("127.0.0.1", "give a port"),
            ("http://127.0.0.1:80", "not ws:// or wss://"),
            ("wss://127.0.0.1:8443/ws/p1", "host and port only"),
            ("::1:80", "in brackets"),
            ("wss://[::1", "closing ]"),
            ("wss://127.0.0.1:https", "not a port"),
            ("wss://:443", "no host"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
