//! `sistemo-agent`: started by sistemo's initramfs before the image's own init, it serves the
//! host on the virtio-serial port named `sistemo.agent` for as long as the guest runs.

use sistemo_agent::guest::{OnEof, serve};

fn main() {
    let mut args = std::env::args().skip(1);
    let port = match (args.next().as_deref(), args.next()) {
        (Some("--port"), Some(p)) => p,
        _ => {
            eprintln!("usage: sistemo-agent --port /dev/vportNpM");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(async {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open(&port)?;
        let rd = tokio::fs::File::from_std(dev.try_clone()?);
        let wr = tokio::fs::File::from_std(dev);
        serve(rd, wr, OnEof::Wait).await
    });
    if let Err(e) = res {
        eprintln!("sistemo-agent: {port}: {e}");
        std::process::exit(1);
    }
}
