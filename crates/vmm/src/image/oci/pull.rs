//! Pulling from an OCI registry with `oci-client`: the manifest (an index resolved to
//! linux/amd64), the config, and each layer into the blob cache (verified, shared, progress per
//! layer), then the conversion. Credentials from `registry login` live in
//! `data_dir/registries.json`, root-only.

use super::blobs::Blobs;
use super::reference::ImageRef;
use super::{ImageConfig, OciMeta};
use crate::image::{ImageInfo, ImagePolicy, ImageStore, write_atomic};
use crate::{Progress, VmmError};
use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::AsyncWrite;

/// Layer media types sistemo applies (compression is recognised from the bytes).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// Stored registry credentials (`registry login`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Credentials {
    /// Registry (as written in references, e.g. `127.0.0.1:5000`) → (user, password).
    auths: BTreeMap<String, (String, String)>,
}

impl Credentials {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("registries.json")
    }

    /// The credentials in `data_dir` (none when the file is missing).
    pub fn load(data_dir: &Path) -> Credentials {
        std::fs::read(Self::path(data_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Remember `user`/`password` for `registry` (file mode 0600).
    pub fn store(data_dir: &Path, registry: &str, user: &str, password: &str) -> Result<(), VmmError> {
        let mut c = Self::load(data_dir);
        c.auths
            .insert(registry.to_string(), (user.to_string(), password.to_string()));
        std::fs::create_dir_all(data_dir).map_err(VmmError::io("creating the data dir"))?;
        write_atomic(
            &Self::path(data_dir),
            &serde_json::to_vec_pretty(&c).expect("json"),
            0o600,
        )
    }

    /// Forget `registry`'s credentials; false when there were none.
    pub fn remove(data_dir: &Path, registry: &str) -> Result<bool, VmmError> {
        let mut c = Self::load(data_dir);
        let had = c.auths.remove(registry).is_some();
        if had {
            write_atomic(
                &Self::path(data_dir),
                &serde_json::to_vec_pretty(&c).expect("json"),
                0o600,
            )?;
        }
        Ok(had)
    }

    fn auth_for(&self, registry: &str) -> RegistryAuth {
        match self.auths.get(registry) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// The platforms of the image index a pull met (`os/arch[/variant]` each), if it met one: set
/// by the client's platform resolver, read when no linux/amd64 entry was found.
type SeenPlatforms = std::sync::Arc<std::sync::Mutex<Option<Vec<String>>>>;

/// A client for `r`'s registry: https, or plain http when [`ImageRef::plain_http`] allows it.
/// Indexes resolve to their linux/amd64 image; the platforms of an index go to the returned
/// [`SeenPlatforms`].
fn client(r: &ImageRef, policy: &ImagePolicy) -> (Client, SeenPlatforms) {
    let protocol = if r.plain_http(&policy.insecure_registries) {
        ClientProtocol::HttpsExcept(vec![r.registry_host().to_string()])
    } else {
        ClientProtocol::Https
    };
    // Registry TLS is rustls (no OpenSSL in the daemon: 1.7 MB of its memory) with the
    // process's crypto provider, ring as for the API's TLS; one installed before is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seen = SeenPlatforms::default();
    let record = seen.clone();
    let resolver = move |entries: &[oci_client::manifest::ImageIndexEntry]| {
        let platforms = entries
            .iter()
            .map(|e| match &e.platform {
                Some(p) => match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                },
                None => "no platform".to_string(),
            })
            .collect();
        *record.lock().unwrap_or_else(|e| e.into_inner()) = Some(platforms);
        linux_amd64_resolver(entries)
    };
    let c = Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(resolver)),
        connect_timeout: Some(policy.connect_timeout),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    });
    (c, seen)
}

/// The error of a manifest pull: an index without a linux/amd64 image (or whose linux/amd64
/// entry is another index) is refused as such, not reported as a missing image.
fn manifest_error(
    r: &ImageRef,
    insecure: &[String],
    seen: &SeenPlatforms,
    e: OciDistributionError,
) -> VmmError {
    let platforms = seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    match (&e, platforms) {
        (OciDistributionError::ImageManifestNotFoundError(why), Some(mut p)) => {
            p.sort();
            p.dedup();
            let reason = if why.contains("instead") {
                "its linux/amd64 entry is another index (allowed: an index of image manifests)".to_string()
            } else {
                format!(
                    "its index has no linux/amd64 image, only {} (allowed: images for linux/amd64)",
                    if p.is_empty() {
                        "no entries".to_string()
                    } else {
                        p.join(", ")
                    }
                )
            };
            VmmError::ImageRefused {
                reference: r.normalized(),
                reason,
            }
        }
        _ => registry_error(r, insecure, e),
    }
}

/// A registry error as one line, telling a missing image from an unreachable registry.
fn registry_error(r: &ImageRef, insecure: &[String], e: OciDistributionError) -> VmmError {
    let text = chain(&e);
    let registry = r.registry().to_string();
    match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => VmmError::NotInRegistry {
            reference: r.normalized(),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                )
            }) =>
        {
            VmmError::NotInRegistry {
                reference: r.normalized(),
            }
        }
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            VmmError::Registry {
                registry,
                reason: format!(
                    "authentication failed (check `sistemo registry login {}`): {text}",
                    r.registry()
                ),
            }
        }
        _ if !r.plain_http(insecure) => VmmError::Registry {
            registry,
            reason: format!(
                "{text} (over https: plain http is allowed for loopback registries and those in insecure_registries)"
            ),
        },
        _ => VmmError::Registry {
            registry,
            reason: text,
        },
    }
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// An `AsyncWrite` into a file that reports progress every quarter of `total`.
struct Counting<'a> {
    inner: tokio::fs::File,
    done: u64,
    total: u64,
    next: u64,
    label: String,
    progress: Progress<'a>,
}

impl AsyncWrite for Counting<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.done += n as u64;
        if self.total > 0 && self.done >= self.next && self.done < self.total {
            let pct = self.done * 100 / self.total;
            (self.progress)(&format!("{}: {pct}%", self.label));
            self.next += self.total / 4;
        }
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..12.min(hex.len())]
}

/// Pull `r` and store it under `tags`, with `login` (user, password) for this pull only, else
/// the stored credentials of `registry login`, else anonymously. A manifest digest the store
/// already converted is only tagged; layers already in the blob cache are not downloaded again.
/// Nothing partial stays in the store on failure: no image, no temporary file, and none of the
/// layer blobs this pull downloaded.
pub async fn pull(
    store: &ImageStore,
    r: &ImageRef,
    policy: &ImagePolicy,
    tags: &[String],
    login: Option<(&str, &str)>,
    progress: Progress<'_>,
) -> Result<ImageInfo, VmmError> {
    let started = Instant::now();
    if !r.plain_http(&policy.insecure_registries) {
        tracing::debug!(registry = r.registry(), "pulling over https");
    }
    let (c, seen) = client(r, policy);
    let auth = match login {
        Some((u, p)) => RegistryAuth::Basic(u.to_string(), p.to_string()),
        None => Credentials::load(store.data_dir()).auth_for(r.registry()),
    };
    let reference: &Reference = &r.0;
    progress(&format!("resolving {r}"));
    let (manifest, digest, config) = c
        .pull_manifest_and_config(reference, &auth)
        .await
        .map_err(|e| manifest_error(r, &policy.insecure_registries, &seen, e))?;
    if let Some(pinned) = r.digest()
        && pinned != digest
    {
        // A digest reference names an index or the manifest itself: the registry checked the
        // index; a manifest pinned directly must be the one received.
        tracing::debug!(pinned, %digest, "digest reference resolved through an index");
    }
    if let Some(i) = store.oci_image(&digest) {
        progress(&format!("{r} is {digest}, already converted"));
        return store.tag(&i.sha256, tags);
    }
    // Another pull of this digest may be under way: wait for it, then find it converted.
    let blobs: Blobs = store.blobs();
    let _cache = blobs.hold_cache().await?;
    let _converting = blobs.hold_digest(&digest).await?;
    if let Some(i) = store.oci_image(&digest) {
        progress(&format!("{r} is {digest}, already converted"));
        return store.tag(&i.sha256, tags);
    }
    let (cfg, created) = ImageConfig::parse(config.as_bytes()).map_err(|reason| VmmError::ImageRefused {
        reference: r.normalized(),
        reason,
    })?;
    let n = manifest.layers.len();
    for l in &manifest.layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(VmmError::ImageRefused {
                reference: r.normalized(),
                reason: format!(
                    "layer {} has media type {} (allowed: OCI or Docker tar layers, plain, gzip or zstd)",
                    l.digest, l.media_type
                ),
            });
        }
    }
    let digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    // Held until the image is stored; dropped on an error, taking back the blobs it added.
    let mut held = blobs.hold_layers(&digests).await?;
    let mut layers = Vec::with_capacity(n);
    for (i, l) in manifest.layers.iter().enumerate() {
        let label = format!(
            "layer {}/{n} {} ({} MiB)",
            i + 1,
            short(&l.digest),
            l.size.max(0) >> 20
        );
        let dest = blobs.path(&l.digest)?;
        if blobs.has(&l.digest) {
            progress(&format!("{label}: cached"));
        } else {
            let t = Instant::now();
            let tmp = blobs.temp()?;
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(VmmError::io("creating a blob"))?;
            let total = l.size.max(0) as u64;
            let w = Counting {
                inner: file,
                done: 0,
                total,
                next: total / 4,
                label: label.clone(),
                progress,
            };
            if let Err(e) = c.pull_blob(reference, l, w).await {
                let _ = std::fs::remove_file(&tmp);
                return Err(match e {
                    OciDistributionError::DigestError(d) => VmmError::ImageRefused {
                        reference: format!("blob {}", l.digest),
                        reason: format!("its content does not match its digest (corrupt or tampered): {d}"),
                    },
                    e => registry_error(r, &policy.insecure_registries, e),
                });
            }
            held.commit(&tmp, &l.digest)?;
            progress(&format!(
                "{label}: downloaded in {:.1}s",
                t.elapsed().as_secs_f64()
            ));
        }
        layers.push((l.digest.clone(), dest));
    }
    let meta = OciMeta {
        reference: r.normalized(),
        digest,
        created,
        layers: layers.iter().map(|(d, _)| d.clone()).collect(),
        config: cfg,
    };
    let info = super::convert::convert(store, &layers, meta, tags, policy.max_size, progress).await?;
    held.keep();
    progress(&format!(
        "pulled {r} in {:.1}s: {} MiB",
        started.elapsed().as_secs_f64(),
        info.size >> 20
    ));
    Ok(info)
}
