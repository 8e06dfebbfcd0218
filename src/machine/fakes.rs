//! In-memory fakes of what the machine service needs from the host (links, the firewall, the
//! hypervisor, images), for its rollback and race tests without root.

use crate::domain::{ByteSize, ImageTag};
use crate::images::{ImageBackend, ImageError};
use crate::net::firewall::{
    BridgeNet, Desired, FirewallDriver, FirewallError, Health, MachinePort, PortMapping,
};
use crate::net::link::{HostLinks, LinkError};
use ipnet::Ipv4Net;
use sistemo_vmm::image::ImageInfo;
use sistemo_vmm::{Hypervisor, Instance, LinkKind, MachineSpec, OutputChunk, Progress, VmmError};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Links by name; `fail_tap` makes TAP creation fail.
#[derive(Default)]
pub(super) struct FakeLinks {
    pub(super) links: Mutex<HashSet<String>>,
    pub(super) fail_tap: AtomicBool,
    /// Links on another daemon's bridge in the same namespace.
    pub(super) foreign: Mutex<HashSet<String>>,
}

#[async_trait::async_trait]
impl HostLinks for FakeLinks {
    async fn ensure_bridge(&self, name: &str, _: Ipv4Net, _: Ipv4Addr) -> Result<(), LinkError> {
        self.links.lock().unwrap().insert(name.into());
        Ok(())
    }
    async fn exists(&self, name: &str) -> Result<bool, LinkError> {
        Ok(self.links.lock().unwrap().contains(name))
    }
    async fn attach(&self, _: &str, _: &str) -> Result<(), LinkError> {
        Ok(())
    }
    async fn create_tap(&self, name: &str, _: &str) -> Result<(), LinkError> {
        if self.fail_tap.load(Ordering::SeqCst) {
            return Err(LinkError::Foreign("TAP creation failed (fake)".into()));
        }
        self.links.lock().unwrap().insert(name.into());
        Ok(())
    }
    async fn create_detached_tap(&self, name: &str, _: Option<(u32, u32)>) -> Result<(), LinkError> {
        self.create_tap(name, "").await
    }
    async fn delete(&self, name: &str) -> Result<(), LinkError> {
        self.links.lock().unwrap().remove(name);
        self.foreign.lock().unwrap().remove(name);
        Ok(())
    }
    async fn flush_neighbour(&self, _: Ipv4Addr) -> Result<(), LinkError> {
        Ok(())
    }
    async fn routed_v4(&self) -> Result<Vec<Ipv4Net>, LinkError> {
        Ok(vec![])
    }
    /// Links sit on the default bridge; `foreign` ones on another daemon's bridge.
    async fn with_controllers(&self) -> Result<Vec<(String, Option<String>)>, LinkError> {
        let on = |l: &String, b: &str| (l.clone(), Some(b.to_string()));
        let mut all: Vec<_> = self
            .links
            .lock()
            .unwrap()
            .iter()
            .map(|l| on(l, "sistemo0"))
            .collect();
        all.extend(self.foreign.lock().unwrap().iter().map(|l| on(l, "other0")));
        Ok(all)
    }
}

/// The mappings and port bindings the kernel would hold; `fail_add` makes adds and rebuilds
/// fail (the kernel refuses).
#[derive(Default)]
pub(super) struct FakeFirewall {
    pub(super) held: Arc<Mutex<HashSet<PortMapping>>>,
    pub(super) bound: Arc<Mutex<HashSet<MachinePort>>>,
    pub(super) fail_add: Arc<AtomicBool>,
}

impl FirewallDriver for FakeFirewall {
    fn rebuild(&self, d: &Desired) -> Result<(), FirewallError> {
        if self.fail_add.load(Ordering::SeqCst) {
            return Err(FirewallError::Rejected("fake rejection".into()));
        }
        *self.held.lock().unwrap() = d.mappings.iter().copied().collect();
        *self.bound.lock().unwrap() = d.ports.iter().cloned().collect();
        Ok(())
    }
    fn bind(&self, p: &[MachinePort]) -> Result<(), FirewallError> {
        self.bound.lock().unwrap().extend(p.iter().cloned());
        Ok(())
    }
    fn unbind(&self, p: &[MachinePort]) -> Result<(), FirewallError> {
        let mut b = self.bound.lock().unwrap();
        for x in p {
            b.remove(x);
        }
        Ok(())
    }
    fn add(&self, m: &[PortMapping]) -> Result<(), FirewallError> {
        if self.fail_add.load(Ordering::SeqCst) {
            return Err(FirewallError::Rejected("fake rejection".into()));
        }
        self.held.lock().unwrap().extend(m.iter().copied());
        Ok(())
    }
    fn remove(&self, m: &[PortMapping]) -> Result<(), FirewallError> {
        let mut h = self.held.lock().unwrap();
        for x in m {
            h.remove(x);
        }
        Ok(())
    }
    fn check(&self, _: bool) -> Result<Health, FirewallError> {
        Ok(Health::InSync)
    }
    fn ensure_forward_compat(&self, _: &[BridgeNet]) -> Result<Vec<String>, FirewallError> {
        Ok(vec![])
    }
    fn remove_forward_compat(&self) -> Result<(), FirewallError> {
        Ok(())
    }
    fn render(&self, _: &Desired) -> String {
        String::new()
    }
}

/// Where the fake hypervisor fails.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Fail {
    Nothing,
    Start,
    Ready,
    /// `--wait init` fails after the machine booted and its rules went in.
    Init,
}

/// VMMs are this test process (alive by pid and start time); `running` holds machines whose
/// VMM was started and not stopped. An exec blocks until its machine stops when `hold_exec`.
pub(super) struct FakeVmm {
    pub(super) fail: Mutex<Fail>,
    pub(super) running: Mutex<HashSet<uuid::Uuid>>,
    pub(super) stopped: Notify,
    pub(super) hold_exec: AtomicBool,
    /// When set, a stop waits for `release_stop` (a guest slow to power down).
    pub(super) hold_stop: AtomicBool,
    pub(super) release_stop: Notify,
    /// When set, a start waits for `release_start` (a slow boot).
    pub(super) hold_start: AtomicBool,
    pub(super) release_start: Notify,
    /// The CPU cap (thousandths) of the last VMM started.
    pub(super) started_cpu_limit: Mutex<u32>,
}

#[async_trait::async_trait]
impl Hypervisor for FakeVmm {
    fn name(&self) -> String {
        "fake".into()
    }
    fn link_kind(&self) -> LinkKind {
        LinkKind::Tap
    }
    async fn start(&self, spec: &MachineSpec) -> Result<Instance, VmmError> {
        if self.hold_start.load(Ordering::SeqCst) {
            self.release_start.notified().await;
        }
        if *self.fail.lock().unwrap() == Fail::Start {
            return Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: "fake start failure".into(),
            });
        }
        self.running.lock().unwrap().insert(spec.id);
        *self.started_cpu_limit.lock().unwrap() = spec.cpu_limit_milli;
        Ok(Instance::of_pid(std::process::id() as i32).expect("own process"))
    }
    async fn wait_ready(
        &self,
        spec: &MachineSpec,
        _: &Instance,
        _: Duration,
        _: Progress<'_>,
    ) -> Result<(), VmmError> {
        if *self.fail.lock().unwrap() == Fail::Ready {
            return Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: "kernel panic (fake)".into(),
            });
        }
        Ok(())
    }
    async fn wait_init(&self, spec: &MachineSpec, _: Duration, _: Progress<'_>) -> Result<(), VmmError> {
        if *self.fail.lock().unwrap() == Fail::Init {
            return Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: "init never answered (fake)".into(),
            });
        }
        Ok(())
    }
    async fn stop(&self, spec: &MachineSpec, _: &Instance, _: Duration) -> Result<(), VmmError> {
        if self.hold_stop.load(Ordering::SeqCst) {
            self.release_stop.notified().await;
        }
        self.running.lock().unwrap().remove(&spec.id);
        self.stopped.notify_waiters();
        Ok(())
    }
    async fn cleanup(&self, _: &MachineSpec) -> Result<(), VmmError> {
        Ok(())
    }
    async fn exec(
        &self,
        spec: &MachineSpec,
        cmd: &str,
        _: Duration,
        out: sistemo_vmm::OutputSink,
    ) -> Result<i32, VmmError> {
        let _ = out
            .send(OutputChunk::Stdout(format!("ran {cmd}\n").into_bytes()))
            .await;
        if self.hold_exec.load(Ordering::SeqCst) {
            let stopped = self.stopped.notified();
            if self.running.lock().unwrap().contains(&spec.id) {
                stopped.await;
            }
            return Err(VmmError::Exec {
                name: spec.name.clone(),
                reason: "the machine stopped".into(),
            });
        }
        Ok(0)
    }
    async fn session(
        &self,
        spec: &MachineSpec,
        _: sistemo_vmm::Start,
    ) -> Result<sistemo_vmm::Session, VmmError> {
        Err(VmmError::Exec {
            name: spec.name.clone(),
            reason: "the fake VMM has no guest agent".into(),
        })
    }
    async fn facts(&self, spec: &MachineSpec) -> Result<sistemo_vmm::Facts, VmmError> {
        Err(VmmError::Exec {
            name: spec.name.clone(),
            reason: "the fake VMM has no guest agent".into(),
        })
    }
    fn shell_command(&self, _: &MachineSpec) -> Vec<String> {
        vec!["true".into()]
    }
}

/// Disks are files; `full` makes the copy fail half-way like a full disk.
#[derive(Default)]
pub(super) struct FakeImages {
    pub(super) full: AtomicBool,
}

#[async_trait::async_trait]
impl ImageBackend for FakeImages {
    async fn create_disk(
        &self,
        image: &str,
        dir: &Path,
        storage: Option<ByteSize>,
        _: Progress<'_>,
    ) -> Result<(PathBuf, ByteSize), ImageError> {
        if image == "nope" {
            return Err(VmmError::ImageNotFound {
                reference: image.into(),
            }
            .into());
        }
        let p = dir.join("disk.raw");
        std::fs::write(&p, b"half a disk").unwrap();
        if self.full.load(Ordering::SeqCst) {
            return Err(VmmError::Io {
                context: "cloning the image".into(),
                source: std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
            }
            .into());
        }
        Ok((p, storage.unwrap_or(ByteSize::mib(2048))))
    }
    fn list(&self) -> Vec<ImageInfo> {
        vec![]
    }
    async fn build(
        &self,
        _: &ImageTag,
        _: &[sistemo_vmm::image::PackageName],
        _: Progress<'_>,
    ) -> Result<ImageInfo, ImageError> {
        unreachable!("not used here")
    }
    fn remove(&self, _: &ImageTag) -> Result<bool, ImageError> {
        Ok(false)
    }
}
