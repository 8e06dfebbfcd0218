//! Rollback and race tests of the machine service without root: in-memory fakes stand in for
//! netlink, nftables, QEMU and the image store (which need root or real VMs; the real ones are
//! exercised by `tests/*.rs`). Each test checks that a failure leaves no row, IP, rule, link or file.

use super::Deploy;
use super::fakes::{Fail, FakeFirewall, FakeImages, FakeLinks, FakeVmm};
use crate::api::ErrorKind;
use crate::backend::Backend;
use crate::config::Config;
use crate::domain::{ByteSize, MachineState, RestartPolicy};
use crate::host::Host;
use crate::net::firewall::{MachinePort, PortMapping};
use crate::store::Store;
use sistemo_vmm::{Instance, OutputChunk};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

struct Rig {
    host: Arc<Host>,
    links: Arc<FakeLinks>,
    held: Arc<Mutex<HashSet<PortMapping>>>,
    bound: Arc<Mutex<HashSet<MachinePort>>>,
    fail_fw: Arc<AtomicBool>,
    vmm: Arc<FakeVmm>,
    images: Arc<FakeImages>,
    dir: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn rig() -> Rig {
    let dir = std::env::temp_dir().join(format!("sistemo-unit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("machines")).unwrap();
    let links = Arc::new(FakeLinks::default());
    let fw = FakeFirewall::default();
    let (held, bound, fail_fw) = (fw.held.clone(), fw.bound.clone(), fw.fail_add.clone());
    let vmm = Arc::new(FakeVmm {
        fail: Mutex::new(Fail::Nothing),
        running: Mutex::default(),
        stopped: Notify::new(),
        hold_exec: AtomicBool::new(false),
        hold_stop: AtomicBool::new(false),
        release_stop: Notify::new(),
        hold_start: AtomicBool::new(false),
        release_start: Notify::new(),
        started_cpu_limit: Mutex::new(0),
    });
    let images = Arc::new(FakeImages::default());
    let cfg = Config {
        data_dir: dir.clone(),
        max_vcpus: Some(2),
        // The fakes' disks are a few bytes: a nearly full host must not fail these tests.
        min_disk_free: ByteSize::mib(64),
        ..Config::default()
    };
    let backend = Backend {
        vmm: vmm.clone(),
        images: Some(images.clone()),
    };
    let host = Host::new(
        cfg,
        Store::in_memory().unwrap(),
        links.clone(),
        Box::new(fw),
        backend,
    );
    host.startup().await.unwrap();
    Rig {
        host: Arc::new(host),
        links,
        held,
        bound,
        fail_fw,
        vmm,
        images,
        dir,
    }
}

fn web(expose: &[&str]) -> Deploy {
    Deploy {
        io: Default::default(),
        image: "debian".into(),
        name: Some("web".parse().unwrap()),
        vcpus: None,
        cpu_limit: None,
        memory: None,
        // Small: the free-space check must pass on a nearly full host (the fakes write bytes).
        storage: Some(ByteSize::mib(256)),
        expose: expose.iter().map(|s| s.parse().unwrap()).collect(),
        network: None,
        restart: RestartPolicy::No,
        wait: Default::default(),
        wait_timeout: None,
        attach: vec![],
        root_volume: None,
        clone_of: None,
        cold: false,
        workload: Default::default(),
    }
}

impl Rig {
    /// Nothing of a machine is left: no row (so no IP lease or port claim), no rule, no TAP,
    /// no running VMM, no directory.
    fn assert_nothing_left(&self) {
        assert!(
            self.host.machines.list().unwrap().is_empty(),
            "a machine row was left"
        );
        assert!(
            self.host.machines.ports().unwrap().is_empty(),
            "a port claim was left"
        );
        assert!(self.held.lock().unwrap().is_empty(), "a firewall rule was left");
        assert!(self.bound.lock().unwrap().is_empty(), "a port binding was left");
        let links = self.links.links.lock().unwrap();
        assert!(
            links.iter().all(|l| l == "sistemo0"),
            "a link was left: {links:?}"
        );
        assert!(
            self.vmm.running.lock().unwrap().is_empty(),
            "a VMM was left running"
        );
        let left: Vec<_> = std::fs::read_dir(self.dir.join("machines")).unwrap().collect();
        assert!(left.is_empty(), "a machine directory was left: {left:?}");
    }

    async fn deploy(&self, d: Deploy) -> crate::error::Result<super::MachineView> {
        self.host.machines.deploy(d, &|_| {}).await
    }
}

#[tokio::test]
async fn deploy_that_works_holds_row_rule_link_and_vmm() {
    let r = rig().await;
    let v = r.deploy(web(&["28101:80"])).await.unwrap();
    assert_eq!(v.machine.state, MachineState::Running);
    assert_eq!(v.machine.ip.to_string(), "10.200.0.2");
    assert_eq!(r.held.lock().unwrap().len(), 1);
    assert_eq!(r.vmm.running.lock().unwrap().len(), 1);
    assert!(
        r.links
            .links
            .lock()
            .unwrap()
            .contains(&crate::net::host_ifname(&v.machine.id))
    );
    r.host.machines.delete("web", &|_| {}).await.unwrap();
    r.assert_nothing_left();
}

#[tokio::test]
async fn deploy_failing_at_tap_creation_leaves_nothing() {
    let r = rig().await;
    r.links.fail_tap.store(true, Ordering::SeqCst);
    let e = r.deploy(web(&["28102:80"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    r.assert_nothing_left();
}

#[tokio::test]
async fn deploy_failing_at_boot_or_ready_leaves_nothing() {
    for fail in [Fail::Start, Fail::Ready] {
        let r = rig().await;
        *r.vmm.fail.lock().unwrap() = fail;
        let e = r.deploy(web(&["28103:80"])).await.unwrap_err();
        assert!(crate::error::chain(&e).contains("fake"), "{fail:?}: {e}");
        r.assert_nothing_left();
    }
}

#[tokio::test]
async fn deploy_whose_firewall_add_fails_leaves_nothing() {
    let r = rig().await;
    r.fail_fw.store(true, Ordering::SeqCst);
    assert!(r.deploy(web(&["28104:80"])).await.is_err());
    r.assert_nothing_left();
}

#[tokio::test]
async fn deploy_on_a_full_disk_is_507_and_leaves_nothing() {
    let r = rig().await;
    r.images.full.store(true, Ordering::SeqCst);
    let e = r.deploy(web(&["28105:80"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InsufficientStorage, "{e}");
    assert_eq!(e.body().status, 507);
    r.assert_nothing_left();
    // and an unknown image is 404, not 400
    let mut d = web(&[]);
    d.image = "nope".into();
    r.images.full.store(false, Ordering::SeqCst);
    assert_eq!(r.deploy(d).await.unwrap_err().kind(), ErrorKind::NotFound);
    r.assert_nothing_left();
}

#[tokio::test]
async fn two_deploys_with_one_name_make_one_machine() {
    let r = rig().await;
    let (a, b) = tokio::join!(r.deploy(web(&["28106:80"])), r.deploy(web(&["28107:80"])));
    let (ok, err) = match (a, b) {
        (Ok(v), Err(e)) | (Err(e), Ok(v)) => (v, e),
        other => panic!("expected one success and one conflict, got {other:?}"),
    };
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(r.host.machines.list().unwrap().len(), 1);
    assert_eq!(r.held.lock().unwrap().len(), 1, "only the winner's rule");
    assert_eq!(r.vmm.running.lock().unwrap().len(), 1);
    assert_eq!(ok.machine.name.as_str(), "web");
}

#[tokio::test]
async fn expose_racing_delete_leaves_no_claim_or_rule() {
    for _ in 0..20 {
        let r = Arc::new(rig().await);
        r.deploy(web(&[])).await.unwrap();
        let specs = ["29000:90".parse().unwrap()];
        let (exposed, deleted) = tokio::join!(
            r.host.machines.expose("web", &specs),
            r.host.machines.delete("web", &|_| {})
        );
        deleted.unwrap();
        if let Err(e) = exposed {
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        }
        r.assert_nothing_left();
    }
}

#[tokio::test]
async fn expose_whose_firewall_add_fails_keeps_no_claim() {
    let r = rig().await;
    r.deploy(web(&["28108:80"])).await.unwrap();
    r.fail_fw.store(true, Ordering::SeqCst);
    let specs = ["29001:90".parse().unwrap()];
    assert!(r.host.machines.expose("web", &specs).await.is_err());
    let ports = r.host.machines.ports().unwrap();
    assert_eq!(ports.len(), 1, "only the deploy's claim: {ports:?}");
    assert_eq!(r.held.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn stop_racing_exec_ends_stopped_and_exec_ends_too() {
    let r = Arc::new(rig().await);
    r.deploy(web(&["28109:80"])).await.unwrap();
    r.vmm.hold_exec.store(true, Ordering::SeqCst);
    let (tx, mut rx) = sistemo_vmm::output_queue();
    let r2 = r.clone();
    let exec = tokio::spawn(async move {
        r2.host
            .machines
            .exec("web", "sleep 100", Duration::from_secs(60), tx)
            .await
    });
    // The command runs (its first output arrived) before the stop begins.
    assert!(matches!(rx.recv().await, Some(OutputChunk::Stdout(_))));
    let v = r.host.machines.stop("web", &|_| {}).await.unwrap();
    assert_eq!(v.machine.state, MachineState::Stopped);
    let done = tokio::time::timeout(Duration::from_secs(10), exec)
        .await
        .expect("exec ended when its machine stopped")
        .unwrap();
    assert!(done.is_err(), "exec into a stopped machine reports an error");
    assert!(
        r.held.lock().unwrap().is_empty(),
        "stopped machine's rule left the firewall"
    );
    let e = r
        .host
        .machines
        .exec(
            "web",
            "true",
            Duration::from_secs(5),
            sistemo_vmm::output_queue().0,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
}

#[tokio::test]
async fn failed_start_shows_error_with_reason_then_starts() {
    let r = rig().await;
    r.deploy(web(&["28110:80"])).await.unwrap();
    r.host.machines.stop("web", &|_| {}).await.unwrap();
    *r.vmm.fail.lock().unwrap() = Fail::Ready;
    assert!(r.host.machines.start("web", &|_| {}).await.is_err());
    let m = r.host.machines.get("web").unwrap().machine;
    assert_eq!(m.state, MachineState::Error);
    assert!(
        m.error.as_deref().unwrap_or("").contains("kernel panic"),
        "{:?}",
        m.error
    );
    assert!(r.held.lock().unwrap().is_empty());
    assert!(r.vmm.running.lock().unwrap().is_empty());
    *r.vmm.fail.lock().unwrap() = Fail::Nothing;
    let m = r.host.machines.start("web", &|_| {}).await.unwrap().machine;
    assert_eq!((m.state, m.error), (MachineState::Running, None));
    assert_eq!(r.held.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_vmm_that_dies_is_noticed_and_its_rules_leave() {
    let r = rig().await;
    let v = r.deploy(web(&["28111:80"])).await.unwrap();
    // Pretend the VMM died: its recorded process start time no longer matches.
    let dead = Instance {
        pid: std::process::id() as i32,
        start_time: 1,
    };
    // Through the store, as the daemon would find it.
    r.host
        .machines
        .store
        .lock()
        .set_instance(v.machine.id, Some(&dead))
        .unwrap();
    assert_eq!(r.host.machines.reap_dead().await.unwrap(), 1);
    let m = r.host.machines.get("web").unwrap().machine;
    assert_eq!(m.state, MachineState::Error);
    assert!(m.error.unwrap().contains("exited unexpectedly"));
    assert!(
        r.held.lock().unwrap().is_empty(),
        "a dead machine's rules left the firewall"
    );
    assert_eq!(r.host.machines.reap_dead().await.unwrap(), 0, "noticed once");
}

#[tokio::test]
async fn startup_rolls_back_an_interrupted_deploy() {
    let r = rig().await;
    let m = r
        .host
        .machines
        .store
        .lock()
        .create_machine(
            &crate::store::NewMachine {
                id: uuid::Uuid::new_v4(),
                name: "half".parse().unwrap(),
                image: "debian".into(),
                network: "default".parse().unwrap(),
                vcpus: 1,
                memory_mib: 512,
                storage_bytes: 0,
                restart: RestartPolicy::No,
            },
            &["27000".parse().unwrap()],
        )
        .unwrap();
    std::fs::create_dir_all(r.dir.join("machines").join(m.id.to_string())).unwrap();
    // and a directory a crash left without any row
    let orphan = r.dir.join("machines").join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("disk.raw"), b"x").unwrap();
    r.host.startup().await.unwrap();
    r.assert_nothing_left();
}

#[tokio::test]
async fn a_rebuild_during_a_slow_delete_does_not_bring_its_rules_back() {
    let r = Arc::new(rig().await);
    r.deploy(web(&["28112:80"])).await.unwrap();
    r.vmm.hold_stop.store(true, Ordering::SeqCst);
    let r2 = r.clone();
    let delete = tokio::spawn(async move { r2.host.machines.delete("web", &|_| {}).await });
    // The delete is in the guest's power-down: the machine is `deleting`, its rules are out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.host.machines.get("web").map(|v| v.machine.state).ok() != Some(MachineState::Deleting) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delete never reached `deleting`"
        );
        tokio::task::yield_now().await;
    }
    // A rebuild now (a `network create`, the repair loop after a flush) reads the database.
    r.host.repair_once(false).unwrap();
    r.host.networks.create("blue", None).await.unwrap();
    assert!(
        r.held.lock().unwrap().is_empty(),
        "a rebuild brought a deleting machine's rule back"
    );
    r.vmm.release_stop.notify_one();
    delete.await.unwrap().unwrap();
    r.host.networks.delete("blue").await.unwrap();
    r.assert_nothing_left();
}

#[tokio::test]
async fn storage_over_the_limit_or_the_free_space_is_refused_before_anything_is_made() {
    let r = rig().await;
    let mut d = web(&[]);
    d.storage = Some(ByteSize::bytes(300 << 30));
    let e = r.deploy(d).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("max_storage"), "{e}");
    let st = nix::sys::statvfs::statvfs(&r.dir).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let mut d = web(&[]);
    // within max_storage only on a host with less than 254 GiB free
    d.storage = Some(ByteSize::bytes((free + (1 << 30)).min(255 << 30)));
    if free < 250 << 30 {
        let e = r.deploy(d).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InsufficientStorage, "{e}");
        assert!(e.to_string().contains("min_disk_free"), "{e}");
    }
    r.assert_nothing_left();
}

#[tokio::test]
async fn start_up_kills_a_vmm_no_machine_owns() {
    let r = rig().await;
    // A VMM a crash left behind: named like QEMU, its command line in a machine directory.
    // (a shell under QEMU's name, waiting on its stdin: no child of its own to leak)
    // (a link, not a copy: a copy still open for writing in a forking test process can make
    // its exec fail with "text file busy")
    let qemu = r.dir.join("qemu-system-x86_64");
    std::os::unix::fs::symlink("/bin/sh", &qemu).unwrap();
    let disk = r
        .dir
        .join("machines")
        .join(uuid::Uuid::new_v4().to_string())
        .join("disk.raw");
    let waiting = |prog: &std::path::Path| {
        std::process::Command::new(prog)
            .args(["-c", "read x"])
            .arg(&disk)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut orphan = waiting(&qemu);
    // and a process that only names a machine's file, which must live
    let mut reader = waiting(std::path::Path::new("/bin/sh"));
    assert!(orphan.try_wait().unwrap().is_none() && reader.try_wait().unwrap().is_none());
    r.host.startup().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if orphan.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan VMM still runs: {:?}, found {:?} under {}",
            std::fs::read(format!("/proc/{}/cmdline", orphan.id()))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ")),
            super::recovery::vmm_processes(&r.dir.join("machines")),
            r.dir.display()
        );
        tokio::task::yield_now().await;
    }
    assert!(reader.try_wait().unwrap().is_none(), "only VMMs are killed");
    reader.kill().unwrap();
    reader.wait().unwrap();
}

#[tokio::test]
async fn a_clean_stop_waits_for_operations_in_flight() {
    let r = rig().await;
    assert!(r.host.drained(Duration::from_millis(1)).await, "idle at once");
    let op = r.host.begin();
    assert!(
        !r.host.drained(Duration::from_millis(20)).await,
        "one operation runs"
    );
    let done = tokio::spawn(async move {
        tokio::task::yield_now().await;
        drop(op);
    });
    assert!(
        r.host.drained(Duration::from_secs(5)).await,
        "drained once it ended"
    );
    done.await.unwrap();
}

/// Make `web`'s VMM look dead to the daemon (its process start time no longer matches).
fn kill_vmm(r: &Rig, id: uuid::Uuid) {
    let dead = Instance {
        pid: std::process::id() as i32,
        start_time: 1,
    };
    r.host
        .machines
        .store
        .lock()
        .set_instance(id, Some(&dead))
        .unwrap();
}

#[tokio::test]
async fn restart_policies_bring_a_dead_machine_back_with_back_off() {
    let r = rig().await;
    let mut d = web(&["28130:80"]);
    d.restart = RestartPolicy::OnFailure;
    let v = r.deploy(d).await.unwrap();
    kill_vmm(&r, v.machine.id);
    assert_eq!(r.host.machines.reap_dead().await.unwrap(), 1);
    assert_eq!(
        r.host.machines.get("web").unwrap().machine.state,
        MachineState::Error
    );
    // back again after the first back-off (1 s), rules and all
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        r.host.machines.reap_dead().await.unwrap();
        r.host.machines.restart_due().await;
        if r.host.machines.get("web").unwrap().machine.state == MachineState::Running {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(r.held.lock().unwrap().len(), 1, "its rule is back");
    // a second death soon after waits longer (2 s): not restarted at once
    kill_vmm(&r, v.machine.id);
    r.host.machines.reap_dead().await.unwrap();
    r.host.machines.restart_due().await;
    r.host.machines.reap_dead().await.unwrap();
    r.host.machines.restart_due().await;
    assert_eq!(
        r.host.machines.get("web").unwrap().machine.state,
        MachineState::Error
    );
    // a machine with the default policy stays down
    let mut d = web(&[]);
    d.name = Some("plain".parse().unwrap());
    let p = r.deploy(d).await.unwrap();
    kill_vmm(&r, p.machine.id);
    r.host.machines.reap_dead().await.unwrap();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        r.host.machines.reap_dead().await.unwrap();
        r.host.machines.restart_due().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        r.host.machines.get("plain").unwrap().machine.state,
        MachineState::Error
    );
}

#[tokio::test]
async fn a_machine_without_a_name_is_named_after_its_image() {
    let r = rig().await;
    let unnamed = |image: &str| Deploy {
        image: image.into(),
        name: None,
        ..web(&[])
    };
    let mut names = vec![];
    for image in [
        "debian",
        "debian",
        "/srv/images/My_App.rootfs.ext4",
        "https://example.org/x/alpine-3.20.ext4.gz",
    ] {
        names.push(r.deploy(unnamed(image)).await.unwrap().machine.name.to_string());
    }
    assert_eq!(names, ["debian", "debian-2", "my-app", "alpine-3"]);
}

#[tokio::test]
async fn oci_overrides_on_an_image_with_an_init_system_are_refused_and_leave_nothing() {
    let r = rig().await;
    let d = Deploy {
        workload: crate::machine::Overrides::parse(vec!["A=1".into()], None, None, None, vec![]).unwrap(),
        ..web(&["8080:80"])
    };
    let e = r.deploy(d).await.unwrap_err().to_string();
    assert!(
        e.contains("\"debian\"") && e.contains("--env") && e.contains("OCI"),
        "{e}"
    );
    r.assert_nothing_left();
}

/// The host-hardening cases (rollback after boot, CPU caps, the start-up sweep, restarts off
/// the liveness pass), in a file of their own.
#[path = "tests_hardening.rs"]
mod hardening;
