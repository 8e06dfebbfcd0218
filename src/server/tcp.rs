//! The opt-in TCP API: a bearer token on every request, a cap on open connections (so idle
//! ones can never starve the daemon of file descriptors or the Unix socket of service), a
//! deadline for a request's headers (no slow-loris), and the caller's address in the audit log.

use super::{AppState, Peer, probes, router};
use crate::api::{ErrorBody, ErrorKind};
use crate::store::Caller;
use axum::Json;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most TCP API connections open at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a connection may last at most (its requests and their responses).
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

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
    let app = router(m).layer(auth).merge(probes());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A slot first: past the cap, connections wait in the listen backlog.
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (io, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a TCP API connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let peer = Peer(Caller {
            uid: None,
            remote: Some(addr.to_string()),
        });
        let svc = TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(peer))));
        let conn = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "TCP API connection ended"),
                Err(_) => tracing::debug!(%addr, "TCP API connection closed at its deadline"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
