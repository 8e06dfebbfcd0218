//! The `netns` backend: a machine that is a network namespace with a veth on the bridge.
//! No kernel of its own; it exercises the whole network engine fast and runs where no hypervisor can.

use crate::{
    Facts, Hypervisor, Instance, LinkKind, MachineSpec, Progress, Session, Start, VmmError, format_mac,
};
use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// Backend whose machines are network namespaces named `<prefix><first 12 hex of the ID>`.
#[derive(Debug, Clone)]
pub struct NetnsBackend {
    prefix: String,
}

impl NetnsBackend {
    /// A backend naming its namespaces with `prefix` (tests use a unique one to clean up).
    pub fn new(prefix: impl Into<String>) -> Self {
        NetnsBackend {
            prefix: prefix.into(),
        }
    }

    /// The namespace name of a machine.
    fn ns_name(&self, spec: &MachineSpec) -> String {
        format!("{}{}", self.prefix, &spec.id.simple().to_string()[..12])
    }
}

/// Run `ip ...` (or another program) to completion; a non-zero exit is a [`VmmError::Command`]
/// carrying its stderr.
async fn run(args: &[&str]) -> Result<String, VmmError> {
    let out = crate::proc::run(Command::new(args[0]).args(&args[1..]), &args.join(" ")).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent binary in the machine's folder (written when missing or outdated), 0700.
fn install_agent(dir: &std::path::Path) -> Result<std::path::PathBuf, VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("agent");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == crate::AGENT_BINARY.len() as u64) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(VmmError::io(format!("creating {}", dir.display())))?;
    let tmp = dir.join(".agent.tmp");
    std::fs::write(&tmp, crate::AGENT_BINARY)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(VmmError::io(format!("installing {}", path.display())))?;
    Ok(path)
}

/// SIGKILL a process, or a process group when `pid` is negative; an already gone target is fine.
fn sigkill(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

impl NetnsBackend {
    /// The same agent as in a VM, one process per connection, on a socket pair inside the
    /// machine's namespace (and a UTS namespace named after the machine); it ends when the
    /// connection's last user drops it.
    async fn agent(&self, spec: &MachineSpec) -> Result<sistemo_agent::client::Client, VmmError> {
        let agent = install_agent(&spec.dir)?;
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(VmmError::io("creating a socket pair"))?;
        let theirs = std::os::fd::OwnedFd::from(theirs);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns_name(spec)])
            .arg(&agent)
            .args(["--stdio", "--hostname", &spec.name])
            .stdin(Stdio::from(
                theirs.try_clone().map_err(VmmError::io("duplicating a socket"))?,
            ))
            .stdout(Stdio::from(theirs))
            .stderr(Stdio::inherit())
            .kill_on_drop(false)
            .spawn()
            .map_err(VmmError::io("starting the agent in the namespace"))?;
        // Reaped in the background: it ends when the session's connection does.
        tokio::spawn(async move { child.wait().await });
        ours.set_nonblocking(true)
            .map_err(VmmError::io("configuring a socket"))?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(VmmError::io("registering a socket"))?;
        let err = |reason: String| VmmError::Exec {
            name: spec.name.clone(),
            reason,
        };
        let c = sistemo_agent::client::connect(stream, Duration::from_secs(10))
            .await
            .map_err(|e| err(format!("the agent did not start: {e}")))?;
        Ok(c)
    }
}

#[async_trait]
impl Hypervisor for NetnsBackend {
    fn name(&self) -> String {
        "netns".into()
    }

    fn link_kind(&self) -> LinkKind {
        LinkKind::Veth
    }

    async fn start(&self, spec: &MachineSpec) -> Result<Instance, VmmError> {
        let ns = self.ns_name(spec);
        // A leftover namespace of a crashed run is replaced.
        let _ = self.cleanup(spec).await;
        run(&["ip", "netns", "add", &ns]).await?;
        let res = async {
            let n = &spec.net;
            let mac = format_mac(&n.mac);
            let addr = format!("{}/{}", n.ip, n.prefix);
            let gw = n.gateway.to_string();
            run(&[
                "ip",
                "link",
                "add",
                &n.host_ifname,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac,
                "netns",
                &ns,
            ])
            .await?;
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["addr", "add", &addr, "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec!["route", "add", "default", "via", &gw],
            ] {
                let mut a = vec!["ip", "-n", &ns];
                a.extend(args);
                run(&a).await?;
            }
            // The holder process stands for the VMM: the machine runs while it lives.
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "sleep", "infinity"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(VmmError::io("spawning the namespace holder"))?;
            let pid = child.id() as i32;
            // Reap it in the background so it never lingers as a zombie.
            std::thread::spawn(move || {
                let mut c = child;
                let _ = c.wait();
            });
            Instance::of_pid(pid).ok_or_else(|| VmmError::Boot {
                name: spec.name.clone(),
                reason: "namespace holder exited at once".into(),
            })
        }
        .await;
        if res.is_err() {
            let _ = self.cleanup(spec).await;
        }
        res
    }

    async fn wait_ready(
        &self,
        spec: &MachineSpec,
        inst: &Instance,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        let deadline = Instant::now() + timeout;
        progress("waiting for the namespace");
        while Instant::now() < deadline {
            if inst.is_alive() && std::path::Path::new(&format!("/proc/{}/ns/net", inst.pid)).exists() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(VmmError::Boot {
            name: spec.name.clone(),
            reason: "namespace holder did not come up".into(),
        })
    }

    async fn stop(&self, spec: &MachineSpec, inst: &Instance, _timeout: Duration) -> Result<(), VmmError> {
        if inst.is_alive() {
            // The holder runs in its own process group: signal the group.
            sigkill(-inst.pid);
        }
        self.cleanup(spec).await
    }

    async fn cleanup(&self, spec: &MachineSpec) -> Result<(), VmmError> {
        let ns = self.ns_name(spec);
        if !std::path::Path::new("/run/netns").join(&ns).exists() {
            return Ok(());
        }
        // Everything a user started in the machine goes with it.
        if let Ok(pids) = run(&["ip", "netns", "pids", &ns]).await {
            for p in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                sigkill(p);
            }
        }
        run(&["ip", "netns", "del", &ns]).await.map(|_| ())
    }

    async fn session(&self, spec: &MachineSpec, start: Start) -> Result<Session, VmmError> {
        let c = self.agent(spec).await?;
        c.start(start).await.map_err(|e| VmmError::Exec {
            name: spec.name.clone(),
            reason: e.to_string(),
        })
    }

    async fn facts(&self, spec: &MachineSpec) -> Result<Facts, VmmError> {
        let c = self.agent(spec).await?;
        c.facts().await.map_err(|e| VmmError::Exec {
            name: spec.name.clone(),
            reason: e.to_string(),
        })
    }

    fn has_guest(&self) -> bool {
        false
    }

    fn shell_command(&self, spec: &MachineSpec) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.ns_name(spec),
            "sh".into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigkill_reaches_a_process_group() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        sigkill(-(c.id() as i32));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(c.wait().unwrap().signal(), Some(9));
    }
}
