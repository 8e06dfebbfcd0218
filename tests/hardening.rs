//! The daemon's state on disk is private and its own: file modes of the data dir, database and
//! machine directories; one daemon per data dir (an exclusive lock); `--socket` never deletes
//! a file that is not a socket. Real daemon in a namespace (harness: `tests/common`).

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `sistemo up` in `env`'s namespace on `env`'s data dir with another socket; its output.
fn second_daemon(env: &Env, socket: &std::path::Path) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", env.ns))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(socket)
        .args(["up", "--config"])
        .arg(env.dir.join("config.yml"))
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .args([
            "--nft-table",
            "other",
            "--hypervisor",
            "netns",
            "--bridge",
            "sistemo9",
        ])
        .args(["--subnet", "10.231.0.0/24"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn state_on_disk_is_private_and_one_daemon_owns_it() {
    let env = Env::new("priv");
    let id = env.machine("web", &["--expose", "8080:80"]);
    let data = env.dir.join("data");
    step("file modes");
    assert_eq!(mode(&data), 0o711, "data dir");
    assert_eq!(mode(&data.join("machines")), 0o711, "machines dir");
    assert_eq!(mode(&data.join("sistemo.db")), 0o600, "database");
    let v: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    let dir = data.join("machines").join(v["id"].as_str().unwrap());
    assert!(!id.is_empty());
    assert_eq!(mode(&dir), 0o700, "machine dir");

    step("a second daemon on the same data dir refuses, and changes nothing");
    let other = env.dir.join("other.sock");
    let o = second_daemon(&env, &other);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a second daemon started on the same data dir: {err}"
    );
    assert!(err.contains("another sistemo daemon uses the data dir"), "{err}");
    assert!(
        env.cli_ok(&["machine", "status", "web"])
            .contains("Status:   running"),
        "the first daemon's machine is untouched"
    );

    step("--socket on a file that is not a socket is refused, the file kept");
    let precious = env.dir.join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", env.ns))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&precious)
        .args(["up", "--data-dir"])
        .arg(env.dir.join("data2"))
        .args(["--hypervisor", "netns", "--nft-table", "third"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}

/// Processes on the host whose command line contains `marker` (netns machines run their
/// commands as host processes in their namespace).
fn running(marker: &str) -> bool {
    run(&["pgrep", "-f", marker]).status.success()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn exec_output_is_byte_exact_and_a_client_that_leaves_ends_the_command() {
    let env = Env::new("exb");
    env.machine("web", &[]);
    step("binary output survives");
    let o = env.cli(&["machine", "exec", "web", r"printf 'a\377\000b\303'"]);
    assert_eq!(
        o.stdout,
        b"a\xff\x00b\xc3",
        "{:?}",
        String::from_utf8_lossy(&o.stderr)
    );

    step("a client that goes away kills its command");
    let marker = format!("sleep 3{}", std::process::id() % 1000);
    let mut client = Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["machine", "exec", "web", &format!("{marker}0; echo never")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // control: while its client is there, the command runs
    poll("the command to run", std::time::Duration::from_secs(10), || {
        running(&marker).then_some(())
    });
    client.kill().unwrap();
    client.wait().unwrap();
    poll(
        "the command to be killed with its client gone",
        std::time::Duration::from_secs(10),
        || (!running(&marker)).then_some(()),
    );

    step("a reader that stops early (| head) ends the command and the CLI");
    let yes = format!("yes exb{}", std::process::id());
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --socket {} machine exec web '{yes}' | head -c 100000 | wc -c",
            env!("CARGO_BIN_EXE_sistemo"),
            env.socket.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "100000");
    poll("yes to be killed", std::time::Duration::from_secs(10), || {
        (!running(&yes)).then_some(())
    });
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn console_logs_are_byte_exact_and_do_not_drive_the_terminal() {
    let env = Env::new("logs");
    env.machine("web", &[]);
    let v: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    // What a guest could write to its console: a screen clear, a title, a clipboard write
    // (OSC 52), colours, and bytes that are not UTF-8.
    let guest: &[u8] = b"boot \x1b[2J\x1b]0;pwned\x07\x1b]52;c;aGk=\x1b\\\x1b[31mred\x1b[0m \xff\xfe end\n";
    let log = env
        .dir
        .join("data/machines")
        .join(v["id"].as_str().unwrap())
        .join("console.log");
    std::fs::write(&log, guest).unwrap();
    let shown = env.cli(&["machine", "logs", "web"]);
    assert!(shown.status.success());
    assert_eq!(
        shown.stdout,
        b"boot red \xff\xfe end\n",
        "{:?}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let raw = env.cli(&["machine", "logs", "web", "--raw"]);
    assert_eq!(raw.stdout, guest, "--raw passes the bytes exactly");
}

/// e2fsck and resize2fs parse file systems a guest wrote: they run as the VMM user, with no
/// capability, `no_new_privs`, no network, and only the image as their standard input. The
/// "tools" here are wrappers on the daemon's PATH that act as an exploited e2fsprogs would
/// (read the daemon's database, reach the volume's folder) and log what they could, then run
/// the real tool, so the resize must still work. Run as root, every probe succeeds.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn file_system_tools_run_unprivileged_and_confined() {
    let mut env = Env::new("sfstool");
    let probe = env.dir.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = probe.join("log");
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let db = env.dir.join("data/sistemo.db");
    let volumes = env.dir.join("data/volumes");
    for tool in ["e2fsck", "resize2fs"] {
        let real = String::from_utf8(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let script = format!(
            "#!/bin/sh\n\
             st() {{ grep \"^$1:\" /proc/self/status | cut -f2; }}\n\
             if head -c 16 {db} >/dev/null 2>&1; then d=read; else d=denied; fi\n\
             if ls {volumes} >/dev/null 2>&1; then v=listed; else v=denied; fi\n\
             echo \"{tool} uid=$(id -u) nnp=$(st NoNewPrivs) cap=$(st CapEff) net=$(readlink /proc/self/ns/net) db=$d volumes=$v last=$(eval echo \\${{$#}})\" >> {log}\n\
             exec {real} \"$@\"\n",
            db = db.display(),
            volumes = volumes.display(),
            log = log.display(),
            real = real.trim(),
        );
        let p = probe.join(tool);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        probe.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    env.daemon_env.push(("PATH".into(), path));
    env.kill_daemon("-TERM");
    env.start_daemon();
    let daemon_net = std::fs::read_link(format!("/proc/{}/ns/net", env.daemon_pid().unwrap())).unwrap();

    env.cli_ok(&["volume", "create", "64M", "--name", "data"]);
    env.cli_ok(&["volume", "resize", "data", "128M"]);
    let shown = env.cli_ok(&["volume", "show", "data", "-o", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let file = std::path::PathBuf::from(shown["path"].as_str().unwrap());
    assert!(file.starts_with(&volumes), "{}", file.display());
    let blocks = ok(&["dumpe2fs", "-h", file.to_str().unwrap()]);
    assert!(
        blocks.contains("Block count:              131072"),
        "the real resize2fs did not run:\n{blocks}"
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (0, 0, 0o600),
        "the volume was not given back"
    );

    let vmm = nix::unistd::User::from_name("sistemo-vmm")
        .unwrap()
        .expect("the VMM user");
    let lines = std::fs::read_to_string(&log).unwrap();
    for tool in ["e2fsck", "resize2fs"] {
        let l = lines
            .lines()
            .find(|l| l.starts_with(&format!("{tool} ")))
            .unwrap_or_else(|| panic!("{tool} did not run:\n{lines}"));
        for want in [
            format!("uid={}", vmm.uid),
            "nnp=1".into(),
            "cap=0000000000000000".into(),
            "db=denied".into(),
            "volumes=denied".into(),
            "last=/dev/stdin".into(),
        ] {
            assert!(l.contains(&want), "{tool}: want {want}: {l}");
        }
        assert!(
            !l.contains(&format!("net={}", daemon_net.display())),
            "{tool} shares the daemon's network: {l}"
        );
    }
}

/// The console file of machine `name`.
fn console_of(env: &Env, name: &str) -> std::path::PathBuf {
    let v: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", name, "-o", "json"])).unwrap();
    env.dir
        .join("data/machines")
        .join(v["id"].as_str().unwrap())
        .join("console.log")
}

fn len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The console's two parts, `console.log` and `console.log.1`, together.
fn kept(log: &std::path::Path) -> u64 {
    len(log) + len(&log.with_extension("log.1"))
}

/// `hh-NNNNNNNN` line numbers in `text`, in order.
fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("hh-")?.get(..8)?.parse().ok())
        .collect()
}

/// A guest writing far more than `log_max_bytes` to its console (here: a writer holding the
/// file open in append mode, as QEMU's console does) leaves at most the cap on disk; `logs`
/// shows the newest lines; a `logs -f` reader started before sees each line at most once, in
/// order, up to the last (its stream offsets survive the daemon dropping old bytes).
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn console_logs_are_capped_and_followed_across_the_cap() {
    use std::io::{BufRead, Write};
    let env = Env::with_config("hhlogs", "log_max_bytes: 16K\n");
    env.machine("web", &[]);
    let log = console_of(&env, "web");
    let mut w = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .unwrap();
    let mut follow = Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["machine", "logs", "-f", "web"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    step("writing 60 times the cap, in rounds the daemon rotates between");
    let mut n = 0u64;
    for round in 0..60 {
        let start = std::fs::read_to_string(log.with_extension("log.start")).unwrap_or_default();
        let mut chunk = String::new();
        while chunk.len() < 16 << 10 {
            n += 1;
            chunk.push_str(&format!("hh-{n:08} console line\n"));
        }
        w.write_all(chunk.as_bytes()).unwrap();
        // the daemon's pass moves the live file aside at half the cap (the offset file is
        // written last)
        poll("a rotation", Duration::from_secs(10), || {
            (std::fs::read_to_string(log.with_extension("log.start")).unwrap_or_default() != start)
                .then_some(())
        });
        assert!(len(&log) < 16 << 10, "round {round}: the live file was truncated");
    }
    poll("the console within the cap", Duration::from_secs(10), || {
        (kept(&log) <= 16 << 10).then_some(())
    });
    let shown = env.cli_ok(&["machine", "logs", "web"]);
    let nums = numbers(&shown);
    assert_eq!(nums.last(), Some(&n), "logs shows the newest line");
    assert!(
        shown.len() <= 16 << 10 && nums.first() > Some(&1),
        "only the tail is kept"
    );
    assert!(shown.starts_with("hh-"), "the tail starts at a whole line");
    step("the follower saw the last line, each line at most once and in order");
    let mut seen = Vec::new();
    poll("the follower at the last line", Duration::from_secs(20), || {
        while let Ok(l) = rx.try_recv() {
            seen.extend(numbers(&l));
        }
        (seen.last() == Some(&n)).then_some(())
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen.windows(2).all(|p| p[0] < p[1]),
        "a line seen twice or out of order"
    );
}

/// A real VM: `--cpu-limit` lands in its cgroup's `cpu.max` and in `machine status`, a bad one
/// is one line and changes nothing; a guest writing 10 times `log_max_bytes` to its serial
/// console leaves at most the cap on disk (QEMU appends, so truncation leaves no hole) and
/// `machine logs` shows its newest lines.
#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_cpu_limit_and_capped_console() {
    let seed = common::vm_state::seed();
    let env = Env::qemu_with_config("hhvm", &seed, "log_max_bytes: 64K\n");
    step("bad --cpu-limit: one line, nothing made");
    for (bad, says) in [
        ("0", "allowed: above 0"),
        ("abc", "allowed: above 0"),
        ("2.5", "up to 2"),
    ] {
        let o = env.cli(&[
            "machine",
            "deploy",
            "debian",
            "--name",
            "hh",
            "--vcpus",
            "2",
            "--cpu-limit",
            bad,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says) && err.trim().lines().count() == 1,
            "{bad}: {err}"
        );
    }
    assert_eq!(env.cli_ok(&["machine", "ls", "-o", "json"]).trim(), "[]");

    step("--cpu-limit 1.5 on 2 vCPUs");
    env.cli_ok(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "hh",
        "--vcpus",
        "2",
        "--cpu-limit",
        "1.5",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "hh", "-o", "json"])).unwrap();
    if info["limits"].is_null() {
        eprintln!("this host gives machines no cgroups: cpu.max not checked");
    } else {
        assert_eq!(info["limits"]["cpus"], 1.5);
        let st = env.cli_ok(&["machine", "status", "hh"]);
        assert!(st.contains(", 1.5 CPU, "), "{st}");
        let pid = info["pid"].as_i64().unwrap();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        // cgroup v2 (`cpu.max`), else the v1 cpu controller (`cpu.cfs_quota_us`)
        let v2 = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| format!("/sys/fs/cgroup{p}/cpu.max"))
            .filter(|p| std::path::Path::new(p).exists());
        let quota = match v2 {
            Some(p) => std::fs::read_to_string(p).unwrap(),
            None => {
                let p = cg
                    .lines()
                    .find_map(|l| {
                        let (ctl, path) = l.split_once(':')?.1.split_once(':')?;
                        ctl.split(',').any(|c| c == "cpu").then_some(path)
                    })
                    .unwrap_or_else(|| panic!("{cg}"));
                let q = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu{p}/cpu.cfs_quota_us")).unwrap();
                format!("{} 100000", q.trim())
            }
        };
        assert_eq!(quota.trim(), "150000 100000", "the VMM's cgroup: {cg}");
    }

    step("a guest writes 10 times the cap to its console");
    let log = console_of(&env, "hh");
    env.cli_ok(&[
        "machine",
        "exec",
        "hh",
        "seq -f 'hh-%08g console line' 1 30000 > /dev/ttyS0",
    ]);
    // `exec` returns once the guest's tty took the bytes; its UART drains them to QEMU later
    let shown = poll("logs show the newest line", Duration::from_secs(60), || {
        let shown = env.cli_ok(&["machine", "logs", "hh"]);
        (numbers(&shown).last() == Some(&30000)).then_some(shown)
    });
    poll("the console within the cap", Duration::from_secs(30), || {
        (kept(&log) <= 64 << 10).then_some(())
    });
    assert!(numbers(&shown).first() > Some(&1), "the oldest lines are gone");
    let bytes = std::fs::read(&log).unwrap();
    assert!(
        !bytes.contains(&0),
        "no hole: QEMU writes at the file's end after a truncation"
    );
    assert!(len(&log.with_file_name("qemu.log")) <= 64 << 10);
    env.cli_ok(&["machine", "delete", "hh", "-y"]);
}
