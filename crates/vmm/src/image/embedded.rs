//! Where the embedded agent binary lies in our own executable file, so that every machine's
//! initrd gets it by a kernel-side copy (`copy_file_range`) without its pages entering our RSS.
//!
//! [`crate::AGENT_BINARY`] is read-only data in the executable's first `LOAD` segment. Reading it
//! through that mapping makes its 2 MiB resident in the daemon for good (file-backed pages stay
//! mapped until memory pressure); the same bytes read from the file by offset stay in the page
//! cache only. The offset comes from `/proc/self/maps`: the mapping that holds the slice, its
//! file offset, device and inode, checked against `/proc/self/exe`.

use nix::sys::stat::{major, minor};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The executable file and the agent's byte offset in it.
pub(crate) struct AgentInExe {
    pub(crate) file: File,
    pub(crate) offset: u64,
}

/// The agent's place in `/proc/self/exe`, found once; `None` if it cannot be located (then
/// callers copy [`crate::AGENT_BINARY`] from memory).
pub(crate) fn agent_in_exe() -> Option<AgentInExe> {
    static OFFSET: OnceLock<Option<u64>> = OnceLock::new();
    let offset = (*OFFSET.get_or_init(|| {
        let found = locate(crate::AGENT_BINARY);
        if found.is_none() {
            tracing::debug!("the embedded agent is not found in /proc/self/exe: copied from memory");
        }
        found
    }))?;
    let file = File::open("/proc/self/exe").ok()?;
    Some(AgentInExe { file, offset })
}

/// The file offset of `blob` in the executable, if a private read-only mapping of
/// `/proc/self/exe`'s inode holds all of it.
fn locate(blob: &[u8]) -> Option<u64> {
    let exe = std::fs::metadata("/proc/self/exe").ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let (start, end) = (blob.as_ptr() as u64, blob.as_ptr() as u64 + blob.len() as u64);
    maps.lines().find_map(|l| {
        let m = MapLine::parse(l)?;
        (m.start <= start
            && end <= m.end
            && m.inode == exe.ino()
            && m.dev == (major(exe.dev()), minor(exe.dev()))
            && !m.writable)
            .then(|| start - m.start + m.offset)
    })
}

/// One line of `/proc/PID/maps`: `start-end perms offset major:minor inode path`.
#[derive(Debug, PartialEq)]
struct MapLine {
    start: u64,
    end: u64,
    writable: bool,
    offset: u64,
    dev: (u64, u64),
    inode: u64,
}

impl MapLine {
    fn parse(line: &str) -> Option<MapLine> {
        let mut f = line.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let perms = f.next()?;
        let offset = f.next()?;
        let (major, minor) = f.next()?.split_once(':')?;
        let inode = f.next()?.parse().ok()?;
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        Some(MapLine {
            start: hex(start)?,
            end: hex(end)?,
            writable: perms.as_bytes().get(1) == Some(&b'w'),
            offset: hex(offset)?,
            dev: (hex(major)?, hex(minor)?),
            inode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn maps_lines_parse() {
        let l = "55d0c1a00000-55d0c2000000 r--p 00123000 fe:01 10100783   /usr/bin/sistemo";
        assert_eq!(
            MapLine::parse(l),
            Some(MapLine {
                start: 0x55d0c1a00000,
                end: 0x55d0c2000000,
                writable: false,
                offset: 0x123000,
                dev: (0xfe, 1),
                inode: 10100783,
            })
        );
        assert!(MapLine::parse("7ffd-7ffe rw-p 00000000 00:00 0 [stack]").is_some_and(|m| m.writable));
        assert_eq!(MapLine::parse("garbage"), None);
    }

    #[test]
    fn the_agent_is_found_in_this_executable_byte_for_byte() {
        let a = agent_in_exe().expect("the agent's offset in /proc/self/exe");
        let blob = crate::AGENT_BINARY;
        let mut buf = vec![0u8; blob.len()];
        a.file
            .read_exact_at(&mut buf, a.offset)
            .expect("reading the agent from the file");
        assert!(
            buf == blob,
            "the bytes at offset {} differ from the embedded agent",
            a.offset
        );
    }

    #[test]
    fn a_heap_copy_is_not_found() {
        let copy = crate::AGENT_BINARY[..4096].to_vec();
        assert_eq!(locate(&copy), None);
    }
}
