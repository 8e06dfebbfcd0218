//! Importing image archives: `docker save` tars and OCI image layouts (a directory, or a tar
//! of one, as `skopeo copy oci-archive:` or `podman save --format oci-archive` write). A tar is
//! unpacked with the same path rules as a layer; every blob is checked against its digest as it
//! enters the blob cache, then the image is converted like a pulled one.

use super::layer::{ApplyOptions, apply_layer, open_layer};
use super::reference::ImageRef;
use super::{ImageConfig, OciMeta};
use crate::image::{ImageInfo, ImagePolicy, ImageStore};
use crate::{Progress, VmmError};
use serde::Deserialize;
use std::path::{Path, PathBuf};

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// One image of a `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An image found in an archive, its blobs still in the unpacked archive.
struct Found {
    digest: String,
    names: Vec<String>,
    config: Vec<u8>,
    /// (digest, file) of each layer, lowest first.
    layers: Vec<(String, PathBuf)>,
}

fn not_an_image(path: &Path, why: &str) -> VmmError {
    VmmError::ImageRefused {
        reference: path.display().to_string(),
        reason: format!(
            "not an image archive: {why} (allowed: a `docker save` tar, an OCI image layout directory or tar)"
        ),
    }
}

fn read_json<T: for<'a> Deserialize<'a>>(p: &Path, archive: &Path) -> Result<T, VmmError> {
    let b = std::fs::read(p).map_err(|_| not_an_image(archive, &format!("no readable {}", p.display())))?;
    serde_json::from_slice(&b)
        .map_err(|e| not_an_image(archive, &format!("{} is not valid: {e}", p.display())))
}

/// A blob of an OCI layout, its digest checked.
fn oci_blob(dir: &Path, digest: &str, archive: &Path) -> Result<PathBuf, VmmError> {
    let hex = super::blobs::check_digest(digest)?;
    let p = dir.join("blobs/sha256").join(hex);
    if !p.is_file() {
        return Err(not_an_image(archive, &format!("blob {digest} is missing")));
    }
    Ok(p)
}

fn find_oci(dir: &Path, archive: &Path) -> Result<Found, VmmError> {
    let mut index: Index = read_json(&dir.join("index.json"), archive)?;
    let mut names = Vec::new();
    loop {
        let amd64 = |d: &Descriptor| {
            d.platform
                .as_ref()
                .is_none_or(|p| p.architecture == "amd64" && p.os == "linux")
        };
        let Some(pos) = index.manifests.iter().position(amd64) else {
            return Err(VmmError::ImageRefused {
                reference: archive.display().to_string(),
                reason: "its index has no linux/amd64 image (allowed: images for linux/amd64)".into(),
            });
        };
        let d = index.manifests.swap_remove(pos);
        for k in ["io.containerd.image.name", "org.opencontainers.image.ref.name"] {
            if let Some(v) = d.annotations.get(k) {
                names.push(v.clone());
            }
        }
        let p = oci_blob(dir, &d.digest, archive)?;
        let bytes = std::fs::read(&p).map_err(VmmError::io(format!("reading {}", p.display())))?;
        check_bytes(&bytes, &d.digest)?;
        if INDEX_TYPES.contains(&d.media_type.as_str()) {
            index = serde_json::from_slice(&bytes)
                .map_err(|e| not_an_image(archive, &format!("index {} is not valid: {e}", d.digest)))?;
            continue;
        }
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| not_an_image(archive, &format!("manifest {} is not valid: {e}", d.digest)))?;
        let cp = oci_blob(dir, &m.config.digest, archive)?;
        let config = std::fs::read(&cp).map_err(VmmError::io(format!("reading {}", cp.display())))?;
        check_bytes(&config, &m.config.digest)?;
        let layers = m
            .layers
            .iter()
            .map(|l| Ok((l.digest.clone(), oci_blob(dir, &l.digest, archive)?)))
            .collect::<Result<_, VmmError>>()?;
        return Ok(Found {
            digest: d.digest,
            names,
            config,
            layers,
        });
    }
}

fn find_docker(dir: &Path, archive: &Path) -> Result<Found, VmmError> {
    let entries: Vec<DockerEntry> = read_json(&dir.join("manifest.json"), archive)?;
    let e = entries
        .into_iter()
        .next()
        .ok_or_else(|| not_an_image(archive, "manifest.json lists no image"))?;
    let inside = |rel: &str| -> Result<PathBuf, VmmError> {
        if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
            return Err(not_an_image(archive, &format!("manifest.json names {rel:?}")));
        }
        let p = dir.join(rel);
        if !p.is_file() {
            return Err(not_an_image(archive, &format!("{rel} is missing")));
        }
        Ok(p)
    };
    let config = std::fs::read(inside(&e.config)?).map_err(VmmError::io("reading the image config"))?;
    let digest = format!("sha256:{}", hex(&config));
    let layers = e
        .layers
        .iter()
        .map(|l| {
            let p = inside(l)?;
            Ok((format!("sha256:{}", super::blobs::sha256_file(&p)?), p))
        })
        .collect::<Result<_, VmmError>>()?;
    Ok(Found {
        digest,
        names: e.repo_tags.unwrap_or_default(),
        config,
        layers,
    })
}

fn hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn check_bytes(b: &[u8], digest: &str) -> Result<(), VmmError> {
    let got = format!("sha256:{}", hex(b));
    if got != digest {
        return Err(VmmError::ImageRefused {
            reference: format!("blob {digest}"),
            reason: format!("its content has digest {got} (corrupt or tampered)"),
        });
    }
    Ok(())
}

/// Import the archive at `path` under `tags` (default: the names it carries, normalized).
pub async fn import(
    store: &ImageStore,
    path: &Path,
    tags: &[String],
    policy: &ImagePolicy,
    progress: Progress<'_>,
) -> Result<ImageInfo, VmmError> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VmmError::ImageNotFound {
            reference: path.display().to_string(),
        },
        _ => VmmError::io(format!("reading {}", path.display()))(e),
    })?;
    let scratch = store.scratch("import")?;
    let res = async {
        let dir = if md.is_dir() {
            path.to_path_buf()
        } else if md.is_file() {
            progress(&format!("unpacking {}", path.display()));
            let dir = scratch.join("archive");
            std::fs::create_dir(&dir).map_err(VmmError::io("creating a scratch folder"))?;
            let (d, p, max) = (dir.clone(), path.to_path_buf(), policy.max_size);
            tokio::task::spawn_blocking(move || {
                let opts = ApplyOptions {
                    privileged: false,
                    max_bytes: max,
                };
                apply_layer(&d, open_layer(&p)?, &p.display().to_string(), opts)
            })
            .await
            .map_err(|e| VmmError::io("unpacking")(std::io::Error::other(e)))?
            .map_err(|e| match e {
                VmmError::ImageRefused { reason, .. } => not_an_image(path, &reason),
                e => not_an_image(path, &e.to_string()),
            })?;
            dir
        } else {
            return Err(not_an_image(path, "neither a file nor a directory"));
        };
        let found = if dir.join("index.json").is_file() {
            find_oci(&dir, path)?
        } else if dir.join("manifest.json").is_file() {
            find_docker(&dir, path)?
        } else {
            return Err(not_an_image(path, "it has neither index.json nor manifest.json"));
        };
        let mut names: Vec<String> = if tags.is_empty() {
            found
                .names
                .iter()
                .filter_map(|n| ImageRef::parse(n).ok().map(|r| r.normalized()))
                .collect()
        } else {
            tags.to_vec()
        };
        names.dedup();
        if names.is_empty() {
            return Err(VmmError::Invalid {
                what: "import without a name",
                value: path.display().to_string(),
                allowed: "an archive that names its image, or --name TAG",
            });
        }
        let blobs = store.blobs();
        let _cache = blobs.hold_cache().await?;
        let _converting = blobs.hold_digest(&found.digest).await?;
        if let Some(i) = store.oci_image(&found.digest) {
            progress(&format!(
                "{} is {}, already converted",
                path.display(),
                found.digest
            ));
            return store.tag(&i.sha256, &names);
        }
        let (cfg, created) = ImageConfig::parse(&found.config).map_err(|reason| VmmError::ImageRefused {
            reference: path.display().to_string(),
            reason,
        })?;
        let digests: Vec<String> = found.layers.iter().map(|(d, _)| d.clone()).collect();
        // Held until the image is stored; dropped on an error, taking back the blobs it added.
        let mut held = blobs.hold_layers(&digests).await?;
        let mut layers = Vec::new();
        for (i, (digest, file)) in found.layers.iter().enumerate() {
            progress(&format!("layer {}/{} {digest}", i + 1, found.layers.len()));
            let f = std::fs::File::open(file).map_err(VmmError::io(format!("reading {}", file.display())))?;
            layers.push((digest.clone(), held.insert(f, digest)?));
        }
        let meta = OciMeta {
            reference: names[0].clone(),
            digest: found.digest,
            created,
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
            config: cfg,
        };
        let info = super::convert::convert(store, &layers, meta, &names, policy.max_size, progress).await?;
        held.keep();
        Ok(info)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Write `data` as a blob of layout `dir`; its digest.
    fn blob(dir: &Path, data: &[u8]) -> String {
        let h = hex(data);
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("blobs/sha256").join(&h), data).unwrap();
        format!("sha256:{h}")
    }

    /// An image manifest for `arch` with one gzip layer holding `/hello`; its descriptor.
    fn image(dir: &Path, arch: &str, payload: &str) -> serde_json::Value {
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("hello").unwrap();
        let content = format!("{arch}{payload}");
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append(&h, content.as_bytes()).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t.into_inner().unwrap()).unwrap();
        let layer = blob(dir, &gz.finish().unwrap());
        let config = blob(
            dir,
            format!(r#"{{"architecture":"{arch}","os":"linux","config":{{"Cmd":["/hello"]}}}}"#).as_bytes(),
        );
        let m = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 1}]});
        let d = blob(dir, m.to_string().as_bytes());
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 1,
            "platform": {"architecture": arch, "os": "linux"}})
    }

    /// A layout whose index.json points at a nested multi-arch index of `arches`.
    fn layout(dir: &Path, arches: &[&str], payload: &str) {
        let manifests: Vec<serde_json::Value> = arches.iter().map(|a| image(dir, a, payload)).collect();
        let nested = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        let d = blob(dir, nested.to_string().as_bytes());
        let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": 1,
            "annotations": {"org.opencontainers.image.ref.name": "multi:1"}}]});
        std::fs::write(dir.join("index.json"), top.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    #[tokio::test]
    async fn a_multi_arch_index_resolves_to_amd64_and_one_without_it_is_refused() {
        let d = std::env::temp_dir().join(format!("sistemo-import-{}", uuid::Uuid::new_v4().simple()));
        let store = ImageStore::new(&d.join("data"));
        let multi = d.join("multi");
        layout(&multi, &["arm64", "amd64"], "");
        let i = import(&store, &multi, &[], &ImagePolicy::default(), &|_| {})
            .await
            .unwrap();
        assert_eq!(i.tags, ["docker.io/library/multi:1"]);
        let meta = i.oci.unwrap();
        assert_eq!(meta.config.cmd, ["/hello"]);
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /hello"])
            .arg(&i.path)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "amd64");
        let arm = d.join("arm");
        layout(&arm, &["arm64"], "");
        let e = import(&store, &arm, &[], &ImagePolicy::default(), &|_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no linux/amd64"), "{e}");
        // A blob whose bytes do not match its digest.
        let bad = d.join("bad");
        layout(&bad, &["amd64"], " tampered");
        for e in std::fs::read_dir(bad.join("blobs/sha256")).unwrap().flatten() {
            let b = std::fs::read(e.path()).unwrap();
            if b.starts_with(&[0x1f, 0x8b]) {
                let mut b = b;
                let n = b.len() - 10;
                b[n] ^= 0xff;
                std::fs::write(e.path(), b).unwrap();
            }
        }
        let e = import(&store, &bad, &["bad".into()], &ImagePolicy::default(), &|_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupt"), "{e}");
        assert_eq!(store.list().len(), 1, "nothing stored by failed imports");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_failed_import_takes_back_the_layer_blobs_it_added() {
        let d = std::env::temp_dir().join(format!("sistemo-import-{}", uuid::Uuid::new_v4().simple()));
        let store = ImageStore::new(&d.join("data"));
        // One layer already cached (by a stored image), two new, the last not a tar.
        let good = d.join("good");
        layout(&good, &["amd64"], "");
        import(&store, &good, &["good".into()], &ImagePolicy::default(), &|_| {})
            .await
            .unwrap();
        let before = store.blobs().list();
        assert_eq!(before.len(), 1);
        let dir = d.join("three");
        let shared = blob(
            &dir,
            &std::fs::read(store.blobs().path(&before[0]).unwrap()).unwrap(),
        );
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("second").unwrap();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        t.append(&h, &b"2\n"[..]).unwrap();
        let second = blob(&dir, &t.into_inner().unwrap());
        let broken = blob(&dir, &[0xab; 4096]);
        let config = blob(&dir, br#"{"architecture":"amd64","os":"linux"}"#);
        let layer = |d: &str| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 1});
        let m = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
            "layers": [layer(&shared), layer(&second), layer(&broken)]});
        let md = blob(&dir, m.to_string().as_bytes());
        let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": 1,
            "annotations": {"org.opencontainers.image.ref.name": "three:1"}}]});
        std::fs::write(dir.join("index.json"), top.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let e = import(&store, &dir, &[], &ImagePolicy::default(), &|_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&broken), "{e}");
        assert_eq!(
            store.blobs().list(),
            before,
            "the new layers are taken back, the shared one stays"
        );
        assert_eq!(store.list().len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
