//! The opt-in TCP API: a bearer token on every request, a cap on open connections (so idle
//! ones can never starve the daemon of file descriptors or the Unix socket of service), and
//! the caller's address in the audit log.

use super::{AppState, Peer, router};
use crate::api::{ErrorBody, ErrorKind};
use crate::store::Caller;
use axum::Json;
use axum::extract::connect_info::Connected;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most TCP API connections open at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// A TCP listener that holds one of a fixed number of slots per open connection.
pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

/// A connection with its slot, given back when it closes.
pub struct CappedStream {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        let slot = self.slots.clone().acquire_owned().await.expect("never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => return (CappedStream { io, _slot: slot }, addr),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a TCP API connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected<axum::serve::IncomingStream<'_, CappedListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, CappedListener>) -> Self {
        Peer(Caller {
            uid: None,
            remote: Some(s.remote_addr().to_string()),
        })
    }
}

/// Serve the API on an opt-in TCP listener; every request needs `Authorization: Bearer <token>`.
pub async fn serve_tcp(
    listener: TcpListener,
    m: AppState,
    token: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let expected = Arc::new(format!("Bearer {token}"));
    let auth = axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let expected = expected.clone();
        async move {
            let ok = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()));
            if ok {
                next.run(req).await
            } else {
                let body = ErrorBody::new(
                    ErrorKind::Unauthorized,
                    "missing or wrong bearer token (allowed: Authorization: Bearer <token from the config>)",
                );
                (StatusCode::UNAUTHORIZED, Json(body)).into_response()
            }
        }
    });
    let listener = CappedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    axum::serve(
        listener,
        router(m)
            .layer(auth)
            .into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
