//! The one place with `unsafe`: syscalls the standard library and crates do not wrap.
//! Each function documents why its `unsafe` is sound.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create a persistent TAP device `name` (kernel TAPs cannot be created over rtnetlink).
pub fn create_persistent_tap(name: &str) -> std::io::Result<()> {
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
    // SAFETY: same descriptor; TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Set a `SOL_SOCKET` option whose value is the plain-data `value`.
fn setsockopt<T>(fd: std::os::fd::RawFd, opt: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call; the
    // kernel reads exactly `size_of::<T>()` bytes from `value`, which outlives the call, and
    // callers pass the C type the option expects (`c_int`, `timeval`).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Let socket `fd` send datagrams of `bytes` (SO_SNDBUFFORCE: root may exceed `wmem_max`; a
/// netlink batch must travel in one datagram).
pub fn force_send_buffer(fd: std::os::fd::RawFd, bytes: usize) -> std::io::Result<()> {
    let v: libc::c_int = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    setsockopt(fd, libc::SO_SNDBUFFORCE, &v)
}

/// Make blocking receives on socket `fd` fail with `EAGAIN` after `timeout`.
pub fn set_recv_timeout(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    setsockopt(fd, libc::SO_RCVTIMEO, &tv)
}
