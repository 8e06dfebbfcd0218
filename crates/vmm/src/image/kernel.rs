//! The guest kernel: Debian's cloud kernel fetched with apt (or a given `.deb`), unpacked to an
//! ELF `vmlinux`, with the virtio modules it needs resolved from their own `depends=`.

use super::initramfs::{build_base_initramfs, find_static_busybox};
use super::write_atomic;
use crate::proc::{run, spawn_error};
use crate::{Progress, VmmError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// Bumped whenever the base initramfs layout or `/init` changes, so caches are rebuilt.
const INITRAMFS_VERSION: u32 = 6;

/// The Debian metapackage whose dependency is the kernel we boot.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, in no particular order: their dependencies are resolved from the
/// `.ko` files' own `depends=` and loaded first.
const WANTED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    // The guest agent's virtio-serial port, and its vsock where the VMM offers one (loaded
    // only then: see `init.sh`).
    "virtio_console",
    "vmw_vsock_virtio_transport",
    // ACPI power button + input events: lets `system_powerdown` reach systemd-logind.
    "button",
    "evdev",
    // ext4 and its helpers, when the kernel has them as modules.
    "ext4",
    "crc32c_generic",
];

/// Of [`WANTED_MODULES`], those without which no guest boots.
const REQUIRED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "ext4",
];

/// A kernel and base initramfs ready to boot guests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootAssets {
    /// Uncompressed ELF kernel (PVH entry), for `-kernel`.
    pub kernel: PathBuf,
    /// Base initramfs (gzip'd newc): busybox, virtio modules, `/init`.
    pub initramfs: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct KernelCache {
    package: String,
    version: String,
    vmlinux: PathBuf,
    modules: Vec<PathBuf>,
    /// [`WANTED_MODULES`] when the modules were selected: a cache made for another list is
    /// made again.
    #[serde(default)]
    wanted: Vec<String>,
}

/// Make sure `data_dir/kernel/` holds a bootable kernel and base initramfs; fast when cached.
///
/// The kernel is Debian's `linux-image-*-cloud-amd64` fetched with `apt-get download` (signed
/// apt repository), or the package file `kernel_deb` when given (used only when nothing is
/// cached yet).
pub async fn ensure_boot_assets(
    data_dir: &Path,
    kernel_deb: Option<&Path>,
    progress: Progress<'_>,
) -> Result<BootAssets, VmmError> {
    let kdir = data_dir.join("kernel");
    std::fs::create_dir_all(&kdir).map_err(VmmError::io(format!("creating {}", kdir.display())))?;
    let cache_file = kdir.join("kernel.json");
    let cached: Option<KernelCache> = std::fs::read(&cache_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|c: &KernelCache| c.vmlinux.exists() && c.modules.iter().all(|m| m.exists()))
        .filter(|c| {
            c.wanted
                .iter()
                .map(String::as_str)
                .eq(WANTED_MODULES.iter().copied())
        });
    let kernel = match cached {
        Some(c) => c,
        None => {
            let c = fetch_kernel(&kdir, kernel_deb, progress).await?;
            write_atomic(&cache_file, &serde_json::to_vec_pretty(&c).expect("json"), 0o644)?;
            c
        }
    };
    // The name also carries a digest of `/init`: branches that change it never share a cache.
    let init = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(super::initramfs::INIT_SCRIPT.as_bytes());
        d.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>()
    };
    let initramfs = kdir.join(format!(
        "initramfs-{}-v{INITRAMFS_VERSION}-{init}.img",
        kernel.version
    ));
    if !initramfs.exists() {
        progress("building the base initramfs");
        let busybox = find_static_busybox()?;
        let bytes = build_base_initramfs(&busybox, &kernel.modules)?;
        write_atomic(&initramfs, &bytes, 0o644)?;
    }
    Ok(BootAssets {
        kernel: kernel.vmlinux,
        initramfs,
        kernel_version: kernel.version,
    })
}

async fn kernel_package() -> Result<String, VmmError> {
    let out = run(
        Command::new("apt-cache").args(["depends", KERNEL_META]),
        "apt-cache depends",
    )
    .await?;
    parse_kernel_dependency(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| VmmError::Command {
        what: format!("apt-cache depends {KERNEL_META}"),
        reason: "no linux-image-* dependency found (run apt-get update?)".into(),
    })
}

/// The versioned kernel package in `apt-cache depends` output.
fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64") && p != &KERNEL_META)
        .map(str::to_string)
}

async fn fetch_kernel(
    kdir: &Path,
    kernel_deb: Option<&Path>,
    progress: Progress<'_>,
) -> Result<KernelCache, VmmError> {
    let work = kdir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(VmmError::io("creating the kernel download folder"))?;
    let (deb, package) = match kernel_deb {
        Some(p) => (p.to_path_buf(), p.display().to_string()),
        None => {
            let package = kernel_package().await?;
            progress(&format!("downloading {package}"));
            run(
                Command::new("apt-get")
                    .args(["download", &package])
                    .current_dir(&work),
                &format!("apt-get download {package}"),
            )
            .await?;
            let deb = std::fs::read_dir(&work)
                .map_err(VmmError::io("listing the kernel download"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .ok_or_else(|| VmmError::Command {
                    what: format!("apt-get download {package}"),
                    reason: "no .deb was written".into(),
                })?;
            (deb, package)
        }
    };
    progress("unpacking the kernel package");
    let tree = work.join("tree");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        "dpkg-deb -x",
    )
    .await?;
    let moddir = tree.join("lib/modules");
    let version = std::fs::read_dir(&moddir)
        .map_err(VmmError::io(format!("reading {}", moddir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| VmmError::Command {
            what: "unpacking the kernel".into(),
            reason: "the package has no lib/modules/<version>".into(),
        })?;
    let vmlinuz = tree.join(format!("boot/vmlinuz-{version}"));
    progress("extracting vmlinux");
    let bz = std::fs::read(&vmlinuz).map_err(VmmError::io(format!("reading {}", vmlinuz.display())))?;
    let elf = extract_vmlinux(&bz).await?;
    let outdir = kdir.join(&version);
    let _ = std::fs::remove_dir_all(&outdir);
    std::fs::create_dir_all(outdir.join("modules")).map_err(VmmError::io("creating the kernel folder"))?;
    let vmlinux = outdir.join("vmlinux");
    write_atomic(&vmlinux, &elf, 0o644)?;

    progress("selecting virtio modules");
    let root = moddir.join(&version);
    let builtin = std::fs::read_to_string(root.join("modules.builtin")).unwrap_or_default();
    let builtin: HashSet<String> = builtin
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(module_name)
        .collect();
    let mut index = BTreeMap::new();
    index_modules(&root.join("kernel"), &mut index)?;
    let mut loaded: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut order = Vec::new();
    for m in WANTED_MODULES {
        if !REQUIRED_MODULES.contains(m) && !builtin.contains(*m) && !index.contains_key(*m) {
            progress(&format!("kernel has no module {m}; skipping it"));
            continue;
        }
        resolve_module(m, &index, &builtin, &mut loaded, &mut order, &mut Vec::new()).await?;
    }
    let mut modules = Vec::new();
    for (i, name) in order.iter().enumerate() {
        let p = outdir.join("modules").join(format!("{i:02}-{name}.ko"));
        write_atomic(&p, &loaded[name], 0o644)?;
        modules.push(p);
    }
    let _ = std::fs::remove_dir_all(&work);
    progress(&format!("kernel {version} ready ({} modules)", modules.len()));
    Ok(KernelCache {
        package,
        version,
        vmlinux,
        modules,
        wanted: WANTED_MODULES.iter().map(|m| m.to_string()).collect(),
    })
}

/// Module name of a file name: `virtio-rng.ko.xz` → `virtio_rng`.
fn module_name(file: &str) -> String {
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<(), VmmError> {
    for e in std::fs::read_dir(dir).map_err(VmmError::io(format!("reading {}", dir.display())))? {
        let e = e.map_err(VmmError::io("listing modules"))?;
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, index)?;
        } else {
            let f = e.file_name().to_string_lossy().into_owned();
            if f.contains(".ko") {
                index.insert(module_name(&f), p);
            }
        }
    }
    Ok(())
}

/// Load `name` and (first) its dependencies into `order`, depth first. Builtins are skipped.
async fn resolve_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    loaded: &mut BTreeMap<String, Vec<u8>>,
    order: &mut Vec<String>,
    stack: &mut Vec<String>,
) -> Result<(), VmmError> {
    if builtin.contains(name) || loaded.contains_key(name) || stack.iter().any(|s| s == name) {
        return Ok(());
    }
    let path = index.get(name).ok_or_else(|| VmmError::Command {
        what: "selecting kernel modules".into(),
        reason: format!("module {name} is neither built in nor in the package"),
    })?;
    let bytes = read_module(path).await?;
    stack.push(name.to_string());
    for dep in module_depends(&bytes) {
        Box::pin(resolve_module(&dep, index, builtin, loaded, order, stack)).await?;
    }
    stack.pop();
    loaded.insert(name.to_string(), bytes);
    order.push(name.to_string());
    Ok(())
}

async fn read_module(path: &Path) -> Result<Vec<u8>, VmmError> {
    let f = path.to_string_lossy();
    let tool = if f.ends_with(".xz") {
        "xz"
    } else if f.ends_with(".zst") {
        "zstd"
    } else if f.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).map_err(VmmError::io(format!("reading {}", path.display())));
    };
    let out = run(
        Command::new(tool).arg("-dc").arg(path),
        &format!("{tool} -dc {f}"),
    )
    .await?;
    Ok(out.stdout)
}

/// The `depends=` list from a module's `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut i = 0;
    while let Some(pos) = find(&ko[i..], key) {
        let start = i + pos;
        // Must start a modinfo string: preceded by NUL (or at the very start).
        if start == 0 || ko[start - 1] == 0 {
            let rest = &ko[start + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect();
        }
        i = start + 1;
    }
    Vec::new()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Compressed-stream formats a bzImage may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    /// LZ4 legacy frame (`02 21 4c 18`), Debian 6.1.
    Lz4,
    /// Zstandard (`28 b5 2f fd`), Debian 6.12.
    Zstd,
    /// gzip (`1f 8b 08`).
    Gzip,
}

/// Every offset in `image` where a compressed stream may start, in file order.
fn find_compressed_payloads(image: &[u8]) -> Vec<(usize, Compression)> {
    let magics: [(&[u8], Compression); 3] = [
        (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
        (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        (&[0x1f, 0x8b, 0x08], Compression::Gzip),
    ];
    let mut found = Vec::new();
    for (m, c) in magics {
        let mut i = 0;
        while let Some(p) = find(&image[i..], m) {
            found.push((i + p, c));
            i += p + 1;
        }
    }
    found.sort_by_key(|(o, _)| *o);
    found
}

/// Decompress the kernel ELF out of a bzImage: the first candidate stream that yields an ELF.
async fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, VmmError> {
    for (off, c) in find_compressed_payloads(bzimage).into_iter().take(16) {
        let data = &bzimage[off..];
        let out = match c {
            Compression::Gzip => {
                let mut d = flate2::read::GzDecoder::new(data);
                let mut v = Vec::new();
                let _ = std::io::Read::read_to_end(&mut d, &mut v);
                v
            }
            Compression::Lz4 => pipe_through("lz4", &["-dc"], data).await?,
            Compression::Zstd => pipe_through("zstd", &["-dc"], data).await?,
        };
        if out.starts_with(b"\x7fELF") {
            return Ok(out);
        }
    }
    Err(VmmError::Command {
        what: "extracting vmlinux".into(),
        reason: "no compressed stream in the kernel image decompresses to an ELF".into(),
    })
}

/// Feed `input` to `program args` and collect stdout, ignoring its exit status (a decompressor
/// complains about the trailing bytes after the stream, which is expected here).
async fn pipe_through(program: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>, VmmError> {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(e, program))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = child
        .wait_with_output()
        .await
        .map_err(VmmError::io(format!("running {program}")))?;
    let _ = writer.await;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_magics_in_file_order() {
        let mut img = vec![0u8; 100];
        img[10..14].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
        img[50..54].copy_from_slice(&[0x02, 0x21, 0x4c, 0x18]);
        img[70..73].copy_from_slice(&[0x1f, 0x8b, 0x08]);
        assert_eq!(
            find_compressed_payloads(&img),
            vec![
                (10, Compression::Zstd),
                (50, Compression::Lz4),
                (70, Compression::Gzip)
            ]
        );
    }

    #[tokio::test]
    async fn extracts_a_gzip_payload() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"\x7fELF-kernel").unwrap();
        let mut img = b"bzImage-header....".to_vec();
        img.extend(gz.finish().unwrap());
        img.extend_from_slice(b"trailer");
        assert_eq!(extract_vmlinux(&img).await.unwrap(), b"\x7fELF-kernel");
        assert!(extract_vmlinux(b"nothing here").await.is_err());
    }

    #[test]
    fn reads_module_depends() {
        let ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0retpoline=Y\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert_eq!(module_name("virtio-rng.ko.xz"), "virtio_rng");
    }

    #[test]
    fn parses_apt_cache_depends() {
        let t = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_kernel_dependency(t).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
    }
}
