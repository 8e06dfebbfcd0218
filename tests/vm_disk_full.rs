//! A real VM whose host runs out of disk: QEMU pauses the guest on its failed write
//! (`werror=enospc`), `machine status` and `doctor` say so, and once space returns the daemon
//! resumes it and the guest's writes complete. The machines' directory is a small loop-mounted
//! ext4 file system the test makes (and removes, also on failure). Root and the VM assets are
//! needed, as for `tests/vm.rs`.

mod common;
use common::vm_state::{cgroup_dirs, seed};
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A loop-mounted ext4 file system, unmounted (its loop device detached) and its backing file
/// removed on drop; declared before the `Env` so it is dropped after it (the daemon and QEMU
/// are gone by then). Also removes the machines' cgroups a failed run left.
struct LoopFs {
    image_dir: PathBuf,
    mountpoint: Option<PathBuf>,
    machine_ids: Vec<String>,
    /// The test's folder holding the mount point: the `Env` cannot remove it while mounted.
    env_dir: Option<PathBuf>,
}

impl LoopFs {
    fn new() -> LoopFs {
        let image_dir = std::env::temp_dir().join(format!(
            "sistemo-diskfull-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&image_dir).unwrap();
        LoopFs {
            image_dir,
            mountpoint: None,
            machine_ids: Vec::new(),
            env_dir: None,
        }
    }

    /// Make a `size` ext4 file system (no blocks reserved for root: QEMU writes as its own
    /// user) and mount it on `at`.
    fn mount(&mut self, size: &str, at: &Path) {
        let img = self.image_dir.join("fs.img");
        let img = img.to_str().unwrap();
        ok(&["truncate", "-s", size, img]);
        ok(&["mkfs.ext4", "-q", "-F", "-m", "0", img]);
        ok(&["mount", "-o", "loop", img, at.to_str().unwrap()]);
        self.mountpoint = Some(at.to_path_buf());
        // As the daemon makes the machines' directory: the VMM user traverses it.
        ok(&["chmod", "0711", at.to_str().unwrap()]);
    }

    fn unmount(&mut self) {
        let Some(at) = self.mountpoint.take() else { return };
        let at = at.to_str().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        // A VMM killed a moment ago may still hold its disk open.
        while !run(&["umount", at]).status.success() {
            if Instant::now() > end {
                eprintln!("{at} still busy; unmounting lazily");
                let _ = run(&["umount", "-l", at]);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Bytes free on the mounted file system.
    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.mountpoint.as_ref().unwrap()).unwrap();
        s.blocks_available() * s.fragment_size()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.unmount();
        // `mount -o loop` detaches the device at unmount; a lazy unmount leaves it to the
        // kernel, so detach anything still bound to the file.
        let img = self.image_dir.join("fs.img");
        let o = run(&["losetup", "-j", img.to_str().unwrap()]);
        for dev in String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split(':').next())
        {
            let _ = run(&["losetup", "-d", dev]);
        }
        let _ = std::fs::remove_dir_all(&self.image_dir);
        if let Some(d) = &self.env_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        for id in &self.machine_ids {
            for d in cgroup_dirs(id) {
                for _ in 0..50 {
                    if !d.exists() || std::fs::remove_dir(&d).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// A child process killed and reaped on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `doctor -o json`'s failed `disk` checks' details.
fn doctor_disk_failures(env: &Env) -> Vec<String> {
    let o = env.cli(&["doctor", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("doctor's JSON: {e}: {}", String::from_utf8_lossy(&o.stdout)));
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "disk" && c["ok"] == false)
        .map(|c| format!("{} (fix: {})", c["detail"], c["fix"]))
        .collect()
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_paused_on_a_full_host_disk_and_resumed_when_space_returns() {
    let t0 = Instant::now();
    let seed = seed();
    let mut fs = LoopFs::new();
    let env = Env::qemu("dfull", &seed);
    // The daemon reads the key at its start: written, then restarted below.
    env.write_config("min_disk_free: 256M\nmax_storage: 1G\n");
    let mut env = env;
    env.kill_daemon("-TERM");
    step("the machines' directory on a 1500M file system");
    let machines = env.dir.join("data/machines");
    fs.env_dir = Some(env.dir.clone());
    fs.mount("1500M", &machines);
    env.start_daemon();

    step("deploy: 1400M is over max_storage (1G); 768M fits with 256M to keep free");
    let e = env.cli_err(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "big",
        "--storage",
        "1400M",
    ]);
    assert!(e.contains("max_storage"), "{e}");
    env.cli_ok(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "full",
        "--storage",
        "768M",
    ]);
    let st: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "full", "-o", "json"])).unwrap();
    fs.machine_ids.push(st["id"].as_str().unwrap().to_string());
    assert!(st.get("paused").is_none(), "{st}");
    eprintln!("deployed after {:.1}s", t0.elapsed().as_secs_f64());

    step("the host fills: a filler leaves 80M free, the guest writes 300M");
    let filler = machines.join("filler");
    let fill = fs.free().saturating_sub(80 << 20);
    ok(&["fallocate", "-l", &fill.to_string(), filler.to_str().unwrap()]);
    assert!(fs.free() < 100 << 20, "{} free", fs.free());
    // The exec runs on its own: the guest may pause before its SSH session ends, and exec
    // waits for that session (killed on drop if still there).
    let writer = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
            .arg("--socket")
            .arg(&env.socket)
            .args([
                "machine",
                "exec",
                "full",
                "(dd if=/dev/zero of=/big bs=1M count=300 conv=fsync 2>/root/dd.err; echo $? >/root/dd.rc) &",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t_fill = Instant::now();
    let st = poll("the machine reported paused", Duration::from_secs(120), || {
        let st = env.cli_ok(&["machine", "status", "full"]);
        st.contains("Paused:").then_some(st)
    });
    eprintln!("paused after {:.1}s of writing", t_fill.elapsed().as_secs_f64());
    assert!(st.contains("Status:   running"), "{st}");
    assert!(
        st.contains("Paused:   the host's disk is full (io-error); resumed when 256M is free in"),
        "{st}"
    );
    let js: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "full", "-o", "json"])).unwrap();
    assert_eq!(js["status"], "running", "{js}");
    assert!(
        js["paused"].as_str().is_some_and(|p| p.contains("disk is full")),
        "{js}"
    );
    let failures = doctor_disk_failures(&env);
    assert!(
        failures
            .iter()
            .any(|d| d.contains("paused because the host's disk is full: full")),
        "{failures:?}"
    );
    assert!(fs.free() < 256 << 20, "{} free", fs.free());
    // Still paused while the host stays full (no resume into the same wall): two check rounds.
    let still = Instant::now() + Duration::from_secs(2);
    while Instant::now() < still {
        assert!(env.cli_ok(&["machine", "status", "full"]).contains("Paused:"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !env.log().contains("machine resumed"),
        "resumed while the disk was full"
    );

    step("space returns: the filler goes, the machine resumes and its writes complete");
    std::fs::remove_file(&filler).unwrap();
    let t_free = Instant::now();
    poll("the machine resumed", Duration::from_secs(30), || {
        (!env.cli_ok(&["machine", "status", "full"]).contains("Paused:")).then_some(())
    });
    eprintln!(
        "resumed {:.1}s after space returned",
        t_free.elapsed().as_secs_f64()
    );
    assert!(env.log().contains("machine resumed"), "{}", env.log());
    // dd finishes with every byte written: the failed writes were retried, not lost.
    let rc = poll("dd to finish in the guest", Duration::from_secs(120), || {
        let o = env.cli(&["machine", "exec", "full", "cat /root/dd.rc"]);
        let rc = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !rc.is_empty()).then_some(rc)
    });
    let err = env.cli_ok(&["machine", "exec", "full", "ls -la /root /big; cat /root/dd.err"]);
    assert_eq!(rc, "0", "dd failed in the guest: {err}");
    assert_eq!(
        env.cli_ok(&["machine", "exec", "full", "stat -c %s /big"]).trim(),
        (300u64 << 20).to_string()
    );
    assert!(doctor_disk_failures(&env).iter().all(|d| !d.contains("paused")));
    let js: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "full", "-o", "json"])).unwrap();
    assert!(js.get("paused").is_none(), "{js}");

    drop(writer);
    step("delete; unmount");
    env.cli_ok(&["machine", "delete", "full", "-y"]);
    fs.unmount();
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
