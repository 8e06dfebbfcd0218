//! Prepare everything real-VM tests need: kernel + base initramfs, and the `debian` image.
//! Usage: `cargo run -p sistemo-vmm --example prepare_assets -- [DATA_DIR]` (default /var/lib/sistemo).

use std::path::PathBuf;
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/var/lib/sistemo".into()),
    );
    let progress = |s: &str| eprintln!("  {s}");
    let t = Instant::now();
    let assets = sistemo_vmm::image::ensure_boot_assets(&data_dir, &progress).await?;
    eprintln!("boot assets in {:.1}s: {assets:?}", t.elapsed().as_secs_f64());
    let store = sistemo_vmm::image::ImageStore::new(&data_dir);
    let force = std::env::var_os("SISTEMO_REBUILD_IMAGE").is_some();
    if force || store.resolve("debian", 0, &progress).await.is_err() {
        let t = Instant::now();
        let info = store.build_debian("debian", &[], &progress).await?;
        eprintln!(
            "image built in {:.1}s: {} ({} bytes)",
            t.elapsed().as_secs_f64(),
            info.sha256,
            info.size
        );
    }
    for i in store.list() {
        println!("{} {:?} {} {}", i.sha256, i.tags, i.size, i.source);
    }
    Ok(())
}
