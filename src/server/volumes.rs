//! The volume routes: `/v1/volumes` (create, list, show, resize, snapshot, clone, delete) and
//! a machine's volumes, snapshot and clone under `/v1/machines/{name}`. Changes are audited;
//! operations that copy data stream their progress.

use super::{AppState, Peer, audited, convert, streamed};
use crate::api::*;
use crate::domain::{ByteSize, VolumeName};
use crate::error::Error;
use crate::machine::AttachSpec;
use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use axum::routing::{delete, get, post};

fn name(what: &str, s: &str) -> Result<VolumeName, Error> {
    s.parse::<VolumeName>()
        .map_err(|e| Error::Invalid(format!("{what}: {}", e.0)))
}

async fn list(State(h): State<AppState>) -> Result<Json<Vec<VolumeInfo>>, Error> {
    Ok(Json(h.volumes.list()?.iter().map(convert::volume_info).collect()))
}

async fn show(State(h): State<AppState>, Path(n): Path<String>) -> Result<Json<VolumeInfo>, Error> {
    Ok(Json(convert::volume_info(&h.volumes.get(&n)?)))
}

async fn create(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<VolumeCreateRequest>,
) -> Response {
    let target = req.name.clone().unwrap_or_default();
    streamed(h, p, "volume.create", target, move |h, pr| async move {
        let size = ByteSize::parse("size", &req.size)?;
        let format = req.format.as_deref().unwrap_or("ext4").parse()?;
        let n = req.name.as_deref().map(|n| name("name", n)).transpose()?;
        Ok(convert::volume_info(
            &h.volumes.create(n, size, format, &*pr).await?,
        ))
    })
}

async fn resize(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
    Json(req): Json<VolumeResizeRequest>,
) -> Response {
    let target = format!("{n} {}", req.size);
    streamed(h, p, "volume.resize", target, move |h, pr| async move {
        let size = ByteSize::parse("size", &req.size)?;
        Ok(convert::volume_info(&h.volumes.resize(&n, size, &*pr).await?))
    })
}

fn required(req: &NameRequest, what: &str) -> Result<VolumeName, Error> {
    let n = req
        .name
        .as_deref()
        .ok_or_else(|| Error::Invalid(format!("{what} needs a name (allowed: a-z, 0-9, '-')")))?;
    name(what, n)
}

async fn snapshot(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
    Json(req): Json<NameRequest>,
) -> Response {
    let target = format!("{n} {}", req.name.clone().unwrap_or_default());
    streamed(h, p, "volume.snapshot", target, move |h, pr| async move {
        let snap = required(&req, "snapshot name")?;
        Ok(convert::volume_info(&h.volumes.snapshot(&n, snap, &*pr).await?))
    })
}

async fn clone(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
    Json(req): Json<NameRequest>,
) -> Response {
    let target = format!("{n} {}", req.name.clone().unwrap_or_default());
    streamed(h, p, "volume.clone", target, move |h, pr| async move {
        let new = required(&req, "volume name")?;
        Ok(convert::volume_info(
            &h.volumes.clone_volume(&n, new, &*pr).await?,
        ))
    })
}

async fn remove(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    audited(&h, &p, "volume.delete", &n, h.volumes.delete(&n).await)?;
    Ok(Json(serde_json::json!({"deleted": n})))
}

async fn machine_volumes(
    State(h): State<AppState>,
    Path(n): Path<String>,
) -> Result<Json<Vec<VolumeAttachmentInfo>>, Error> {
    Ok(Json(
        h.machines
            .volumes_of(&n)?
            .iter()
            .map(convert::attachment_info)
            .collect(),
    ))
}

async fn attach(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
    Json(req): Json<AttachRequest>,
) -> Result<Json<MachineInfo>, Error> {
    let r = async {
        let a = AttachSpec {
            volume: name("volume", &req.volume)?,
            mount: req
                .mount
                .as_deref()
                .map(crate::machine::check_mount)
                .transpose()?,
            readonly: req.readonly,
        };
        h.machines.attach_volume(&n, a).await
    }
    .await;
    let v = audited(&h, &p, "machine.volume.attach", &format!("{n} {}", req.volume), r)?;
    Ok(Json(convert::machine_info(&v)))
}

async fn detach(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path((n, vol)): Path<(String, String)>,
) -> Result<Json<MachineInfo>, Error> {
    let r = h.machines.detach_volume(&n, &vol).await;
    let v = audited(&h, &p, "machine.volume.detach", &format!("{n} {vol}"), r)?;
    Ok(Json(convert::machine_info(&v)))
}

async fn machine_snapshot(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
    Json(req): Json<NameRequest>,
) -> Response {
    let target = format!("{n} {}", req.name.clone().unwrap_or_default());
    streamed(h, p, "machine.snapshot", target, move |h, pr| async move {
        let snap = req
            .name
            .as_deref()
            .map(|s| name("snapshot name", s))
            .transpose()?;
        let vs = h.machines.snapshot(&n, snap, &*pr).await?;
        Ok(vs.iter().map(convert::volume_info).collect::<Vec<_>>())
    })
}

async fn machine_clone(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(n): Path<String>,
    Json(req): Json<NameRequest>,
) -> Response {
    let target = format!("{n} {}", req.name.clone().unwrap_or_default());
    streamed(h, p, "machine.clone", target, move |h, pr| async move {
        let new = req
            .name
            .as_deref()
            .ok_or_else(|| Error::Invalid("the clone needs a name (allowed: a-z, 0-9, '-')".into()))?
            .parse()?;
        Ok(convert::machine_info(
            &h.machines.clone_machine(&n, new, &*pr).await?,
        ))
    })
}

/// The routes, merged into the API's router.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(show).delete(remove))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/volumes/{name}/snapshot", post(snapshot))
        .route("/v1/volumes/{name}/clone", post(clone))
        .route("/v1/machines/{name}/volumes", get(machine_volumes).post(attach))
        .route("/v1/machines/{name}/volumes/{volume}", delete(detach))
        .route("/v1/machines/{name}/snapshot", post(machine_snapshot))
        .route("/v1/machines/{name}/clone", post(machine_clone))
}
