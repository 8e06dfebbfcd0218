//! Daemon configuration, read in this one place: defaults, then the YAML file, then `SISTEMO_*`
//! environment, then flags. Every key of Sistemo's `config.yml` is read with its meaning: those
//! spelled alike as they are, the others renamed to ours by [`sistemo`].

mod sistemo;

use crate::domain::{ByteSize, HypervisorKind, IfName, Subnet, TableName};
use serde::{Deserialize, Serialize};
use sistemo_vmm::image::{
    Archive, BuildOptions, DEFAULT_MAX_IMAGE_SIZE, DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR, ImagePolicy,
    apt_mirror,
};
use sistemo_vmm::qemu::{AccelChoice, QemuOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Default config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/sistemo/config.yml";
/// Shortest bearer token the TCP API accepts.
pub const MIN_TOKEN_LEN: usize = 32;
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/sistemo/sistemo.sock";

/// The effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory: database, images, machines.
    pub data_dir: PathBuf,
    /// API Unix socket (root-only).
    pub socket: PathBuf,
    /// Bridge of the default network.
    pub bridge: IfName,
    /// Subnet of the default network; the bridge holds its first address.
    pub bridge_subnet: Subnet,
    /// Name of sistemo's nftables table (`ip` family).
    pub nft_table: TableName,
    /// Hypervisor backend: `qemu`, or `netns` (machines are network namespaces; for tests).
    pub hypervisor: HypervisorKind,
    /// Prefix of namespace names of the `netns` backend.
    pub netns_prefix: String,
    /// Sistemo's key: serve the API and dashboard on this port (of `listen_addr`); the same
    /// as `listen: [listen_addr:port]`.
    pub port: Option<u16>,
    /// The address `port` listens on.
    pub listen_addr: Ipv4Addr,
    /// TCP listeners of the API and the dashboard: `ADDR:PORT` (TLS unless loopback),
    /// `https://ADDR:PORT` or `http://ADDR:PORT` (loopback only); `[]`: none. Default
    /// `127.0.0.1:7777`.
    pub listen: Option<Vec<String>>,
    /// The TLS certificate (PEM, chain) of the listeners; default: self-signed, generated.
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// How long a browser session lasts, in hours.
    pub session_hours: u32,
    /// A shared bearer token accepted as an admin on the TCP listeners (API tokens, made with
    /// `sistemo token create`, are the better way).
    pub token: Option<String>,
    /// Most vCPUs a machine may have (default: the host's CPU count).
    pub max_vcpus: Option<u32>,
    /// DNS servers given to machines.
    pub dns: Vec<Ipv4Addr>,
    /// Milliseconds between firewall health checks (self-repair).
    pub repair_interval_ms: u64,
    /// Insert accept rules into foreign forward chains with policy drop (Docker hosts).
    pub forward_compat: bool,
    /// Host ports machines may connect to through their gateway (all others are closed to them).
    pub host_ports_for_machines: Vec<u16>,
    /// Let machines reach link-local addresses, like a cloud's metadata service at
    /// 169.254.169.254 (its credentials belong to the host).
    pub allow_metadata: bool,
    /// Drop machines' new connections to SMTP ports 25, 465 and 587.
    pub block_smtp: bool,
    /// Entries the audit log keeps (the oldest go first).
    pub history_limit: u32,
    /// Largest `--storage` a machine may have.
    pub max_storage: ByteSize,
    /// Free space the data dir's file system must keep after a deploy's disk is counted.
    pub min_disk_free: ByteSize,
    /// QEMU accelerator: `auto` (KVM when it can run the guest, else TCG), `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// Appended to the guest kernel's command line (e.g. `loglevel=7` to debug a boot).
    pub guest_cmdline_extra: Option<String>,
    /// Report every failed readiness attempt while a guest boots.
    pub debug_boot: bool,
    /// The unprivileged user e2fsck and resize2fs run as on untrusted file systems (created at
    /// start when missing). Set, it also confines QEMU: once it has opened its files it switches
    /// to a uid of its machine's own (`vmm_uid_base` + the machine's slot), chrooted into an
    /// empty folder; `null` leaves QEMU running as root.
    pub vmm_user: Option<String>,
    /// The first uid of the per-machine VMM uids (65,536 of them; no account is made for them).
    pub vmm_uid_base: u32,
    /// Put each machine in its own cgroup (memory, CPU and task limits) where the host allows.
    pub vmm_cgroups: bool,
    /// Give cold-booted machines a vsock device for the guest agent where the host has
    /// `/dev/vhost-vsock` (else, and on failure, the agent's virtio-serial port serves).
    pub vsock: bool,
    /// Debian archive for image builds (default: the host's apt configuration, else
    /// `http://deb.debian.org/debian`).
    pub debian_mirror: Option<String>,
    /// Folder caching debootstrap trees, so that rebuilds skip debootstrap.
    pub debootstrap_cache: Option<PathBuf>,
    /// A guest kernel `.deb` to use instead of downloading `linux-image-cloud-amd64`.
    pub kernel_deb: Option<PathBuf>,
    /// Folders whose regular files may be deployed as path images; empty: no host path.
    pub image_dirs: Vec<PathBuf>,
    /// Accept `http://` image URLs without `--insecure-http`.
    pub allow_http_images: bool,
    /// Largest image a URL may download (received and after decompression).
    pub max_image_size: ByteSize,
    /// Tests only (`SISTEMO_TEST_VOLUME_PAUSE_MS`): volume operations pause this long at each
    /// crash-relevant point, so a crash test can kill the daemon there. Never in a file.
    #[serde(skip)]
    pub test_volume_pause_ms: Option<u64>,
    /// Largest `--memory` (default: the host's memory). Sistemo's `max_memory_mb`.
    pub max_memory: Option<ByteSize>,
    /// The host's uplink, Sistemo's NAT interface: checked to exist at start. Machines' traffic
    /// is masqueraded on every interface that is not a sistemo bridge, this one included.
    pub host_interface: Option<IfName>,
    /// Machines' download rate, in megabits per second, unless a deploy sets one (0: unlimited).
    pub default_bandwidth_mbps: u32,
    /// Machines' upload rate, in megabits per second, unless a deploy sets one (0: unlimited).
    pub default_upload_mbps: u32,
    /// Machines' disk operations per second, unless a deploy sets one (0: unlimited).
    pub default_iops: u32,
    /// Machines' disk bandwidth, in MiB per second, unless a deploy sets one (0: unlimited).
    pub default_disk_bw_mbps: u32,
    /// Milliseconds between checks for machines whose VMM died (default: `repair_interval_ms`).
    /// Sistemo's `reconciler_interval_sec`.
    pub liveness_interval_ms: Option<u64>,
    /// Seconds a guest may take to answer after its VMM started; past it the deploy or start
    /// fails and is rolled back. Sistemo's `ssh_timeout_sec`.
    pub ready_timeout_sec: u64,
    /// Requests per second one client address may make on the TCP API (0: no limit).
    pub rate_limit_rps: u32,
    /// Requests one client address may make at once on the TCP API before `rate_limit_rps` applies.
    pub rate_limit_burst: u32,
    /// OCI registries (`host` or `host:port`) that may be pulled from over plain http
    /// (registries on loopback addresses always may).
    pub insecure_registries: Vec<String>,
    /// Most bytes each log of a machine (its console, QEMU's messages) keeps: the oldest are
    /// dropped (at least 16K; default 8M).
    pub log_max_bytes: ByteSize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: "/var/lib/sistemo".into(),
            socket: DEFAULT_SOCKET.into(),
            bridge: "sistemo0".parse().expect("valid default bridge"),
            bridge_subnet: "10.200.0.0/16".parse().expect("valid default subnet"),
            nft_table: "sistemo".parse().expect("valid default table"),
            hypervisor: HypervisorKind::Qemu,
            netns_prefix: "sistemo-m-".into(),
            port: None,
            listen_addr: Ipv4Addr::LOCALHOST,
            listen: None,
            tls_cert: None,
            tls_key: None,
            session_hours: 12,
            token: None,
            max_vcpus: None,
            dns: vec![Ipv4Addr::new(1, 1, 1, 1)],
            repair_interval_ms: 500,
            forward_compat: true,
            host_ports_for_machines: vec![],
            allow_metadata: false,
            block_smtp: true,
            history_limit: 100_000,
            max_storage: ByteSize::bytes(256 << 30),
            min_disk_free: ByteSize::bytes(2 << 30),
            accel: AccelChoice::Auto,
            guest_cmdline_extra: None,
            debug_boot: false,
            vmm_user: Some(sistemo_vmm::qemu::DEFAULT_VMM_USER.into()),
            vmm_uid_base: sistemo_vmm::qemu::DEFAULT_VMM_UID_BASE,
            vmm_cgroups: true,
            vsock: true,
            debian_mirror: None,
            debootstrap_cache: None,
            kernel_deb: None,
            image_dirs: vec![],
            allow_http_images: false,
            max_image_size: ByteSize::bytes(DEFAULT_MAX_IMAGE_SIZE),
            test_volume_pause_ms: None,
            max_memory: None,
            host_interface: None,
            default_bandwidth_mbps: 0,
            default_upload_mbps: 0,
            default_iops: 0,
            default_disk_bw_mbps: 0,
            liveness_interval_ms: None,
            ready_timeout_sec: 180,
            rate_limit_rps: 100,
            rate_limit_burst: 200,
            insecure_registries: vec![],
            log_max_bytes: ByteSize::mib(8),
        }
    }
}

/// A configuration problem, naming the key and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Flags of `sistemo up`; each overrides the same key.
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--bridge`.
    pub bridge: Option<String>,
    /// `--subnet`.
    pub subnet: Option<String>,
    /// `--nft-table`.
    pub nft_table: Option<String>,
    /// `--hypervisor`.
    pub hypervisor: Option<String>,
}

fn flag<T: std::str::FromStr<Err = crate::domain::Invalid>>(
    name: &str,
    v: Option<String>,
) -> Result<Option<T>, ConfigError> {
    v.map(|v| {
        v.parse()
            .map_err(|e: crate::domain::Invalid| ConfigError(format!("{name}: {e}")))
    })
    .transpose()
}

impl Config {
    /// Load the file (absent is fine unless `explicit`), then `SISTEMO_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (
                std::env::var_os("SISTEMO_CONFIG")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| DEFAULT_CONFIG_FILE.into()),
                std::env::var_os("SISTEMO_CONFIG").is_some(),
            ),
        };
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) if text.trim().is_empty() => Config::default(),
            Ok(text) => {
                let cfg = sistemo::parse(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
                if cfg.token.is_some() {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&path)
                        .map(|m| m.permissions().mode() & 0o777)
                        .unwrap_or(0);
                    if mode & 0o077 != 0 {
                        return Err(ConfigError(format!(
                            "config file {} holds the API token and is readable by others (mode {mode:o}); allowed: mode 600 (chmod 600 {})",
                            path.display(),
                            path.display()
                        )));
                    }
                }
                cfg
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::default(),
            Err(e) => return Err(ConfigError(format!("config file {}: {e}", path.display()))),
        };
        if let Ok(v) = std::env::var("SISTEMO_DATA_DIR") {
            cfg.data_dir = v.into();
        }
        if let Some(v) = flag(
            "SISTEMO_BRIDGE_SUBNET",
            std::env::var("SISTEMO_BRIDGE_SUBNET").ok(),
        )? {
            cfg.bridge_subnet = v;
        }
        if let Some(v) = flag("SISTEMO_HYPERVISOR", std::env::var("SISTEMO_HYPERVISOR").ok())? {
            cfg.hypervisor = v;
        }
        if let Ok(v) = std::env::var("SISTEMO_ACCEL") {
            cfg.accel = yaml_serde::from_str(&v).map_err(|_| {
                ConfigError(format!(
                    "SISTEMO_ACCEL {v:?} is not an accelerator (allowed: auto, kvm, tcg)"
                ))
            })?;
        }
        let path_var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        cfg.guest_cmdline_extra = std::env::var("SISTEMO_GUEST_CMDLINE_EXTRA")
            .ok()
            .or(cfg.guest_cmdline_extra);
        cfg.debug_boot |= std::env::var_os("SISTEMO_DEBUG_BOOT").is_some();
        cfg.debian_mirror = std::env::var("SISTEMO_DEBIAN_MIRROR").ok().or(cfg.debian_mirror);
        cfg.debootstrap_cache = path_var("SISTEMO_DEBOOTSTRAP_CACHE").or(cfg.debootstrap_cache);
        cfg.kernel_deb = path_var("SISTEMO_KERNEL_DEB").or(cfg.kernel_deb);
        cfg.test_volume_pause_ms = std::env::var("SISTEMO_TEST_VOLUME_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok());
        Ok(cfg)
    }

    /// Apply the flags of `sistemo up`.
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        if let Some(v) = o.socket {
            self.socket = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = flag("--bridge", o.bridge)? {
            self.bridge = v;
        }
        if let Some(v) = flag("--subnet", o.subnet)? {
            self.bridge_subnet = v;
        }
        if let Some(v) = flag("--nft-table", o.nft_table)? {
            self.nft_table = v;
        }
        if let Some(v) = flag("--hypervisor", o.hypervisor)? {
            self.hypervisor = v;
        }
        Ok(())
    }

    /// How often machines' VMMs are checked for having died.
    pub fn liveness_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.liveness_interval_ms
                .unwrap_or(self.repair_interval_ms)
                .max(50),
        )
    }

    /// Options of the QEMU backend.
    pub fn qemu_options(&self) -> QemuOptions {
        QemuOptions {
            accel: self.accel,
            cmdline_extra: self.guest_cmdline_extra.clone(),
            debug_boot: self.debug_boot,
            vmm_user: self.vmm_user.clone(),
            vmm_uid_base: self.vmm_uid_base,
            cgroups: self.vmm_cgroups,
            vsock: self.vsock,
        }
    }

    /// Options of Debian image builds; the mirror is `debian_mirror`, else the host's apt
    /// configuration, else Debian's own; the security archive is the host's, else Debian's.
    pub fn build_options(&self) -> BuildOptions {
        let etc_apt = Path::new("/etc/apt");
        BuildOptions {
            mirror: self
                .debian_mirror
                .clone()
                .or_else(|| apt_mirror(etc_apt, Archive::Release))
                .unwrap_or_else(|| DEFAULT_MIRROR.into()),
            security_mirror: apt_mirror(etc_apt, Archive::Security)
                .unwrap_or_else(|| DEFAULT_SECURITY_MIRROR.into()),
            debootstrap_cache: self.debootstrap_cache.clone(),
        }
    }

    /// What image references may name, and download bounds.
    pub fn image_policy(&self) -> ImagePolicy {
        ImagePolicy {
            image_dirs: self.image_dirs.clone(),
            allow_http: self.allow_http_images,
            max_size: self.max_image_size.as_bytes(),
            insecure_registries: self.insecure_registries.clone(),
            ..ImagePolicy::default()
        }
    }

    /// What machines may reach, for the firewall.
    pub fn policy(&self) -> crate::net::firewall::Policy {
        crate::net::firewall::Policy {
            host_ports: self.host_ports_for_machines.clone(),
            allow_metadata: self.allow_metadata,
            block_smtp: self.block_smtp,
        }
    }

    /// Check what the types cannot: combinations of keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.token
            && token.len() < MIN_TOKEN_LEN
        {
            return Err(ConfigError(format!(
                "token is {} characters long (allowed: at least {MIN_TOKEN_LEN}, e.g. `openssl rand -hex 32`; or none, and API tokens from `sistemo token create`)",
                token.len()
            )));
        }
        self.listeners()?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError(
                "tls_cert and tls_key go together (allowed: both, or neither for a generated self-signed certificate)".into(),
            ));
        }
        sistemo_vmm::qemu::check_uid_base(self.vmm_uid_base).map_err(ConfigError)?;
        if self.session_hours == 0 {
            return Err(ConfigError("session_hours 0 (allowed: 1 or more hours)".into()));
        }
        if let Some(d) = self.image_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(ConfigError(format!(
                "image_dirs: {} is relative (allowed: absolute folders)",
                d.display()
            )));
        }
        if self.max_image_size.as_bytes() < 1 << 20 {
            return Err(ConfigError(format!(
                "max_image_size {} is too small (allowed: 1M or more)",
                self.max_image_size
            )));
        }
        if self.history_limit == 0 {
            return Err(ConfigError("history_limit 0 (allowed: 1 or more entries)".into()));
        }
        if self.max_vcpus == Some(0) {
            return Err(ConfigError("max_vcpus 0 (allowed: 1 or more)".into()));
        }
        if let Some(m) = self.max_memory.filter(|m| *m < ByteSize::mib(64)) {
            return Err(ConfigError(format!(
                "max_memory {m} is too small (allowed: 64M or more)"
            )));
        }
        if self.log_max_bytes < ByteSize::bytes(16 << 10) {
            return Err(ConfigError(format!(
                "log_max_bytes {} is too small (allowed: 16K or more)",
                self.log_max_bytes
            )));
        }
        if self.ready_timeout_sec == 0 {
            return Err(ConfigError(
                "ready_timeout_sec 0 (allowed: 1 or more seconds)".into(),
            ));
        }
        if self.rate_limit_rps > 0 && self.rate_limit_burst == 0 {
            return Err(ConfigError(format!(
                "rate_limit_burst 0 with rate_limit_rps {} would refuse every request (allowed: 1 or more, or rate_limit_rps: 0 for no limit)",
                self.rate_limit_rps
            )));
        }
        if let Some(i) = &self.host_interface
            && !Path::new("/sys/class/net").join(i.as_str()).exists()
        {
            return Err(ConfigError(format!(
                "host_interface {i} does not exist on this host (allowed: an interface of `ip link`)"
            )));
        }
        Ok(())
    }
}

/// Default TCP listener of the API and the dashboard.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7777";

/// One TCP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Address and port.
    pub addr: std::net::SocketAddr,
    /// Whether it speaks TLS.
    pub tls: bool,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }
}

impl Config {
    /// The TCP listeners: `listen`, else `listen_addr:port`, else [`DEFAULT_LISTEN`]. Plain
    /// HTTP is refused off loopback, naming the address.
    pub fn listeners(&self) -> Result<Vec<Listener>, ConfigError> {
        let entries: Vec<String> = match (&self.listen, self.port) {
            (Some(_), Some(p)) => {
                return Err(ConfigError(format!(
                    "both port ({p}) and listen are set (allowed: one of them; listen: [\"ADDR:PORT\", …] for several)"
                )));
            }
            (Some(l), None) => l.clone(),
            (None, Some(p)) => vec![format!("{}:{p}", self.listen_addr)],
            (None, None) => vec![DEFAULT_LISTEN.into()],
        };
        let mut out: Vec<Listener> = Vec::new();
        for e in entries {
            let (scheme, rest) = match e.split_once("://") {
                Some((s, r)) => (Some(s), r),
                None => (None, e.as_str()),
            };
            let addr: std::net::SocketAddr = rest.parse().map_err(|_| {
                ConfigError(format!(
                    "listen {e:?} is not an address (allowed: ADDR:PORT, https://ADDR:PORT, http://127.0.0.1:PORT; IPv6 as [ADDR]:PORT)"
                ))
            })?;
            let tls = match scheme {
                None => !addr.ip().is_loopback(),
                Some("https") => true,
                Some("http") if addr.ip().is_loopback() => false,
                Some("http") => {
                    return Err(ConfigError(format!(
                        "listen {e}: plain HTTP off loopback would send passwords and tokens in clear (allowed: https://{addr}, or http:// on a loopback address)"
                    )));
                }
                Some(s) => {
                    return Err(ConfigError(format!(
                        "listen {e:?}: scheme {s:?} (allowed: http, https)"
                    )));
                }
            };
            if out.iter().any(|l| l.addr == addr) {
                return Err(ConfigError(format!("listen {addr} is given twice")));
            }
            out.push(Listener { addr, tls });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_default_to_loopback_and_need_tls_elsewhere() {
        let c = Config::default();
        assert_eq!(
            c.listeners()
                .unwrap()
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>(),
            ["http://127.0.0.1:7777"]
        );
        let c: Config = yaml_serde::from_str("port: 8000").unwrap();
        assert_eq!(c.listeners().unwrap()[0].to_string(), "http://127.0.0.1:8000");
        let c: Config =
            yaml_serde::from_str("listen: [\"0.0.0.0:7777\", \"[::1]:7778\", \"https://127.0.0.1:7779\"]")
                .unwrap();
        assert_eq!(
            c.listeners()
                .unwrap()
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>(),
            [
                "https://0.0.0.0:7777",
                "http://[::1]:7778",
                "https://127.0.0.1:7779"
            ]
        );
        let c: Config = yaml_serde::from_str("listen: [\"http://10.1.2.3:7777\"]").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("http://10.1.2.3:7777") && e.contains("https://10.1.2.3:7777"),
            "{e}"
        );
        let c: Config = yaml_serde::from_str("listen: []\nport: 1").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("both port"));
        let c: Config = yaml_serde::from_str("listen: []").unwrap();
        assert!(c.listeners().unwrap().is_empty());
        let c: Config = yaml_serde::from_str("tls_cert: /x.pem").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("tls_key"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = yaml_serde::from_str::<Config>("bridge_subnett: 10.0.0.0/8")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bridge_subnett"), "{e}");
    }

    #[test]
    fn bad_values_are_named_at_parse_time() {
        let e = yaml_serde::from_str::<Config>("bridge: bad name")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"bad name\""), "{e}");
        let e = yaml_serde::from_str::<Config>("bridge_subnet: 10.200.0.1/16")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host bits"), "{e}");
        let e = yaml_serde::from_str::<Config>("hypervisor: xen")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xen") && e.contains("netns"), "{e}");
        let mut c = Config::default();
        let e = c
            .apply(Overrides {
                subnet: Some("10.0.0.0/33".into()),
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--subnet: ") && e.contains("10.0.0.0/33"), "{e}");
    }
}
