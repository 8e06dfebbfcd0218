//! The agent's only `unsafe`: a child's set-up between fork and exec (terminal, signal mask),
//! the terminal-size and RNG-reseed ioctls, systemd's power-off signal, descriptor registration.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Command;

/// Make the child a session leader whose controlling terminal is its stdin (a PTY slave).
pub(crate) fn controlling_tty(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (setsid(2), ioctl(2)); it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Give the child an empty signal mask: PID 1 (`--init`) blocks the signals it waits for, and
/// a child inherits the mask through fork and exec.
pub(crate) fn unblock_signals(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // pthread_sigmask(2), which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            if libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Set the window size of the terminal `fd` (a PTY master); the foreground group gets SIGWINCH.
pub(crate) fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a live descriptor for the duration of the call and `ws` a valid winsize
    // the kernel only reads.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Power the guest off: systemd's poweroff signal when systemd is PID 1 (an orderly shutdown),
/// SIGTERM when the agent is PID 1 (it stops the workload, then powers off),
/// else sync and power off at once (an image with no init system has nothing to stop).
/// A request that comes while the image's init is still starting waits for it (at most
/// [`INIT_WAIT`], on a thread of its own): a machine stopped right after its deploy shuts down
/// in order too.
pub(crate) fn power_off() {
    std::thread::spawn(|| {
        crate::facts::wait_init_ready(INIT_WAIT, || {});
        power_off_now();
    });
}

/// How long a power-off request waits for the image's init to be able to act on it.
const INIT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

fn power_off_now() {
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    // The agent as PID 1 (an image's single program): it stops the program, then powers off.
    if pid1.trim() == "systemd" || pid1.trim() == "agent" {
        let sig = if pid1.trim() == "agent" {
            libc::SIGTERM
        } else {
            libc::SIGRTMIN() + 4
        };
        // libc rather than nix: nix's `Signal` cannot name a real-time signal (systemd's
        // SIGRTMIN+4 means power off).
        // SAFETY: kill(2) with a valid signal number; it touches no memory.
        unsafe {
            libc::kill(1, sig);
        }
        return;
    }
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
}

/// Register `file` with tokio's reactor for `interest` (it must be non-blocking).
pub(crate) fn async_fd(
    file: std::fs::File,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::fs::File>> {
    // SAFETY: the `File` owns its descriptor, which stays open and unchanged for as long as the
    // `AsyncFd` holds the `File` (it closes it only when dropped, after deregistering).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(file, interest) }.map_err(std::io::Error::from)
}

/// Mix `entropy` into the kernel's RNG and reseed its CRNG at once (`RNDRESEEDCRNG`), so
/// `/dev/urandom`, UUIDs and TCP secrets of a clone differ from its template's.
pub(crate) fn reseed_rng(entropy: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    let mut f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    f.write_all(entropy)?;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory; `f` is a live
    // descriptor of /dev/urandom for the duration of the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
