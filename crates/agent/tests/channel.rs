//! The agent and its host client over a real socket pair, in this process: the protocol,
//! sessions, backpressure and file copy without a VM (the real-VM tests repeat the important
//! ones through QEMU's virtio-serial port).

use sistemo_agent::client::{Client, Event, Session, connect};
use sistemo_agent::guest::{OnEof, serve};
use sistemo_agent::proto::{Job, Start, WinSize};
use std::time::Duration;

async fn pair() -> Client {
    let (host, guest) = tokio::net::UnixStream::pair().unwrap();
    let (rd, wr) = guest.into_split();
    tokio::spawn(serve(rd, wr, OnEof::Return));
    connect(host, Duration::from_secs(5)).await.unwrap()
}

fn exec(argv: &[&str]) -> Start {
    Start {
        job: Job::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
        },
        env: vec![],
        cwd: None,
        user: None,
        tty: None,
        stdin: false,
        timeout_ms: None,
    }
}

/// Run a session to its end: (stdout, stderr, last event).
async fn drain(mut s: Session) -> (Vec<u8>, Vec<u8>, Event) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("session stalled")
        {
            Some(Event::Stdout(b)) => out.extend_from_slice(&b),
            Some(Event::Stderr(b)) => err.extend_from_slice(&b),
            Some(Event::Started(_)) => {}
            Some(e) => return (out, err, e),
            None => panic!("connection ended"),
        }
    }
}

fn code(e: &Event) -> (Option<i32>, Option<i32>) {
    match e {
        Event::Exited { code, signal, .. } => (*code, *signal),
        other => panic!("not an exit: {other:?}"),
    }
}

#[tokio::test]
async fn exit_codes_signals_stdout_and_stderr() {
    let c = pair().await;
    let (o, e, end) = drain(
        c.start(exec(&["sh", "-c", "echo out; echo err >&2; exit 7"]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (o.as_slice(), e.as_slice(), code(&end)),
        (&b"out\n"[..], &b"err\n"[..], (Some(7), None))
    );
    let (_, _, end) = drain(c.start(exec(&["sh", "-c", "kill -TERM $$"])).await.unwrap()).await;
    assert_eq!(code(&end), (None, Some(15)));
    // A missing program exits 127, as in a shell, saying which.
    let (_, e, end) = drain(c.start(exec(&["/nonexistent/prog"])).await.unwrap()).await;
    assert_eq!(code(&end), (Some(127), None));
    assert!(String::from_utf8_lossy(&e).contains("/nonexistent/prog"));
}

#[tokio::test]
async fn stdin_is_streamed_and_closed() {
    let c = pair().await;
    let mut st = exec(&["sha256sum"]);
    st.stdin = true;
    let s = c.start(st).await.unwrap();
    // More than the credit window, so the writer must wait for the agent's grants.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_stdin(&data).await.unwrap();
    s.close_stdin().await.unwrap();
    let (o, _, end) = drain(s).await;
    assert_eq!(code(&end), (Some(0), None));
    let want = std::process::Command::new("sh")
        .args(["-c", "head -c 0 /dev/null"])
        .output()
        .unwrap();
    assert!(want.status.success());
    let mut h = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    h.stdin.take().unwrap().write_all(&data).unwrap();
    let local = h.wait_with_output().unwrap().stdout;
    assert_eq!(o, local);
}

#[tokio::test]
async fn a_timeout_kills_the_process_group() {
    let c = pair().await;
    let mut st = exec(&["sh", "-c", "sleep 100 & sleep 100"]);
    st.timeout_ms = Some(200);
    let (_, _, end) = drain(c.start(st).await.unwrap()).await;
    assert!(
        matches!(
            end,
            Event::Exited {
                timed_out: true,
                signal: Some(9),
                ..
            }
        ),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_reader_that_stops_stops_the_writer_and_dropping_kills_it() {
    let c = pair().await;
    let marker = format!("/tmp/sistemo-agent-test-{}", std::process::id());
    let cmd = format!("echo $$ > {marker}; exec yes");
    let mut s = c.start(exec(&["sh", "-c", &cmd])).await.unwrap();
    // Take a little output, then stop reading: the agent stops at its window.
    let mut got = 0;
    while got < 100_000 {
        match s.next().await {
            Some(Event::Stdout(b)) => got += b.len(),
            Some(Event::Started(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        tokio::task::yield_now().await;
    };
    let _ = std::fs::remove_file(&marker);
    let alive = || {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
    };
    assert!(alive());
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive() {
        assert!(std::time::Instant::now() < deadline, "yes survived its session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fifty_sessions_at_once() {
    let c = pair().await;
    let runs = (0..50).map(|i| {
        let c = c.clone();
        async move {
            let (o, _, end) = drain(c.start(exec(&["sh", "-c", &format!("echo {i}")])).await.unwrap()).await;
            assert_eq!(code(&end), (Some(0), None));
            assert_eq!(String::from_utf8(o).unwrap().trim(), i.to_string());
        }
    });
    futures::future::join_all(runs).await;
}

#[tokio::test]
async fn a_pty_has_the_size_given_and_follows_resizes() {
    let c = pair().await;
    let mut st = exec(&["sh", "-c", "stty size; read x; stty size"]);
    st.tty = Some(WinSize { rows: 30, cols: 100 });
    st.stdin = true;
    let mut s = c.start(st).await.unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("30 100") {
        match s.next().await {
            Some(Event::Stdout(b)) => out.extend_from_slice(&b),
            Some(Event::Started(_)) => {}
            e => panic!("{e:?}: {}", String::from_utf8_lossy(&out)),
        }
    }
    s.resize(WinSize { rows: 50, cols: 132 }).await.unwrap();
    s.write_stdin(b"go\n").await.unwrap();
    let (o, _, end) = drain(s).await;
    assert!(
        String::from_utf8_lossy(&o).contains("50 132"),
        "{}",
        String::from_utf8_lossy(&o)
    );
    assert_eq!(code(&end), (Some(0), None));
}

#[tokio::test]
async fn files_and_directories_copy_both_ways() {
    let c = pair().await;
    let t = std::env::temp_dir().join(format!("sistemo-agent-cp-{}", std::process::id()));
    std::fs::create_dir_all(t.join("src/sub")).unwrap();
    std::fs::write(t.join("src/sub/f"), b"hello").unwrap();
    // Host to "guest": the archive is fed on stdin.
    let mut buf = Vec::new();
    sistemo_agent::archive::pack(&t.join("src"), &mut buf).unwrap();
    let mut st = exec(&[]);
    st.job = Job::WriteArchive {
        path: t.join("dst").display().to_string(),
    };
    st.stdin = true;
    let s = c.start(st).await.unwrap();
    s.write_stdin(&buf).await.unwrap();
    s.close_stdin().await.unwrap();
    let (_, _, end) = drain(s).await;
    assert_eq!(code(&end), (Some(0), None));
    assert_eq!(std::fs::read(t.join("dst/sub/f")).unwrap(), b"hello");
    // "Guest" to host: the archive comes on stdout.
    let mut st = exec(&[]);
    st.job = Job::ReadArchive {
        path: t.join("dst").display().to_string(),
    };
    let (o, _, end) = drain(c.start(st).await.unwrap()).await;
    assert_eq!(code(&end), (Some(0), None));
    sistemo_agent::archive::unpack(&o[..], &t.join("back")).unwrap();
    assert_eq!(std::fs::read(t.join("back/sub/f")).unwrap(), b"hello");
    // A missing source is a clear failure.
    let mut st = exec(&[]);
    st.job = Job::ReadArchive {
        path: "/nonexistent".into(),
    };
    let (_, _, end) = drain(c.start(st).await.unwrap()).await;
    assert!(
        matches!(&end, Event::Failed(m) if m.contains("/nonexistent")),
        "{end:?}"
    );
    std::fs::remove_dir_all(&t).unwrap();
}

#[tokio::test]
async fn facts_come_back() {
    let c = pair().await;
    let f = c.facts().await.unwrap();
    assert!(f.mem_total_kib > 0 && !f.agent.is_empty());
}

#[tokio::test]
async fn garbage_before_the_marker_is_skipped() {
    // The agent's side of a stream that starts with the tail of an older frame.
    let (host, guest) = tokio::net::UnixStream::pair().unwrap();
    let (grd, mut gwr) = guest.into_split();
    use tokio::io::AsyncWriteExt;
    gwr.write_all(b"\x00\x01\x02stale bytes of an old frame")
        .await
        .unwrap();
    tokio::spawn(serve(grd, gwr, OnEof::Return));
    let c = connect(host, Duration::from_secs(5)).await.unwrap();
    let (o, _, _) = drain(c.start(exec(&["echo", "ok"])).await.unwrap()).await;
    assert_eq!(o, b"ok\n");
}

#[tokio::test]
async fn archives_of_directories_come_back_whole_every_time() {
    let c = pair().await;
    let t = std::env::temp_dir().join(format!("sistemo-agent-cp-many-{}", std::process::id()));
    std::fs::create_dir_all(t.join("src/sub")).unwrap();
    std::fs::write(t.join("src/sub/f"), b"hello").unwrap();
    // A session left stalled (no credit granted) must not disturb the others.
    let mut stalled = c.start(exec(&["sh", "-c", "exec yes"])).await.unwrap();
    let mut got = 0;
    while got < 2_000_000 {
        match stalled.next().await {
            Some(Event::Stdout(b)) => got += b.len(),
            Some(Event::Started(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    for i in 0..200 {
        let mut st = exec(&[]);
        st.job = Job::ReadArchive {
            path: t.join("src").display().to_string(),
        };
        let (o, _, end) = drain(c.start(st).await.unwrap()).await;
        assert_eq!(code(&end), (Some(0), None));
        assert!(o.len() >= 2048, "round {i}: {} bytes", o.len());
    }
    drop(stalled);
    std::fs::remove_dir_all(&t).unwrap();
}
