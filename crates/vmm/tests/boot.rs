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
    }
}

fn kernel_deb() -> Option<PathBuf> {
    std::env::var_os("SISTEMO_KERNEL_DEB").map(PathBuf::from)
}

fn data_dir() -> PathBuf {
    PathBuf::from(std::env::var("SISTEMO_VM_TEST_DIR").unwrap_or_else(|_| "/var/tmp/sistemo-vmtest".into()))
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
        .resolve("debian", 0, &say)
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

    // A second boot of the same machine: same pinned host key, files written by the first boot
    // are still on the disk, a stale SSH master does not get in the way.
    let t0 = Instant::now();
    let inst = vm.start(&spec).await.expect("restart");
    guard.inst = Some(inst.clone());
    vm.wait_ready(&spec, &inst, Duration::from_secs(90), &say)
        .await
        .expect("ready again");
    eprintln!("restart → ready: {:.2}s", t0.elapsed().as_secs_f64());
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
