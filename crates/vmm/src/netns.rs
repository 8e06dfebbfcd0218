//! The `netns` backend: a machine that is a network namespace with a veth on the bridge.
//! No kernel of its own; it exercises the whole network engine fast and runs where no hypervisor can.

use crate::{ExecOutput, Hypervisor, Instance, LinkKind, MachineSpec, VmmError};
use async_trait::async_trait;
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
    pub fn ns_name(&self, spec: &MachineSpec) -> String {
        format!("{}{}", self.prefix, &spec.id.simple().to_string()[..12])
    }
}

async fn run(args: &[&str]) -> Result<String, VmmError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(VmmError::io(format!("running {}", args[0])))?;
    if !out.status.success() {
        return Err(VmmError::Boot {
            name: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wrap a command line so that a trailing `&` detaches it from exec's pipes.
pub fn detach_background(cmd: &str) -> String {
    let t = cmd.trim_end();
    if t.ends_with('&') && !t.ends_with("&&") {
        format!("{{ {t} }} </dev/null >/dev/null 2>&1")
    } else {
        cmd.to_string()
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
            let mac = n
                .mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
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
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
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
            unsafe_free_kill(-inst.pid);
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
                unsafe_free_kill(p);
            }
        }
        run(&["ip", "netns", "del", &ns]).await.map(|_| ())
    }

    async fn exec(&self, spec: &MachineSpec, cmd: &str, timeout: Duration) -> Result<ExecOutput, VmmError> {
        let argv = self.exec_argv(spec, cmd);
        crate::run_exec(&spec.name, &argv, timeout, VmmError::io("spawning exec")).await
    }

    fn exec_argv(&self, spec: &MachineSpec, cmd: &str) -> Vec<String> {
        let mut argv = self.shell_command(spec);
        argv.extend(["-c".into(), detach_background(cmd)]);
        argv
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

/// SIGKILL a process (or a process group when `pid` is negative) through `kill(1)`,
/// keeping this crate free of `unsafe`.
fn unsafe_free_kill(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::detach_background;

    #[test]
    fn trailing_ampersand_detaches() {
        assert_eq!(detach_background("echo hi"), "echo hi");
        assert_eq!(detach_background("a && b"), "a && b");
        assert_eq!(
            detach_background("node x.js &"),
            "{ node x.js & } </dev/null >/dev/null 2>&1"
        );
    }
}
