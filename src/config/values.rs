//! Single values from flags and variables: booleans as people write them,
//! listen addresses, secrets, origins, CIDR blocks.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::auth;

/// A boolean from a flag (`--cluster`) or its variable (`RP_CLUSTER=yes`). The flag
/// itself takes no value, so a value that does not parse always comes from the
/// variable, which the error names.
#[derive(Debug, Clone, Copy)]
pub(super) struct EnvBool(pub(super) &'static str);

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
pub(super) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
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
/// The backend API's key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

pub(super) fn parse_api_key(text: &str) -> Result<ApiKey, String> {
    Ok(ApiKey(text.to_string()))
}

pub(super) fn parse_jwt_secret(text: &str) -> Result<Box<auth::Key>, String> {
    Ok(Box::new(auth::Key { secret: text.to_string(), audience: None }))
}

/// Whether `text` is an origin as browsers send it: scheme://host[:port], nothing more.
pub(super) fn is_origin(text: &str) -> bool {
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

/// `10.0.0.5` or `10.0.0.0/8` (IPv6 too) as an address and a prefix length.
pub fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let text = text.trim();
    let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() { max } else { prefix.parse().ok()? };
    (prefix <= max).then_some((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
