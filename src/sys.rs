//! The one place with `unsafe`: syscalls the standard library and crates do not wrap (the TAP
//! ioctls, glibc's `mallopt`), each block with why it is sound; socket options go through
//! `nix`'s typed wrappers.

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
