//! Starting a session's process: argv, environment, working directory and user resolved the way
//! a login would, with pipes or a fresh PTY, in a process group of its own so that a timeout or a
//! departed client kills everything it started.

use crate::proto::{Start, WinSize};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncWrite};

/// `PATH` when the caller sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A byte stream read from the process.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// A byte stream written to the process.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A started process and its streams.
pub struct Spawned {
    /// The process.
    pub child: tokio::process::Child,
    /// Its pid (also its process group).
    pub pid: u32,
    /// Its stdin, when the session feeds one.
    pub stdin: Option<Writer>,
    /// Its stdout (or the terminal).
    pub stdout: Reader,
    /// Its stderr (none on a terminal).
    pub stderr: Option<Reader>,
    /// The PTY master, for resizing.
    pub pty: Option<OwnedFd>,
}

/// A user as `/etc/passwd` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Look `user` (a name or a numeric uid) up in `passwd` text. Static binaries cannot use NSS
/// modules, and images differ in which they have: the file is the common ground.
pub fn lookup_user(passwd: &str, user: &str) -> Option<Account> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || (f[0] != user && f[2] != user) {
            return None;
        }
        Some(Account {
            name: f[0].into(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].into(),
            shell: f[6].into(),
        })
    })
}

fn account(user: Option<&str>) -> io::Result<Account> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    // No user asked: whoever the agent runs as (root in a guest).
    let me = nix::unistd::geteuid().as_raw().to_string();
    let want = user.unwrap_or(&me);
    if let Some(a) = lookup_user(&passwd, want) {
        return Ok(a);
    }
    match (user, want.parse::<u32>()) {
        // A uid with no entry still runs, as `docker exec -u 1234` does.
        (_, Ok(uid)) => Ok(Account {
            name: want.into(),
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
        }),
        (None, _) => Ok(Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            shell: "/bin/sh".into(),
        }),
        (Some(u), _) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user {u:?} in the guest's /etc/passwd"),
        )),
    }
}

/// Start `argv` as `start` says; an empty `argv` is the user's login shell.
pub fn spawn(argv: &[String], start: &Start) -> io::Result<Spawned> {
    let acct = account(start.user.as_deref())?;
    let login;
    let argv = if argv.is_empty() {
        let shell = if acct.shell.ends_with("nologin") || !std::path::Path::new(&acct.shell).exists() {
            "/bin/sh".to_string()
        } else {
            acct.shell.clone()
        };
        login = [shell, "-l".to_string()];
        &login[..]
    } else {
        argv
    };
    let (prog, args) = argv.split_first().expect("not empty");
    let cwd = match &start.cwd {
        Some(c) => c.clone(),
        // A home it can enter (as the user it runs as), else the root.
        None if nix::unistd::access(acct.home.as_str(), nix::unistd::AccessFlags::X_OK).is_ok()
            && std::path::Path::new(&acct.home).is_dir() =>
        {
            acct.home.clone()
        }
        None => "/".into(),
    };
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).env_clear().current_dir(&cwd);
    cmd.env("PATH", crate::early::session_path(DEFAULT_PATH))
        .env("HOME", &acct.home)
        .env("USER", &acct.name)
        .env("LOGNAME", &acct.name)
        .env("SHELL", &acct.shell);
    if start.tty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(start.env.iter().map(|(k, v)| (k, v)));
    {
        use std::os::unix::process::CommandExt;
        if acct.uid != nix::unistd::geteuid().as_raw() || acct.gid != nix::unistd::getegid().as_raw() {
            cmd.uid(acct.uid).gid(acct.gid);
        }
    }
    match start.tty {
        Some(size) => spawn_on_pty(cmd, size, start.stdin),
        None => spawn_with_pipes(cmd, start.stdin),
    }
}

fn spawn_with_pipes(mut cmd: std::process::Command, stdin: bool) -> io::Result<Spawned> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(cmd).kill_on_drop(true).spawn()?;
    let pid = child.id().unwrap_or(0);
    Ok(Spawned {
        pid,
        stdin: child.stdin.take().map(|w| Box::new(w) as Writer),
        stdout: Box::new(child.stdout.take().expect("piped stdout")),
        stderr: Some(Box::new(child.stderr.take().expect("piped stderr"))),
        child,
        pty: None,
    })
}

fn spawn_on_pty(mut cmd: std::process::Command, size: WinSize, _stdin: bool) -> io::Result<Spawned> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    crate::sys::set_winsize(pty.master.as_fd(), size.rows, size.cols)?;
    let slave = File::from(pty.slave);
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    crate::sys::controlling_tty(&mut cmd);
    let child = tokio::process::Command::from(cmd).kill_on_drop(true).spawn()?;
    let pid = child.id().unwrap_or(0);
    let master = File::from(pty.master);
    let reader = tokio::fs::File::from_std(master.try_clone()?);
    let writer = tokio::fs::File::from_std(master.try_clone()?);
    Ok(Spawned {
        pid,
        stdin: Some(Box::new(writer)),
        stdout: Box::new(reader),
        stderr: None,
        child,
        pty: Some(OwnedFd::from(master)),
    })
}

/// Resize the terminal of a session started with a PTY.
pub fn resize(pty: &OwnedFd, size: WinSize) -> io::Result<()> {
    crate::sys::set_winsize(pty.as_fd(), size.rows, size.cols)
}

/// Send `signal` to the terminal's foreground process group: with job control, the command
/// the shell runs has a group of its own, which a signal to the shell's group misses. Only a
/// group in the session the session's process `leader` leads: a terminal without one reports
/// 0, and `killpg(0)` would signal the agent's own group.
pub fn signal_foreground(pty: &OwnedFd, leader: u32, signal: i32) {
    let Ok(fg) = nix::unistd::tcgetpgrp(pty) else {
        return;
    };
    let leader = nix::unistd::Pid::from_raw(leader as i32);
    let ours = nix::unistd::getpgrp();
    if fg.as_raw() <= 1 || fg == ours || leader.as_raw() <= 1 {
        return;
    }
    if nix::unistd::getsid(Some(fg)) != Ok(leader) {
        return;
    }
    let _ = nix::sys::signal::killpg(fg, nix::sys::signal::Signal::try_from(signal).ok());
}

/// Send `signal` to the process group led by `pid`.
pub fn signal_group(pid: u32, signal: i32) {
    if pid == 0 {
        return;
    }
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::try_from(signal).ok(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_without_a_foreground_group_signals_nobody() {
        // A fresh terminal has no session: it reports group 0, and killpg(0) would kill the
        // caller's own group (this test process, and whoever started it).
        let pty = nix::pty::openpty(None, None).unwrap();
        signal_foreground(&pty.master, std::process::id(), libc::SIGKILL);
        signal_foreground(&pty.master, 0, libc::SIGKILL);
        assert!(
            nix::sys::signal::kill(nix::unistd::getpid(), None).is_ok(),
            "still here"
        );
    }

    #[test]
    fn users_are_found_by_name_or_uid() {
        let p = "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n";
        assert_eq!(lookup_user(p, "www-data").unwrap().uid, 33);
        assert_eq!(lookup_user(p, "33").unwrap().name, "www-data");
        assert_eq!(lookup_user(p, "root").unwrap().home, "/root");
        assert!(lookup_user(p, "nobody").is_none());
    }
}
