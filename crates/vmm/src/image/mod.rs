//! Guest images and boot artefacts: the kernel ([`ensure_boot_assets`]) and initramfs, the content-addressed
//! ext4 store ([`ImageStore`]), Debian builds ([`BuildOptions`]) and machine disks ([`clone_disk`]).

mod debian;
mod disk;
mod download;
mod embedded;
mod initramfs;
mod kernel;
pub mod oci;
mod source;
mod store;

pub use debian::{BuildOptions, DEFAULT_MIRROR, PackageName, RECIPE, apt_mirror, is_stale_build};
pub(crate) use disk::command;
pub use disk::{Priority, clone_disk, clone_disk_at, grow_disk, make_ext4};
pub(crate) use initramfs::{GuestConfig, guest_volumes, write_machine_initrd};
pub use kernel::{BootAssets, ensure_boot_assets};
pub use source::{DEFAULT_MAX_IMAGE_SIZE, ImagePolicy, UrlRef, check_ext4, check_path, is_sha256, is_url};
pub use store::{ImageInfo, ImageStore};

use crate::VmmError;
use std::io::Write;
use std::path::Path;

/// Write `data` to `path` through a temporary file and a rename, with `mode`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ctx = || format!("writing {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(VmmError::io(ctx()))?;
    f.write_all(data).map_err(VmmError::io(ctx()))?;
    f.sync_all().map_err(VmmError::io(ctx()))?;
    std::fs::rename(&tmp, path).map_err(VmmError::io(ctx()))
}
