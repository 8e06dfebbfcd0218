//! The TCP listeners (API and dashboard): TLS where configured, the authorisation check of
//! `auth.rs` on every API request, one cap on open connections across all listeners (so idle
//! ones can never starve the daemon of file descriptors or the Unix socket of service), a
//! deadline for the TLS handshake and a request's headers, and for each piece of a request's
//! body (no slow-loris), and the caller's address in the audit log.

use super::auth::{Secure, login, require};
use super::{AppState, Peer, probes, router, web};
use crate::config::Listener;
use crate::store::Caller;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Most TCP connections open at once, all listeners together; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to finish the TLS handshake, and to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a request's body may stay silent (between two pieces; an upload may take long).
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a connection may last at most (its requests and their responses).
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The app every TCP listener serves: the API behind the check, log-in, probes, dashboard.
fn app(m: AppState) -> axum::Router {
    let api = router(m.clone()).layer(axum::middleware::from_fn_with_state(m.clone(), require));
    let login = axum::Router::new()
        .route("/v1/login", axum::routing::post(login))
        .with_state(m);
    api.merge(login).merge(probes()).merge(web::dashboard())
}

/// Serve on bound TCP listeners until `shutdown` resolves; `tls` for those that need it.
pub async fn serve_tcp(
    listeners: Vec<(TcpListener, Listener)>,
    m: AppState,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(m);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let mut tasks = tokio::task::JoinSet::new();
    for (l, how) in listeners {
        let acceptor = if how.tls {
            Some(acceptor.clone().expect("TLS configured for a TLS listener"))
        } else {
            None
        };
        tasks.spawn(accept_loop(
            l,
            app.clone(),
            slots.clone(),
            acceptor,
            shutdown.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    slots: Arc<Semaphore>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + Unpin,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let mut shutdown = shutdown;
    loop {
        // A slot first: past the cap, connections wait in the listen backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            () = &mut shutdown => return,
        };
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
            () = &mut shutdown => return,
        };
        let _ = io.set_nodelay(true);
        let peer = Peer(Caller {
            uid: None,
            remote: Some(addr.to_string()),
            actor: None,
        });
        let svc = app
            .clone()
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                BODY_IDLE_TIMEOUT,
            ))
            .layer(axum::Extension(ConnectInfo(peer)))
            .layer(axum::Extension(Secure(tls.is_some())));
        let (http, tls) = (http.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let r = tokio::time::timeout(CONNECTION_TIMEOUT, serve_one(io, tls, http, svc)).await;
            match r {
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TCP API connection ended"),
                Err(_) => tracing::debug!(%addr, "TCP API connection closed at its deadline"),
                Ok(Ok(())) => {}
            }
        });
    }
}

async fn serve_one(
    io: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: hyper::server::conn::http1::Builder,
    app: axum::Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let svc = TowerToHyperService::new(app);
    match tls {
        None => {
            http.serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await?
        }
        Some(acceptor) => {
            let stream = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(io))
                .await
                .map_err(|_| "the TLS handshake took too long")??;
            http.serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await?
        }
    }
    Ok(())
}
