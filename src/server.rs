//! The API server: HTTP/JSON over a root-only Unix socket (axum). Maps routes to the manager,
//! streams long operations as NDJSON events, and writes every operation to the audit log.

use crate::api::*;
use crate::machine::{Error, Manager};
use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

/// The caller's uid, from the Unix socket's peer credentials.
#[derive(Clone, Debug)]
pub struct Peer {
    uid: Option<u32>,
}

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Peer {
            uid: s.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(_: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer { uid: None }
    }
}

type AppState = Arc<Manager>;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let code = match &self {
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            code,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

fn audit<T>(m: &Manager, peer: &Peer, action: &str, target: &str, r: &Result<T, Error>) {
    let result = match r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    let _ = m.store().record(peer.uid, action, target, &result);
}

/// Run a long operation in its own task (it completes even if the client goes away) and stream
/// its progress and result as NDJSON [`Event`]s.
fn streamed<T, F, Fut>(m: AppState, peer: Peer, action: &'static str, target: String, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(AppState, Arc<dyn Fn(&str) + Send + Sync>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let ptx = tx.clone();
    let progress: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(move |s: &str| {
        let line = serde_json::to_string(&Event::<()>::Progress(s.to_string())).unwrap_or_default();
        let _ = ptx.send(line + "\n");
    });
    tokio::spawn(async move {
        let r = f(m.clone(), progress).await;
        audit(&m, &peer, action, &target, &r);
        let line = match r {
            Ok(v) => serde_json::to_string(&Event::Result(v)),
            Err(e) => serde_json::to_string(&Event::<T>::Error(e.to_string())),
        }
        .unwrap_or_default();
        let _ = tx.send(line + "\n");
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|l| (Ok::<_, std::io::Error>(l), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

async fn list(State(m): State<AppState>) -> Result<Json<Vec<MachineInfo>>, Error> {
    m.list().map(Json)
}

async fn status(State(m): State<AppState>, Path(name): Path<String>) -> Result<Json<MachineInfo>, Error> {
    m.status(&name).map(Json)
}

async fn deploy(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<DeployRequest>,
) -> Response {
    let target = req.name.clone().unwrap_or_default();
    streamed(m, p, "machine.deploy", target, move |m, pr| async move {
        m.deploy(&req, &*pr).await
    })
}

async fn lifecycle(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path((name, op)): Path<(String, String)>,
) -> Response {
    let action: &'static str = match op.as_str() {
        "start" => "machine.start",
        "stop" => "machine.stop",
        "restart" => "machine.restart",
        _ => {
            return Error::NotFound(format!("no operation {op:?} (allowed: start, stop, restart)"))
                .into_response();
        }
    };
    let n = name.clone();
    streamed(m, p, action, name, move |m, pr| async move {
        match action {
            "machine.start" => m.start(&n, &*pr).await,
            "machine.stop" => m.stop(&n, &*pr).await,
            _ => m.restart(&n, &*pr).await,
        }
    })
}

async fn delete(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Response {
    let n = name.clone();
    streamed(m, p, "machine.delete", name, move |m, pr| async move {
        m.delete(&n, &*pr)
            .await
            .map(|_| serde_json::json!({"deleted": n}))
    })
}

async fn expose(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<ExposeRequest>,
) -> Result<Json<MachineInfo>, Error> {
    let r = m.expose(&name, &req.ports).await;
    audit(
        &m,
        &p,
        "machine.expose",
        &format!("{name} {}", req.ports.join(" ")),
        &r,
    );
    r.map(Json)
}

async fn unexpose(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<UnexposeRequest>,
) -> Result<Json<MachineInfo>, Error> {
    let r = m.unexpose(&name, &req.port).await;
    audit(&m, &p, "machine.unexpose", &format!("{name} {}", req.port), &r);
    r.map(Json)
}

async fn exec(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<ExecRequest>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ExecEvent>();
    tokio::spawn(async move {
        let timeout = Duration::from_secs(req.timeout_s.unwrap_or(600));
        let r = m.exec_stream(&name, &req.cmd, timeout, tx.clone()).await;
        audit(&m, &p, "machine.exec", &name, &r);
        let _ = tx.send(match r {
            Ok(code) => ExecEvent::Exit(code),
            Err(e) => ExecEvent::Error(e.to_string()),
        });
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let line = serde_json::to_string(&ev).unwrap_or_default() + "\n";
        Some((Ok::<_, std::io::Error>(line), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

async fn shell(State(m): State<AppState>, Path(name): Path<String>) -> Result<Json<ShellResponse>, Error> {
    Ok(Json(ShellResponse {
        argv: m.shell(&name).await?,
    }))
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    offset: Option<u64>,
}

async fn logs(
    State(m): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<String, Error> {
    m.logs(&name, q.offset.unwrap_or(0))
}

async fn networks(State(m): State<AppState>) -> Result<Json<Vec<NetworkInfo>>, Error> {
    m.networks().map(Json)
}

async fn network_create(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<NetworkCreateRequest>,
) -> Result<Json<NetworkInfo>, Error> {
    let r = m.network_create(&req.name, req.subnet.as_deref()).await;
    audit(&m, &p, "network.create", &req.name, &r);
    r.map(Json)
}

async fn network_delete(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let r = m.network_delete(&name).await;
    audit(&m, &p, "network.delete", &name, &r);
    r.map(|_| Json(serde_json::json!({"deleted": name})))
}

async fn ports(State(m): State<AppState>) -> Result<Json<Vec<PortRow>>, Error> {
    m.ports().map(Json)
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    limit: Option<u32>,
    action: Option<String>,
    target: Option<String>,
}

async fn history(
    State(m): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Vec<crate::store::HistoryEntry>>, Error> {
    Ok(Json(m.store().history(
        q.limit.unwrap_or(50),
        q.action.as_deref(),
        q.target.as_deref(),
    )?))
}

async fn info(State(m): State<AppState>) -> Result<Json<InfoResponse>, Error> {
    let mut config = serde_json::to_value(m.config()).unwrap_or_default();
    if config["token"].is_string() {
        config["token"] = "<redacted>".into();
    }
    let (database, machines) = {
        let st = m.store();
        (
            st.integrity().unwrap_or_else(|e| e.to_string()),
            st.machines().map(|v| v.len()).unwrap_or(0),
        )
    };
    Ok(Json(InfoResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        hypervisor: m.hypervisor(),
        config,
        firewall: m.firewall_health(),
        database,
        machines,
        bridges: m.bridges().await?,
    }))
}

async fn firewall(State(m): State<AppState>) -> Result<String, Error> {
    m.firewall_render()
}

async fn images(State(m): State<AppState>) -> Result<Json<Vec<ImageRow>>, Error> {
    m.images().map(Json)
}

async fn image_build(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<ImageBuildRequest>,
) -> Response {
    let target = req.name.clone().unwrap_or_else(|| req.base.clone());
    streamed(m, p, "image.build", target, move |m, pr| async move {
        m.image_build(&req, &*pr).await
    })
}

async fn image_remove(
    State(m): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(tag): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let r = m.image_remove(&tag);
    audit(&m, &p, "image.rm", &tag, &r);
    r.map(|_| Json(serde_json::json!({"deleted": tag})))
}

/// The router.
pub fn router(m: AppState) -> Router {
    Router::new()
        .route("/v1/machines", get(list).post(deploy))
        .route("/v1/machines/{name}", get(status).delete(delete))
        .route("/v1/machines/{name}/expose", post(expose))
        .route("/v1/machines/{name}/unexpose", post(unexpose))
        .route("/v1/machines/{name}/exec", post(exec))
        .route("/v1/machines/{name}/shell", get(shell))
        .route("/v1/machines/{name}/logs", get(logs))
        .route("/v1/machines/{name}/{op}", post(lifecycle))
        .route("/v1/networks", get(networks).post(network_create))
        .route("/v1/networks/{name}", axum::routing::delete(network_delete))
        .route("/v1/ports", get(ports))
        .route("/v1/history", get(history))
        .route("/v1/info", get(info))
        .route("/v1/firewall", get(firewall))
        .route("/v1/images", get(images))
        .route("/v1/images/build", post(image_build))
        .route("/v1/images/{tag}", axum::routing::delete(image_remove))
        .with_state(m)
}

/// Serve the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    m: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(m).into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serve the API on an opt-in TCP listener; every request needs `Authorization: Bearer <token>`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
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
                (
                    StatusCode::UNAUTHORIZED,
                    Json(ErrorBody {
                        error: "missing or wrong bearer token (allowed: Authorization: Bearer <token from the config>)"
                            .into(),
                    }),
                )
                    .into_response()
            }
        }
    });
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
