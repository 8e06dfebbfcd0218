//! Local image files for a remote daemon: `machine deploy ./x.ext4` and `image import ./x.tar`
//! with `--host` upload the file through the API (a remote daemon never reads the caller's
//! paths), with progress; an ext4 image the daemon already holds is not sent again.

use super::output::progress_printer;
use super::urlencode;
use crate::api::{ImageRow, MachineInfo, UploadInfo};
use crate::client::Client;
use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};

/// Whether a deploy's IMAGE names a local file: absolute, `./` or `../`, `*.ext4`, or an
/// existing path with a `/` (anything else with a `/` is an OCI reference).
pub fn is_local_path(image: &str) -> bool {
    !sistemo_vmm::image::is_url(image)
        && (image.starts_with('/')
            || image.starts_with("./")
            || image.starts_with("../")
            || image.ends_with(".ext4")
            || (image.contains('/') && Path::new(image).exists()))
}

/// A regular file the CLI can read, or a usage error naming it.
fn local_file(arg: &str) -> Result<PathBuf> {
    let p = std::path::absolute(arg).with_context(|| format!("resolving {arg}"))?;
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        Ok(_) => bail!(super::Usage::new(std::io::Error::other(format!(
            "{arg:?} is not a regular file: a remote daemon is sent a file (allowed: an ext4 image or a tar archive; tar a layout directory first)"
        )))),
        Err(e) => bail!(super::Usage::new(std::io::Error::other(format!(
            "{arg:?} cannot be read here ({e}): with --host the file is uploaded from this machine (allowed: a local file, a tag, or an https URL)"
        )))),
    }
}

/// Ask the daemon whether it admits an upload of `file` to `route` (role, size cap, free
/// space) before sending it: a refusal then names its reason instead of a broken connection.
fn preflight(c: &Client, route: &str, file: &Path) -> Result<()> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    c.call::<UploadInfo>("POST", &format!("{route}?check=true&size={size}"), None::<&()>)?;
    Ok(())
}

fn sha256_of(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Upload progress on stderr: a byte bar on a terminal, else a line at each quarter.
fn upload_progress(what: String) -> impl FnMut(u64, u64) + Send + 'static {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(what.clone());
        b
    });
    let mut quarter = 0;
    move |sent, total| match &bar {
        Some(b) => {
            b.set_length(total);
            b.set_position(sent);
            if sent >= total {
                b.finish_and_clear();
            }
        }
        None => {
            let q = (sent * 4).checked_div(total).unwrap_or(4);
            if q > quarter {
                quarter = q;
                eprintln!(
                    "… uploading {what}: {}% of {} MiB",
                    q * 25,
                    total.div_ceil(1 << 20)
                );
            }
        }
    }
}

/// The machine name a deploy of `file` gets without `--name`, as the daemon names one after an
/// image file (its stem, then `-2`, `-3`…): the image is deployed by its digest.
fn name_after(c: &Client, file: &Path) -> Result<String> {
    let stem = file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.split('.').next().unwrap_or_default().to_ascii_lowercase();
    let mut base: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(50);
    let base = base.trim_matches('-').to_string();
    let taken: Vec<String> = c
        .get::<Vec<MachineInfo>>("/v1/machines")?
        .into_iter()
        .map(|m| m.name)
        .collect();
    Ok((1..1000)
        .map(|i| {
            if i == 1 {
                base.clone()
            } else {
                format!("{base}-{i}")
            }
        })
        .find(|n| !n.is_empty() && !taken.contains(n))
        .unwrap_or(base))
}

/// Send the ext4 image `arg` to the daemon (unless it holds it already) and return the digest
/// to deploy, and the machine's name (`name`, or one after the file).
pub fn deploy_image(c: &Client, arg: &str, name: Option<String>) -> Result<(String, Option<String>)> {
    let file = local_file(arg)?;
    let sha = sha256_of(&file)?;
    if c.get::<UploadInfo>(&format!("/v1/images/upload/{sha}")).is_ok() {
        eprintln!("… the daemon already has {arg} (sha256 {sha})");
    } else {
        preflight(c, "/v1/images/upload", &file)?;
        let info: UploadInfo = c.upload(
            &format!("/v1/images/upload?sha256={sha}"),
            &file,
            upload_progress(arg.to_string()),
        )?;
        eprintln!(
            "… uploaded {arg} ({} bytes, sha256 {})",
            info.size_bytes, info.sha256
        );
    }
    let name = match name {
        Some(n) => Some(n),
        None => Some(name_after(c, &file)?),
    };
    Ok((sha, name))
}

/// Send the archive `arg` to the daemon and import it as `name`.
pub fn import(c: &Client, arg: &Path, name: Option<&str>) -> Result<ImageRow> {
    let shown = arg.display().to_string();
    let file = local_file(&shown)?;
    preflight(c, "/v1/images/import/upload", &file)?;
    let sha = sha256_of(&file)?;
    let mut path = format!("/v1/images/import/upload?sha256={sha}");
    if let Some(n) = name {
        path.push_str(&format!("&name={}", urlencode(n)));
    }
    Ok(c.upload_stream(&path, &file, upload_progress(shown), progress_printer())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_are_told_from_tags_urls_and_references() {
        for p in ["./my.ext4", "../x", "/srv/a.ext4", "a.ext4", "img/b.ext4"] {
            assert!(is_local_path(p), "{p}");
        }
        for r in [
            "debian",
            "https://h/a.ext4",
            "127.0.0.1:5000/web:1",
            "ghcr.io/o/r",
            "node:20",
        ] {
            assert!(!is_local_path(r), "{r}");
        }
    }
}
