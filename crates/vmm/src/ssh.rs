//! SSH keys and command lines: the daemon's client key, each machine's pinned host key and
//! `known_hosts`, and the exact `ssh` argv used by exec, readiness checks and interactive shells.

use crate::VmmError;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// The daemon's SSH client key pair.
#[derive(Debug, Clone)]
pub(crate) struct ClientKey {
    /// Private key file (`data_dir/ssh/id_ed25519`).
    pub(crate) private: PathBuf,
    /// Public key line (`ssh-ed25519 AAAA... comment`).
    pub(crate) public: String,
}

/// A machine's SSH host key, generated on the host and handed to the guest at boot.
#[derive(Debug, Clone)]
pub(crate) struct HostKey {
    /// Private key file in the machine folder.
    pub(crate) private: PathBuf,
    /// Public key line.
    pub(crate) public: String,
}

async fn keygen(path: &Path, comment: &str) -> Result<(), VmmError> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| crate::proc::spawn_error(e, "ssh-keygen"))?;
    if !out.status.success() {
        return Err(VmmError::Io {
            context: format!("ssh-keygen {}", path.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

async fn read_pub(private: &Path) -> Result<String, VmmError> {
    let pubfile = private.with_extension("pub");
    let s = tokio::fs::read_to_string(&pubfile)
        .await
        .map_err(VmmError::io(format!("reading {}", pubfile.display())))?;
    Ok(s.trim().to_string())
}

/// The daemon's client key in `data_dir/ssh/id_ed25519`, created on first use.
pub(crate) async fn ensure_client_key(data_dir: &Path) -> Result<ClientKey, VmmError> {
    let dir = data_dir.join("ssh");
    create_private_dir(&dir)?;
    let private = dir.join("id_ed25519");
    if !private.exists() || !private.with_extension("pub").exists() {
        let _ = std::fs::remove_file(&private);
        keygen(&private, "sistemo-daemon").await?;
    }
    let public = read_pub(&private).await?;
    Ok(ClientKey { private, public })
}

/// The SSH alias under which a machine's host key is pinned (independent of its IP).
pub(crate) fn host_alias(id: &uuid::Uuid) -> String {
    format!("sistemo-{}", id.simple())
}

/// One `known_hosts` line pinning `pubkey` (`ssh-ed25519 AAAA... [comment]`) for `alias`.
pub(crate) fn known_hosts_line(alias: &str, pubkey: &str) -> String {
    let mut parts = pubkey.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default();
    format!("{alias} {kind} {blob}\n")
}

/// The machine's host key in `dir/ssh_host_ed25519_key` (created on first start) and its
/// `known_hosts` file `dir/known_hosts`, rewritten every time so it always matches the key.
pub(crate) async fn ensure_host_key(dir: &Path, alias: &str) -> Result<HostKey, VmmError> {
    let private = dir.join("ssh_host_ed25519_key");
    if !private.exists() || !private.with_extension("pub").exists() {
        let _ = std::fs::remove_file(&private);
        keygen(&private, alias).await?;
    }
    let public = read_pub(&private).await?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, known_hosts_line(alias, &public))
        .map_err(VmmError::io(format!("writing {}", known_hosts.display())))?;
    Ok(HostKey { private, public })
}

fn create_private_dir(dir: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(VmmError::io(format!("creating {}", dir.display())))
}

/// Where and how to reach one guest over SSH.
#[derive(Debug, Clone)]
pub(crate) struct SshTarget {
    /// Guest address.
    pub(crate) ip: std::net::Ipv4Addr,
    /// Alias its host key is pinned under (see [`host_alias`]).
    pub(crate) alias: String,
    /// The daemon's private key.
    pub(crate) identity: PathBuf,
    /// The machine's `known_hosts`.
    pub(crate) known_hosts: PathBuf,
    /// Network namespace to run `ssh` in (`ip netns exec`), for tests.
    pub(crate) netns: Option<String>,
    /// Connection-sharing socket: the first `ssh` becomes a master that lives on for a minute,
    /// so later commands skip the key exchange (about 1.3 s of guest CPU under TCG).
    pub(crate) control_path: Option<PathBuf>,
}

impl SshTarget {
    /// The full argv: `[ip netns exec NS] ssh <options> [-t] root@IP [remote...]`.
    /// Host keys are pinned: `StrictHostKeyChecking=yes` with the machine's own file.
    pub(crate) fn argv(&self, tty: bool, connect_timeout_s: u32, remote: &[String]) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            a.extend(["ip", "netns", "exec", ns.as_str()].map(String::from));
        }
        a.push("ssh".into());
        let opts = [
            "-F".to_string(),
            "/dev/null".to_string(),
            "-i".to_string(),
            self.identity.display().to_string(),
            "-o".to_string(),
            "IdentitiesOnly=yes".to_string(),
            "-o".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
            "-o".to_string(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".to_string(),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "-o".to_string(),
            format!("HostKeyAlias={}", self.alias),
            "-o".to_string(),
            "UpdateHostKeys=no".to_string(),
            "-o".to_string(),
            format!("ConnectTimeout={connect_timeout_s}"),
            "-o".to_string(),
            "ServerAliveInterval=15".to_string(),
            "-o".to_string(),
            "LogLevel=ERROR".to_string(),
        ];
        a.extend(opts);
        if let Some(c) = &self.control_path {
            a.extend([
                "-o".to_string(),
                "ControlMaster=auto".to_string(),
                "-o".to_string(),
                format!("ControlPath={}", c.display()),
                "-o".to_string(),
                "ControlPersist=60".to_string(),
            ]);
        }
        if tty {
            a.push("-t".into());
        } else {
            a.extend(["-T", "-o", "BatchMode=yes"].map(String::from));
        }
        a.push(format!("root@{}", self.ip));
        a.extend(remote.iter().cloned());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_line_drops_the_comment() {
        assert_eq!(
            known_hosts_line("sistemo-ab", "ssh-ed25519 AAAAC3Nz host@x\n"),
            "sistemo-ab ssh-ed25519 AAAAC3Nz\n"
        );
    }

    #[test]
    fn argv_pins_the_host_key() {
        let t = SshTarget {
            ip: "10.0.0.2".parse().unwrap(),
            alias: "sistemo-x".into(),
            identity: "/k".into(),
            known_hosts: "/kh".into(),
            netns: Some("ns1".into()),
            control_path: None,
        };
        let a = t.argv(false, 2, &["true".into()]);
        assert_eq!(&a[..4], &["ip", "netns", "exec", "ns1"]);
        assert!(a.contains(&"StrictHostKeyChecking=yes".to_string()));
        assert!(a.contains(&"UserKnownHostsFile=/kh".to_string()));
        assert!(!a.iter().any(|x| x.contains("StrictHostKeyChecking=no")));
        assert_eq!(a.last().unwrap(), "true");
        assert_eq!(a[a.len() - 2], "root@10.0.0.2");
    }
}
