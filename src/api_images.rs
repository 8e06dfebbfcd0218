//! Wire types of the image routes: the store's images and templates, pulls, imports, uploads,
//! registry log-ins and builds. Re-exported by [`crate::api`].

use serde::{Deserialize, Serialize};

/// An image in the local store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRow {
    /// sha256 of the ext4 file.
    pub sha256: String,
    /// Tags naming it.
    pub tags: Vec<String>,
    /// Size in bytes.
    pub size: u64,
    /// Where it came from.
    pub source: String,
    /// Machines deployed from it (by one of its tags or its digest).
    #[serde(default)]
    pub used_by: Vec<String>,
    /// For an OCI image: its reference, manifest digest, creation time and exposed ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciImageRow>,
    /// Its templates (`image warm`): saved machines new deploys of this shape start from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateRow>,
}

/// A template of an image (`image warm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRow {
    /// Its key.
    pub key: String,
    /// The image's sha256.
    pub image_sha256: String,
    /// The reference it was made from.
    pub image: String,
    /// vCPUs of the machines it starts.
    pub vcpus: u32,
    /// Their memory, MiB.
    pub memory_mib: u64,
    /// Their disk size, bytes.
    pub storage_bytes: u64,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// Bytes it takes on the host's disk (RAM file, state, frozen disk).
    pub bytes: u64,
}

/// `POST /v1/images/warm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageWarmRequest {
    /// The image (a tag or an OCI reference).
    pub image: String,
    /// vCPUs (default 1).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory, e.g. `512M` (default 512M).
    #[serde(default)]
    pub memory: Option<String>,
}

/// What `image list` shows of an OCI image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OciImageRow {
    /// Normalized reference, e.g. `docker.io/library/nginx:latest`.
    pub reference: String,
    /// Manifest digest (`sha256:…`).
    pub digest: String,
    /// The image's creation time (RFC 3339), when it says.
    #[serde(default)]
    pub created: Option<String>,
    /// `ExposedPorts` (hints; `--expose` publishes).
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    /// The command it runs (Entrypoint + Cmd), empty when it boots its own init.
    #[serde(default)]
    pub command: Vec<String>,
}

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagePullRequest {
    /// OCI reference: `nginx`, `ghcr.io/o/r:tag`, `REPO@sha256:…`.
    pub reference: String,
    /// An extra tag for it.
    #[serde(default)]
    pub name: Option<String>,
    /// Credentials for this pull only (not stored), e.g. from the caller's Docker `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
}

/// A registry's username and password (the password is never shown by `Debug`).
#[derive(Clone, Serialize, Deserialize)]
pub struct RegistryCredentials {
    /// The registry account's user name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryCredentials({}, <hidden>)", self.username)
    }
}

/// `POST /v1/images/import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageImportRequest {
    /// Absolute path (on the daemon's host) of a `docker save` tar or an OCI layout.
    pub path: String,
    /// Tag (default: the names the archive carries).
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/registries/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryLoginRequest {
    /// `host[:port]` as written in references.
    pub registry: String,
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

/// `POST /v1/images/build`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageBuildRequest {
    /// Base to build (only `debian`).
    pub base: String,
    /// Tag of the result (default: the base's name).
    pub name: Option<String>,
    /// Extra Debian packages baked in.
    pub include: Vec<String>,
}

/// `POST /v1/images/upload`: an ext4 image received and stored under its sha256 (deploy it by
/// that digest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadInfo {
    /// sha256 of the file (hex): its name in the image store.
    pub sha256: String,
    /// Its size.
    pub size_bytes: u64,
}
