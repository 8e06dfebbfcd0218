//! Volumes' data safety through the real CLI and daemon (`netns` hypervisor, real SQLite and
//! files): a daemon killed with SIGKILL in the middle of create, resize, snapshot, clone and a
//! machine clone loses nothing and lists nothing half-made; a failed machine clone removes only
//! what it made; a resize counts the copy it makes against `min_disk_free`.

mod common;
use common::volumes::*;
use common::*;
use std::collections::BTreeSet;

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn killed_daemon_mid_volume_operation_loses_nothing() {
    let mut env = Env::new("svolk");
    let base = json(&env, &["volume", "create", "64M", "--name", "base"]);
    let path = base["path"].as_str().unwrap().to_string();
    let sum = sha(&path);
    env.kill_daemon("-KILL");
    env.daemon_env = vec![("SISTEMO_TEST_VOLUME_PAUSE_MS".into(), "3000".into())];
    env.start_daemon();
    let mut grown = false;
    for (op, args) in [
        ("resize", vec!["volume", "resize", "base", "128M"]),
        ("snapshot", vec!["volume", "snapshot", "base", "s1"]),
        ("clone", vec!["volume", "clone", "base", "c1"]),
    ] {
        for stage in ["file made", "file placed"] {
            step(&format!("{op}: killed at {stage}"));
            kill_at(&mut env, &args, stage);
            let listed = names(&env);
            assert_eq!(
                listed,
                BTreeSet::from(["base".to_string()]),
                "nothing half-made listed"
            );
            files_match_rows(&env);
            let b = json(&env, &["volume", "show", "base"]);
            if op == "resize" && stage == "file placed" {
                grown = true;
            }
            let size: u64 = if grown { 128 << 20 } else { 64 << 20 };
            assert_eq!(
                b["size_bytes"].as_u64(),
                Some(size),
                "the recorded size is the file's"
            );
            assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
            if !grown {
                assert_eq!(sha(&path), sum, "the source is intact");
            }
            ok(&["e2fsck", "-fn", &path]);
        }
    }
    assert!(
        env.log()
            .contains("removing a volume file a crash left half-made")
    );
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn killed_daemon_mid_create_or_machine_clone_lists_nothing_half_made() {
    let mut env = Env::new("svolc");
    let data = json(&env, &["volume", "create", "64M", "--name", "data"]);
    let path = data["path"].as_str().unwrap().to_string();
    env.machine("a", &["--attach", "data:/data"]);
    env.cli_ok(&["machine", "stop", "a"]);
    let sum = sha(&path);
    env.kill_daemon("-KILL");
    env.daemon_env = vec![("SISTEMO_TEST_VOLUME_PAUSE_MS".into(), "3000".into())];
    env.start_daemon();
    let before = BTreeSet::from(["data".to_string()]);

    for stage in ["file made", "file placed"] {
        step(&format!("volume create: killed at {stage}"));
        kill_at(&mut env, &["volume", "create", "32M", "--name", "new"], stage);
        assert_eq!(names(&env), before, "nothing half-made listed");
        files_match_rows(&env);
    }

    // The clone's volume is a copy of `data`, then the machine is deployed with it attached:
    // until that is done the copy is pending, and a restart removes it.
    for stage in ["file made", "file placed", "copies made"] {
        step(&format!("machine clone: killed at {stage}"));
        kill_at(&mut env, &["machine", "clone", "a", "a2"], stage);
        assert_eq!(names(&env), before, "nothing half-made listed");
        files_match_rows(&env);
        assert!(
            env.cli_err(&["machine", "status", "a2"])
                .contains("does not exist")
        );
        assert_eq!(sha(&path), sum, "the source is intact");
        let a = json(&env, &["machine", "status", "a"]);
        assert_eq!(a["volumes"][0]["volume"], "data", "{a}");
    }

    assert!(
        env.log()
            .contains("removing a volume a crash left half-made (a machine clone or snapshot)"),
        "the pending copy was swept at start"
    );

    step("machine clone: killed once deployed, before its copy is committed");
    kill_at(&mut env, &["machine", "clone", "a", "a2"], "machine made");
    assert_eq!(
        names(&env),
        BTreeSet::from(["data".to_string(), "a2-data".to_string()]),
        "the finished clone keeps its volume"
    );
    files_match_rows(&env);
    let a2 = json(&env, &["machine", "status", "a2"]);
    assert_eq!(a2["volumes"][0]["volume"], "a2-data", "{a2}");
    assert!(
        env.log()
            .contains("a machine clone finished without its volume committed")
    );
    assert_eq!(sha(&path), sum, "the source is intact");

    step("a clone that fails removes only what it made");
    env.kill_daemon("-KILL");
    env.daemon_env.clear();
    env.start_daemon();
    let e = env.cli_err(&["machine", "clone", "a", "a2"]);
    assert!(e.contains("already taken"), "{e}");
    env.cli_ok(&["-y", "machine", "delete", "a2"]);
    // a's second volume cannot be cloned (its name is taken) once its first one has been.
    env.cli_ok(&["volume", "create", "16M", "--name", "logs"]);
    env.cli_ok(&["machine", "volume", "attach", "a", "logs"]);
    env.cli_ok(&["volume", "create", "16M", "--name", "a3-logs"]);
    let e = env.cli_err(&["machine", "clone", "a", "a3"]);
    assert!(e.contains("a3-logs") && e.contains("already taken"), "{e}");
    assert_eq!(
        names(&env),
        ["data", "a2-data", "logs", "a3-logs"].map(String::from).into(),
        "the clone's own copy (a3-data) is gone, the volume in its way stays"
    );
    files_match_rows(&env);
    assert!(
        env.cli_err(&["machine", "status", "a3"])
            .contains("does not exist")
    );
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let at = self.0.to_str().unwrap();
        if !run(&["umount", at]).status.success() {
            let _ = run(&["umount", "-l", at]);
        }
    }
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn resize_counts_its_copy_against_min_disk_free() {
    let mut env = Env::new("svolr");
    // The volumes on a file system of their own: 256M, no reflinks (a resize copies the file),
    // and nobody else's writes moving its free space.
    env.kill_daemon("-TERM");
    let dir = env.dir.join("data/volumes");
    std::fs::create_dir_all(&dir).unwrap();
    ok(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=256m,mode=0700",
        "tmpfs",
        dir.to_str().unwrap(),
    ]);
    let _fs = Tmpfs(dir.clone());
    env.write_config("min_disk_free: 64M\n");
    env.start_daemon();
    let free = || {
        let s = nix::sys::statvfs::statvfs(&dir).unwrap();
        s.blocks_available() * s.fragment_size()
    };
    assert!(
        env.cli_ok(&["doctor"]).contains("no reflink"),
        "{}",
        env.cli_ok(&["doctor"])
    );

    step("a raw volume of 96M, full of data");
    let big = json(
        &env,
        &["volume", "create", "96M", "--name", "big", "--format", "raw"],
    );
    let path = big["path"].as_str().unwrap().to_string();
    ok(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={path}"),
        "bs=1M",
        "count=96",
        "conv=notrunc,fsync",
    ]);
    let sum = sha(&path);

    step("growing it by 16M copies its 96M first: refused, nothing changed");
    // 256M - 96M = 160M free, 64M kept: 96M may be written; the resize writes 112M.
    assert!(free() > 140 << 20 && free() < 165 << 20, "{} free", free());
    refused(
        &env,
        &["volume", "resize", "big", "112M"],
        "it writes up to 112M",
        1,
    );
    assert_eq!(json(&env, &["volume", "show", "big"])["size_bytes"], 96 << 20);
    assert_eq!(sha(&path), sum);
    assert_eq!(names(&env), BTreeSet::from(["big".to_string()]));
    files_match_rows(&env);

    step("control: a resize whose copy fits goes through");
    let small = json(
        &env,
        &["volume", "create", "16M", "--name", "small", "--format", "raw"],
    );
    let spath = small["path"].as_str().unwrap().to_string();
    ok(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={spath}"),
        "bs=1M",
        "count=16",
        "conv=notrunc,fsync",
    ]);
    let r = json(&env, &["volume", "resize", "small", "32M"]);
    assert_eq!(r["size_bytes"], 32 << 20);
    files_match_rows(&env);
}
