//! Daemon configuration: defaults, then the YAML config file, then environment, then flags.
//! Keys are Sistemo-compatible where they exist (`bridge_subnet`, `port`, `max_vcpus`).

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Default config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/sistemo/config.yml";
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
    pub bridge: String,
    /// Subnet of the default network; the bridge holds its first address.
    pub bridge_subnet: Ipv4Net,
    /// Name of sistemo's nftables table (`ip` family).
    pub nft_table: String,
    /// Hypervisor backend: `qemu`, or `netns` (machines are network namespaces; for tests).
    pub hypervisor: String,
    /// Prefix of namespace names of the `netns` backend.
    pub netns_prefix: String,
    /// Optional TCP port for the API (needs `token`); off by default.
    pub port: Option<u16>,
    /// Address of the TCP API listener.
    pub listen_addr: Ipv4Addr,
    /// Bearer token required on the TCP listener.
    pub token: Option<String>,
    /// Most vCPUs a machine may have (default: the host's CPU count).
    pub max_vcpus: Option<u32>,
    /// DNS servers given to machines.
    pub dns: Vec<Ipv4Addr>,
    /// Milliseconds between firewall health checks (self-repair).
    pub repair_interval_ms: u64,
    /// Insert accept rules into foreign forward chains with policy drop (Docker hosts).
    pub forward_compat: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: "/var/lib/sistemo".into(),
            socket: DEFAULT_SOCKET.into(),
            bridge: "sistemo0".into(),
            bridge_subnet: "10.200.0.0/16".parse().expect("valid default subnet"),
            nft_table: "sistemo".into(),
            hypervisor: "qemu".into(),
            netns_prefix: "sistemo-m-".into(),
            port: None,
            listen_addr: Ipv4Addr::LOCALHOST,
            token: None,
            max_vcpus: None,
            dns: vec![Ipv4Addr::new(1, 1, 1, 1)],
            repair_interval_ms: 500,
            forward_compat: true,
        }
    }
}

/// A configuration problem, naming the key and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Interface names: 1-15 characters of `[a-zA-Z0-9_-]` (what the kernel and nft accept safely).
pub fn check_ifname(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty()
        || v.len() > 15
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError(format!(
            "{key} {v:?} is not a valid interface name (allowed: 1-15 characters of a-z, A-Z, 0-9, '-', '_')"
        )));
    }
    Ok(())
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
            Ok(text) => serde_yaml::from_str(&text)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::default(),
            Err(e) => return Err(ConfigError(format!("config file {}: {e}", path.display()))),
        };
        if let Ok(v) = std::env::var("SISTEMO_DATA_DIR") {
            cfg.data_dir = v.into();
        }
        if let Ok(v) = std::env::var("SISTEMO_BRIDGE_SUBNET") {
            cfg.bridge_subnet = v.parse().map_err(|_| {
                ConfigError(format!(
                    "SISTEMO_BRIDGE_SUBNET {v:?} is not a CIDR like 10.200.0.0/16"
                ))
            })?;
        }
        if let Ok(v) = std::env::var("SISTEMO_HYPERVISOR") {
            cfg.hypervisor = v;
        }
        Ok(cfg)
    }

    /// Check values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ifname("bridge", &self.bridge)?;
        if self.nft_table.is_empty()
            || self.nft_table.len() > 64
            || !self
                .nft_table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError(format!(
                "nft_table {:?} is not a valid table name (allowed: letters, digits, '_', '-')",
                self.nft_table
            )));
        }
        if self.bridge_subnet.prefix_len() > 29 {
            return Err(ConfigError(format!(
                "bridge_subnet {} is too small (allowed: prefix length 8 to 29)",
                self.bridge_subnet
            )));
        }
        if self.bridge_subnet.trunc() != self.bridge_subnet {
            return Err(ConfigError(format!(
                "bridge_subnet {} has host bits set (did you mean {}?)",
                self.bridge_subnet,
                self.bridge_subnet.trunc()
            )));
        }
        if !matches!(self.hypervisor.as_str(), "qemu" | "netns") {
            return Err(ConfigError(format!(
                "hypervisor {:?} is not supported (allowed: qemu, netns)",
                self.hypervisor
            )));
        }
        if self.port.is_some() && self.token.as_deref().unwrap_or("").is_empty() {
            return Err(ConfigError(
                "port is set but token is empty: the TCP API needs a token".into(),
            ));
        }
        Ok(())
    }
}

/// Settings of `sistemo_vmm` still taken from the environment, as the library read them itself
/// before (`SISTEMO_ACCEL`, `SISTEMO_GUEST_CMDLINE_EXTRA`, `SISTEMO_DEBUG_BOOT`,
/// `SISTEMO_DEBIAN_MIRROR`, `SISTEMO_DEBOOTSTRAP_CACHE`, `SISTEMO_KERNEL_DEB`); unset means the
/// library's defaults. The one place these variables are read, until they become config keys.
#[derive(Debug, Clone, Default)]
pub struct VmmOverrides {
    /// QEMU backend options.
    pub qemu: sistemo_vmm::qemu::QemuOptions,
    /// Debian image build options.
    pub build: sistemo_vmm::image::BuildOptions,
    /// A kernel package to use instead of downloading one.
    pub kernel_deb: Option<PathBuf>,
}

/// Read [`VmmOverrides`] from the environment.
pub fn vmm_env_overrides() -> VmmOverrides {
    use sistemo_vmm::qemu::AccelChoice;
    let var = |k: &str| std::env::var(k).ok();
    let mut o = VmmOverrides::default();
    o.qemu.accel = match var("SISTEMO_ACCEL").as_deref() {
        Some("kvm") => AccelChoice::Kvm,
        Some("tcg") => AccelChoice::Tcg,
        _ => AccelChoice::Auto,
    };
    o.qemu.cmdline_extra = var("SISTEMO_GUEST_CMDLINE_EXTRA");
    o.qemu.debug_boot = std::env::var_os("SISTEMO_DEBUG_BOOT").is_some();
    if let Some(m) = var("SISTEMO_DEBIAN_MIRROR") {
        o.build.mirror = m;
    }
    o.build.debootstrap_cache = std::env::var_os("SISTEMO_DEBOOTSTRAP_CACHE").map(PathBuf::from);
    o.kernel_deb = std::env::var_os("SISTEMO_KERNEL_DEB").map(PathBuf::from);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let e = serde_yaml::from_str::<Config>("bridge_subnett: 10.0.0.0/8")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bridge_subnett"), "{e}");
    }

    #[test]
    fn validate_names_value() {
        let c = Config {
            bridge: "bad name".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("\"bad name\""));
        let c = Config {
            bridge_subnet: "10.200.0.1/16".parse().unwrap(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("host bits"));
    }
}
