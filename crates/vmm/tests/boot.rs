//! Real-VM test of the QEMU backend: boots the `debian` image in a network namespace the test
//! creates (bridge 10.250.0.1/24 + TAP), runs exec through SSH, and stops the VM.
//!
//! Ignored by plain `cargo test` (the tests are named `real_vm_*`, so `--skip real_vm_` leaves
//! them out). `sudo scripts/test` runs them with the assets it prepares
//! (`scripts/prepare-vm-assets`, data folder in `SISTEMO_VM_TEST_DIR`). By hand, as root:
//! ```text
//! cargo run -- image prepare --data-dir /var/tmp/sistemo-vmtest
//! cargo test -p sistemo-vmm --test boot -- --ignored --nocapture
//! ```
//! (`SISTEMO_VM_TEST_DIR` overrides the data folder; `SISTEMO_ACCEL=kvm|tcg`,
//! `SISTEMO_GUEST_CMDLINE_EXTRA`, `SISTEMO_DEBUG_BOOT` and `SISTEMO_KERNEL_DEB` are passed to the
//! backend as options.) Included but without root or assets, a test fails saying what is
//! missing; it never passes without booting. No traffic leaves the namespace.

use sistemo_vmm::image::{ImageStore, clone_disk, ensure_boot_assets};
use sistemo_vmm::qemu::{AccelChoice, Qemu, QemuOptions};
use sistemo_vmm::{Hypervisor, Instance, MachineSpec, NetAttachment, OutputChunk, exec_collect};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Deletes the namespace, kills a leftover VMM and removes the machine folder, even on panic.
struct Guard {
    ns: String,
    dir: PathBuf,
    inst: Option<Instance>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = &self.inst
            && i.is_alive()
        {
            let _ = Command::new("kill").args(["-KILL", &i.pid.to_string()]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        if std::thread::panicking() {
            // Keep the console log and keys for the post-mortem.
            eprintln!("machine folder kept: {}", self.dir.display());
            let _ = std::fs::remove_file(self.dir.join("disk.img"));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ip(ns: &str, args: &[&str]) {
    let st = Command::new("ip").args(["-n", ns]).args(args).status().unwrap();
    assert!(st.success(), "ip -n {ns} {args:?}");
}

/// A namespace `sistemo-vmt-<pid>-<tag>` with bridge br0 (10.250.0.1/24) and TAP tap0 on it,
/// and a machine folder; both go when the guard drops.
fn namespace(tag: &str) -> (Guard, String, PathBuf) {
    let ns = format!("sistemo-vmt-{}-{tag}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    let guard = Guard {
        ns: ns.clone(),
        dir: dir.clone(),
        inst: None,
    };
    std::fs::create_dir_all(&dir).unwrap();
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    ip(&ns, &["link", "set", "lo", "up"]);
    ip(&ns, &["link", "add", "br0", "type", "bridge"]);
    ip(&ns, &["addr", "add", "10.250.0.1/24", "dev", "br0"]);
    ip(&ns, &["link", "set", "br0", "up"]);
    ip(&ns, &["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ip(&ns, &["link", "set", "tap0", "master", "br0"]);
    ip(&ns, &["link", "set", "tap0", "up"]);
    (guard, ns, dir)
}

fn spec(dir: &std::path::Path, disk: PathBuf) -> MachineSpec {
    MachineSpec {
        id: uuid::Uuid::new_v4(),
        name: "vmtest".into(),
        vcpus: 1,
        memory_mib: 512,
        dir: dir.to_path_buf(),
        disk: Some(disk),
        net: NetAttachment {
            host_ifname: "tap0".into(),
            bridge: "br0".into(),
            mac: [0x52, 0x54, 0x00, 0x0a, 0xfa, 0x02],
            ip: "10.250.0.2".parse().unwrap(),
            prefix: 24,
            gateway: "10.250.0.1".parse().unwrap(),
            dns: vec!["10.250.0.1".parse().unwrap()],
        },
        ssh_pubkey: None,
        volumes: vec![],
        io: Default::default(),
        slot: 0,
        cpu_limit_milli: 0,
    }
}

/// The backend's options, from the test's environment.
fn options() -> QemuOptions {
    QemuOptions {
        accel: std::env::var("SISTEMO_ACCEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(AccelChoice::Auto),
        cmdline_extra: std::env::var("SISTEMO_GUEST_CMDLINE_EXTRA").ok(),
        debug_boot: std::env::var_os("SISTEMO_DEBUG_BOOT").is_some(),
        ..QemuOptions::default()
    }
}

fn kernel_deb() -> Option<PathBuf> {
    std::env::var_os("SISTEMO_KERNEL_DEB").map(PathBuf::from)
}

fn data_dir() -> PathBuf {
    PathBuf::from(std::env::var("SISTEMO_VM_TEST_DIR").unwrap_or_else(|_| "/var/tmp/sistemo-vmtest".into()))
}

/// Field `n` (1-based, after the command name) of `/proc/PID/stat`.
fn stat_field(pid: i32, n: usize) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(n - 3).unwrap().to_string()
}

/// The running VMM is confined: an unprivileged uid, seccomp, an empty chroot, its own session,
/// its machine's cgroup with the expected limits, and no way to open machine files as its uid.
/// Prints its memory beyond guest RAM (the figure behind `VMM_OVERHEAD_MIB`).
fn assert_confined(vm: &Qemu, spec: &MachineSpec, inst: &Instance) {
    let pid = inst.pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("no {k} in {status}"))
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (vuid, vgid) = vm.vmm_ids(spec).expect("the backend confines QEMU by default");
    let uid = field("Uid:");
    assert!(
        uid.iter().all(|u| u == &vuid.to_string()),
        "QEMU's uids {uid:?}, want {vuid}"
    );
    assert_ne!(uid[1], "0", "QEMU's effective uid is root");
    let gid = field("Gid:");
    assert!(gid.iter().all(|g| g == &vgid.to_string()), "QEMU's gids {gid:?}");
    assert!(field("Groups:").iter().all(|g| g != "0"), "QEMU keeps group root");
    assert_eq!(field("Seccomp:"), ["2"], "QEMU has no seccomp filter");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "QEMU keeps capabilities");
    // Chrooted into the machine's empty jail.
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(root, spec.dir.join("jail"));
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "the jail is not empty"
    );
    // Its own session (survives the daemon), and the pid is QEMU's, not a launcher's.
    assert_eq!(
        stat_field(pid, 6),
        pid.to_string(),
        "QEMU does not lead its own session"
    );
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("qemu-system"), "pid {pid} is {comm}");
    // Its cgroup, with the machine's limits.
    let cg = vm.cgroups();
    assert!(
        cg.available(),
        "this host offers no cgroups for limits: {}",
        cg.describe()
    );
    let name = Qemu::cgroup_name(spec);
    assert!(
        cg.contains(&name, pid),
        "QEMU {pid} is not in {:?}",
        cg.dirs(&name)
    );
    let want = vm.limits_for(spec);
    assert_eq!(cg.limits(&name), Some(want));
    assert_eq!(
        want.memory_bytes,
        (spec.memory_mib + sistemo_vmm::qemu::VMM_OVERHEAD_MIB) << 20
    );
    assert_eq!(want.cpu_quota_us, u64::from(spec.vcpus) * 100_000);
    // As QEMU's uid, no machine file opens: not this machine's disk (QEMU opened it as root
    // before switching users), and so not another machine's either (every machine folder is
    // root's and 0700). Nor can it list the folder.
    let disk = spec.disk.as_ref().unwrap();
    for (what, cmd) in [
        ("read the disk", vec!["dd", "bs=512", "count=1", "of=/dev/null"]),
        ("list the machine folder", vec!["ls"]),
    ] {
        let target = if what.contains("disk") {
            format!("if={}", disk.display())
        } else {
            spec.dir.display().to_string()
        };
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={vuid}"),
                &format!("--regid={vgid}"),
                "--clear-groups",
                "--",
            ])
            .args(&cmd)
            .arg(&target)
            .output()
            .unwrap();
        assert!(!out.status.success(), "QEMU's uid could {what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{what}: {err}");
    }
    for f in ["disk.img", "initrd.img", "console.log", "qemu.log", "qmp.sock"] {
        use std::os::unix::fs::MetadataExt;
        let p = spec.dir.join(f);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            assert_eq!(m.uid(), 0, "{f} is not root's");
            if m.is_file() {
                assert_eq!(m.mode() & 0o077, 0, "{f} is {:o}", m.mode());
            }
        }
    }
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&spec.dir).unwrap().mode() & 0o777, 0o700);
    // Memory beyond guest RAM: RSS minus the resident part of the guest RAM mapping.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let ram_kb = spec.memory_mib * 1024;
    let (mut size, mut guest_rss) = (0u64, 0u64);
    for l in smaps.lines() {
        let kb = || {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if l.starts_with("Size:") {
            size = kb();
        } else if l.starts_with("Rss:") && size == ram_kb {
            guest_rss += kb();
        }
    }
    let rss_kb: u64 = field("VmRSS:")[0].parse().unwrap();
    eprintln!(
        "VMM memory: RSS {} MiB (anon {} MiB, file {} MiB), guest RAM resident {} MiB, overhead {} MiB \
         (limit allows {} MiB)",
        rss_kb >> 10,
        field("RssAnon:")[0].parse::<u64>().unwrap() >> 10,
        field("RssFile:")[0].parse::<u64>().unwrap() >> 10,
        guest_rss >> 10,
        (rss_kb - guest_rss) >> 10,
        sistemo_vmm::qemu::VMM_OVERHEAD_MIB
    );
}

/// A second machine's VMM (slot 1, on a disk of zeros: it only has to be running) has a uid of
/// its own: as the first VMM's uid, signalling it is refused, while signalling the first VMM
/// itself (what one uid shared by all VMMs would allow against any of them) works.
async fn neighbour_vmm_is_out_of_reach(vm: &Qemu, a: &MachineSpec, a_inst: &Instance, ns: &str) {
    let dir = a.dir.join("neighbour");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("zeros.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    ip(ns, &["tuntap", "add", "dev", "tap1", "mode", "tap"]);
    ip(ns, &["link", "set", "tap1", "master", "br0"]);
    let mut b = spec(&dir, disk);
    b.slot = 1;
    b.name = "neighbour".into();
    b.net.host_ifname = "tap1".into();
    b.net.mac[5] = 3;
    b.net.ip = "10.250.0.3".parse().unwrap();
    let b_inst = vm.start(&b).await.expect("start the neighbour");
    let (a_uid, a_gid) = vm.vmm_ids(a).unwrap();
    let (b_uid, _) = vm.vmm_ids(&b).unwrap();
    assert_ne!(a_uid, b_uid, "two machines' VMMs share a uid");
    let signal = |pid: i32| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={a_uid}"),
                &format!("--regid={a_gid}"),
                "--clear-groups",
                "--",
                "kill",
                "-0",
                &pid.to_string(),
            ])
            .output()
            .unwrap()
    };
    let own = signal(a_inst.pid);
    assert!(
        own.status.success(),
        "control: a VMM's uid cannot signal its own VMM: {own:?}"
    );
    assert!(b_inst.is_alive(), "the neighbour stopped before the check");
    let other = signal(b_inst.pid);
    assert!(
        !other.status.success(),
        "one VMM's uid could signal another machine's VMM"
    );
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    let _ = Command::new("kill")
        .args(["-KILL", &b_inst.pid.to_string()])
        .status();
    vm.cleanup(&b).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    ip(ns, &["link", "del", "tap1"]);
}

/// Panics at once, saying what is missing, unless running as root with the prepared assets
/// (the kernel, and the `debian` image when `image` is set) in `data_dir()`.
fn require_assets(image: bool) {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "needs root and network namespaces (euid {} is not 0): run sudo scripts/test",
            nix::unistd::geteuid()
        );
    }
    let data = data_dir();
    let kernel = data.join("kernel/kernel.json").exists();
    let debian = std::fs::read_to_string(data.join("images/index.json"))
        .is_ok_and(|index| index.contains("\"debian\""));
    if !kernel || (image && !debian) {
        panic!(
            "VM assets missing in {}: run sudo scripts/prepare-vm-assets DIR and set \
             SISTEMO_VM_TEST_DIR=DIR/data (sudo scripts/test does both), or \
             sistemo image prepare --data-dir {}",
            data.display(),
            data.display()
        );
    }
}

#[tokio::test]
#[ignore = "boots real VMs: run sudo scripts/test"]
async fn real_vm_unbootable_disk_fails_fast_with_the_reason() {
    require_assets(false);
    let say = |s: &str| eprintln!("  {s}");
    let assets = ensure_boot_assets(&data_dir(), kernel_deb().as_deref(), &say)
        .await
        .expect("boot assets");
    let (mut guard, ns, dir) = namespace("bad");
    let disk = dir.join("zeros.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let spec = spec(&dir, disk);
    let vm = Qemu::new(&data_dir(), assets, options())
        .await
        .expect("qemu")
        .with_netns(&ns);
    let inst = vm.start(&spec).await.expect("start");
    guard.inst = Some(inst.clone());
    let t = Instant::now();
    let err = vm
        .wait_ready(&spec, &inst, Duration::from_secs(60), &say)
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "failure took {:?}",
        t.elapsed()
    );
    assert!(msg.contains("cannot mount /dev/vda"), "{msg}");
    assert!(!inst.is_alive());
    vm.cleanup(&spec).await.unwrap();
}

#[tokio::test]
#[ignore = "boots real VMs: run sudo scripts/test"]
async fn real_vm_boots_debian_and_execs() {
    require_assets(true);
    let data = data_dir();
    let say = |s: &str| eprintln!("  {s}");
    let assets = ensure_boot_assets(&data, kernel_deb().as_deref(), &say)
        .await
        .expect("boot assets");
    let image = ImageStore::new(&data)
        .resolve("debian", &Default::default(), &say)
        .await
        .expect("the debian image: run `sistemo image prepare` first (see the module docs)");

    let (mut guard, ns, dir) = namespace("boot");
    let disk = dir.join("disk.img");
    let t = Instant::now();
    clone_disk(&image, &disk, 2 << 30).await.expect("clone");
    eprintln!("disk cloned in {:.2}s", t.elapsed().as_secs_f64());

    let spec = spec(&dir, disk);
    let vm = Qemu::new(&data, assets, options())
        .await
        .expect("qemu")
        .with_netns(&ns);
    eprintln!("backend {}", vm.name());

    let t0 = Instant::now();
    let inst = vm.start(&spec).await.expect("start");
    guard.inst = Some(inst.clone());
    eprintln!("VMM pid {} after {:.2}s", inst.pid, t0.elapsed().as_secs_f64());
    vm.wait_ready(&spec, &inst, Duration::from_secs(90), &say)
        .await
        .expect("ready");
    let out = exec_collect(&vm, &spec, "echo hi", Duration::from_secs(30))
        .await
        .expect("exec");
    eprintln!("deploy → first exec: {:.2}s", t0.elapsed().as_secs_f64());
    assert_eq!(out.code, 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    assert_confined(&vm, &spec, &inst);
    neighbour_vmm_is_out_of_reach(&vm, &spec, &inst, &ns).await;
    // No vhost-vsock on this host: the machine has no vsock device, and its init loaded none of
    // the vsock modules the initramfs carries.
    assert!(!spec.dir.join("vsock.cid").exists());
    let out = exec_collect(
        &vm,
        &spec,
        "grep -c vsock /proc/modules || true",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");

    let out = exec_collect(&vm, &spec, "echo err >&2; exit 3", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(out.code, 3);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // Streaming: the first line arrives while the command still runs.
    let (tx, mut rx) = sistemo_vmm::output_queue();
    let streamed = {
        let (vm, spec) = (vm.clone(), spec.clone());
        tokio::spawn(async move {
            vm.exec(
                &spec,
                "echo first; sleep 2; echo second",
                Duration::from_secs(30),
                tx,
            )
            .await
        })
    };
    let first = rx.recv().await;
    assert_eq!(first, Some(OutputChunk::Stdout(b"first\n".to_vec())));
    assert!(!streamed.is_finished(), "the first line came only at the end");
    assert_eq!(streamed.await.unwrap().expect("streamed exec"), 0);

    let out = exec_collect(
        &vm,
        &spec,
        "hostname; cat /etc/machine-id",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("vmtest\n"), "{text}");
    assert!(text.contains(&spec.id.simple().to_string()), "{text}");

    let t = Instant::now();
    let out = exec_collect(&vm, &spec, "sleep 100 &", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(out.code, 0);
    assert!(t.elapsed() < Duration::from_secs(10), "background exec hung");
    // Many execs at once share one SSH connection (more than sshd's default of 10 sessions).
    let t = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (vm, spec) = (vm.clone(), spec.clone());
            tokio::spawn(async move {
                exec_collect(&vm, &spec, &format!("sleep 1; echo {i}"), Duration::from_secs(60)).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().expect("concurrent exec");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
    }
    eprintln!("16 concurrent execs in {:.2}s", t.elapsed().as_secs_f64());

    // The guest's RNG is seeded before userspace starts (RDRAND), so nothing in the boot, sshd
    // included, blocks in getrandom() waiting for entropy.
    let out = exec_collect(
        &vm,
        &spec,
        "dmesg | grep -E -m2 'Run /init|crng init done'",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("crng init done"),
        "RNG not ready before /init:\n{text}"
    );

    // The guest clock is the host's (apt refuses a Release file from the future).
    let out = exec_collect(&vm, &spec, "date +%s", Duration::from_secs(30))
        .await
        .unwrap();
    let guest: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("date +%s");
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((guest - host).abs() < 120, "guest clock {guest} vs host {host}");

    // The background process outlives the SSH session that started it.
    vm.disconnect(&spec).await;
    let out = exec_collect(
        &vm,
        &spec,
        "pgrep -x sleep >/dev/null && echo running",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "running\n");

    // SISTEMO_VM_TEST_ANALYZE=1 prints where the boot time went; any other value is run as is.
    if let Ok(cmd) = std::env::var("SISTEMO_VM_TEST_ANALYZE") {
        let cmd = if cmd == "1" {
            "systemd-analyze; systemd-analyze blame | head -12; \
             systemd-analyze critical-chain sistemo-sshd.socket"
                .to_string()
        } else {
            cmd
        };
        let out = exec_collect(&vm, &spec, &cmd, Duration::from_secs(60))
            .await
            .unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let t = Instant::now();
    vm.stop(&spec, &inst, Duration::from_secs(30))
        .await
        .expect("stop");
    eprintln!("stopped in {:.2}s", t.elapsed().as_secs_f64());
    assert!(!inst.is_alive());
    vm.cleanup(&spec).await.unwrap();
    assert!(!dir.join("qmp.sock").exists());
    for d in vm.cgroups().dirs(&Qemu::cgroup_name(&spec)) {
        assert!(!d.exists(), "cgroup {} left after cleanup", d.display());
    }

    // A second boot of the same machine: same pinned host key, files written by the first boot
    // are still on the disk, a stale SSH master does not get in the way.
    let t0 = Instant::now();
    let inst = vm.start(&spec).await.expect("restart");
    guard.inst = Some(inst.clone());
    vm.wait_ready(&spec, &inst, Duration::from_secs(90), &say)
        .await
        .expect("ready again");
    eprintln!("restart → ready: {:.2}s", t0.elapsed().as_secs_f64());
    assert_confined(&vm, &spec, &inst);
    let out = exec_collect(&vm, &spec, "echo again", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");
    vm.stop(&spec, &inst, Duration::from_secs(30))
        .await
        .expect("stop again");
    vm.cleanup(&spec).await.unwrap();
    eprintln!("console tail:\n{}", sistemo_vmm::qemu::console_tail(&spec, 5));
}
