//! Guest access: running commands in a running machine (output streamed as it comes), sessions
//! through the guest agent (stdin, terminals, file copy), the guest's own report, the argv of
//! `machine ssh`, and the console log.

use super::Machines;
use crate::domain::MachineState;
use crate::error::{Error, Result};
use sistemo_vmm::{MachineSpec, OutputSink, Session, Start};
use std::time::Duration;

/// Most console output one `logs` call returns.
const LOG_CHUNK: u64 = 4 << 20;

impl Machines {
    /// The spec of a running machine, or a conflict saying how to start it.
    fn running_spec(&self, name: &str) -> Result<MachineSpec> {
        let m = self.store.lock().machine(name)?;
        if m.state != MachineState::Running {
            return Err(Error::Conflict(format!(
                "machine {} is {}; start it with `sistemo machine start {}`",
                m.name, m.state, m.name
            )));
        }
        self.spec_of(&m)
    }

    /// Run `cmd` through the guest's shell, sending its output to `out` as it comes; returns
    /// its exit code.
    pub async fn exec(&self, name: &str, cmd: &str, timeout: Duration, out: OutputSink) -> Result<i32> {
        let spec = self.running_spec(name)?;
        Ok(self.vmm.exec(&spec, cmd, timeout, out).await?)
    }

    /// Open a session in a running machine through its agent.
    pub async fn session(&self, name: &str, start: Start) -> Result<Session> {
        let spec = self.running_spec(name)?;
        Ok(self.vmm.session(&spec, start).await?)
    }

    /// A machine as [`Machines::get`] has it, plus what its guest agent reports when it runs.
    pub async fn status(&self, name: &str) -> Result<super::MachineView> {
        let mut v = self.get(name)?;
        if v.machine.state == MachineState::Running && v.paused.is_none() && self.vmm.has_guest() {
            let spec = self.spec_of(&v.machine)?;
            v.guest = Some(self.vmm.facts(&spec).await.map_err(|e| e.to_string()));
        }
        Ok(v)
    }

    /// The argv of an interactive shell into a running machine.
    pub fn shell(&self, name: &str) -> Result<Vec<String>> {
        let spec = self.running_spec(name)?;
        Ok(self.vmm.shell_command(&spec))
    }

    /// The machine's console log from stream offset `offset` on (for `logs -f`), or without
    /// one its newest lines (the tail); at most 4 MiB, as the guest wrote it. Returns the
    /// stream offset of the first byte with the bytes: offsets count every byte the console
    /// ever had, the dropped ones too, so a follower's offset stays valid across the cap.
    pub fn logs(&self, name: &str, offset: Option<u64>) -> Result<(u64, Vec<u8>)> {
        let m = self.store.lock().machine(name)?;
        let p = self.machine_dir(m.id).join("console.log");
        sistemo_vmm::logring::read(&p, offset, LOG_CHUNK)
            .map_err(Error::io(format!("reading {}", p.display())))
    }

    /// Keep every machine's console and QEMU logs within `log_max_bytes` (the oldest bytes
    /// go). Blocking file work: run off the async workers.
    pub fn cap_logs(&self) -> Result<()> {
        let cap = self.settings.log_max_bytes.as_bytes();
        let machines = self.store.lock().machines()?;
        for m in machines {
            let dir = self.machine_dir(m.id);
            for log in ["console.log", "qemu.log"] {
                let p = dir.join(log);
                if let Err(e) = sistemo_vmm::logring::enforce(&p, cap) {
                    tracing::warn!(machine = %m.name, log = %p.display(), error = %e, "capping a log failed");
                }
            }
        }
        Ok(())
    }
}
