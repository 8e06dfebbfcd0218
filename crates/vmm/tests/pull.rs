//! Pulling an image over HTTP, entirely inside a private network namespace: the test thread
//! unshares its own netns, serves a tiny ext4 image on 127.0.0.1 there, and resolves the URL.
//! Needs root, `python3` and `curl`; skipped otherwise.

use sistemo_vmm::image::{ImageStore, make_ext4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(p: &str) -> bool {
    Command::new(p)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn pulls_an_image_over_http_once() {
    if !nix::unistd::geteuid().is_root() || !have("python3") || !have("curl") || !have("mkfs.ext4") {
        eprintln!("needs root, python3, curl and mkfs.ext4: skipped");
        return;
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

    let mut server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "18093"])
        .current_dir(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect("127.0.0.1:18093").is_err() {
        assert!(Instant::now() < deadline, "http server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let store = ImageStore::new(&dir.join("data"));
    let url = "http://127.0.0.1:18093/img.ext4";
    let res = rt.block_on(async {
        let a = store.resolve(url, 1 << 30, &|_| {}).await?;
        // Second time: served from the store, no download.
        let b = store
            .resolve(url, 1 << 30, &|s| panic!("downloaded again: {s}"))
            .await?;
        assert_eq!(a, b);
        let too_big = store.resolve(url, 1024, &|_| {}).await;
        assert!(too_big.is_ok(), "cached, so the limit is not re-checked");
        let bad = store
            .resolve("http://127.0.0.1:18093/not-ext4.img", 1 << 30, &|_| {})
            .await;
        assert!(bad.is_err(), "a non-ext4 download is refused");
        let small = store
            .resolve("http://127.0.0.1:18093/img.ext4?x", 1024, &|_| {})
            .await;
        assert!(small.is_err(), "the size limit holds");
        Ok::<_, sistemo_vmm::VmmError>(a)
    });
    let _ = server.kill();
    let _ = server.wait();
    let path = res.expect("pull");
    assert!(path.file_name().unwrap().to_string_lossy().ends_with(".ext4"));
    assert_eq!(store.list().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
