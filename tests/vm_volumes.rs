//! Volumes with real VMs (QEMU, TCG where KVM cannot run the guest), four boots in all: data
//! written into /data on machine A survives A's delete and reads back on machine B with the same
//! sha256; a resize grows the file system the guest sees; a snapshot stays as it was while its
//! source changes; a daemon killed mid `machine snapshot` leaves no snapshot listed or on disk; a clone of a machine boots with a new identity; `--preserve-storage` and
//! `deploy --volume` bring the old root file system back.

mod common;
use common::vm_state::{json, seed};
use common::volumes::{files_match_rows, kill_at, names};
use common::*;

fn exec(env: &Env, m: &str, cmd: &str) -> String {
    env.cli_ok(&["machine", "exec", m, cmd]).trim().to_string()
}

fn sha(path: &str) -> String {
    ok(&["sha256sum", path])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Bytes of the file system mounted at `dir` in machine `m`.
fn fs_size(env: &Env, m: &str, dir: &str) -> u64 {
    exec(env, m, &format!("df -B1 --output=size {dir} | tail -1"))
        .parse()
        .unwrap()
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_volumes_outlive_machines() {
    let seed = seed();
    let mut env = Env::qemu("svolvm", &seed);

    step("A writes into its volume at /data");
    env.cli_ok(&["volume", "create", "256M", "--name", "vdata"]);
    env.cli_ok(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "a",
        "--attach",
        "vdata:/data",
    ]);
    let sum = exec(
        &env,
        "a",
        "head -c 3000000 /dev/urandom > /data/f && sync && sha256sum /data/f | cut -d' ' -f1",
    );
    assert_eq!(sum.len(), 64, "{sum}");
    let seen_by_a = fs_size(&env, "a", "/data");
    assert!(seen_by_a > 200 << 20 && seen_by_a <= 256 << 20, "{seen_by_a}");

    step("stopped A: volume snapshot, machine snapshot, resize, clone");
    env.cli_ok(&["machine", "stop", "a"]);
    let snap = json(&env, &["volume", "snapshot", "vdata", "snap1", "-o", "json"]);
    let snap_path = snap["path"].as_str().unwrap().to_string();
    let snap_sum = sha(&snap_path);
    let before = names(&env);
    env.kill_daemon("-KILL");
    env.daemon_env
        .push(("SISTEMO_TEST_VOLUME_PAUSE_MS".into(), "3000".into()));
    env.start_daemon();
    for stage in ["file made", "copies made"] {
        step(&format!("machine snapshot: killed at {stage}"));
        kill_at(&mut env, &["machine", "snapshot", "a"], stage);
        assert_eq!(names(&env), before, "nothing half-made listed");
        files_match_rows(&env);
    }
    env.kill_daemon("-KILL");
    env.daemon_env.clear();
    env.start_daemon();
    let ms = json(&env, &["machine", "snapshot", "a", "-o", "json"]);
    let names: Vec<&str> = ms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-snap-1", "a-snap-1-vdata"], "{ms}");
    assert!(ms[0]["source"].as_str().unwrap().contains("machine a"), "{ms}");
    env.cli_ok(&["volume", "resize", "vdata", "512M"]);
    let b = json(&env, &["machine", "clone", "a", "b", "-o", "json"]);
    let a = json(&env, &["machine", "status", "a", "-o", "json"]);
    assert_ne!(a["ip"], b["ip"]);
    assert_ne!(a["id"], b["id"]);
    assert_eq!(b["status"], "running");
    assert_eq!(exec(&env, "b", "hostname"), "b");
    // its volume is a clone of A's (taken after the resize): same data
    assert_eq!(b["volumes"][0]["volume"], "b-vdata");
    assert_eq!(exec(&env, "b", "sha256sum /data/f | cut -d' ' -f1"), sum);

    step("A deleted: vdata survives and reads back on B, grown");
    env.cli_ok(&["-y", "machine", "delete", "a"]);
    let v = json(&env, &["volume", "show", "vdata", "-o", "json"]);
    assert!(v["attached_to"].as_array().unwrap().is_empty());
    env.cli_ok(&["machine", "stop", "b"]);
    env.cli_ok(&["machine", "volume", "attach", "b", "vdata", "--mount", "/vol"]);
    env.cli_ok(&["machine", "start", "b"]);
    assert_eq!(exec(&env, "b", "sha256sum /vol/f | cut -d' ' -f1"), sum);
    let grown = fs_size(&env, "b", "/vol");
    assert!(
        grown > seen_by_a + (200 << 20),
        "resize grew the guest's file system: {seen_by_a} -> {grown}"
    );

    step("the snapshot stays as it was while its source changes");
    exec(
        &env,
        "b",
        "echo changed > /vol/f && echo kept > /root/marker && sync",
    );
    env.cli_ok(&["machine", "stop", "b"]);
    assert_ne!(sha(v["path"].as_str().unwrap()), snap_sum, "the source changed");
    assert_eq!(sha(&snap_path), snap_sum, "the snapshot did not");

    step("--preserve-storage, then deploy --volume brings the root back");
    let out = env.cli_ok(&["-y", "machine", "delete", "b", "--preserve-storage"]);
    assert!(out.contains("volume b-root"), "{out}");
    let root = json(&env, &["volume", "show", "b-root", "-o", "json"]);
    assert_eq!(root["kind"], "volume");
    let c = json(
        &env,
        &[
            "machine",
            "deploy",
            "--volume",
            "b-root",
            "--name",
            "c",
            "--attach",
            "vdata:/data",
            "-o",
            "json",
        ],
    );
    assert_eq!(c["volumes"][0]["root"], true);
    assert_eq!(exec(&env, "c", "cat /root/marker"), "kept");
    assert_eq!(exec(&env, "c", "hostname"), "c");
    assert_eq!(exec(&env, "c", "cat /data/f"), "changed");
    let e = env.cli_err(&["machine", "volume", "detach", "c", "b-root"]);
    assert!(e.contains("root disk"), "{e}");
    env.cli_ok(&["-y", "machine", "delete", "c"]);
    // every volume is still there: only `volume delete` removes one
    let left: Vec<String> = json(&env, &["volume", "list", "-o", "json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for want in [
        "vdata",
        "snap1",
        "a-snap-1",
        "a-snap-1-vdata",
        "b-vdata",
        "b-root",
    ] {
        assert!(left.iter().any(|n| n == want), "{want} missing from {left:?}");
    }
}
