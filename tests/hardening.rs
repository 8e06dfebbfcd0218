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
