//! Request and response types of the HTTP/JSON API, shared by the CLI, the server and tests,
//! so client and server cannot drift apart. This is also the documented `-o json` schema.

pub use crate::api_images::*;
pub use crate::api_volumes::*;
pub use crate::api_web::*;
pub use crate::domain::{MachineState, RestartPolicy};
pub use crate::error::ErrorKind;
use serde::{Deserialize, Serialize};

/// API version prefix of every route.
pub const PREFIX: &str = "/v1";

/// Header of `GET /v1/machines/NAME/logs[?offset=N]`: the console stream offset of the body's
/// first byte (offsets count dropped bytes too; without `offset` the body is the log's tail).
pub const LOG_OFFSET_HEADER: &str = "x-log-offset";

/// An error, as an HTTP body and inside streamed NDJSON events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// One line: what failed, then its causes, separated by `: `.
    pub error: String,
    /// Its kind.
    pub kind: ErrorKind,
    /// The HTTP status of its kind.
    pub status: u16,
}

impl ErrorBody {
    /// A body of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: message.into(),
            kind,
            status: kind.status(),
        }
    }
}

/// One audit-log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Time (UTC, RFC 3339).
    pub at: String,
    /// Caller's uid from the socket's peer credentials, if known.
    pub uid: Option<u32>,
    /// A TCP API caller's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// Who: `user alice`, `token ci`, or the local account behind the socket's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Action, e.g. `machine.expose`.
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// `ok` or the error.
    pub result: String,
}

/// One exposed port as shown by `machine status` and `ports`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortInfo {
    /// Bound host address, `null` for every address.
    pub bind: Option<String>,
    /// Host port or range, e.g. `8080` or `8000-8010`.
    pub host_port: String,
    /// Machine port or range.
    pub machine_port: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The canonical spec, usable with `expose`/`unexpose`.
    pub spec: String,
    /// The page's status line, e.g. `host:8080 → machine:3000 (tcp)`.
    pub display: String,
}

/// A machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineInfo {
    /// The machine's UUID (it names the machine too).
    pub id: String,
    /// Unique name (`a-z`, `0-9`, `-`; never a UUID).
    pub name: String,
    /// `creating`, `starting`, `running`, `stopping`, `stopped` or `error`.
    pub status: MachineState,
    /// Why the machine is in state `error` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set while a `running` machine is paused by its VMM because the host's disk is full: what
    /// happened and when it resumes (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// IPv4 address on its network.
    pub ip: String,
    /// Network name.
    pub network: String,
    /// Image it was deployed from.
    pub image: String,
    /// The sha256 of that image's file when it was deployed (absent: booted from a volume, or
    /// deployed before digests were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Virtual CPUs the guest sees.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk size in bytes.
    pub storage_bytes: u64,
    /// Exposed ports.
    pub ports: Vec<PortInfo>,
    /// Restart policy: `no`, `on-failure` or `always`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The VMM's process ID while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The hypervisor running it, e.g. `qemu-kvm` or `qemu-tcg` (TCG is not an isolation
    /// boundary).
    #[serde(default)]
    pub vmm: String,
    /// The limits its VMM runs under, when the host enforces them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<MachineLimits>,
    /// What the guest's agent reports (`machine status` of a running machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    /// Why a running machine is degraded: its agent does not answer (exec, shell and cp fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// Its disk and network rate limits (0: none): `download_mbps`, `upload_mbps` (Mbit/s),
    /// `iops`, `disk_bw_mbps` (MiB/s).
    #[serde(default)]
    pub io: sistemo_vmm::IoLimits,
    /// Creation time (UTC).
    pub created_at: String,
    /// Its volumes (the root one first).
    #[serde(default)]
    pub volumes: Vec<VolumeAttachmentInfo>,
    /// The template it was restored from (`image warm`); absent when it booted cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The one program it runs (an OCI image's workload, with the deploy's overrides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadInfo>,
    /// How its workload ended, when that stopped it (`stopped`, cleared by the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// A machine's workload as `machine status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadInfo {
    /// The effective command: entrypoint and arguments.
    pub command: Vec<String>,
    /// Names of its environment entries (the values are not shown).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (absent: `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User (absent: root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What a machine's VMM may use (its cgroup).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineLimits {
    /// Memory (guest RAM and the VMM's own), MiB.
    pub memory_mib: u64,
    /// CPUs' worth of time.
    pub cpus: f64,
    /// Tasks (processes and threads).
    pub pids: u64,
}

/// `POST /v1/machines`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DeployRequest {
    /// Image: a tag (`debian`), an absolute `*.ext4` path under the daemon's `image_dirs`, or
    /// an https URL (`.gz`/`.zst` are decompressed).
    pub image: String,
    /// For a URL image: the sha256 (hex) the downloaded bytes must have (of the `.gz`/`.zst`
    /// file as served, for a compressed one); a mismatch stores nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// For a URL image: accept plain `http://` (else only https, unless the daemon's
    /// `allow_http_images` is set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_http: bool,
    /// Name (default: after the image, `debian`, then `debian-2`, …).
    pub name: Option<String>,
    /// vCPUs (default 1).
    pub vcpus: Option<u32>,
    /// A CPU cap in CPUs, above 0 and up to `vcpus` (e.g. `0.5`: half a core; default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<String>,
    /// Memory, e.g. `512M`, `2G` (default 512M).
    pub memory: Option<String>,
    /// Disk size, e.g. `4G` (default: the image's size, at least 2G).
    pub storage: Option<String>,
    /// Expose specs.
    pub expose: Vec<String>,
    /// Network name (default `default`).
    pub network: Option<String>,
    /// Restart policy: `no` (default), `on-failure` or `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// What the deploy waits for: `agent` (default: the guest agent answers), `init` (the
    /// image's init takes commands too) or `ssh` (its sshd also answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// Seconds `wait` may take (default: the daemon's `ready_timeout_sec`, 180).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_timeout_s: Option<u64>,
    /// Volumes to attach: `NAME[:/MOUNT][:ro]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attach: Vec<String>,
    /// Boot from this existing volume (its root file system) instead of an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Download limit, Mbit/s (default: the daemon's `default_bandwidth_mbps`; 0 too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<u32>,
    /// Upload limit, Mbit/s (default: `default_upload_mbps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_mbps: Option<u32>,
    /// Disk operations per second (default: `default_iops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops: Option<u32>,
    /// Disk bandwidth, MiB/s (default: `default_disk_bw_mbps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bw_mbps: Option<u32>,
    /// Boot cold even when a template of the image and shape exists.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
    /// OCI images: environment entries `K=V` added to (or replacing) the image's `Env`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// OCI images: the program to run instead of the image's `Entrypoint` (its `Cmd` is
    /// dropped too, as Docker does; `""` clears the entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// OCI images: working directory instead of the image's `WorkingDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// OCI images: `USER[:GROUP]` (names or IDs) instead of the image's `User`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// OCI images: arguments replacing the image's `Cmd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// `POST /v1/machines/{name}/expose`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExposeRequest {
    /// Specs to add, all or none.
    pub ports: Vec<String>,
}

/// `POST /v1/machines/{name}/unexpose`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnexposeRequest {
    /// Host side to remove: `8080`, `8080/udp`, `127.0.0.1:8080`.
    pub port: String,
}

/// `POST /v1/machines/{name}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Command line, run by the guest's shell.
    pub cmd: String,
    /// Seconds before giving up (default 600).
    pub timeout_s: Option<u64>,
}

/// `POST /v1/machines/{name}/session` with `Upgrade: sistemo-session`: after `101 Switching
/// Protocols` the connection carries the guest agent's frames (`sistemo_agent::proto`): the
/// client sends stdin, its end, terminal sizes and signals; the daemon sends the output, then
/// the exit (or failure) as the last frame. Closing the connection kills the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRequest {
    /// What to run.
    pub job: SessionJob,
    /// Environment entries `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory in the guest (absolute).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Guest user name or uid (default root).
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a terminal of this size.
    #[serde(default)]
    pub tty: Option<TermSize>,
    /// Stream the client's stdin to the command.
    #[serde(default)]
    pub stdin: bool,
    /// Seconds before the command is killed (default: none).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// What a session runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionJob {
    /// A program and its arguments.
    Exec {
        /// Argument vector.
        argv: Vec<String>,
    },
    /// A command line run by the guest's `sh -c`.
    Shell {
        /// The command line.
        cmd: String,
    },
    /// The user's login shell.
    Login,
    /// A tar archive of a guest path, sent as output (`machine cp NAME:SRC DST`).
    CopyFrom {
        /// Absolute guest path.
        path: String,
    },
    /// A tar archive read from stdin, unpacked at a guest path (`machine cp SRC NAME:DST`).
    CopyTo {
        /// Absolute guest path.
        path: String,
    },
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TermSize {
    /// Terminal height in character rows.
    pub rows: u16,
    /// Terminal width in character columns.
    pub cols: u16,
}

/// What the guest's agent reports (`machine status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestInfo {
    /// The agent's version.
    pub agent: String,
    /// Seconds since the guest booted.
    pub uptime_s: u64,
    /// Memory in use, KiB.
    pub mem_used_kib: u64,
    /// Total memory, KiB.
    pub mem_total_kib: u64,
    /// Root file system used, bytes.
    pub disk_used: u64,
    /// Root file system size, bytes.
    pub disk_total: u64,
    /// Addresses, `ifname addr/prefix`.
    pub addresses: Vec<String>,
    /// The guest's PID 1.
    pub init: String,
    /// Whether the image's init takes commands yet (false while systemd starts).
    #[serde(default)]
    pub init_ready: bool,
}

/// Result of exec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResponse {
    /// Exit code.
    pub code: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

/// `machine ssh`: what the CLI runs on the terminal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShellResponse {
    /// Argument vector.
    pub argv: Vec<String>,
}

/// A network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// Unique name, at most 11 characters (its bridge is `sis-NAME`).
    pub name: String,
    /// Bridge interface.
    pub bridge: String,
    /// Subnet in CIDR form; the bridge holds its first address.
    pub subnet: String,
    /// Gateway (bridge address).
    pub gateway: String,
    /// Machines on it.
    pub machines: usize,
}

/// `POST /v1/networks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkCreateRequest {
    /// Name: 1-15 characters of `[a-z0-9-]`.
    pub name: String,
    /// Subnet (default: the next free 10.201+.0.0/24).
    pub subnet: Option<String>,
}

/// One row of `sistemo ports`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortRow {
    /// Machine name.
    pub machine: String,
    /// `active` when the machine runs (rules in nftables), else `inactive`.
    pub state: String,
    /// The port.
    #[serde(flatten)]
    pub port: PortInfo,
}

/// One streamed line of a long operation (NDJSON): progress, then a result or an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event<T> {
    /// A progress line.
    Progress(String),
    /// The final result.
    Result(T),
    /// The final error.
    Error(ErrorBody),
}

/// Daemon facts for `doctor` and `config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InfoResponse {
    /// sistemo version.
    pub version: String,
    /// Hypervisor backend in use, e.g. `qemu-tcg`.
    pub hypervisor: String,
    /// The effective configuration (token redacted).
    pub config: serde_json::Value,
    /// Firewall health: `in sync` or what drifted.
    pub firewall: String,
    /// Database integrity check result.
    pub database: String,
    /// Number of machines.
    pub machines: usize,
    /// sistemo's bridges and whether each exists in the daemon's network namespace.
    pub bridges: Vec<(String, bool)>,
    /// Running machines paused because the host's disk is full (resumed when space returns).
    #[serde(default)]
    pub paused: Vec<String>,
    /// How volume snapshots and clones are made on the data dir (reflink or sparse copy).
    #[serde(default)]
    pub volume_copy: String,
}

/// One streamed line of `exec` (NDJSON): output chunks as they come, then the exit code.
/// Output is byte-exact: a chunk that is UTF-8 comes as text, any other as base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    /// A chunk of standard output (UTF-8).
    Stdout(String),
    /// A chunk of standard error (UTF-8).
    Stderr(String),
    /// A chunk of standard output that is not UTF-8, base64-encoded.
    StdoutB64(String),
    /// A chunk of standard error that is not UTF-8, base64-encoded.
    StderrB64(String),
    /// The command's exit code (last event).
    Exit(i32),
    /// Running the command failed (last event).
    Error(ErrorBody),
}

impl ExecEvent {
    /// The event carrying `bytes` of standard output (`err`: standard error).
    pub fn output(bytes: Vec<u8>, err: bool) -> ExecEvent {
        use base64::Engine as _;
        match (String::from_utf8(bytes), err) {
            (Ok(s), false) => ExecEvent::Stdout(s),
            (Ok(s), true) => ExecEvent::Stderr(s),
            (Err(e), false) => {
                ExecEvent::StdoutB64(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
            (Err(e), true) => {
                ExecEvent::StderrB64(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    }

    /// The output bytes an event carries and whether they are standard error; `None` for the
    /// exit and error events (and for base64 that does not decode).
    pub fn bytes(&self) -> Option<(Vec<u8>, bool)> {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).ok();
        match self {
            ExecEvent::Stdout(s) => Some((s.clone().into_bytes(), false)),
            ExecEvent::Stderr(s) => Some((s.clone().into_bytes(), true)),
            ExecEvent::StdoutB64(s) => Some((b64(s)?, false)),
            ExecEvent::StderrB64(s) => Some((b64(s)?, true)),
            ExecEvent::Exit(_) | ExecEvent::Error(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_is_byte_exact_on_the_wire() {
        for (bytes, err) in [
            (b"hello \xc3\xa9".to_vec(), false),
            (b"\xff\x00bin".to_vec(), true),
        ] {
            let line = serde_json::to_string(&ExecEvent::output(bytes.clone(), err)).unwrap();
            let back: ExecEvent = serde_json::from_str(&line).unwrap();
            assert_eq!(back.bytes(), Some((bytes, err)), "{line}");
        }
        assert_eq!(
            serde_json::to_string(&ExecEvent::output(b"ok".to_vec(), false)).unwrap(),
            r#"{"stdout":"ok"}"#,
            "text stays text"
        );
    }
}
