//! `sistemo-agent`: started by sistemo's initramfs before the image's own init, it serves the
//! host on the virtio-serial port named `sistemo.agent` for as long as the guest runs
//! (`--port`), and, where the VMM offers virtio-vsock, every connection to vsock port
//! [`VSOCK_PORT`]; or one connection on a socket as its stdin (`--stdio`). With `--init` it is PID 1
//! of an image that runs one program (an OCI image's entrypoint): see `sistemo_agent::init`.

use sistemo_agent::guest::{OnEof, serve};
use sistemo_agent::proto::VSOCK_PORT;

/// Present when sistemo's init loaded the vsock transport (the VMM offers the device).
const VSOCK_FLAG: &str = "/run/sistemo/vsock";

/// Serve every connection to vsock port [`VSOCK_PORT`], each as its own channel. Without a vsock
/// transport in the guest (no [`VSOCK_FLAG`]) this waits forever: the virtio-serial port is then
/// the only channel, and no vsock socket is ever opened (the kernel would run modprobe for one).
async fn serve_vsock() {
    use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};
    if !std::path::Path::new(VSOCK_FLAG).exists() {
        return std::future::pending().await;
    }
    let Ok(listener) = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, VSOCK_PORT)) else {
        return std::future::pending().await;
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (rd, wr) = stream.into_split();
                tokio::spawn(async move {
                    if let Err(e) = serve(rd, wr, OnEof::Return).await {
                        eprintln!("sistemo-agent: vsock: {e}");
                    }
                });
            }
            // Out of descriptors or memory for a moment: the next connection may fare better.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

fn main() {
    if let Some(argv0) = std::env::args_os().next()
        && sistemo_agent::early::invoked_as_stand_in(&argv0.to_string_lossy())
    {
        sistemo_agent::early::run_stand_in(std::env::args_os().skip(1).collect());
    }
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("--init") {
        if std::process::id() != 1 {
            eprintln!("sistemo-agent: --init runs only as PID 1");
            std::process::exit(2);
        }
        let port = match (std::env::args().nth(2).as_deref(), std::env::args().nth(3)) {
            (Some("--port"), Some(p)) => Some(p),
            _ => None,
        };
        sistemo_agent::init::run(port);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let port = match (args.next().as_deref(), args.next()) {
        (Some("--port"), Some(p)) => p,
        // One connection on stdin, a socket (the `netns` backend runs the agent this way, with
        // the machine's name as the hostname of a UTS namespace of the session's own).
        (Some("--stdio"), hostname) => {
            if let Some(flag) = hostname {
                let name = match (flag.as_str(), args.next()) {
                    ("--hostname", Some(name)) => name,
                    _ => {
                        eprintln!("usage: sistemo-agent --stdio [--hostname NAME]");
                        std::process::exit(2);
                    }
                };
                let uts = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)
                    .and_then(|()| nix::unistd::sethostname(&name));
                if let Err(e) = uts {
                    eprintln!("sistemo-agent: hostname {name}: {e}");
                    std::process::exit(1);
                }
            }
            let res = rt.block_on(async {
                use std::os::fd::AsFd;
                let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
                let sock = std::os::unix::net::UnixStream::from(fd);
                sock.set_nonblocking(true)?;
                let (rd, wr) = tokio::net::UnixStream::from_std(sock)?.into_split();
                serve(rd, wr, OnEof::Return).await
            });
            if let Err(e) = res {
                eprintln!("sistemo-agent: stdin: {e}");
                std::process::exit(1);
            }
            return;
        }
        _ => {
            eprintln!(
                "usage: sistemo-agent --port /dev/vportNpM | --stdio [--hostname NAME] | --init [--port /dev/vportNpM]"
            );
            std::process::exit(2);
        }
    };
    let res = rt.block_on(async {
        let port = sistemo_agent::port::Port::open(&port)?;
        // Tells sistemo's init that the agent runs, in the image's root (see init.sh).
        let _ = std::fs::write("/run/sistemo/agent.pid", format!("{}\n", std::process::id()));
        let (rd, wr) = port.split()?;
        tokio::select! {
            r = serve(rd, wr, OnEof::Wait) => r,
            () = serve_vsock() => Ok(()),
        }
    });
    if let Err(e) = res {
        eprintln!("sistemo-agent: {port}: {e}");
        std::process::exit(1);
    }
}
