//! Pulling an image over HTTP, entirely inside a private network namespace: the test thread
//! unshares its own netns, serves a tiny ext4 image on 127.0.0.1 there (a minimal HTTP server in
//! this file), and resolves the URL. Needs root, `curl` and `mkfs.ext4`: ignored by plain
//! `cargo test`, run by `sudo scripts/test`; included without them, it fails saying what is
//! missing.

use sistemo_vmm::image::{ImagePolicy, ImageStore, make_ext4};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn have(p: &str) -> bool {
    Command::new(p)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Serves the files under `root` to HTTP GET requests on `listener` (query strings ignored,
/// one request per connection), in a thread that lives as long as the test process.
fn serve(listener: std::net::TcpListener, root: PathBuf) {
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
            let file = target.split('?').next().unwrap_or("").trim_start_matches('/');
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
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn pulls_an_image_over_http_once() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "needs root and network namespaces (euid {} is not 0): run sudo scripts/test",
            nix::unistd::geteuid()
        );
    }
    for tool in ["curl", "mkfs.ext4"] {
        assert!(have(tool), "needs {tool}: run sudo scripts/deps");
    }
    // This thread (and the processes it spawns) get a fresh, empty network namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );

    let dir = std::env::temp_dir().join(format!("sistemo-pull-{}", std::process::id()));
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("tree/etc")).unwrap();
    std::fs::write(www.join("tree/etc/hello"), "hi").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(make_ext4(&www.join("tree"), &www.join("img.ext4"), "pull"))
        .unwrap();
    std::fs::write(www.join("not-ext4.img"), vec![0u8; 4096]).unwrap();

    // Bound here, in this thread's namespace; served from another thread.
    let listener = std::net::TcpListener::bind("127.0.0.1:18093").expect("bind 127.0.0.1:18093");
    serve(listener, www.clone());

    let store = ImageStore::new(&dir.join("data"));
    // Plain http on loopback, allowed explicitly; `max` bytes at most.
    let policy = |max: u64| ImagePolicy {
        allow_http: true,
        max_size: max,
        ..ImagePolicy::default()
    };
    let url = "http://127.0.0.1:18093/img.ext4";
    let res = rt.block_on(async {
        let a = store.resolve(url, &policy(1 << 30), &|_| {}).await?;
        // Second time: served from the store, no download.
        let b = store
            .resolve(url, &policy(1 << 30), &|s| panic!("downloaded again: {s}"))
            .await?;
        assert_eq!(a, b);
        let too_big = store.resolve(url, &policy(1024), &|_| {}).await;
        assert!(too_big.is_ok(), "cached, so the limit is not re-checked");
        let bad = store
            .resolve("http://127.0.0.1:18093/not-ext4.img", &policy(1 << 30), &|_| {})
            .await;
        assert!(bad.is_err(), "a non-ext4 download is refused");
        let small = store
            .resolve("http://127.0.0.1:18093/img.ext4?x", &policy(1024), &|_| {})
            .await;
        assert!(small.is_err(), "the size limit holds");
        Ok::<_, sistemo_vmm::VmmError>(a)
    });
    let path = res.expect("pull");
    assert!(path.file_name().unwrap().to_string_lossy().ends_with(".ext4"));
    assert_eq!(store.list().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
