//! Sessions started while the image's init is still starting: their `PATH` begins with
//! [`EARLY_BIN`], whose `systemctl` (this binary) waits until systemd takes commands, then runs
//! the image's own, so `deploy` followed at once by `exec "systemctl start nginx"` just works.

use std::os::unix::process::CommandExt;
use std::time::Duration;

/// The folder (on the guest's `/run` tmpfs, made by sistemo's init) prepended to `PATH` while
/// the init starts; its `systemctl` is a link to the agent.
pub const EARLY_BIN: &str = "/run/sistemo/bin";

/// How long the stand-in waits for the init before running the real program anyway.
const INIT_WAIT: Duration = Duration::from_secs(30);

/// `PATH` for a session started now: [`EARLY_BIN`] first while the image's init does not take
/// commands yet (and only if sistemo's init made that folder).
pub fn session_path(default: &str) -> String {
    if !crate::facts::init_state().ready && std::path::Path::new(EARLY_BIN).is_dir() {
        format!("{EARLY_BIN}:{default}")
    } else {
        default.to_string()
    }
}

/// Whether the agent was started as one of the stand-ins in [`EARLY_BIN`] (by its name).
pub fn invoked_as_stand_in(argv0: &str) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "systemctl")
}

/// Run as the `systemctl` stand-in: wait (at most [`INIT_WAIT`]) until the init takes commands,
/// then replace this process with the first other `systemctl` on `PATH`.
pub fn run_stand_in(args: Vec<std::ffi::OsString>) -> ! {
    crate::facts::wait_init_ready(INIT_WAIT, || {
        eprintln!("systemctl: waiting for the image's init to take commands…")
    });
    let path = std::env::var("PATH").unwrap_or_default();
    let real = path
        .split(':')
        .filter(|d| !d.is_empty() && *d != EARLY_BIN)
        .map(|d| std::path::Path::new(d).join("systemctl"))
        .find(|p| p.is_file());
    let Some(real) = real else {
        eprintln!("systemctl: command not found");
        std::process::exit(127);
    };
    let e = std::process::Command::new(&real)
        .arg0("systemctl")
        .args(args)
        .exec();
    eprintln!("systemctl: {}: {e}", real.display());
    std::process::exit(126);
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_stand_in_names_run_as_stand_ins() {
        assert!(super::invoked_as_stand_in("/run/sistemo/bin/systemctl"));
        assert!(super::invoked_as_stand_in("systemctl"));
        assert!(!super::invoked_as_stand_in("/run/sistemo/agent"));
        assert!(!super::invoked_as_stand_in("systemctl2"));
    }
}
