//! The client's connections: where the daemon is (its socket, or a remote address with its
//! token and pinned certificate), and how hyper's pool connects to it (Unix socket, TCP, TLS).

use super::{ClientError, Result, pin};
use hyper::http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long connecting (and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the daemon is.
#[derive(Debug)]
pub(super) enum Target {
    /// The Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Remote(Remote),
}

/// A daemon reached over TCP.
pub(super) struct Remote {
    /// `https://HOST:PORT` (or `http://` on loopback).
    pub(super) base: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
    pub(super) token: Option<String>,
    /// The pinned fingerprint, once known; where it came from.
    pub(super) pin: Mutex<Option<(String, String)>>,
    /// Given with --fingerprint (never asked, never stored).
    pub(super) given: bool,
}

/// The daemon's default port.
const DEFAULT_PORT: u16 = 7777;

/// `--host`: whether TLS, the host (an IPv6 address without brackets) and the port.
pub(super) fn parse_host(url: &str) -> std::result::Result<(bool, String, u16), String> {
    let bad = || {
        format!(
            "--host {url:?} is not a daemon's address (allowed: https://HOST[:PORT], or http://127.0.0.1:PORT on loopback)"
        )
    };
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
        return Err(bad());
    }
    let uri: Uri = format!("http://{rest}/").parse().map_err(|_| bad())?;
    let host = uri.host().ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    if host.is_empty() || (rest.contains(':') && uri.port().is_none() && !rest.ends_with(']')) {
        return Err(bad());
    }
    let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
    if !tls && !loopback {
        return Err(format!(
            "--host {url:?}: plain HTTP off loopback would send the token in clear (allowed: https://{rest})"
        ));
    }
    Ok((tls, host, port))
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Remote")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub(super) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A connection: the Unix socket, or TCP with or without TLS.
pub(super) enum Io {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens connections to the target for hyper's pool.
#[derive(Clone)]
pub(super) struct Connector(pub(super) Arc<Target>);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Io>;
    type Error = ClientError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Io>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let target = self.0.clone();
        Box::pin(async move {
            let io = tokio::time::timeout(CONNECT_TIMEOUT, connect(&target))
                .await
                .unwrap_or_else(|_| Err(unreachable(&target, "timed out")))?;
            Ok(TokioIo::new(io))
        })
    }
}

pub(super) fn unreachable(target: &Target, reason: impl std::fmt::Display) -> ClientError {
    match target {
        Target::Unix(p) => ClientError::Unreachable {
            socket: p.display().to_string(),
            reason: reason.to_string(),
        },
        Target::Remote(r) => ClientError::RemoteUnreachable {
            url: r.base.clone(),
            reason: reason.to_string(),
        },
    }
}

pub(super) async fn connect(target: &Target) -> Result<Io> {
    let r = match target {
        Target::Unix(p) => {
            return tokio::net::UnixStream::connect(p)
                .await
                .map(Io::Unix)
                .map_err(|e| unreachable(target, e));
        }
        Target::Remote(r) => r,
    };
    let tcp = tokio::net::TcpStream::connect((r.host.as_str(), r.port))
        .await
        .map_err(|e| unreachable(target, e))?;
    let _ = tcp.set_nodelay(true);
    if !r.tls {
        return Ok(Io::Tcp(tcp));
    }
    let expected = r.pin.lock().expect("pin").clone();
    let verifier = pin::PinVerifier::new(expected.as_ref().map(|p| p.0.clone()), pin::provider());
    let config = pin::client_config(verifier.clone())?;
    let name = rustls::pki_types::ServerName::try_from(r.host.clone())
        .map_err(|e| ClientError::Protocol(format!("host {:?}: {e}", r.host)))?;
    match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Ok(s) => Ok(Io::Tls(Box::new(s))),
        Err(e) => Err(match (verifier.seen(), expected) {
            (Some(seen), Some((expected, source_of_pin))) if seen != expected => {
                ClientError::CertificateChanged {
                    authority: r.authority(),
                    expected,
                    seen,
                    source_of_pin,
                }
            }
            (Some(seen), None) => ClientError::UnknownCertificate {
                authority: r.authority(),
                seen,
            },
            _ => unreachable(target, format!("TLS: {e}")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_urls_are_checked() {
        let ok = |u: &str| parse_host(u).unwrap();
        assert_eq!(ok("https://h.example:7443"), (true, "h.example".into(), 7443));
        assert_eq!(ok("https://h.example/"), (true, "h.example".into(), 7777));
        assert_eq!(ok("https://[::1]:9"), (true, "::1".into(), 9));
        assert_eq!(ok("http://127.0.0.1:7777"), (false, "127.0.0.1".into(), 7777));
        assert_eq!(ok("http://localhost"), (false, "localhost".into(), 7777));
        for bad in [
            "h.example:7443",
            "ftp://h",
            "https://",
            "https://h/v1",
            "https://u@h",
            "https://h:port",
            "https://h:99999",
        ] {
            let e = parse_host(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(
            parse_host("http://10.1.2.3:7777")
                .unwrap_err()
                .contains("in clear")
        );
    }
}
