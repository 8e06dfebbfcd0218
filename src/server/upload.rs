//! Image files uploaded through the API, so a remote CLI never names a path on the daemon's
//! host: streamed into a private scratch file (capped by `max_image_size` and `min_disk_free`,
//! removed whatever happens), checked before use, then an ext4 image is stored in the image
//! store under its sha256 and an OCI archive is imported (and its upload removed).

use super::{AppState, Peer, audited, convert, streamed};
use crate::api::UploadInfo;
use crate::domain::ByteSize;
use crate::error::Error;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::post;
use sha2::{Digest, Sha256};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt as _;

/// Scratch folders of uploads in the image store are named `.upload-PID-UUID`.
const SCRATCH: &str = ".upload-";

#[derive(serde::Deserialize)]
pub(super) struct UploadQuery {
    /// The sha256 the caller computed: the upload is refused when the bytes differ.
    sha256: Option<String>,
    /// Tag of an imported archive (default: the names the archive carries).
    name: Option<String>,
    /// Only check that an upload of `size` bytes would be admitted (the caller's role, the size
    /// cap, the free space), with an empty body: a daemon that refuses an upload before
    /// reading it closes the connection under a client still sending.
    #[serde(default)]
    check: bool,
    /// The size a `check` asks about.
    size: Option<u64>,
}

/// A received upload: its file in a private scratch folder, removed when dropped (a client that
/// goes away mid-upload drops the request, and with it this).
struct Upload {
    dir: PathBuf,
    file: PathBuf,
    sha256: String,
    size: u64,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The scratch folder while the body is received (removed when dropped).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Remove scratch folders an earlier daemon (another pid) left behind.
fn sweep(images: &Path) {
    let ours = format!("{SCRATCH}{}-", std::process::id());
    let Ok(rd) = std::fs::read_dir(images) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(SCRATCH) && !n.starts_with(&ours) {
            tracing::warn!(dir = %e.path().display(), "removing an upload a crash left half-made");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn over(h: &AppState, n: u64) -> Error {
    Error::Invalid(format!(
        "the upload ({}) is over the daemon's image size limit (allowed: up to {}, the max_image_size setting)",
        ByteSize::bytes(n),
        h.config().max_image_size
    ))
}

/// Whether an upload of `n` bytes is admitted: within `max_image_size`, and leaving
/// `min_disk_free` free in the image store once written.
fn admit(h: &AppState, n: u64) -> Result<(), Error> {
    let cfg = h.config();
    if n > cfg.max_image_size.as_bytes() {
        return Err(over(h, n));
    }
    let images = cfg.data_dir.join("images");
    std::fs::create_dir_all(&images).map_err(io(format!("creating {}", images.display())))?;
    let free = nix::sys::statvfs::statvfs(&images)
        .map(|s| s.blocks_available() * s.fragment_size())
        .map_err(|e| io(format!("reading the free space of {}", images.display()))(e.into()))?;
    let keep = cfg.min_disk_free.as_bytes();
    if free < n.saturating_add(keep) {
        return Err(Error::NoSpace(format!(
            "the upload ({}) does not fit: {} free in {}, and {} must stay free (min_disk_free)",
            ByteSize::bytes(n),
            ByteSize::mib(free >> 20),
            images.display(),
            cfg.min_disk_free
        )));
    }
    Ok(())
}

/// Answer a `check`: whether an upload of the given size would be admitted.
fn check(h: &AppState, q: &UploadQuery) -> Result<Json<UploadInfo>, Error> {
    let n = q
        .size
        .ok_or_else(|| Error::Invalid("check needs size (allowed: check=true&size=BYTES)".into()))?;
    admit(h, n)?;
    Ok(Json(UploadInfo {
        sha256: q.sha256.clone().unwrap_or_default(),
        size_bytes: n,
    }))
}

/// Receive the body into a scratch file of the image store, within the size cap and the
/// free-space reserve; the announced sha256, when given, must match.
async fn receive(h: &AppState, headers: &HeaderMap, body: Body, want: Option<&str>) -> Result<Upload, Error> {
    let max = h.config().max_image_size.as_bytes();
    if let Some(w) = want
        && !sistemo_vmm::image::is_sha256(w)
    {
        return Err(Error::Invalid(format!(
            "sha256 {w:?} is not a digest (allowed: 64 hex characters)"
        )));
    }
    let images = h.config().data_dir.join("images");
    std::fs::create_dir_all(&images).map_err(io(format!("creating {}", images.display())))?;
    sweep(&images);
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced {
        admit(h, n)?;
    }
    let scratch = Scratch(images.join(format!(
        "{SCRATCH}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )));
    std::fs::create_dir(&scratch.0).map_err(io(format!("creating {}", scratch.0.display())))?;
    let file = scratch.0.join("upload");
    let mut out = tokio::fs::File::create(&file)
        .await
        .map_err(io(format!("creating {}", file.display())))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let over = |n: u64| over(h, n);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| {
            Error::Invalid(format!(
                "the upload was cut off after {size} bytes ({e}); nothing was stored"
            ))
        })?;
        size += chunk.len() as u64;
        if size > max {
            return Err(over(size));
        }
        hash.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(io(format!("writing {}", file.display())))?;
    }
    out.sync_all()
        .await
        .map_err(io(format!("writing {}", file.display())))?;
    if let Some(n) = announced
        && n != size
    {
        return Err(Error::Invalid(format!(
            "the upload ended after {size} of {n} bytes; nothing was stored"
        )));
    }
    let sha256: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(w) = want
        && !w.eq_ignore_ascii_case(&sha256)
    {
        return Err(Error::Invalid(format!(
            "the upload's sha256 is {sha256}, not the announced {w}; nothing was stored"
        )));
    }
    let dir = scratch.0.clone();
    std::mem::forget(scratch);
    Ok(Upload {
        dir,
        file,
        sha256,
        size,
    })
}

/// Store an uploaded ext4 image under its sha256 (the image store's own naming, so `image
/// list` shows it and a deploy names it by its digest).
fn store_ext4(h: &AppState, up: &Upload) -> Result<UploadInfo, Error> {
    sistemo_vmm::image::check_ext4(&up.file, "the upload").map_err(|_| {
        Error::Invalid(
            "the uploaded file is not an ext4 image (no superblock magic 0xEF53 at byte 1080; allowed: a raw ext2/3/4 file system image); nothing was stored".into(),
        )
    })?;
    let dest = h
        .config()
        .data_dir
        .join("images")
        .join(format!("{}.ext4", up.sha256));
    if !dest.exists() {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&up.file, std::fs::Permissions::from_mode(0o644))
            .map_err(io(format!("setting the mode of {}", up.file.display())))?;
        std::fs::rename(&up.file, &dest).map_err(io(format!("storing {}", dest.display())))?;
    }
    Ok(UploadInfo {
        sha256: up.sha256.clone(),
        size_bytes: up.size,
    })
}

/// Whether `file` starts with a tar header (`ustar` magic, as `docker save` and OCI layouts
/// written by tar have).
fn is_tar(file: &Path) -> bool {
    let mut head = [0u8; 512];
    std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[257..262] == b"ustar"
}

/// `POST /v1/images/upload[?sha256=HEX]`: an ext4 image in the body, stored by its sha256.
async fn upload_ext4(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UploadInfo>, Error> {
    if q.check {
        return check(&h, &q);
    }
    let r = async {
        let up = receive(&h, &headers, body, q.sha256.as_deref()).await?;
        store_ext4(&h, &up)
    }
    .await;
    let target = match &r {
        Ok(i) => i.sha256.clone(),
        Err(_) => q.sha256.clone().unwrap_or_else(|| "ext4".into()),
    };
    Ok(Json(audited(&h, &p, "image.upload", &target, r)?))
}

/// `POST /v1/images/import/upload[?name=TAG][&sha256=HEX]`: a `docker save` archive or an OCI
/// layout tar in the body, imported with streamed progress; the upload is removed afterwards.
async fn upload_import(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    if q.check {
        return check(&h, &q).map(axum::response::IntoResponse::into_response);
    }
    let target = q.name.clone().unwrap_or_else(|| "upload".into());
    let up = async {
        let up = receive(&h, &headers, body, q.sha256.as_deref()).await?;
        if !is_tar(&up.file) {
            return Err(Error::Invalid(
                "the uploaded file is not a tar archive (allowed: a `docker save` archive or an OCI image layout as tar); nothing was imported".into(),
            ));
        }
        Ok(up)
    }
    .await;
    let up = audited(&h, &p, "image.import", &target, up)?;
    Ok(streamed(h, p, "image.import", target, move |h, pr| async move {
        let path = up
            .file
            .to_str()
            .map(String::from)
            .ok_or_else(|| Error::Invalid(format!("upload path {} is not UTF-8", up.file.display())))?;
        pr(&format!(
            "received {} (sha256 {})",
            ByteSize::bytes(up.size),
            up.sha256
        ));
        let i = h.images.import(&path, q.name.as_deref(), &*pr).await;
        drop(up);
        Ok(convert::image_row(&(i?, Vec::new())))
    }))
}

/// `GET /v1/images/upload/{sha256}`: whether the store holds that ext4 image (so a client
/// need not send it again), whatever the backend.
async fn stored(
    State(h): State<AppState>,
    axum::extract::Path(sha): axum::extract::Path<String>,
) -> Result<Json<UploadInfo>, Error> {
    if !sistemo_vmm::image::is_sha256(&sha) {
        return Err(Error::Invalid(format!(
            "sha256 {sha:?} is not a digest (allowed: 64 hex characters)"
        )));
    }
    let sha = sha.to_ascii_lowercase();
    let p = h.config().data_dir.join("images").join(format!("{sha}.ext4"));
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(Json(UploadInfo {
            sha256: sha,
            size_bytes: m.len(),
        })),
        _ => Err(Error::NotFound(format!("image sha256 {sha} is not stored"))),
    }
}

/// The upload routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/images/upload", post(upload_ext4))
        .route("/v1/images/upload/{sha256}", axum::routing::get(stored))
        .route("/v1/images/import/upload", post(upload_import))
}
