//! Wire types of the web-facing API: log-in and sessions, users and API tokens, the event
//! stream (`GET /v1/events`) and host figures for the dashboard. Re-exported by [`crate::api`].

use serde::{Deserialize, Serialize};

/// `POST /v1/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    /// User name.
    pub username: String,
    /// The password in clear (over TLS, or loopback); it is only ever stored hashed.
    pub password: String,
}

/// `GET /v1/session` and the answer of `POST /v1/login`: who is calling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    /// `user alice`, `token ci` or the local account behind the socket.
    pub actor: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// For a browser session: the value every mutating request sends as `X-CSRF-Token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
    /// For a browser session: when it ends (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// A user, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    /// Login name: 1-32 characters of `a-z`, `0-9`, `.`, `_`, `-`.
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// Creation time (UTC).
    pub created_at: String,
}

/// `POST /v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserAddRequest {
    /// Name: 1-32 characters of `a-z`, `0-9`, `.`, `_`, `-`.
    pub name: String,
    /// `admin` (default) or `viewer`.
    #[serde(default)]
    pub role: Option<String>,
    /// Password (8 characters or more).
    pub password: String,
}

/// `POST /v1/users/{name}/password`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasswordRequest {
    /// The new password.
    pub password: String,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreateRequest {
    /// Name (same rules as user names).
    pub name: String,
    /// `admin` (default) or `viewer`.
    #[serde(default)]
    pub role: Option<String>,
    /// Lifetime, e.g. `30d`, `12h`, `2w` (default: no expiry).
    #[serde(default)]
    pub expires: Option<String>,
}

/// An API token, as listed (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The token's name, unique (`token revoke NAME`).
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// Expiry (Unix seconds), if any.
    pub expires_at: Option<i64>,
    /// `active`, `expired` or `revoked`.
    pub state: String,
    /// Last use (Unix seconds), if any.
    pub last_used_at: Option<i64>,
    /// Creation time (UTC).
    pub created_at: String,
}

/// The answer of `POST /v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token as stored.
    pub info: TokenInfo,
    /// The secret, for `Authorization: Bearer …` or `SISTEMO_TOKEN`.
    pub token: String,
}

/// `GET /v1/system`: the host as the dashboard's overview shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemInfo {
    /// sistemo version.
    pub version: String,
    /// Hypervisor backend in use.
    pub hypervisor: String,
    /// Host CPUs.
    pub cpus: u32,
    /// 1-minute load average.
    pub load1: f64,
    /// Host memory, bytes.
    pub mem_total: u64,
    /// Memory available, bytes.
    pub mem_available: u64,
    /// Size of the data dir's file system, bytes.
    pub disk_total: u64,
    /// Free space there, bytes.
    pub disk_free: u64,
    /// Firewall health: `in sync` or what drifted.
    pub firewall: String,
    /// The TCP listeners, e.g. `https://0.0.0.0:7777`.
    pub listeners: Vec<String>,
    /// SHA-256 fingerprint of the TLS certificate, when a listener uses TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
}

/// One event of `GET /v1/events` (server-sent events: the `event:` field is the variant, the
/// `data:` field this JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DaemonEvent {
    /// A machine was created or changed (state, error, ports): its whole new view.
    Machine {
        /// The machine now.
        machine: Box<crate::api::MachineInfo>,
    },
    /// A machine is gone.
    MachineRemoved {
        /// Its name.
        name: String,
    },
    /// A progress line of a long operation (deploy, start, image build …).
    Progress {
        /// Action, e.g. `machine.deploy`.
        action: String,
        /// What it acts on.
        target: String,
        /// The line.
        message: String,
    },
    /// A change was recorded in the audit log.
    Change {
        /// The audit entry.
        entry: crate::api::HistoryEntry,
    },
    /// The firewall drifted and was repaired.
    Firewall {
        /// What happened.
        detail: String,
    },
    /// Events were lost (a slow reader): refetch everything.
    Resync,
}

impl DaemonEvent {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            DaemonEvent::Machine { .. } => "machine",
            DaemonEvent::MachineRemoved { .. } => "machine_removed",
            DaemonEvent::Progress { .. } => "progress",
            DaemonEvent::Change { .. } => "change",
            DaemonEvent::Firewall { .. } => "firewall",
            DaemonEvent::Resync => "resync",
        }
    }
}
