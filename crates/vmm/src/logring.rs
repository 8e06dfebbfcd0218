//! Logs kept to a size: a file its writer appends to (O_APPEND) and its previous part `FILE.1`,
//! read as one stream whose byte offsets stay valid when the oldest bytes are dropped.
//!
//! The stream is `FILE.1` then `FILE`; `FILE.start` holds the stream offset of `FILE.1`'s first
//! byte (0 when absent). [`enforce`] (the daemon's liveness pass) keeps both parts at most half
//! the cap each: when `FILE` has grown past it, its newest half-cap bytes are copied to `FILE.1`
//! and `FILE` is truncated; the writer's next append lands at the new end (O_APPEND). Bytes the
//! writer appends between the copy and the truncation (an instant) are lost. Every change and
//! read takes one lock, so a read never sees half a rotation.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Serialises rotations and reads (all of them happen in the daemon).
static LOCK: Mutex<()> = Mutex::new(());

fn old_part(path: &Path) -> PathBuf {
    suffixed(path, ".1")
}

fn start_file(path: &Path) -> PathBuf {
    suffixed(path, ".start")
}

fn suffixed(path: &Path, s: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(s);
    PathBuf::from(p)
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The stream offset of the oldest byte kept.
fn start_of(path: &Path) -> u64 {
    std::fs::read_to_string(start_file(path))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn set_start(path: &Path, start: u64) -> io::Result<()> {
    write_private(&start_file(path), format!("{start}\n").as_bytes())
}

/// Replace `path` with `data` (a temporary file renamed over it), 0600.
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = suffixed(path, ".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    std::fs::rename(&tmp, path)
}

/// The last `n` bytes of the file at `path` (fewer when it is shorter; none when absent).
fn last_bytes(path: &Path, n: u64) -> io::Result<Vec<u8>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
    let mut buf = Vec::new();
    f.take(n).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Move what `path` holds into `FILE.1` (keeping its newest `keep` bytes; all with `None`) and
/// empty `path`, dropping `FILE.1`'s previous bytes from the stream. Used at boot, before the
/// VMM opens the file, and by [`enforce`].
pub fn rotate(path: &Path, keep: Option<u64>) -> io::Result<()> {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    rotate_locked(path, keep)
}

fn rotate_locked(path: &Path, keep: Option<u64>) -> io::Result<()> {
    let len = len_of(path);
    if len == 0 {
        return Ok(());
    }
    let kept = whole_lines(last_bytes(path, keep.unwrap_or(u64::MAX))?, len);
    let dropped = len_of(&old_part(path)) + len - kept.len() as u64;
    write_private(&old_part(path), &kept)?;
    // Truncate, not replace: the writer keeps its descriptor (O_APPEND) and writes on at 0.
    std::fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    set_start(path, start_of(path) + dropped)
}

/// `kept`, the end of `len` bytes, from its first whole line on when its head was cut.
fn whole_lines(mut kept: Vec<u8>, len: u64) -> Vec<u8> {
    if (kept.len() as u64) < len
        && let Some(i) = kept.iter().position(|b| *b == b'\n')
    {
        kept.drain(..=i);
    }
    kept
}

fn boot_file(path: &Path) -> PathBuf {
    suffixed(path, ".boot")
}

/// [`rotate`] at a VMM's start: the previous boot's bytes become the older part, and the stream
/// offset where this boot begins is kept (`FILE.boot`) for [`tail_since_boot`].
pub fn rotate_boot(path: &Path) -> io::Result<()> {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    rotate_locked(path, None)?;
    let begins = start_of(path) + len_of(&old_part(path)) + len_of(path);
    write_private(&boot_file(path), format!("{begins}\n").as_bytes())
}

/// The newest `n` bytes of the stream written since the last [`rotate_boot`] (what the running
/// or last VMM wrote, never its predecessor's), e.g. to tell a power-off from a crash.
pub fn tail_since_boot(path: &Path, n: u64) -> Vec<u8> {
    let boot = std::fs::read_to_string(boot_file(path))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let end = {
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        start_of(path) + len_of(&old_part(path)) + len_of(path)
    };
    let from = end.saturating_sub(n).max(boot);
    read(path, Some(from), n).map(|(_, b)| b).unwrap_or_default()
}

/// Keep the log at `path` (with `FILE.1`) within `cap` bytes: each part at most `cap / 2` once
/// this returns. Returns whether anything was dropped or moved.
pub fn enforce(path: &Path, cap: u64) -> io::Result<bool> {
    let half = (cap / 2).max(1);
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let old = old_part(path);
    let old_len = len_of(&old);
    let mut changed = false;
    if old_len > half {
        let kept = whole_lines(last_bytes(&old, half)?, old_len);
        write_private(&old, &kept)?;
        set_start(path, start_of(path) + old_len - kept.len() as u64)?;
        changed = true;
    }
    if len_of(path) > half {
        rotate_locked(path, Some(half))?;
        changed = true;
    }
    Ok(changed)
}

/// Up to `max` bytes of the stream: from stream offset `offset` (clamped to what is kept), or,
/// without one, its newest bytes starting at a line (the tail). Returns the stream offset of the
/// first byte returned with the bytes; the next read continues at that offset + their length.
pub fn read(path: &Path, offset: Option<u64>, max: u64) -> io::Result<(u64, Vec<u8>)> {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let old = old_part(path);
    let start = start_of(path);
    let old_len = len_of(&old);
    let end = start + old_len + len_of(path);
    let from = match offset {
        Some(o) => o.clamp(start, end),
        None => end.saturating_sub(max).max(start),
    };
    let mut buf = Vec::new();
    let mut want = max;
    // The part of FILE.1 at and after `from`, then FILE's.
    for (file, first, len) in [
        (&old, start, old_len),
        (&path.to_path_buf(), start + old_len, end - start - old_len),
    ] {
        let last = first + len;
        if want == 0 || from >= last {
            continue;
        }
        let skip = from.saturating_sub(first);
        let mut f = match File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(skip))?;
        let n = want.min(len - skip);
        let got = f.take(n).read_to_end(&mut buf)? as u64;
        want -= got;
    }
    if offset.is_none() && from > start {
        // A tail starts at a whole line.
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            buf.drain(..=i);
            return Ok((from + i as u64 + 1, buf));
        }
    }
    Ok((from, buf))
}

/// The newest `n` bytes of the stream (across both parts), for diagnoses.
pub fn tail(path: &Path, n: u64) -> Vec<u8> {
    read(path, None, n).map(|(_, b)| b).unwrap_or_default()
}

/// Remove the log at `path` with its previous part and offset file.
pub fn remove(path: &Path) {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for p in [
        path.to_path_buf(),
        old_part(path),
        start_file(path),
        boot_file(path),
    ] {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn tmp() -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("sistemo-logring-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        (dir.join("console.log"), dir)
    }

    /// A writer holding the file open with O_APPEND, as QEMU's `append=on` file chardev does.
    fn append(f: &mut File, from: usize, to: usize) -> Vec<u8> {
        let mut all = Vec::new();
        for i in from..to {
            let line = format!("line {i:06}\n");
            f.write_all(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
        }
        all
    }

    #[test]
    fn a_capped_log_keeps_absolute_offsets_and_its_newest_bytes() {
        let (p, dir) = tmp();
        let mut w = OpenOptions::new().append(true).create(true).open(&p).unwrap();
        let cap = 4096;
        let mut stream = Vec::new();
        let mut follower = 0u64; // a `logs -f` reader's offset
        for round in 0..50 {
            stream.extend(append(&mut w, round * 100, round * 100 + 100));
            // a follower reading every other round never sees a byte twice or out of place
            if round % 2 == 0 {
                let (at, b) = read(&p, Some(follower), 1 << 20).unwrap();
                // at > follower only when it fell behind what is kept: it resumes at the oldest
                assert!(at >= follower);
                assert_eq!(
                    &stream[at as usize..at as usize + b.len()],
                    &b[..],
                    "round {round}"
                );
                follower = at + b.len() as u64;
            }
            enforce(&p, cap).unwrap();
            assert!(len_of(&p) + len_of(&old_part(&p)) <= cap, "round {round}");
        }
        // the writer's appends after truncations land at the new end, not after a hole
        let (at, all) = read(&p, Some(0), 1 << 20).unwrap();
        assert_eq!(at + all.len() as u64, stream.len() as u64);
        assert_eq!(&stream[at as usize..], &all[..]);
        assert!(!all.contains(&0), "no hole of zeroes");
        // the tail starts at a line and ends with the newest line
        let (t_at, t) = read(&p, None, 100).unwrap();
        assert!(
            t.starts_with(b"line ") && t.ends_with(b"line 004999\n"),
            "{:?}",
            String::from_utf8_lossy(&t)
        );
        assert_eq!(&stream[t_at as usize..], &t[..]);
        // an offset past the end (a different stream) resumes at the end, empty
        let (e_at, e) = read(&p, Some(u64::MAX), 100).unwrap();
        assert_eq!((e_at, e.len()), (stream.len() as u64, 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_boot_rotation_keeps_the_previous_boot_and_the_offsets() {
        let (p, dir) = tmp();
        std::fs::write(&p, b"boot one\n").unwrap();
        rotate(&p, None).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"boot two\n")
            .unwrap();
        assert_eq!(
            read(&p, Some(0), 100).unwrap(),
            (0, b"boot one\nboot two\n".to_vec())
        );
        rotate(&p, None).unwrap();
        // boot one's bytes are dropped; offsets count them
        assert_eq!(read(&p, Some(0), 100).unwrap(), (9, b"boot two\n".to_vec()));
        assert_eq!(tail(&p, 100), b"boot two\n");
        // a long previous part is trimmed to half the cap
        std::fs::write(&p, vec![b'x'; 10_000]).unwrap();
        rotate(&p, None).unwrap();
        assert!(enforce(&p, 1000).unwrap());
        assert_eq!(len_of(&old_part(&p)), 500, "no newline: cut anywhere");
        assert_eq!(read(&p, Some(0), 10).unwrap().0, 9 + 9 + 9_500);
        // with lines, the kept part starts at a whole one
        std::fs::write(&p, b"first line\nsecond\n").unwrap();
        rotate(&p, Some(10)).unwrap();
        assert_eq!(std::fs::read(old_part(&p)).unwrap(), b"second\n");
        // a boot's own tail never shows its predecessor's last words
        std::fs::write(&p, b"reboot: Power down\n").unwrap();
        rotate_boot(&p).unwrap();
        assert_eq!(tail_since_boot(&p, 4096), b"");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"panic\n")
            .unwrap();
        assert_eq!(tail_since_boot(&p, 4096), b"panic\n");
        assert!(
            tail(&p, 4096).starts_with(b"reboot"),
            "while the whole tail has both"
        );
        remove(&p);
        assert_eq!(read(&p, None, 10).unwrap(), (0, vec![]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
