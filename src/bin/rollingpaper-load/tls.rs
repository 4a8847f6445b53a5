//! `wss://`: the TLS client (rustls, ring) that the generator's connections use
//! through a TLS terminator. The roots it trusts, a non-blocking TLS stream over
//! an edge-triggered mio socket, and its failures, named by target.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::{error, fmt};

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// TLS reads (of up to 4 KiB each, rustls's size) in one `read` call at most;
/// past them the call says `Interrupted`, which callers take as "call again".
const TLS_READS_PER_CALL: usize = 64;
/// Writes to the socket in one flush at most. rustls holds 64 KiB of output at
/// most and each write takes a record or more, so the bound is never reached
/// while the socket takes data; if it were, the stream fails rather than waits
/// for a writable event that would not come.
const TLS_WRITES_PER_FLUSH: usize = 1024;

/// The TLS options, the same in every mode.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM file of the CA certificates that wss:// targets' certificates must
    /// chain to, instead of the system's roots: a private CA, or a self-signed
    /// certificate itself.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

/// The client configuration shared by every TLS connection of the run; `None`
/// when no target is `wss://`.
///
/// # Errors
/// `--ca-file` without a `wss://` target, a CA file that cannot be read or holds
/// no usable certificate, or no CA roots on the system.
pub fn client_config(any_tls: bool, args: &TlsArgs) -> Result<Option<Arc<ClientConfig>>, String> {
    if !any_tls {
        return match &args.ca_file {
            Some(_) => Err("--ca-file is for wss:// targets, and no --target is one".into()),
            None => Ok(None),
        };
    }
    let roots = match &args.ca_file {
        Some(path) => roots_from_file(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let certificates =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read --ca-file {shown}: {e}"))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| format!("--ca-file {shown}: {e}"))?;
        roots.add(certificate).map_err(|e| format!("--ca-file {shown}: a certificate that cannot be a root: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--ca-file {shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found.errors.first().map_or(String::new(), |e| format!(" ({e})"));
        return Err(format!("no CA roots found on this system{why}: install them, or give --ca-file PATH"));
    }
    Ok(roots)
}

/// A TLS connection over a non-blocking socket registered edge-triggered: every
/// call drives rustls as far as the socket allows, because no readiness event
/// comes again for bytes already read from the socket or for output rustls
/// still holds.
pub struct TlsStream {
    tcp: TcpStream,
    tls: ClientConnection,
    /// The target's `host[:port]`, for errors.
    peer: String,
}

impl TlsStream {
    /// Starts the handshake: the ClientHello goes out with the first flush.
    ///
    /// # Errors
    /// rustls refuses the configuration or the name.
    pub fn new(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        peer: &str,
    ) -> io::Result<Self> {
        let tls = ClientConnection::new(config, server_name).map_err(|error| failure(peer, error))?;
        Ok(TlsStream { tcp, tls, peer: peer.to_string() })
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Writes the TLS records rustls holds (handshake messages, alerts,
    /// encrypted data) until none is left or the socket is full; a full socket
    /// gets a writable event later, and the caller flushes again then.
    pub fn send_pending(&mut self) -> io::Result<()> {
        for _ in 0..TLS_WRITES_PER_FLUSH {
            if !self.tls.wants_write() {
                return Ok(());
            }
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tls.wants_write() {
            return Err(io::Error::other(format!("TLS with {}: the output did not drain", self.peer)));
        }
        Ok(())
    }
}

impl Read for TlsStream {
    /// Plaintext that rustls already holds first, then TLS records from the
    /// socket until `buf` is full or the socket has nothing more. `WouldBlock`
    /// only when both are empty, so that the caller's edge-triggered loop never
    /// stops with data left inside rustls.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        for _ in 0..TLS_READS_PER_CALL {
            match self.tls.reader().read(&mut buf[filled..]) {
                // The peer's close_notify, after the last plaintext.
                Ok(0) => return Ok(filled),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        return Ok(filled);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // An end without close_notify: what came before it is delivered first.
                Err(e) => return if filled > 0 { Ok(filled) } else { Err(e) },
            }
            match self.tls.read_tls(&mut self.tcp) {
                // The socket's end: rustls notes it, and its reader reports it next round.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if filled > 0 { Ok(filled) } else { Err(e) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return if filled > 0 { Ok(filled) } else { Err(e) },
            }
            if let Err(error) = self.tls.process_new_packets() {
                // rustls queued an alert for the peer: a last try to send it.
                let _ = self.send_pending();
                return Err(failure(&self.peer, error));
            }
            // Handshake messages, or the request buffered until the handshake ended.
            // A failure to send is told on the next call, after what was read.
            if let Err(e) = self.send_pending() {
                return if filled > 0 { Ok(filled) } else { Err(e) };
            }
        }
        if filled > 0 {
            Ok(filled)
        } else {
            Err(io::ErrorKind::Interrupted.into())
        }
    }
}

impl Write for TlsStream {
    /// Takes what rustls's buffer takes and flushes it at once; `WouldBlock`
    /// when the buffer is full because the socket is.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.send_pending()?;
        let n = self.tls.writer().write(data)?;
        self.send_pending()?;
        if n == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

/// What went wrong in TLS with one target.
#[derive(Debug)]
pub struct TlsFailure {
    peer: String,
    error: rustls::Error,
}

impl TlsFailure {
    /// The server's certificate was refused here: every connection to that
    /// target would meet the same, so the run stops.
    pub fn is_certificate(&self) -> bool {
        matches!(self.error, rustls::Error::InvalidCertificate(_))
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let TlsFailure { peer, error } = self;
        if !self.is_certificate() {
            return write!(f, "TLS with {peer}: {error}");
        }
        // webpki's reason is wrapped in rustls's `Other`, known by name only.
        let advice = if format!("{error:?}").contains("CaUsedAsEndEntity") {
            "it is a CA certificate, which a server may not present as its own (openssl req -x509 makes \
             one unless given -addext basicConstraints=critical,CA:FALSE); serve one made so, or one \
             signed by the CA"
        } else {
            "it must chain to a CA of --ca-file (or of the system's roots without it) and name the host of \
             the target"
        };
        write!(f, "TLS with {peer}: the server's certificate is refused ({error}); {advice}")
    }
}

impl error::Error for TlsFailure {}

fn failure(peer: &str, error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure { peer: peer.to_string(), error })
}

/// The TLS failure an I/O error carries, if any.
pub fn failure_of(e: &io::Error) -> Option<&TlsFailure> {
    e.get_ref()?.downcast_ref::<TlsFailure>()
}

/// Why a read error ended a connection. The first refused certificate is kept
/// in `refused`: waiting does not cure it, so the caller stops the run.
pub fn read_failure(e: &io::Error, refused: &mut Option<String>) -> String {
    match failure_of(e) {
        Some(failure) => {
            let why = failure.to_string();
            if failure.is_certificate() && refused.is_none() {
                *refused = Some(why.clone());
            }
            why
        }
        None => format!("read: {e}"),
    }
}
