//! Templates for the QEMU backend: a guest booted once with no identity, settled, and saved
//! (RAM file, device state, disk); clones restored from it in tens of milliseconds.
//!
//! The RAM is a file: the template's QEMU writes it (`share=on`) and leaves it out of the saved
//! state (`x-ignore-shared`); each clone maps it privately (copy on write), so it is never
//! written again. The state travels through descriptors (`getfd` on save, stdin on restore):
//! QEMU's seccomp filter forbids the `exec:` transport. A clone starts paused with the
//! template's MAC and no address; the agent then gives it its identity (see
//! `sistemo_agent::identity`) while its TAP is still off the bridge.

use super::args::Boot;
use super::binary::fingerprint;
use super::files::{private_file, qmp_path};
use super::qmp::Qmp;
use super::{Qemu, kill_vmm, wait_exit};
use crate::{Hypervisor, Instance, MachineSpec, Progress, TEMPLATE_MAC, Templates, VmmError, format_mac};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sistemo_agent::proto::{Identity, ProtoError};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The template's files in its folder.
const RAM: &str = "ram";
const STATE: &str = "state";
/// Its disk, frozen at the moment of the save.
pub const DISK: &str = "disk.raw";

/// How long a template's guest may take to settle (systemd's start-up jobs) before the save.
const SETTLE: Duration = Duration::from_secs(90);

impl Qemu {
    /// What every template made by this backend depends on besides its image and shape: the
    /// exact QEMU (binary content, version, firmware), the kernel, the initramfs, the agent,
    /// the accelerator and the command line. Looked at on every call, so that an upgrade of any
    /// of them while the daemon runs means a cold boot, never a restore by another QEMU.
    fn environment(&self) -> String {
        static AGENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let agent = AGENT.get_or_init(|| format!("{:x}", Sha256::digest(crate::AGENT_BINARY)));
        let mut h = Sha256::new();
        for part in [
            self.qemu.identity(),
            fingerprint(&self.assets.kernel),
            fingerprint(&self.assets.initramfs),
            agent.clone(),
            self.name(),
            self.kernel_cmdline(),
            super::TCG_TB_MIB.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        format!("{:x}", h.finalize())
    }

    /// Save the paused-or-running guest of `spec` into `dir` (device state; the RAM is already
    /// in its file) and end its VMM.
    async fn save(&self, spec: &MachineSpec, inst: &Instance, dir: &Path) -> Result<(), VmmError> {
        let mut q = Qmp::connect(&qmp_path(spec)).await?;
        q.execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .await?;
        // QEMU's default of 128 MiB/s makes a save several times slower than the disk.
        q.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 100u64 << 30})),
        )
        .await?;
        // `stop` also flushes the disk: the frozen disk matches the saved state.
        q.execute("stop", None).await?;
        let state = dir.join(STATE);
        let _ = std::fs::remove_file(&state);
        let f = private_file(&state)?;
        {
            use std::os::fd::AsFd;
            q.execute_with_fd("getfd", serde_json::json!({"fdname": "template"}), f.as_fd())
                .await?;
        }
        drop(f);
        q.execute("migrate", Some(serde_json::json!({"uri": "fd:template"})))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = q.execute("query-migrate", None).await?;
            match r["return"]["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(self.boot_error(
                        spec,
                        &format!(
                            "saving the template failed: {}",
                            r["return"]["error-desc"].as_str().unwrap_or("no reason given")
                        ),
                    ));
                }
                _ if Instant::now() >= deadline => {
                    return Err(self.boot_error(spec, "saving the template took more than 120s"));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let _ = q.execute("quit", None).await;
        if !wait_exit(inst, Instant::now() + Duration::from_secs(10)).await {
            kill_vmm(inst).await;
        }
        Ok(())
    }

    /// Wait until systemd has finished starting the image's units (`degraded` counts), so
    /// that clones do not redo that work; other inits are taken as they are.
    async fn settle(&self, spec: &MachineSpec, progress: Progress<'_>) -> Result<(), VmmError> {
        let facts = self.facts(spec).await?;
        if facts.init != "systemd" {
            return Ok(());
        }
        progress("waiting for the template's services to start");
        let out = crate::exec_collect(self, spec, "systemctl is-system-running --wait", SETTLE).await?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if said != "running" && said != "degraded" {
            return Err(self.boot_error(
                spec,
                &format!("the template's systemd did not settle: it says {said:?}"),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Templates for Qemu {
    fn template_key(&self, image_digest: &str, vcpus: u32, memory_mib: u64) -> String {
        let mut h = Sha256::new();
        h.update(
            format!(
                "{image_digest}\n{}\n{}\n{}\n",
                vcpus.max(1),
                memory_mib.max(128),
                self.environment()
            )
            .as_bytes(),
        );
        format!("{:x}", h.finalize())[..32].to_string()
    }

    fn template_files(&self, dir: &Path) -> Vec<PathBuf> {
        [RAM, STATE, DISK].iter().map(|f| dir.join(f)).collect()
    }

    async fn make_template(
        &self,
        spec: &MachineSpec,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        let ram = spec.dir.join(RAM);
        let _ = std::fs::remove_file(&ram);
        private_file(&ram)?;
        let inst = self
            .spawn_vmm(spec, Boot::Template { ram: &ram }, Stdio::null())
            .await?;
        let res = async {
            self.wait_ready(spec, &inst, timeout, progress).await?;
            self.wait_init(spec, timeout, progress).await?;
            self.settle(spec, progress).await?;
            progress("saving the template");
            self.save(spec, &inst, &spec.dir).await
        }
        .await;
        if res.is_err() {
            kill_vmm(&inst).await;
        }
        let _ = self.cleanup(spec).await;
        res
    }

    async fn restore(&self, spec: &MachineSpec, template: &Path) -> Result<Instance, VmmError> {
        let ram = template.join(RAM);
        let state = std::fs::File::open(template.join(STATE)).map_err(VmmError::io(format!(
            "opening the template in {}",
            template.display()
        )))?;
        // The machine's SSH host key (a program run) is made while QEMU starts, ready for
        // `set_identity`.
        let (inst, cfg) = tokio::join!(
            self.spawn_vmm(spec, Boot::Restore { ram: &ram }, Stdio::from(state)),
            self.guest_config(spec, false)
        );
        let inst = inst?;
        let res = async {
            cfg?;
            let mut q = Qmp::connect(&qmp_path(spec)).await?;
            q.execute(
                "migrate-set-capabilities",
                Some(serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
            )
            .await?;
            q.execute("migrate-incoming", Some(serde_json::json!({"uri": "fd:0"})))
                .await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let r = q.execute("query-status", None).await?;
                match r["return"]["status"].as_str().unwrap_or("") {
                    "inmigrate" if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    "paused" => break,
                    s => {
                        return Err(
                            self.boot_error(spec, &format!("restoring the template ended in state {s:?}"))
                        );
                    }
                }
            }
            q.execute("cont", None).await.map(drop)
        }
        .await;
        match res {
            Ok(()) => Ok(inst),
            Err(e) => {
                kill_vmm(&inst).await;
                Err(e)
            }
        }
    }

    async fn set_identity(&self, spec: &MachineSpec, timeout: Duration) -> Result<Vec<String>, VmmError> {
        let cfg = self.guest_config(spec, false).await?;
        let mut entropy = vec![0u8; 64];
        {
            use std::io::Read;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut entropy))
                .map_err(VmmError::io("reading host entropy"))?;
        }
        let err = |reason: String| VmmError::Exec {
            name: spec.name.clone(),
            reason,
        };
        let id = |now: std::time::Duration| Identity {
            time_s: now.as_secs() as i64,
            time_ns: now.subsec_nanos(),
            entropy: entropy.clone(),
            from_mac: format_mac(&TEMPLATE_MAC),
            mac: format_mac(&cfg.mac),
            address: format!("{}/{}", cfg.ip, cfg.prefix),
            gateway: cfg.gateway.to_string(),
            dns: cfg.dns.iter().map(ToString::to_string).collect(),
            hostname: cfg.hostname.clone(),
            machine_id: cfg.machine_id.clone(),
            authorized_keys: cfg.authorized_keys.clone(),
            host_key_private: String::from_utf8_lossy(&cfg.host_key_private).into_owned(),
            host_key_public: cfg.host_key_public.clone(),
        };
        let fut = async {
            loop {
                let c = self.agents.get(spec, &self.channel(spec)).await?;
                // The clock is read last, just before sending.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                match c.identity(id(now)).await {
                    Ok(steps) => return Ok(steps),
                    // The channel broke (the agent went quiet past the keepalive, or the stream
                    // ended): a new connection resynchronises both ends, and applying the same
                    // identity again is harmless.
                    Err(ProtoError::Io(e)) => {
                        tracing::warn!(machine = %spec.name, "the agent channel broke while the clone took its identity; sending it again: {e}");
                    }
                    Err(e) => return Err(err(format!("the guest agent could not take its identity: {e}"))),
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or_else(|_| {
            Err(err(format!(
                "the guest agent did not take its identity within {}s",
                timeout.as_secs()
            )))
        })
    }
}
