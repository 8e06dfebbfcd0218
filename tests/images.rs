//! Images are untrusted input: path images only under `image_dirs`, URL images over https
//! unless allowed, pinned by sha256, capped while streaming, decompressed, and checked to be
//! ext4 before any host tool reads them. Each test serves its images from a minimal HTTP server
//! on 127.0.0.1 inside a network namespace of its own, and makes disks through the daemon's
//! image backend ([`Disks`]) as a deploy does. Needs root (namespaces), curl, zstd and
//! e2fsprogs: ignored by plain `cargo test`, run by `sudo scripts/test`.

use sistemo::api::ErrorKind;
use sistemo::images::{Disks, ImageBackend, ImageError};
use sistemo_vmm::VmmError;
use sistemo_vmm::image::{BuildOptions, ImagePolicy, ImageStore, make_ext4};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The tests share the process environment (one of them puts wrappers on `PATH`): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> (
    std::sync::MutexGuard<'static, ()>,
    PathBuf,
    tokio::runtime::Runtime,
) {
    let g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "needs root and network namespaces (euid {} is not 0): run sudo scripts/test",
            nix::unistd::geteuid()
        );
    }
    for tool in ["curl", "mkfs.ext4", "zstd", "gzip"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok()
                || Command::new(tool).arg("-V").output().is_ok(),
            "needs {tool}: run sudo scripts/deps"
        );
    }
    // This thread, and the threads and processes it starts from now on, get an empty netns.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    let dir = std::env::temp_dir().join(format!("sistemo-images-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("www/tree/etc")).unwrap();
    std::fs::write(dir.join("www/tree/etc/hello"), "hi").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(make_ext4(&dir.join("www/tree"), &dir.join("www/img.ext4"), "img"))
        .unwrap();
    (g, dir, rt)
}

/// Serves `root` on 127.0.0.1 (this thread's namespace) and returns the base URL. Besides
/// files: `/endless` streams bytes without a length; `/flaky/F` answers 503 the first time;
/// `/slow/F` sends F in eight pieces over about 2.4 s.
fn serve(root: &Path) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let root = root.to_path_buf();
    let flaky = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req);
            let target = req.split_whitespace().nth(1).unwrap_or("/");
            let mut file = target.split('?').next().unwrap_or("").trim_start_matches('/');
            if file == "endless" {
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n");
                let chunk = vec![0x55u8; 1 << 16];
                while c.write_all(&chunk).is_ok() {}
                continue;
            }
            if let Some(f) = file.strip_prefix("slow/") {
                // Eight pieces, 300 ms apart: about 2.4 s in all.
                let Ok(body) = std::fs::read(root.join(f)) else {
                    continue;
                };
                let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                for piece in body.chunks(body.len().div_ceil(8)) {
                    std::thread::sleep(Duration::from_millis(300));
                    if c.write_all(piece).is_err() {
                        break;
                    }
                }
                continue;
            }
            if let Some(f) = file.strip_prefix("flaky/") {
                if flaky.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = c.write_all(b"HTTP/1.0 503 Busy\r\nContent-Length: 0\r\n\r\n");
                    continue;
                }
                file = f;
            }
            let _ = match std::fs::read(root.join(file)) {
                Ok(body) => write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .and_then(|_| c.write_all(&body)),
                Err(_) => c.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
            };
        }
    });
    base
}

fn sha256_hex(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(o.stdout).unwrap()[..64].to_string()
}

fn disks(dir: &Path, policy: ImagePolicy) -> Disks {
    Disks::new(&dir.join("data"), BuildOptions::default(), policy)
}

/// Make a machine disk from `image` in a fresh folder, as a deploy does.
fn deploy(
    rt: &tokio::runtime::Runtime,
    d: &Disks,
    dir: &Path,
    image: &str,
    lines: &Mutex<Vec<String>>,
) -> Result<PathBuf, ImageError> {
    let m = dir.join(format!("machine-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&m).unwrap();
    let progress = |s: &str| lines.lock().unwrap().push(s.to_string());
    rt.block_on(d.create_disk(image, &m, None, &progress))
        .map(|(p, _)| p)
}

/// The refusal's reason; panics on any other error.
fn refused(r: Result<PathBuf, ImageError>) -> String {
    let e = r.expect_err("should be refused");
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "400 expected: {e}");
    let msg = sistemo::error::chain(&e);
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        matches!(e, ImageError::Vmm(VmmError::ImageRefused { .. })),
        "{msg}"
    );
    msg
}

/// Nothing but the store's index (and its lock) is left: no image, no scratch folder.
fn store_is_empty(dir: &Path) -> bool {
    let images = dir.join("data/images");
    std::fs::read_dir(&images)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .all(|n| n == ".index.lock" || n == "index.json")
        })
        .unwrap_or(true)
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn http_urls_need_an_explicit_opt_in() {
    let (_g, dir, rt) = setup();
    let base = serve(&dir.join("www"));
    let url = format!("{base}/img.ext4");
    let lines = Mutex::new(vec![]);
    let d = disks(&dir, ImagePolicy::default());
    let e = refused(deploy(&rt, &d, &dir, &url, &lines));
    assert!(
        e.contains(&url) && e.contains("--insecure-http") && e.contains("allow_http_images"),
        "{e}"
    );
    assert!(store_is_empty(&dir), "nothing downloaded");
    // Per request: the API's insecure_http (folded into the reference by the API edge).
    let disk = deploy(&rt, &d, &dir, &format!("{url}#insecure_http"), &lines).expect("with the flag");
    assert!(disk.exists());
    // By configuration.
    let open = disks(
        &dir,
        ImagePolicy {
            allow_http: true,
            ..ImagePolicy::default()
        },
    );
    deploy(&rt, &open, &dir, &url, &lines).expect("allow_http_images");
    cleanup(&dir);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn a_sha256_mismatch_stores_nothing() {
    let (_g, dir, rt) = setup();
    let base = serve(&dir.join("www"));
    let url = format!("{base}/img.ext4");
    let good = sha256_hex(&dir.join("www/img.ext4"));
    let bad = "0".repeat(64);
    let lines = Mutex::new(vec![]);
    let d = disks(&dir, ImagePolicy::default());
    let e = refused(deploy(
        &rt,
        &d,
        &dir,
        &format!("{url}#insecure_http&sha256={bad}"),
        &lines,
    ));
    assert!(e.contains(&good) && e.contains(&bad), "names both digests: {e}");
    assert!(store_is_empty(&dir), "nothing stored");
    assert!(ImageStore::new(&dir.join("data")).list().is_empty());
    deploy(
        &rt,
        &d,
        &dir,
        &format!("{url}#insecure_http&sha256={good}"),
        &lines,
    )
    .expect("the right pin");
    cleanup(&dir);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn gz_and_zst_images_are_decompressed_on_the_fly() {
    let (_g, dir, rt) = setup();
    let www = dir.join("www");
    let gz = Command::new("gzip")
        .arg("-c")
        .arg(www.join("img.ext4"))
        .output()
        .unwrap();
    std::fs::write(www.join("img.ext4.gz"), &gz.stdout).unwrap();
    // Served under a name that does not say it: found by its magic bytes.
    std::fs::write(www.join("noext"), &gz.stdout).unwrap();
    let zst = Command::new("zstd")
        .args(["-q", "-c"])
        .arg(www.join("img.ext4"))
        .output()
        .unwrap();
    std::fs::write(www.join("img.ext4.zst"), &zst.stdout).unwrap();
    let base = serve(&www);
    let policy = ImagePolicy {
        allow_http: true,
        ..ImagePolicy::default()
    };
    let d = disks(&dir, policy);
    let want = sha256_hex(&www.join("img.ext4"));
    let lines = Mutex::new(vec![]);
    let pin = sha256_hex(&www.join("img.ext4.gz"));
    for name in ["img.ext4.gz", "noext", "img.ext4.zst"] {
        let reference = if name == "img.ext4.gz" {
            format!("{base}/{name}#sha256={pin}")
        } else {
            format!("{base}/{name}")
        };
        deploy(&rt, &d, &dir, &reference, &lines).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let store = ImageStore::new(&dir.join("data"));
    let list = store.list();
    assert_eq!(list.len(), 1, "the three decompress to one image: {list:?}");
    assert_eq!(list[0].sha256, want);
    assert_eq!(list[0].tags.len(), 3);
    cleanup(&dir);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn a_non_ext4_image_is_refused_before_any_host_tool_runs() {
    let (_g, dir, rt) = setup();
    let www = dir.join("www");
    let mut junk = vec![0xabu8; 1 << 20];
    junk[1080] = 0;
    std::fs::write(www.join("junk.img"), &junk).unwrap();
    let gz = Command::new("gzip")
        .arg("-c")
        .arg(www.join("junk.img"))
        .output()
        .unwrap();
    std::fs::write(www.join("junk.img.gz"), gz.stdout).unwrap();
    // Wrappers log every e2fsprogs run, then run the real tool.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("tools.log");
    for tool in ["resize2fs", "e2fsck", "mkfs.ext4", "debugfs", "tune2fs"] {
        let real = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(format!("/usr/sbin/{tool}")));
        let w = bin.join(tool);
        std::fs::write(
            &w,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> {}\nexec {} \"$@\"\n",
                log.display(),
                real.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    // SAFETY: every test of this binary holds SERIAL, and no other thread of this process
    // reads or writes the environment while it is changed.
    unsafe { std::env::set_var("PATH", format!("{}:{path}", bin.display())) };
    let base = serve(&www);
    let d = disks(
        &dir,
        ImagePolicy {
            allow_http: true,
            image_dirs: vec![www.clone()],
            ..ImagePolicy::default()
        },
    );
    let lines = Mutex::new(vec![]);
    let by_url = deploy(&rt, &d, &dir, &format!("{base}/junk.img"), &lines);
    let by_gz = deploy(&rt, &d, &dir, &format!("{base}/junk.img.gz"), &lines);
    let by_path = deploy(&rt, &d, &dir, &www.join("junk.img").display().to_string(), &lines);
    // The control: a real ext4 image under the same wrappers is grown by resize2fs.
    let ok = deploy(&rt, &d, &dir, &www.join("img.ext4").display().to_string(), &lines);
    // The spare disk made in the background runs resize2fs too: let it finish first.
    let pool = dir.join("data/pool");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60)
        && !std::fs::read_dir(&pool)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "raw"))
            })
            .unwrap_or(false)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { std::env::set_var("PATH", path) };
    for r in [by_url, by_gz, by_path] {
        let e = refused(r);
        assert!(e.contains("not an ext2/3/4 file system"), "{e}");
    }
    assert!(store_is_empty(&dir));
    ok.expect("a real ext4 image");
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !ran.contains("junk"),
        "a host tool ran on the refused file: {ran}"
    );
    assert!(ran.contains("resize2fs"), "the wrappers work: {ran:?}");
    cleanup(&dir);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn paths_outside_image_dirs_and_escaping_symlinks_are_refused() {
    let (_g, dir, rt) = setup();
    let root = dir.join("import");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(dir.join("www/img.ext4"), root.join("ok.ext4")).unwrap();
    std::os::unix::fs::symlink(dir.join("www/img.ext4"), root.join("escape.ext4")).unwrap();
    let lines = Mutex::new(vec![]);

    // Default: no host path at all.
    let none = disks(&dir, ImagePolicy::default());
    let ok = root.join("ok.ext4").display().to_string();
    let e = refused(deploy(&rt, &none, &dir, &ok, &lines));
    assert!(e.contains(&ok) && e.contains("image_dirs"), "{e}");

    let d = disks(
        &dir,
        ImagePolicy {
            image_dirs: vec![root.clone()],
            ..ImagePolicy::default()
        },
    );
    deploy(&rt, &d, &dir, &ok, &lines).expect("a file under image_dirs");
    let outside = dir.join("www/img.ext4").display().to_string();
    let e = refused(deploy(&rt, &d, &dir, &outside, &lines));
    assert!(
        e.contains(&outside) && e.contains(&root.display().to_string()),
        "{e}"
    );
    let e = refused(deploy(
        &rt,
        &d,
        &dir,
        &root.join("escape.ext4").display().to_string(),
        &lines,
    ));
    assert!(
        e.contains("escape.ext4") && e.contains("outside the image folders"),
        "{e}"
    );
    let e = refused(deploy(
        &rt,
        &d,
        &dir,
        &format!("{}/../www/img.ext4", root.display()),
        &lines,
    ));
    assert!(e.contains("outside the image folders"), "{e}");
    let e = refused(deploy(&rt, &d, &dir, "import/ok.ext4", &lines));
    assert!(e.contains("relative"), "{e}");
    // Devices: through a symlink in the root, and with /dev itself configured.
    std::os::unix::fs::symlink("/dev/zero", root.join("zero.ext4")).unwrap();
    refused(deploy(
        &rt,
        &d,
        &dir,
        &root.join("zero.ext4").display().to_string(),
        &lines,
    ));
    let dev = disks(
        &dir,
        ImagePolicy {
            image_dirs: vec!["/dev".into(), "/proc".into()],
            ..ImagePolicy::default()
        },
    );
    assert!(refused(deploy(&rt, &dev, &dir, "/dev/zero", &lines)).contains("a device"));
    assert!(refused(deploy(&rt, &dev, &dir, "/proc/self/status", &lines)).contains("procfs"));
    cleanup(&dir);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn an_oversized_download_stops_at_the_cap() {
    let (_g, dir, rt) = setup();
    let base = serve(&dir.join("www"));
    let cap = 8u64 << 20;
    let d = disks(
        &dir,
        ImagePolicy {
            allow_http: true,
            max_size: cap,
            ..ImagePolicy::default()
        },
    );
    let lines = Mutex::new(vec![]);
    let t = Instant::now();
    // No Content-Length, an endless body: only a cap counted while streaming stops it.
    let e = refused(deploy(&rt, &d, &dir, &format!("{base}/endless"), &lines));
    assert!(e.contains("larger than the limit of 8388608 bytes"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "stopped promptly: {:?}",
        t.elapsed()
    );
    assert!(store_is_empty(&dir), "no partial file left");
    cleanup(&dir);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn transient_failures_are_retried_and_long_downloads_report_progress() {
    let (_g, dir, rt) = setup();
    let base = serve(&dir.join("www"));
    let d = disks(
        &dir,
        ImagePolicy {
            allow_http: true,
            backoff: Duration::from_millis(200),
            ..ImagePolicy::default()
        },
    );
    let lines = Mutex::new(vec![]);
    deploy(&rt, &d, &dir, &format!("{base}/flaky/img.ext4"), &lines).expect("retried after a 503");
    let l = lines.lock().unwrap().join("\n");
    assert!(l.contains("HTTP 503") && l.contains("retry 1/3"), "{l}");
    // Longer than a second: bytes / total, once a second.
    lines.lock().unwrap().clear();
    let d = disks(
        &dir.join("other"),
        ImagePolicy {
            allow_http: true,
            ..ImagePolicy::default()
        },
    );
    deploy(&rt, &d, &dir, &format!("{base}/slow/img.ext4"), &lines).expect("slow");
    let total = std::fs::metadata(dir.join("www/img.ext4")).unwrap().len();
    let want = format!(" / {:.1} MiB (", total as f64 / (1u64 << 20) as f64);
    let l = lines.lock().unwrap().clone();
    let ticks = l.iter().filter(|s| s.contains(&want)).count();
    assert!(ticks >= 1, "progress with the total ({want}): {l:?}");
    cleanup(&dir);
}

/// Remove the test's folder once the spare disks made in the background are done.
fn cleanup(dir: &Path) {
    let t = Instant::now();
    let filling = || {
        walk(dir)
            .iter()
            .any(|p| p.extension().is_some_and(|x| x == "filling" || x == "cloning"))
    };
    while filling() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..50 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("could not remove {}", dir.display());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}
