//! Unit tests of the QEMU backend: the launcher script and host checks.

use super::*;

#[test]
fn the_launcher_joins_every_cgroup_then_execs_in_place() {
    let dir = std::env::temp_dir().join(format!("sistemo-join-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    let out = std::process::Command::new("sh")
        .args(["-c", JOIN_AND_EXEC, "sh"])
        .args([&a, &b])
        .args(["--", "sh", "-c", "echo $$ \"$1\"", "x", "arg,with space"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (pid, arg) = text.trim().split_once(' ').unwrap();
    assert_eq!(arg, "arg,with space");
    assert_eq!(std::fs::read_to_string(&a).unwrap().trim(), pid);
    assert_eq!(std::fs::read_to_string(&b).unwrap().trim(), pid);
    // No cgroup: straight to the program; a cgroup that cannot be joined stops the launch.
    let out = std::process::Command::new("sh")
        .args(["-c", JOIN_AND_EXEC, "sh", "--", "echo", "ok"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"ok\n");
    let st = std::process::Command::new("sh")
        .args([
            "-c",
            JOIN_AND_EXEC,
            "sh",
            "/nonexistent/cgroup.procs",
            "--",
            "true",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(125));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loopback_exists() {
    assert!(interface_exists("lo"));
    assert!(!interface_exists("sistemo-no-such-if"));
}
