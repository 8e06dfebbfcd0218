//! SSH to guests that run sshd (`machine ssh`, `--wait ssh`): the pinned target, the shared
//! connection's master, and one command run over it.

use super::*;

impl Qemu {
    /// How this backend reaches a machine over SSH.
    pub(super) fn ssh_target(&self, spec: &MachineSpec) -> SshTarget {
        SshTarget {
            ip: spec.net.ip,
            alias: host_alias(&spec.id),
            identity: self.client.private.clone(),
            known_hosts: spec.dir.join("known_hosts"),
            netns: self.netns.clone(),
            control_path: Some(ctl_path(spec)),
        }
    }

    /// Close the shared SSH connection to a machine (the next exec opens a new one).
    pub async fn disconnect(&self, spec: &MachineSpec) {
        self.close_master(spec).await
    }

    /// End a connection-sharing master left from an earlier boot (its TCP session is dead).
    pub(super) async fn close_master(&self, spec: &MachineSpec) {
        let ctl = ctl_path(spec);
        if !ctl.exists() {
            return;
        }
        let mut argv = self.ssh_target(spec).argv(false, 1, &[]);
        let host = argv.pop().expect("destination");
        argv.extend(["-O".to_string(), "exit".to_string(), host]);
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status(),
        )
        .await;
        let _ = std::fs::remove_file(&ctl);
    }

    pub(super) async fn ssh_run(
        &self,
        spec: &MachineSpec,
        remote: &str,
        connect_s: u32,
        timeout: Duration,
    ) -> Result<ExecOutput, VmmError> {
        let argv = self
            .ssh_target(spec)
            .argv(false, connect_s, &[remote.to_string()]);
        let (tx, rx) = output_queue();
        let run =
            async move { run_streaming(&spec.name, &argv, timeout, &tx, |e| spawn_error(e, &argv[0])).await };
        let (done, out) = tokio::join!(run, collect(rx));
        Ok(ExecOutput {
            code: done?.code,
            ..out
        })
    }
}
