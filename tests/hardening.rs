//! The daemon's state on disk is private and its own: file modes of the data dir, database and
//! machine directories; one daemon per data dir (an exclusive lock); `--socket` never deletes
//! a file that is not a socket. Real daemon in a namespace (harness: `tests/common`).

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

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
