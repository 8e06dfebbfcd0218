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

pub use debian::{
    Archive, BuildOptions, DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR, PackageName, RECIPE, apt_mirror,
    is_stale_build,
};
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
    // Unique per writer: two tasks of one process may write the same file at once.
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(VmmError::io(format!("writing {}", path.display())))
}
