//! Wire types of the volume routes: volumes and snapshots, their attachments, and the requests
//! that create, resize, copy and attach them. Re-exported by [`crate::api`].

use serde::{Deserialize, Serialize};

/// A volume or snapshot (`volume list`, `volume show`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// UUID (names its file).
    pub id: String,
    /// Unique name among volumes and snapshots.
    pub name: String,
    /// `volume` or `snapshot`.
    pub kind: String,
    /// `ext4` or `raw`.
    pub format: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// What it was made from (a volume, a snapshot, a machine and its configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Machines it is attached to.
    pub attached_to: Vec<VolumeAttachmentInfo>,
    /// Its file on the host.
    pub path: String,
    /// Creation time (UTC).
    pub created_at: String,
}

/// One attachment of a volume to a machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeAttachmentInfo {
    /// The volume.
    pub volume: String,
    /// The machine.
    pub machine: String,
    /// Where the guest mounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Attached read-only (then it may be shared with other machines).
    pub readonly: bool,
    /// The machine boots from it.
    pub root: bool,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeCreateRequest {
    /// Size, e.g. `5G`.
    pub size: String,
    /// Name (default: generated, `vol-` and 8 hex digits).
    #[serde(default)]
    pub name: Option<String>,
    /// `ext4` (default) or `raw`.
    #[serde(default)]
    pub format: Option<String>,
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeResizeRequest {
    /// New size, larger than the current one.
    pub size: String,
}

/// `POST /v1/volumes/{name}/snapshot`, `…/clone`, `/v1/machines/{name}/snapshot` and
/// `…/clone`: the new object's name (optional for a machine snapshot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NameRequest {
    /// Its name.
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/machines/{name}/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Volume name.
    pub volume: String,
    /// Where the guest mounts it (ext4 volumes).
    #[serde(default)]
    pub mount: Option<String>,
    /// Attach read-only (several machines may share a read-only volume).
    #[serde(default)]
    pub readonly: bool,
}
