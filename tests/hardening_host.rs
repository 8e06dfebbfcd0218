//! The daemon as a container's PID 1 (it reaps orphans and stops cleanly on SIGTERM), and its
//! start-up sweep of leftovers no row owns (TAPs, scratch folders). Real daemon in a namespace
//! (harness: `tests/common`).

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The pids whose parent is `ppid`, with their state letter and command name.
fn children(ppid: u32) -> Vec<(u32, char, String)> {
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after its last ')'
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |x| x.1).to_string();
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|s| s.parse::<u32>().ok()) == Some(ppid) {
            out.push((pid, state, comm));
        }
    }
    out
}

/// `sistemo up` as PID 1 of a new PID namespace (`unshare --pid --fork --mount-proc`), in
/// `env`'s network namespace, on `env`'s data dir; its log goes to `log`.
fn daemon_as_pid1(env: &Env, log: &std::path::Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", env.ns))
        .args(["--", "unshare", "--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["up", "--config"])
        .arg(env.dir.join("config.yml"))
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .args(["--nft-table", &env.table, "--hypervisor", "netns"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn as_pid1_the_daemon_reaps_orphans_and_stops_on_sigterm() {
    let mut env = Env::new("hhinit");
    env.kill_daemon("-TERM");
    let log = env.dir.join("pid1.log");
    let mut unshare = daemon_as_pid1(&env, &log);
    step("PID 1 (sistemo as init) and the daemon, its child, answer");
    let init = poll("sistemo as PID 1", Duration::from_secs(10), || {
        children(unshare.id()).first().map(|c| c.0)
    });
    poll("the daemon's socket", Duration::from_secs(30), || {
        answers(&env.socket).then_some(())
    });
    let status = std::fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    assert!(
        status.contains("NSpid:\t")
            && status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "{status}"
    );
    let kids = children(init);
    assert!(
        kids.iter().any(|k| k.2 == "sistemo"),
        "the daemon runs as PID 1's child: {kids:?}"
    );
    env.cli_ok(&["machine", "ls"]);

    step("an orphan in the namespace is reparented to PID 1 and reaped when it exits");
    let o = Command::new("nsenter")
        .args(["--target", &init.to_string(), "--pid", "--mount", "--"])
        // its own fds: `output()` must not wait for the orphan to close our pipe
        .args(["sh", "-c", "sleep 3 </dev/null >/dev/null 2>&1 & exit 0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The control: the orphan did land on our init (so a reaping failure would show).
    poll("the orphan under PID 1", Duration::from_secs(5), || {
        children(init).iter().any(|k| k.2 == "sleep").then_some(())
    });
    poll("no zombie under PID 1", Duration::from_secs(10), || {
        let kids = children(init);
        (!kids.iter().any(|k| k.2 == "sleep" || k.1 == 'Z')).then_some(())
    });

    step("SIGTERM to PID 1 stops the daemon cleanly");
    ok(&["kill", "-TERM", &init.to_string()]);
    let st = poll("PID 1 gone", Duration::from_secs(30), || {
        unshare.try_wait().unwrap()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "exit {st}: {text}");
    assert!(text.contains("shutting down"), "{text}");
    assert!(!answers(&env.socket));
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn start_up_sweeps_links_and_scratch_folders_no_row_owns() {
    let mut env = Env::new("hhsweep");
    let id = env.machine("web", &[]);
    assert!(!id.is_empty());
    let links = |env: &Env| String::from_utf8_lossy(&env.sh("ip -o link").stdout).into_owned();
    let before = links(&env);
    let own: Vec<&str> = before
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap())
        .filter(|n| n.starts_with("sm"))
        .collect();
    assert_eq!(own.len(), 1, "{before}");
    let own = own[0].to_string();
    env.kill_daemon("-KILL");
    step("a crash left a TAP on our bridge and scratch folders; another bridge has its own");
    for cmd in [
        "ip tuntap add sm0123456789 mode tap",
        "ip link set sm0123456789 master sistemo0",
        "ip link add hhother0 type bridge",
        "ip tuntap add smabcdefabcd mode tap",
        "ip link set smabcdefabcd master hhother0",
    ] {
        assert!(env.sh(cmd).status.success(), "{cmd}");
    }
    let images = env.dir.join("data/images");
    for d in [".build-1-x/root/etc", ".pull-2-y", ".upload-3-z"] {
        std::fs::create_dir_all(images.join(d)).unwrap();
    }
    std::fs::write(images.join("kept.ext4"), b"image").unwrap();
    env.start_daemon();
    let after = links(&env);
    assert!(!after.contains("sm0123456789"), "{after}");
    assert!(
        after.contains("smabcdefabcd"),
        "another bridge's link stays: {after}"
    );
    assert!(after.contains(&own), "the running machine's link stays: {after}");
    let mut left: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.retain(|n| n.starts_with('.') || n == "kept.ext4");
    assert_eq!(left, ["kept.ext4"]);
    let log = env.log();
    assert!(
        log.contains("deleting a machine link no running machine owns"),
        "{log}"
    );
    assert_eq!(
        log.matches("removing a scratch folder a crash left").count(),
        3,
        "{log}"
    );
    env.cli_ok(&["machine", "exec", "web", "true"]);
}

/// The daemon's restart loop (on its own task, apart from the liveness pass) brings a machine
/// whose process was killed back by its policy.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn a_killed_machine_comes_back_by_its_restart_policy() {
    let env = Env::new("hhrestart");
    env.machine("web", &["--restart", "always"]);
    let pid = |env: &Env| {
        let v: serde_json::Value =
            serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
        (v["status"].as_str().unwrap_or("").to_string(), v["pid"].as_i64())
    };
    let (state, first) = pid(&env);
    assert_eq!(state, "running");
    ok(&["kill", "-9", &first.unwrap().to_string()]);
    poll(
        "web running again with a new process",
        Duration::from_secs(20),
        || {
            let (state, now) = pid(&env);
            (state == "running" && now.is_some() && now != first).then_some(())
        },
    );
}

/// A VMM's exit is noticed within a second through its pidfd, however long the liveness timer
/// (here 20 s): the machine leaves `running` at once.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn a_vmm_exit_is_noticed_within_a_second() {
    let env = Env::with_config("hhpidfd", "liveness_interval_ms: 20000\n");
    env.machine("web", &[]);
    let status = |env: &Env| {
        let v: serde_json::Value =
            serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
        (v["status"].as_str().unwrap_or("").to_string(), v["pid"].as_i64())
    };
    let (state, pid) = status(&env);
    assert_eq!(state, "running");
    let t = std::time::Instant::now();
    ok(&["kill", "-9", &pid.unwrap().to_string()]);
    poll("web out of running", Duration::from_secs(20), || {
        (status(&env).0 != "running").then_some(())
    });
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "noticed after {:?}",
        t.elapsed()
    );
}
