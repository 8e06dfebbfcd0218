//! The agent as PID 1 (`sistemo-agent --init`) for images that run one program, as OCI images
//! do: it mounts what a program expects, starts the [`Workload`] with its argv, environment,
//! working directory and user, reaps every orphan, passes signals on to the workload, restarts
//! the agent serving the host if it dies, and powers the guest off when the workload exits.
//! The workload's output goes to the console, which the host keeps as the machine's log.

use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where sistemo's init leaves the workload for PID 1 (on the guest's `/run` tmpfs).
pub const WORKLOAD_FILE: &str = "/run/sistemo/workload.json";
/// Written by PID 1 once the workload runs (its pid): the guest is ready.
pub const WORKLOAD_PID: &str = "/run/sistemo/workload.pid";
/// How long the workload has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The machine's main process, from the image's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Entrypoint + Cmd.
    pub argv: Vec<String>,
    /// `K=V` each, added to a default `PATH`, `HOME` and `HOSTNAME`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid` (default root).
    #[serde(default)]
    pub user: Option<String>,
}

fn log(msg: &str) {
    eprintln!("sistemo-init: {msg}");
}

/// (uid, gid, home) of an OCI `User` value, from the image's passwd and group files.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32, String), String> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, mut gid, home) = match crate::runner::lookup_user(passwd, u) {
        Some(a) => (a.uid, a.gid, a.home),
        None => match u.parse::<u32>() {
            Ok(uid) => (uid, 0, "/".to_string()),
            Err(_) => return Err(format!("no user {u:?} in the image's /etc/passwd")),
        },
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g).then(|| f[2].parse().ok()).flatten()
                })
                .ok_or_else(|| format!("no group {g:?} in the image's /etc/group"))?,
        };
    }
    Ok((uid, gid, home))
}

/// The workload's command, not yet started.
pub fn command(w: &Workload, hostname: &str) -> Result<Command, String> {
    let (prog, args) = w.argv.split_first().ok_or("the image has no command")?;
    let (uid, gid, home) = match &w.user {
        Some(u) => resolve_user(
            u,
            &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
            &std::fs::read_to_string("/etc/group").unwrap_or_default(),
        )?,
        None => (0, 0, "/root".to_string()),
    };
    // `Command` would look the program up in PID 1's PATH: the workload's own is used.
    let path = w
        .env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(crate::runner::DEFAULT_PATH);
    let exe = if prog.contains('/') {
        std::path::PathBuf::from(prog)
    } else {
        path.split(':')
            .map(|d| std::path::Path::new(d).join(prog))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("{prog}: not found in PATH {path}"))?
    };
    let mut cmd = Command::new(exe);
    cmd.arg0(prog)
        .args(args)
        .env_clear()
        .env("PATH", crate::runner::DEFAULT_PATH)
        .env("HOME", &home)
        .env("HOSTNAME", hostname)
        .envs(w.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(w.cwd.as_deref().unwrap_or("/"))
        .process_group(0)
        .stdin(Stdio::null());
    if uid != 0 || gid != 0 {
        cmd.uid(uid).gid(gid);
    }
    crate::sys::unblock_signals(&mut cmd);
    Ok(cmd)
}

/// Mount what programs expect (`/proc`, `/sys`, `/dev` with `/dev/pts` and `/dev/shm`, the
/// cgroup tree), each only when it is not there yet (sistemo's initramfs brings most of them).
fn mounts() {
    use nix::mount::{MsFlags, mount};
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let has = |p: &str| mounted.lines().any(|l| l.split_whitespace().nth(1) == Some(p));
    let fl = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let try_mount = |src: &str, dir: &str, fstype: &str, flags: MsFlags, data: &str| {
        if has(dir) {
            return;
        }
        let _ = std::fs::create_dir_all(dir);
        if let Err(e) = mount(Some(src), dir, Some(fstype), flags, Some(data)) {
            log(&format!("cannot mount {fstype} on {dir}: {e}"));
        }
    };
    try_mount("proc", "/proc", "proc", fl | MsFlags::MS_NODEV, "");
    try_mount("sysfs", "/sys", "sysfs", fl | MsFlags::MS_NODEV, "");
    try_mount("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, "mode=0755");
    try_mount("devpts", "/dev/pts", "devpts", fl, "gid=5,mode=620,ptmxmode=666");
    try_mount("shm", "/dev/shm", "tmpfs", fl | MsFlags::MS_NODEV, "mode=1777");
    if std::path::Path::new("/sys/fs/cgroup").is_dir() {
        try_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", fl | MsFlags::MS_NODEV, "");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    if !std::path::Path::new("/tmp").exists() {
        let _ = std::fs::create_dir("/tmp");
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777));
    }
}

/// Signals PID 1 waits for: children exiting, and those it passes on ([`forwarded`]).
const WAITED: &[nix::sys::signal::Signal] = {
    use nix::sys::signal::Signal::*;
    &[
        SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM, SIGPWR,
    ]
};

/// What PID 1 does with signal `sig`: the signal sent to the workload's process group, and
/// whether it is a stop (the workload is killed if still there after [`STOP_GRACE`]). HUP, INT,
/// QUIT, USR1, USR2 and TERM go on as themselves, as `docker kill -s` would deliver them; TERM
/// (how the agent asks PID 1 to stop the machine) and PWR (a power-off request) stop it, PWR
/// reaching the workload as TERM. `None` for anything else.
pub fn forwarded(sig: nix::sys::signal::Signal) -> Option<(nix::sys::signal::Signal, bool)> {
    use nix::sys::signal::Signal::*;
    match sig {
        SIGHUP | SIGINT | SIGQUIT | SIGUSR1 | SIGUSR2 => Some((sig, false)),
        SIGTERM | SIGPWR => Some((SIGTERM, true)),
        _ => None,
    }
}

fn power_off(code: i32) -> ! {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    log(&format!("the workload exited with code {code}; powering off"));
    let _ = std::fs::write("/run/sistemo/exit-code", format!("{code}\n"));
    // Everything else gets a moment to end cleanly, then is killed.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => break,
            Ok(nix::sys::wait::WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    loop {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Run as PID 1 until the workload exits, then power off; never returns. `port` is the
/// agent's virtio-serial port, to restart the agent if it dies.
pub fn run(port: Option<String>) -> ! {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, sigprocmask};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::Pid;
    let mut set = SigSet::empty();
    for s in WAITED {
        set.add(*s);
    }
    // Blocked, the signals wait for `sigwait` (the kernel does not drop blocked signals sent
    // to PID 1); children are given an empty mask (`sys::unblock_signals`).
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        log(&format!("cannot block signals: {e}"));
    }
    mounts();
    let hostname = std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    if !hostname.is_empty() {
        let _ = nix::unistd::sethostname(&hostname);
    }
    let workload: Workload = match std::fs::read(WORKLOAD_FILE)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(w) => w,
        Err(e) => {
            log(&format!("cannot read {WORKLOAD_FILE}: {e}"));
            power_off(126)
        }
    };
    let child = match command(&workload, &hostname).and_then(|mut c| c.spawn().map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot start {:?}: {e}", workload.argv));
            power_off(127)
        }
    };
    let main = child.id() as i32;
    drop(child);
    let _ = std::fs::write(WORKLOAD_PID, format!("{main}\n"));
    log(&format!("started {:?} as pid {main}", workload.argv));
    let mut agent: Option<i32> = std::fs::read_to_string("/run/sistemo/agent.pid")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let mut agent_restarts: Vec<Instant> = Vec::new();
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig != Signal::SIGCHLD {
            let Some((to, stop)) = forwarded(sig) else {
                continue;
            };
            let _ = killpg(Pid::from_raw(main), to);
            if stop {
                log(&format!("{sig}: stopping the workload"));
                std::thread::spawn(move || {
                    std::thread::sleep(STOP_GRACE);
                    let _ = killpg(Pid::from_raw(main), Signal::SIGKILL);
                });
            } else {
                log(&format!("{sig}: passed on to the workload"));
            }
            continue;
        }
        loop {
            let (pid, code) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) => (p.as_raw(), c),
                Ok(WaitStatus::Signaled(p, s, _)) => (p.as_raw(), 128 + s as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            if pid == main {
                power_off(code);
            }
            if Some(pid) == agent
                && let Some(port) = &port
            {
                agent_restarts.retain(|t| t.elapsed() < Duration::from_secs(60));
                if agent_restarts.len() < 5 {
                    agent_restarts.push(Instant::now());
                    log(&format!("the agent exited ({code}); restarting it"));
                    let mut c = Command::new("/run/sistemo/agent");
                    c.args(["--port", port]);
                    crate::sys::unblock_signals(&mut c);
                    agent = c.spawn().ok().map(|c| c.id() as i32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_reach_the_workload_as_themselves_and_a_power_off_as_term() {
        use nix::sys::signal::Signal::*;
        for s in [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2] {
            assert_eq!(forwarded(s), Some((s, false)), "{s}");
        }
        assert_eq!(forwarded(SIGTERM), Some((SIGTERM, true)));
        assert_eq!(forwarded(SIGPWR), Some((SIGTERM, true)));
        assert_eq!(forwarded(SIGWINCH), None);
        // PID 1 waits for every signal it forwards (the kernel drops the others for PID 1).
        for s in nix::sys::signal::Signal::iterator().filter(|s| forwarded(*s).is_some()) {
            assert!(WAITED.contains(&s), "{s} is not waited for");
        }
        assert!(WAITED.contains(&SIGCHLD));
    }

    #[test]
    fn users_resolve_like_docker() {
        let passwd = "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n";
        let group = "root:x:0:\nweb:x:99:\n";
        assert_eq!(
            resolve_user("www", passwd, group).unwrap(),
            (33, 34, "/var/www".into())
        );
        assert_eq!(resolve_user("www:web", passwd, group).unwrap().1, 99);
        assert_eq!(
            resolve_user("1000:1000", passwd, group).unwrap(),
            (1000, 1000, "/".into())
        );
        assert_eq!(
            resolve_user("33:5", passwd, group).unwrap(),
            (33, 5, "/var/www".into())
        );
        assert!(
            resolve_user("nobody", passwd, group)
                .unwrap_err()
                .contains("nobody")
        );
        assert!(
            resolve_user("www:nogroup", passwd, group)
                .unwrap_err()
                .contains("nogroup")
        );
    }

    #[test]
    fn the_command_gets_the_image_environment() {
        let w = Workload {
            argv: vec!["sh".into(), "-c".into(), "echo $GREETING from $PWD".into()],
            env: vec!["GREETING=hello".into(), "PATH=/usr/bin:/bin".into()],
            cwd: Some("/tmp".into()),
            user: None,
        };
        let out = command(&w, "h").unwrap().stdout(Stdio::piped()).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello from /tmp");
        // PID 1 blocks the signals it waits for; the workload must not inherit that.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGTERM);
        nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
        let w = Workload {
            argv: vec!["grep".into(), "SigBlk".into(), "/proc/self/status".into()],
            env: vec![],
            cwd: None,
            user: None,
        };
        let out = command(&w, "h").unwrap().stdout(Stdio::piped()).output().unwrap();
        nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_UNBLOCK, Some(&set), None)
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "SigBlk:\t0000000000000000"
        );
        let none = Workload {
            argv: vec![],
            env: vec![],
            cwd: None,
            user: None,
        };
        assert!(command(&none, "h").is_err());
    }
}
