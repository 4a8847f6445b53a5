//! A connection's byte stream: plain TCP for `ws://`, TLS over it for `wss://`.
//! An enum rather than a trait object: a plain run pays one predictable branch
//! per read or write call, nothing per message.
//!
//! Connections are registered for READABLE | WRITABLE once, edge-triggered, so
//! TLS output that a full socket did not take is sent on the writable event that
//! follows (the callers' write path calls `flush`, which sends it).

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::ClientConfig;

use crate::target::{Target, Transport};
use crate::tls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls's state is large, and plain connections stay small.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Wraps a connecting socket for `target`; `tls` is the run's client
    /// configuration, present whenever a target is `wss://`.
    ///
    /// # Errors
    /// rustls refuses to start a connection.
    pub fn new(tcp: TcpStream, target: &Target, tls: Option<&Arc<ClientConfig>>) -> io::Result<Stream> {
        match (&target.transport, tls) {
            (Transport::Plain, _) => Ok(Stream::Plain(tcp)),
            (Transport::Tls { server_name }, Some(config)) => {
                Ok(Stream::Tls(Box::new(TlsStream::new(tcp, config.clone(), server_name.clone(), &target.authority)?)))
            }
            (Transport::Tls { .. }, None) => Err(io::Error::other("a wss:// target without a TLS configuration")),
        }
    }

    /// The socket, for the connect checks (`take_error`, `peer_addr`).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.tcp(),
        }
    }

    fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.tcp_mut(),
        }
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(data),
            Stream::Tls(tls) => tls.write(data),
        }
    }

    /// Sends the TLS records rustls still holds; nothing to do on plain TCP.
    #[inline]
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => tls.send_pending(),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        self.tcp_mut().register(registry, token, interests)
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        self.tcp_mut().reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.tcp_mut().deregister(registry)
    }
}
