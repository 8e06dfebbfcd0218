//! From layer blobs to a stored image: the layers applied in order into a private tree (on the
//! blocking pool), `mkfs.ext4 -d` of the tree into a sparse file (no mount), and the store.

use super::OciMeta;
use super::layer::{ApplyOptions, apply_layer, open_layer};
use crate::image::{ImageInfo, ImageStore, make_ext4};
use crate::{Progress, VmmError};
use std::path::PathBuf;
use std::time::Instant;

/// Convert `layers` (digest, blob file; lowest first) into an ext4 image stored under `tags`
/// with `meta`. Regular files of one layer may hold at most `max_bytes`. The scratch tree is
/// removed whatever happens.
pub async fn convert(
    store: &ImageStore,
    layers: &[(String, PathBuf)],
    meta: OciMeta,
    tags: &[String],
    max_bytes: u64,
    progress: Progress<'_>,
) -> Result<ImageInfo, VmmError> {
    let scratch = store.scratch("oci")?;
    let res = async {
        let t = Instant::now();
        let tree = scratch.join("tree");
        std::fs::create_dir(&tree).map_err(VmmError::io("creating the image tree"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755))
                .map_err(VmmError::io("creating the image tree"))?;
        }
        let opts = ApplyOptions {
            privileged: nix::unistd::geteuid().is_root(),
            max_bytes,
        };
        let (tree2, layers2) = (tree.clone(), layers.to_vec());
        tokio::task::spawn_blocking(move || {
            for (digest, blob) in &layers2 {
                apply_layer(&tree2, open_layer(blob)?, digest, opts)?;
            }
            Ok::<(), VmmError>(())
        })
        .await
        .map_err(|e| VmmError::io("applying layers")(std::io::Error::other(e)))??;
        progress(&format!(
            "{} layer(s) applied in {:.1}s; making the ext4 file system",
            layers.len(),
            t.elapsed().as_secs_f64()
        ));
        let file = scratch.join("image.ext4");
        make_ext4(&tree, &file, "oci").await?;
        store.add_oci(&file, tags, meta)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    res
}
