//! Downloading an image: `curl` writes the body to a pipe, which is hashed, capped and
//! decompressed here (`.gz` with flate2, `.zst` through `zstd -dc`) into a sparse file, with
//! timeouts, retries with backoff on transient failures, and progress once a second.

use super::source::{ImagePolicy, UrlRef};
use crate::proc::spawn_error;
use crate::{Progress, VmmError};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Stall guard: a transfer under this many bytes per second for [`LOW_SPEED_TIME`] is aborted
/// (and retried).
const LOW_SPEED_LIMIT: u32 = 1024;
const LOW_SPEED_TIME: u32 = 60;

/// How a body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Raw,
    Gzip,
    Zstd,
}

impl Codec {
    /// By the URL's suffix (query and fragment ignored), else by the body's magic bytes.
    fn detect(url: &str, head: &[u8]) -> Codec {
        let path = url.split(['?', '#']).next().unwrap_or(url).to_ascii_lowercase();
        if path.ends_with(".gz") {
            Codec::Gzip
        } else if path.ends_with(".zst") {
            Codec::Zstd
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Codec::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Codec::Zstd
        } else {
            Codec::Raw
        }
    }
}

/// What one attempt ended with.
enum Failure {
    /// Worth another attempt (connection, timeout, HTTP 408/429/5xx).
    Transient(VmmError),
    /// Final (404, size cap, digest mismatch, bad data).
    Fatal(VmmError),
}

/// The received (compressed) bytes: hashed, counted for progress, capped.
struct Received<R> {
    inner: R,
    hash: Sha256,
    count: Arc<AtomicU64>,
    cap: u64,
}

impl<R: Read> Read for Received<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        let total = self.count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.cap {
            return Err(std::io::Error::other(TooLarge));
        }
        Ok(n)
    }
}

/// The error value a cap raises inside the I/O chain.
#[derive(Debug)]
struct TooLarge;
impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("over the size cap")
    }
}
impl std::error::Error for TooLarge {}

fn is_too_large(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<TooLarge>())
}

/// The image file: capped, with blocks of zeros left as holes.
struct Sparse {
    file: std::fs::File,
    len: u64,
    cap: u64,
}

impl Write for Sparse {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len + buf.len() as u64 > self.cap {
            return Err(std::io::Error::other(TooLarge));
        }
        if buf.iter().all(|&b| b == 0) {
            self.file.seek(SeekFrom::Current(buf.len() as i64))?;
        } else {
            self.file.write_all(buf)?;
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A process killed when dropped (every path out of an attempt, a panic included).
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Download `url` into `dest` (created; removed on failure) within the policy's bounds;
/// returns the sha256 of the bytes as received. A pinned digest that differs is an error
/// naming both.
pub(super) async fn download(
    r: &UrlRef,
    policy: &ImagePolicy,
    dest: &Path,
    progress: Progress<'_>,
) -> Result<String, VmmError> {
    let deadline = Instant::now() + policy.total_timeout;
    let mut attempt = 0u32;
    let res = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(timeout(&r.url, policy));
        }
        match attempt_once(r, policy, dest, left, progress).await {
            Ok(sha) => break Ok(sha),
            Err(Failure::Transient(e)) if attempt < policy.retries => {
                let wait = policy.backoff * 2u32.saturating_pow(attempt);
                if Instant::now() + wait >= deadline {
                    break Err(e);
                }
                attempt += 1;
                progress(&format!(
                    "download failed ({e}); retry {attempt}/{} in {}s",
                    policy.retries,
                    wait.as_secs_f32()
                ));
                tokio::time::sleep(wait).await;
            }
            Err(Failure::Transient(e) | Failure::Fatal(e)) => break Err(e),
        }
    };
    if res.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    let sha = res?;
    if let Some(want) = &r.sha256
        && *want != sha
    {
        let _ = std::fs::remove_file(dest);
        return Err(VmmError::ImageRefused {
            reference: r.url.clone(),
            reason: format!("its sha256 is {sha}, not the pinned {want}; nothing was stored"),
        });
    }
    Ok(sha)
}

fn timeout(url: &str, policy: &ImagePolicy) -> VmmError {
    VmmError::Command {
        what: format!("downloading {url}"),
        reason: format!("not done within {}s", policy.total_timeout.as_secs()),
    }
}

/// One attempt, on a blocking thread; progress is reported from here once a second after the
/// first second.
async fn attempt_once(
    r: &UrlRef,
    policy: &ImagePolicy,
    dest: &Path,
    left: Duration,
    progress: Progress<'_>,
) -> Result<String, Failure> {
    let count = Arc::new(AtomicU64::new(0));
    let headers = dest.with_extension("headers");
    let job = {
        let (r, policy, dest, headers, count) = (
            r.clone(),
            policy.clone(),
            dest.to_path_buf(),
            headers.clone(),
            count.clone(),
        );
        tokio::task::spawn_blocking(move || fetch(&r, &policy, &dest, &headers, left, count))
    };
    tokio::pin!(job);
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let res = loop {
        tokio::select! {
            res = &mut job => break res,
            _ = tick.tick() => {
                let done = count.load(Ordering::Relaxed);
                let total = content_length(&headers);
                progress(&format!(
                    "downloading {}: {} / {} ({}s)",
                    r.url,
                    mib(done),
                    total.map(mib).unwrap_or_else(|| "unknown size".into()),
                    started.elapsed().as_secs()
                ));
            }
        }
    };
    let _ = std::fs::remove_file(&headers);
    res.unwrap_or_else(|e| {
        Err(Failure::Fatal(VmmError::Command {
            what: format!("downloading {}", r.url),
            reason: format!("the download task failed: {e}"),
        }))
    })
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
}

/// The last `Content-Length` curl saw (after redirects).
fn content_length(headers: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(headers).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .filter_map(|(_, v)| v.trim().parse().ok())
        .next_back()
}

/// The last HTTP status curl saw.
fn last_status(headers: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(headers).ok()?;
    text.lines()
        .filter(|l| l.starts_with("HTTP/"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .next_back()
}

/// Blocking: run curl into the pipe, decode into `dest`.
fn fetch(
    r: &UrlRef,
    policy: &ImagePolicy,
    dest: &Path,
    headers: &Path,
    left: Duration,
    count: Arc<AtomicU64>,
) -> Result<String, Failure> {
    let what = format!("downloading {}", r.url);
    let fatal = |reason: String| {
        Failure::Fatal(VmmError::Command {
            what: what.clone(),
            reason,
        })
    };
    let _ = std::fs::remove_file(dest);
    let _ = std::fs::remove_file(headers);
    let protos = if r.is_http() || policy.allow_http || r.insecure_http {
        "=https,http"
    } else {
        "=https"
    };
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--location", "--max-redirs", "5"])
        .args(["--proto", protos, "--proto-redir", protos])
        .arg("--connect-timeout")
        .arg(policy.connect_timeout.as_secs_f64().max(1.0).to_string())
        .arg("--max-time")
        .arg(left.as_secs_f64().max(1.0).to_string())
        .args(["--speed-limit", &LOW_SPEED_LIMIT.to_string()])
        .args(["--speed-time", &LOW_SPEED_TIME.to_string()])
        .arg("--max-filesize")
        .arg(policy.max_size.to_string())
        .arg("--dump-header")
        .arg(headers)
        .args(["-o", "-", "--"])
        .arg(&r.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut curl = Reaped(cmd.spawn().map_err(|e| Failure::Fatal(spawn_error(e, "curl")))?);
    let stderr = curl.0.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.take(8192).read_to_string(&mut s);
        s
    });
    let mut body = Received {
        inner: curl.0.stdout.take().expect("piped"),
        hash: Sha256::new(),
        count,
        cap: policy.max_size,
    };
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| Failure::Fatal(VmmError::io(format!("creating {}", dest.display()))(e)))?
    };
    let mut out = Sparse {
        file,
        len: 0,
        cap: policy.max_size,
    };
    // The first bytes decide the codec when the URL does not.
    let mut head = Vec::with_capacity(4);
    let copied: std::io::Result<()> = (|| {
        while head.len() < 4 {
            let mut b = [0u8; 4];
            let n = body.read(&mut b[..4 - head.len()])?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&b[..n]);
        }
        let codec = Codec::detect(&r.url, &head);
        let mut src = std::io::Cursor::new(head.clone()).chain(&mut body);
        match codec {
            Codec::Raw => copy(&mut src, &mut out),
            Codec::Gzip => copy(&mut flate2::read::MultiGzDecoder::new(src), &mut out),
            Codec::Zstd => unzstd(&mut src, &mut out),
        }
    })();
    let cap_hit = copied.as_ref().err().is_some_and(is_too_large);
    // Stop curl if we stopped reading (cap, bad data), then collect how it ended.
    if copied.is_err() {
        let _ = curl.0.kill();
    }
    let status = curl.0.wait();
    let stderr = err_reader.join().unwrap_or_default();
    let curl_msg = stderr.trim().lines().last().unwrap_or("").to_string();
    let code = status.ok().and_then(|s| s.code());
    if cap_hit || code == Some(63) {
        return Err(Failure::Fatal(VmmError::ImageRefused {
            reference: r.url.clone(),
            reason: format!(
                "larger than the limit of {} bytes (allowed: up to max_image_size); the download was stopped there",
                policy.max_size
            ),
        }));
    }
    match code {
        Some(0) => {}
        Some(c) => {
            let http = last_status(headers);
            let transient = matches!(c, 7 | 18 | 28 | 35 | 52 | 55 | 56)
                || (c == 22 && matches!(http, Some(408 | 429 | 500..=599)));
            let reason = match http.filter(|_| c == 22) {
                Some(h) => format!("HTTP {h}"),
                None => format!("curl exit {c}: {curl_msg}"),
            };
            let e = VmmError::Command {
                what: what.clone(),
                reason,
            };
            return Err(if transient {
                Failure::Transient(e)
            } else {
                Failure::Fatal(e)
            });
        }
        None => return Err(fatal("curl was killed".into())),
    }
    if let Err(e) = copied {
        return Err(fatal(format!("the data could not be decoded: {e}")));
    }
    let len = out.len;
    out.file
        .set_len(len)
        .and_then(|_| out.file.sync_all())
        .map_err(|e| Failure::Fatal(VmmError::io(format!("writing {}", dest.display()))(e)))?;
    Ok(body.hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn copy(src: &mut impl Read, out: &mut Sparse) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
    }
}

/// `.zst` through the `zstd` program: this thread feeds it, another reads its output.
fn unzstd(src: &mut impl Read, out: &mut Sparse) -> std::io::Result<()> {
    let mut z = Reaped(
        Command::new("zstd")
            .args(["-dcq"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| std::io::Error::other(spawn_error(e, "zstd")))?,
    );
    let mut zin = z.0.stdin.take().expect("piped");
    let mut zout = z.0.stdout.take().expect("piped");
    let res = std::thread::scope(|s| {
        let reader = s.spawn(move || copy(&mut zout, out));
        // A closed pipe here means zstd gave up (bad data) or the reader stopped (cap): the
        // reader's result says which.
        let fed = std::io::copy(src, &mut zin);
        drop(zin);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("zstd reader panicked")));
        match (read, fed) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) if is_too_large(&e) => Err(e),
            (Ok(()), Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
            _ => Ok(()),
        }
    });
    let ok = z.0.wait()?.success();
    res?;
    if !ok {
        return Err(std::io::Error::other("zstd: not valid zstd data"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_by_suffix_then_magic() {
        assert_eq!(Codec::detect("https://h/a.ext4.gz", b""), Codec::Gzip);
        assert_eq!(Codec::detect("https://h/a.ext4.ZST?x=1", b""), Codec::Zstd);
        assert_eq!(Codec::detect("https://h/a", &[0x1f, 0x8b, 8, 0]), Codec::Gzip);
        assert_eq!(
            Codec::detect("https://h/a", &[0x28, 0xb5, 0x2f, 0xfd]),
            Codec::Zstd
        );
        assert_eq!(Codec::detect("https://h/a.ext4", &[0, 0, 0, 0]), Codec::Raw);
    }

    #[test]
    fn the_sparse_writer_caps_and_keeps_holes() {
        let d = std::env::temp_dir().join(format!("sistemo-dl-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f");
        let mut w = Sparse {
            file: std::fs::File::create(&p).unwrap(),
            len: 0,
            cap: 3 << 16,
        };
        let mut data = vec![0u8; 3 << 16];
        data[5] = 1;
        copy(&mut &data[..], &mut w).unwrap();
        w.file.set_len(w.len).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let e = copy(&mut &[1u8][..], &mut w).unwrap_err();
        assert!(is_too_large(&e), "{e}");
        // A gzip bomb stops at the cap while decompressing, whatever its compressed size.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![7u8; 1 << 20]).unwrap();
        let gz = gz.finish().unwrap();
        let mut w = Sparse {
            file: std::fs::File::create(&p).unwrap(),
            len: 0,
            cap: 1 << 18,
        };
        let e = copy(&mut flate2::read::MultiGzDecoder::new(&gz[..]), &mut w).unwrap_err();
        assert!(is_too_large(&e) && gz.len() < 1 << 18, "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn headers_give_the_last_length_and_status() {
        let p = std::env::temp_dir().join(format!("sistemo-hdr-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(
            &p,
            "HTTP/1.1 302 Found\r\nLocation: /b\r\nContent-Length: 5\r\n\r\nHTTP/1.1 503 Busy\r\ncontent-length: 1234\r\n\r\n",
        )
        .unwrap();
        assert_eq!(content_length(&p), Some(1234));
        assert_eq!(last_status(&p), Some(503));
        std::fs::remove_file(&p).unwrap();
    }
}
