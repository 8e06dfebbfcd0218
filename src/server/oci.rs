//! Routes of OCI images: pull and import (streamed, with progress per layer), prune of unused
//! layer blobs, and registry credentials.

use super::{AppState, Peer, audited, convert, streamed};
use crate::api::*;
use crate::error::Error;
use axum::Json;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::response::Response;

pub(super) async fn pull(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<ImagePullRequest>,
) -> Response {
    let target = req.reference.clone();
    streamed(h, p, "image.pull", target, move |h, pr| async move {
        let login = req
            .credentials
            .as_ref()
            .map(|c| (c.username.as_str(), c.password.as_str()));
        let i = h
            .images
            .pull(&req.reference, req.name.as_deref(), login, &*pr)
            .await?;
        Ok(convert::image_row(&(i, Vec::new())))
    })
}

pub(super) async fn import(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<ImageImportRequest>,
) -> Response {
    let target = req.path.clone();
    // The daemon reads the file as root: only callers on the root-only Unix socket may name one.
    let local = p.0.uid.is_some();
    streamed(h, p, "image.import", target, move |h, pr| async move {
        if !local {
            return Err(Error::Invalid(
                "image import reads a file on the daemon's host: use the Unix socket (allowed: local callers)".into(),
            ));
        }
        let i = h.images.import(&req.path, req.name.as_deref(), &*pr).await?;
        Ok(convert::image_row(&(i, Vec::new())))
    })
}

pub(super) async fn prune(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
) -> Result<Json<serde_json::Value>, Error> {
    let freed = audited(&h, &p, "image.prune", "blobs", h.images.prune())?;
    let templates = audited(&h, &p, "image.prune", "templates", h.machines.prune_templates())?;
    Ok(Json(serde_json::json!({
        "freed_bytes": freed,
        "templates_removed": templates.iter().map(|t| &t.key).collect::<Vec<_>>(),
    })))
}

pub(super) async fn login(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<RegistryLoginRequest>,
) -> Result<Json<serde_json::Value>, Error> {
    audited(
        &h,
        &p,
        "registry.login",
        &req.registry,
        h.images.login(&req.registry, &req.username, &req.password),
    )?;
    Ok(Json(serde_json::json!({ "registry": req.registry })))
}
