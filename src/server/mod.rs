//! The API server: HTTP/JSON over the Unix socket and the TCP listeners (axum). Maps routes to
//! the services, streams long operations as NDJSON events, and writes every change to the audit
//! log; `auth.rs` is the one authorisation check of the TCP listeners.

mod accounts;
mod auth;
mod convert;
mod oci;
mod ratelimit;
mod session;
mod tcp;
mod terminal;
mod upload;
mod volumes;
mod web;

pub use tcp::serve_tcp;

use crate::api::*;
use crate::error::{Error, chain};
use crate::host::Host;
use crate::spec::{HostPortSpec, SpecError};
use crate::store::Caller;
use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use sistemo_vmm::OutputChunk;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

/// Who is calling: the uid from the Unix socket's peer credentials, or the TCP caller's address.
#[derive(Clone, Debug)]
pub struct Peer(Caller);

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Peer(Caller {
            uid: s.io().peer_cred().ok().map(|c| c.uid()),
            remote: None,
            actor: None,
        })
    }
}

type AppState = Arc<Host>;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = self.body();
        let code = StatusCode::from_u16(body.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, Json(body)).into_response()
    }
}

/// Write `r` to the audit log as `action` on `target` by the caller, and pass it on.
fn audited<T>(h: &Host, peer: &Peer, action: &str, target: &str, r: Result<T, Error>) -> Result<T, Error> {
    let result = match &r {
        Ok(_) => "ok".to_string(),
        Err(e) => chain(e),
    };
    h.record(&peer.0, action, target, &result);
    r
}

/// An NDJSON response of `events`.
fn ndjson<E: Serialize + Send + 'static>(
    events: impl futures::Stream<Item = E> + Send + 'static,
) -> Response {
    use futures::StreamExt as _;
    let lines =
        events.map(|ev| Ok::<_, std::io::Error>(serde_json::to_string(&ev).unwrap_or_default() + "\n"));
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("valid response")
}

/// Run a long operation in its own task (it completes even if the client goes away) and stream
/// its progress and result (or error, with its kind and status) as NDJSON [`Event`]s.
fn streamed<T, F, Fut>(h: AppState, peer: Peer, action: &'static str, target: String, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(AppState, Arc<dyn Fn(&str) + Send + Sync>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event<T>>();
    let ptx = tx.clone();
    let (bus, t) = (h.events.clone(), target.clone());
    let progress: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(move |s: &str| {
        bus.progress(action, &t, s);
        let _ = ptx.send(Event::Progress(s.to_string()));
    });
    let op = h.begin();
    tokio::spawn(async move {
        let _op = op;
        let r = audited(&h, &peer, action, &target, f(h.clone(), progress).await);
        let _ = tx.send(match r {
            Ok(v) => Event::Result(v),
            Err(e) => Event::Error(e.body()),
        });
    });
    ndjson(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    }))
}

async fn list(State(h): State<AppState>) -> Result<Json<Vec<MachineInfo>>, Error> {
    Ok(Json(
        h.machines.list()?.iter().map(convert::machine_info).collect(),
    ))
}

async fn status(State(h): State<AppState>, Path(name): Path<String>) -> Result<Json<MachineInfo>, Error> {
    Ok(Json(convert::machine_info(&h.machines.status(&name).await?)))
}

async fn deploy(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<DeployRequest>,
) -> Response {
    let target = req.name.clone().unwrap_or_default();
    streamed(h, p, "machine.deploy", target, move |h, pr| async move {
        let d = convert::deploy(req)?;
        Ok(convert::machine_info(&h.machines.deploy(d, &*pr).await?))
    })
}

/// What a lifecycle route does.
#[derive(Clone, Copy)]
enum Op {
    Start,
    Stop,
    Restart,
}

fn lifecycle(h: AppState, p: Peer, name: String, op: Op) -> Response {
    let action = match op {
        Op::Start => "machine.start",
        Op::Stop => "machine.stop",
        Op::Restart => "machine.restart",
    };
    let n = name.clone();
    streamed(h, p, action, name, move |h, pr| async move {
        let v = match op {
            Op::Start => h.machines.start(&n, &*pr).await?,
            Op::Stop => h.machines.stop(&n, &*pr).await?,
            Op::Restart => h.machines.restart(&n, &*pr).await?,
        };
        Ok(convert::machine_info(&v))
    })
}

async fn start(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
) -> Response {
    lifecycle(h, p, n, Op::Start)
}

async fn stop(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
) -> Response {
    lifecycle(h, p, n, Op::Stop)
}

async fn restart(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
) -> Response {
    lifecycle(h, p, n, Op::Restart)
}

#[derive(serde::Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    preserve_storage: bool,
}

async fn delete(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let n = name.clone();
    streamed(h, p, "machine.delete", name, move |h, pr| async move {
        if q.preserve_storage {
            let kept = h.machines.delete_preserving(&n, &*pr).await?;
            return Ok(serde_json::json!({"deleted": n, "kept_volume": kept}));
        }
        h.machines.delete(&n, &*pr).await?;
        Ok(serde_json::json!({"deleted": n}))
    })
}

async fn expose(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<ExposeRequest>,
) -> Result<Json<MachineInfo>, Error> {
    let r = async { h.machines.expose(&name, &convert::specs(&req.ports)?).await }.await;
    let target = format!("{name} {}", req.ports.join(" "));
    let v = audited(&h, &p, "machine.expose", &target, r)?;
    Ok(Json(convert::machine_info(&v)))
}

async fn unexpose(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<UnexposeRequest>,
) -> Result<Json<MachineInfo>, Error> {
    let r = async {
        let hp: HostPortSpec = req
            .port
            .parse()
            .map_err(|e: SpecError| Error::Invalid(e.to_string()))?;
        h.machines.unexpose(&name, &hp).await
    }
    .await;
    let v = audited(&h, &p, "machine.unexpose", &format!("{name} {}", req.port), r)?;
    Ok(Json(convert::machine_info(&v)))
}

/// Chunks of exec output that may wait for a slow client before the command is held back.
const EXEC_EVENTS_QUEUE: usize = 16;
/// How often a quiet exec stream sends a blank line.
const EXEC_HEARTBEAT: Duration = Duration::from_secs(1);

async fn exec(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<ExecRequest>,
) -> Response {
    // Bounded end to end: a client that stops reading holds the command's output back; a
    // client that goes away drops the stream, which kills the command.
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecEvent>(EXEC_EVENTS_QUEUE);
    let (otx, mut orx) = sistemo_vmm::output_queue();
    let fwd = tx.clone();
    let pump = tokio::spawn(async move {
        while let Some(c) = orx.recv().await {
            let ev = match c {
                OutputChunk::Stdout(b) => ExecEvent::output(b, false),
                OutputChunk::Stderr(b) => ExecEvent::output(b, true),
            };
            if fwd.send(ev).await.is_err() {
                break;
            }
        }
    });
    let op = h.begin();
    tokio::spawn(async move {
        let _op = op;
        let timeout = Duration::from_secs(req.timeout_s.unwrap_or(600));
        // A client that goes away closes the event stream: the command is dropped, which
        // kills it, even when it writes nothing.
        let r = tokio::select! {
            r = h.machines.exec(&name, &req.cmd, timeout, otx) => r,
            () = tx.closed() => Err(crate::error::Error::Conflict("the client went away; the command was killed".into())),
        };
        let result = match &r {
            Ok(code) => format!("exit {code}"),
            Err(e) => chain(e),
        };
        h.record(&p.0, "machine.exec", &format!("{name} {}", req.cmd), &result);
        // All output goes out before the last event.
        let _ = pump.await;
        let _ = tx
            .send(match r {
                Ok(code) => ExecEvent::Exit(code),
                Err(e) => ExecEvent::Error(e.body()),
            })
            .await;
    });
    // A blank line every second while the command is quiet: writing is how a gone client is
    // noticed (clients skip blank lines).
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let line = match tokio::time::timeout(EXEC_HEARTBEAT, rx.recv()).await {
            Ok(Some(ev)) => serde_json::to_string(&ev).unwrap_or_default() + "\n",
            Ok(None) => return None,
            Err(_) => "\n".to_string(),
        };
        Some((Ok::<_, std::io::Error>(line), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("valid response")
}

async fn shell(State(h): State<AppState>, Path(name): Path<String>) -> Result<Json<ShellResponse>, Error> {
    Ok(Json(ShellResponse {
        argv: h.machines.shell(&name)?,
    }))
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    offset: Option<u64>,
}

async fn logs(
    State(h): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<([(&'static str, String); 1], Vec<u8>), Error> {
    // Without an offset: the tail. The header says where the bytes start in the stream.
    let (at, bytes) = h.machines.logs(&name, q.offset)?;
    Ok(([(crate::api::LOG_OFFSET_HEADER, at.to_string())], bytes))
}

async fn networks(State(h): State<AppState>) -> Result<Json<Vec<NetworkInfo>>, Error> {
    Ok(Json(
        h.networks.list()?.iter().map(convert::network_info).collect(),
    ))
}

async fn network_create(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<NetworkCreateRequest>,
) -> Result<Json<NetworkInfo>, Error> {
    let r = h.networks.create(&req.name, req.subnet.as_deref()).await;
    let n = audited(&h, &p, "network.create", &req.name, r)?;
    Ok(Json(convert::network_info(&(n, 0))))
}

async fn network_delete(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let r = h.networks.delete(&name).await;
    audited(&h, &p, "network.delete", &name, r)?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn ports(State(h): State<AppState>) -> Result<Json<Vec<PortRow>>, Error> {
    Ok(Json(h.machines.ports()?.iter().map(convert::port_row).collect()))
}

/// Most audit entries one `history` call returns.
const MAX_HISTORY_PAGE: u32 = 10_000;

#[derive(serde::Deserialize)]
struct HistoryQuery {
    limit: Option<u32>,
    offset: Option<u32>,
    action: Option<String>,
    target: Option<String>,
}

async fn history(
    State(h): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Vec<HistoryEntry>>, Error> {
    let rows = h.history(
        q.limit.unwrap_or(50).min(MAX_HISTORY_PAGE),
        q.offset.unwrap_or(0),
        q.action.as_deref(),
        q.target.as_deref(),
    )?;
    Ok(Json(rows.into_iter().map(convert::history_entry).collect()))
}

async fn info(State(h): State<AppState>) -> Result<Json<InfoResponse>, Error> {
    Ok(Json(convert::info(h.facts().await?, h.config())))
}

async fn ssh_key(State(h): State<AppState>) -> Result<String, Error> {
    h.ssh_public_key()
}

async fn firewall(State(h): State<AppState>) -> Result<String, Error> {
    h.firewall_render()
}

async fn images(State(h): State<AppState>) -> Result<Json<Vec<ImageRow>>, Error> {
    let templates = h.machines.templates();
    Ok(Json(
        h.images
            .list()?
            .iter()
            .map(|i| ImageRow {
                templates: templates
                    .iter()
                    .filter(|t| t.image_sha256 == i.0.sha256)
                    .map(convert::template_row)
                    .collect(),
                ..convert::image_row(i)
            })
            .collect(),
    ))
}

async fn image_build(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<ImageBuildRequest>,
) -> Response {
    let target = req.name.clone().unwrap_or_else(|| req.base.clone());
    streamed(h, p, "image.build", target, move |h, pr| async move {
        let i = h
            .images
            .build(&req.base, req.name.as_deref(), &req.include, &*pr)
            .await?;
        Ok(convert::image_row(&(i, Vec::new())))
    })
}

async fn image_remove(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(tag): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let sha = h.images.lookup(&tag).map(|i| i.sha256);
    audited(&h, &p, "image.rm", &tag, h.images.remove(&tag))?;
    // Its templates go with the image, once no tag names it any more.
    let mut templates = Vec::new();
    if let Some(sha) = sha
        && !h.images.list()?.iter().any(|(i, _)| i.sha256 == sha)
    {
        templates = h.machines.remove_templates(|t| t.image_sha256 != sha)?;
    }
    Ok(Json(serde_json::json!({
        "deleted": tag,
        "templates_removed": templates.iter().map(|t| &t.key).collect::<Vec<_>>(),
    })))
}

async fn warm(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<ImageWarmRequest>,
) -> Response {
    let target = req.image.clone();
    streamed(h, p, "image.warm", target, move |h, pr| async move {
        let memory = req
            .memory
            .as_deref()
            .map(|m| crate::domain::ByteSize::parse("memory", m))
            .transpose()?;
        let t = h.machines.warm(&req.image, req.vcpus, memory, &*pr).await?;
        Ok(convert::template_row(&t))
    })
}

/// The router.
fn router(m: AppState) -> Router {
    let limit = ratelimit::RateLimit::new(m.config().rate_limit_rps, m.config().rate_limit_burst);
    Router::new()
        .route("/v1/machines", get(list).post(deploy))
        .route("/v1/machines/{name}", get(status).delete(delete))
        .route("/v1/machines/{name}/expose", post(expose))
        .route("/v1/machines/{name}/unexpose", post(unexpose))
        .route("/v1/machines/{name}/exec", post(exec))
        .route("/v1/machines/{name}/shell", get(shell))
        .route("/v1/machines/{name}/session", post(session::session))
        .route("/v1/machines/{name}/terminal", get(terminal::terminal))
        .route("/v1/machines/{name}/logs", get(logs))
        .route("/v1/machines/{name}/start", post(start))
        .route("/v1/machines/{name}/stop", post(stop))
        .route("/v1/machines/{name}/restart", post(restart))
        .route("/v1/networks", get(networks).post(network_create))
        .route("/v1/networks/{name}", axum::routing::delete(network_delete))
        .route("/v1/ports", get(ports))
        .route("/v1/history", get(history))
        .route("/v1/info", get(info))
        .route("/v1/ssh-key", get(ssh_key))
        .route("/v1/firewall", get(firewall))
        .route("/v1/images", get(images))
        .route("/v1/images/build", post(image_build))
        .route("/v1/images/{tag}", axum::routing::delete(image_remove))
        .route("/v1/images/pull", post(oci::pull))
        .route("/v1/images/import", post(oci::import))
        .route("/v1/images/prune", post(oci::prune))
        .route("/v1/images/warm", post(warm))
        .route("/v1/registries/login", post(oci::login))
        .merge(volumes::routes())
        .merge(upload::routes())
        .merge(accounts::routes())
        .merge(web::routes())
        .layer(axum::middleware::from_fn_with_state(limit, ratelimit::limit))
        .with_state(m)
}

/// Probes for load balancers and supervisors, without a token (as Sistemo's): `/health`
/// answers while the daemon serves; `/ready` too, since it serves only once started up.
fn probes() -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(|| async { "ready\n" }))
}

/// Serve the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    m: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(m)
            .layer(axum::middleware::from_fn(auth::local))
            .merge(probes())
            .into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
