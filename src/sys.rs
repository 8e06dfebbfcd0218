//! The one place with `unsafe`: syscalls the standard library and crates do not wrap (the TAP
//! ioctls, glibc's `mallopt`, the `fork` of a daemon running as PID 1, `pidfd_open`), each block with why it
//! is sound; socket options go through `nix`'s typed wrappers.

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// Keep the daemon's heap from holding on to memory after busy moments (a deploy hashes and
/// copies with MiB buffers on blocking threads). glibc raises its mmap threshold to the size of
/// each large block freed, so later MiB buffers come from per-thread arenas and stay resident
/// when freed; idle RSS grew by 12 MB after one 2 GiB path-image deploy. A fixed threshold
/// (blocks of 128 KiB and more are mapped and unmapped on free) and two arenas instead of eight
/// per core keep an idle daemon at its fresh size.
pub fn lean_allocator() {
    // SAFETY: mallopt only sets allocator parameters under glibc's own lock; both parameters
    // are documented for it and take plain integers. Its result (1 success, 0 error) changes
    // nothing we rely on: a refused setting leaves glibc's defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Give the heap's free pages back to the kernel (glibc keeps freed memory of its arenas
/// mapped; the request handlers of a busy moment leave a few MB of it behind).
pub fn trim_heap() {
    // SAFETY: malloc_trim takes a plain integer (the padding to keep at the top of the heap) and
    // works under glibc's own arena locks; it frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create a persistent TAP device `name` (kernel TAPs cannot be created over rtnetlink), owned
/// by `owner` (uid, gid) when given: then that user may attach to it without `CAP_NET_ADMIN`,
/// and no other unprivileged user may.
pub fn create_persistent_tap(name: &str, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `f` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes an `ifreq`,
    // which `IfReq` matches in layout and size (40 bytes) and which lives across the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: same descriptor; TUNSETOWNER and TUNSETGROUP take the uid and gid as integer
        // arguments by value (the kernel reads them from the argument itself, not a pointer).
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETOWNER, libc::c_ulong::from(uid)) } < 0
            // SAFETY: as above.
            || unsafe { libc::ioctl(f.as_raw_fd(), TUNSETGROUP, libc::c_ulong::from(gid)) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: same descriptor; TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Let socket `fd` send datagrams of `bytes` (SO_SNDBUFFORCE: root may exceed `wmem_max`; a
/// netlink batch must travel in one datagram).
pub fn force_send_buffer(fd: &impl AsFd, bytes: usize) -> std::io::Result<()> {
    // The kernel takes an `int` and doubles it; keep it positive.
    setsockopt(fd, sockopt::SndBufForce, &bytes.min(i32::MAX as usize / 2))?;
    Ok(())
}

/// Make blocking receives on socket `fd` fail with `EAGAIN` after `timeout`.
pub fn set_recv_timeout(fd: &impl AsFd, timeout: std::time::Duration) -> std::io::Result<()> {
    // Clamped to what a 32-bit `time_t` holds (`TimeVal` panics beyond it).
    let max = i64::from(i32::MAX) * 1_000_000;
    let tv = TimeVal::microseconds(i64::try_from(timeout.as_micros()).map_or(max, |us| us.min(max)));
    setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

/// A pidfd of process `pid` (Linux 5.3+): it becomes readable when the process exits.
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and a flag word by value and returns a new descriptor or
    // -1; nothing is borrowed. A descriptor it returns is ours alone, so OwnedFd may own it.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is the fresh descriptor just returned (fits an int: the kernel's type).
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Wait until the process of pidfd `fd` has exited (its pidfd turns readable), on tokio's
/// reactor; returns at once when the descriptor cannot be watched.
pub async fn pidfd_exited(fd: std::os::fd::OwnedFd) {
    // SAFETY: `fd` is an open descriptor that the OwnedFd owns and moves into the AsyncFd, so
    // it stays open and refers to the same pidfd until the AsyncFd is dropped, and OwnedFd's
    // `as_raw_fd` always returns that one descriptor: what `register` requires.
    let Ok(a) = (unsafe { tokio::io::unix::AsyncFd::register(fd) }) else {
        return;
    };
    let _ = a.readable().await;
}

/// When this process is PID 1 (a container's init), split in two before any thread exists: the
/// child returns and runs the daemon; the parent stays as a minimal init that reaps every
/// process the namespace reparents to it (orphans of the daemon's tools, of `ip netns exec`…),
/// forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the daemon, and exits with the daemon's
/// status (128 + the signal when a signal ended it), which ends the namespace. Elsewhere,
/// returns at once.
pub fn init_if_pid1() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, getpid};
    if getpid().as_raw() != 1 {
        return;
    }
    // Blocked, the signals queue for `sigwait` (PID 1 would otherwise drop those it has no
    // handler for); the daemon gets the mask it had.
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    let mut old = SigSet::empty();
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)) {
        eprintln!("error: blocking signals as PID 1: {e}");
        std::process::exit(1);
    }
    // SAFETY: called from `main` before the runtime, the logger or any other thread exists
    // (main.rs), so the child is a copy of a single-threaded process: no lock can be held by a
    // thread that is not there, and the child goes on to run ordinary Rust code.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            return;
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            eprintln!("error: starting the daemon under PID 1 (fork): {e}");
            std::process::exit(1);
        }
    };
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                // Every exited child, the daemon's own last.
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                        std::process::exit(128 + sig as i32)
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            },
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    #[test]
    #[ignore = "creating a TAP needs root (CAP_NET_ADMIN): run sudo scripts/test"]
    fn a_tap_gets_its_owner_in_a_scratch_namespace() {
        // In a thread of its own, moved into a new network namespace: nothing touches the host's.
        std::thread::spawn(|| {
            // SAFETY: unshare takes a flag word and only changes this thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            create_persistent_tap("sistemo-t0", Some((4321, 4322))).unwrap();
            // `ip` forks from this thread, so it sees the new namespace.
            let ip = std::process::Command::new("ip")
                .args(["-d", "link", "show", "sistemo-t0"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&ip.stdout).into_owned();
            assert!(
                text.contains("user 4321") && text.contains("group 4322"),
                "{text}"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn receive_timeout_is_set() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        set_recv_timeout(&a, Duration::from_millis(1500)).unwrap();
        assert_eq!(a.read_timeout().unwrap(), Some(Duration::from_millis(1500)));
        let tv = getsockopt(&a, sockopt::ReceiveTimeout).unwrap();
        assert_eq!((tv.tv_sec(), tv.tv_usec()), (1, 500_000));
    }

    #[test]
    #[ignore = "SO_SNDBUFFORCE needs root (CAP_NET_ADMIN): run sudo scripts/test"]
    fn send_buffer_is_forced_past_wmem_max_as_root() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        force_send_buffer(&a, 8 << 20).unwrap();
        // The kernel doubles the value for its bookkeeping.
        assert_eq!(getsockopt(&a, sockopt::SndBuf).unwrap(), 16 << 20);
    }
}
