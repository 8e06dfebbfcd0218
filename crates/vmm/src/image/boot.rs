//! Guest boot artefacts: the Debian cloud kernel as an ELF `vmlinux`, the base busybox initramfs
//! that loads the virtio modules and switches to the image's systemd, and each machine's config cpio.

use crate::VmmError;
use crate::cpio::CpioWriter;
use crate::proc::{run, spawn_error};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// Bumped whenever the base initramfs layout or `/init` changes, so caches are rebuilt.
const INITRAMFS_VERSION: u32 = 3;

/// The Debian metapackage whose dependency is the kernel we boot.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, in no particular order: their dependencies are resolved from the
/// `.ko` files' own `depends=` and loaded first.
const WANTED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    // ACPI power button + input events: lets `system_powerdown` reach systemd-logind.
    "button",
    "evdev",
    // ext4 and its helpers, when the kernel has them as modules.
    "ext4",
    "crc32c_generic",
];

/// Of [`WANTED_MODULES`], those without which no guest boots.
const REQUIRED_MODULES: &[&str] = &["virtio_mmio", "virtio_net", "virtio_blk", "ext4"];

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
}

/// Make sure `data_dir/kernel/` holds a bootable kernel and base initramfs; fast when cached.
///
/// The kernel is Debian's `linux-image-*-cloud-amd64` fetched with `apt-get download` (signed
/// apt repository), or the `.deb` named by the `SISTEMO_KERNEL_DEB` environment variable.
pub async fn ensure_boot_assets(
    data_dir: &Path,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<BootAssets, VmmError> {
    let kdir = data_dir.join("kernel");
    std::fs::create_dir_all(&kdir).map_err(VmmError::io(format!("creating {}", kdir.display())))?;
    let cache_file = kdir.join("kernel.json");
    let cached: Option<KernelCache> = std::fs::read(&cache_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|c: &KernelCache| c.vmlinux.exists() && c.modules.iter().all(|m| m.exists()));
    let kernel = match cached {
        Some(c) => c,
        None => {
            let c = fetch_kernel(&kdir, progress).await?;
            write_atomic(&cache_file, &serde_json::to_vec_pretty(&c).expect("json"), 0o644)?;
            c
        }
    };
    let initramfs = kdir.join(format!("initramfs-{}-v{INITRAMFS_VERSION}.img", kernel.version));
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
pub fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64") && p != &KERNEL_META)
        .map(str::to_string)
}

async fn fetch_kernel(kdir: &Path, progress: &(dyn Fn(&str) + Send + Sync)) -> Result<KernelCache, VmmError> {
    let work = kdir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(VmmError::io("creating the kernel download folder"))?;
    let (deb, package) = match std::env::var_os("SISTEMO_KERNEL_DEB") {
        Some(p) => (PathBuf::from(&p), PathBuf::from(&p).display().to_string()),
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
    })
}

/// Module name of a file name: `virtio-rng.ko.xz` → `virtio_rng`.
pub fn module_name(file: &str) -> String {
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
pub fn module_depends(ko: &[u8]) -> Vec<String> {
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
pub enum Compression {
    /// LZ4 legacy frame (`02 21 4c 18`), Debian 6.1.
    Lz4,
    /// Zstandard (`28 b5 2f fd`), Debian 6.12.
    Zstd,
    /// gzip (`1f 8b 08`).
    Gzip,
}

/// Every offset in `image` where a compressed stream may start, in file order.
pub fn find_compressed_payloads(image: &[u8]) -> Vec<(usize, Compression)> {
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
pub async fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, VmmError> {
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

/// True when `elf` is an ELF executable without a program interpreter (statically linked).
pub fn is_static_elf(elf: &[u8]) -> bool {
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

fn find_static_busybox() -> Result<PathBuf, VmmError> {
    for p in [
        "/bin/busybox",
        "/usr/bin/busybox",
        "/usr/lib/initramfs-tools/bin/busybox",
    ] {
        if let Ok(b) = std::fs::read(p)
            && is_static_elf(&b)
        {
            return Ok(PathBuf::from(p));
        }
    }
    Err(VmmError::Missing {
        program: "busybox (static)".into(),
        hint: "apt-get install busybox-static".into(),
    })
}

/// The guest's `/init`: load modules, mount the root disk, apply the machine's config inside it,
/// and hand over to its `/sbin/init`. Any failure ends in a kernel panic, which stops the VMM.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
log() { echo "sistemo-init: $*"; }
fail() { log "FATAL: $*"; exit 1; }
for m in /lib/modules/*.ko; do insmod "$m" || log "insmod $m failed"; done
[ -f /sistemo/config.env ] || fail "no machine config in the initramfs"
. /sistemo/config.env
i=0
while [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do usleep 10000; i=$((i+1)); done
[ -b /dev/vda ] || fail "no root disk /dev/vda"
mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda as ext4"
R=/newroot
[ -e $R/sbin/init ] || [ -L $R/sbin/init ] || fail "the image has no /sbin/init"
mkdir -p $R/etc $R/root/.ssh $R/etc/ssh $R/etc/systemd/network
echo "$SISTEMO_HOSTNAME" > $R/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost ip6-loopback\n' "$SISTEMO_HOSTNAME" > $R/etc/hosts
echo "$SISTEMO_MACHINE_ID" > $R/etc/machine-id
{
  echo "[Match]"
  echo "MACAddress=$SISTEMO_MAC"
  echo "[Network]"
  echo "Address=$SISTEMO_ADDRESS"
  echo "Gateway=$SISTEMO_GATEWAY"
  for d in $SISTEMO_DNS; do echo "DNS=$d"; done
  echo "LinkLocalAddressing=no"
  echo "IPv6AcceptRA=no"
  echo "KeepConfiguration=static"
} > $R/etc/systemd/network/10-sistemo.network
rm -f $R/etc/resolv.conf
for d in $SISTEMO_DNS; do echo "nameserver $d"; done > $R/etc/resolv.conf
chmod 700 $R/root/.ssh
cp /sistemo/authorized_keys $R/root/.ssh/authorized_keys
chmod 600 $R/root/.ssh/authorized_keys
rm -f $R/etc/ssh/ssh_host_*
cp /sistemo/ssh_host_ed25519_key /sistemo/ssh_host_ed25519_key.pub $R/etc/ssh/
chmod 600 $R/etc/ssh/ssh_host_ed25519_key
chmod 644 $R/etc/ssh/ssh_host_ed25519_key.pub
# The network is up before the image's init runs: nothing in the guest has to wait for it.
IF=""
i=0
while [ -z "$IF" ] && [ $i -lt 500 ]; do
  for d in /sys/class/net/*; do
    [ "$(cat $d/address 2>/dev/null)" = "$SISTEMO_MAC" ] && IF=${d##*/}
  done
  [ -n "$IF" ] || { usleep 10000; i=$((i+1)); }
done
[ -n "$IF" ] || fail "no network interface with MAC $SISTEMO_MAC"
ip link set lo up
ip link set dev "$IF" up
ip addr add "$SISTEMO_ADDRESS" dev "$IF" || fail "cannot set address $SISTEMO_ADDRESS"
ip route add default via "$SISTEMO_GATEWAY" proto static || log "no default route via $SISTEMO_GATEWAY"
# Tell the bridge about our MAC at once (a previous machine may have had this address).
arping -U -c 1 -w 1 -I "$IF" "${SISTEMO_ADDRESS%/*}" >/dev/null 2>&1 &
log "switching to the root filesystem"
umount /proc /sys
mount --move /dev $R/dev
exec switch_root $R /sbin/init
"#;

/// Build the base initramfs (gzip'd newc) from a static busybox and module files (loaded in
/// file-name order).
pub fn build_base_initramfs(busybox: &Path, modules: &[PathBuf]) -> Result<Vec<u8>, VmmError> {
    let mut w = CpioWriter::new();
    for d in [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "newroot",
        "sistemo",
        "tmp",
    ] {
        w.dir(d, 0o755);
    }
    w.char_dev("dev/console", 0o600, 5, 1);
    let bb = std::fs::read(busybox).map_err(VmmError::io(format!("reading {}", busybox.display())))?;
    w.file("bin/busybox", 0o755, &bb);
    w.symlink("bin/sh", "busybox");
    w.file("init", 0o755, INIT_SCRIPT.as_bytes());
    for m in modules {
        let name = m.file_name().expect("module file name").to_string_lossy();
        let data = std::fs::read(m).map_err(VmmError::io(format!("reading {}", m.display())))?;
        w.file(&format!("lib/modules/{name}"), 0o644, &data);
    }
    let raw = w.finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw)
        .map_err(VmmError::io("compressing the initramfs"))?;
    gz.finish().map_err(VmmError::io("compressing the initramfs"))
}

/// What one machine's guest is told at boot.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Hostname.
    pub hostname: String,
    /// `/etc/machine-id` (32 lowercase hex digits).
    pub machine_id: String,
    /// MAC of the interface to configure.
    pub mac: [u8; 6],
    /// Address.
    pub ip: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Lines for root's `authorized_keys`.
    pub authorized_keys: Vec<String>,
    /// The guest's SSH host private key (OpenSSH format).
    pub host_key_private: Vec<u8>,
    /// The guest's SSH host public key line.
    pub host_key_public: String,
}

/// Format a MAC as `52:54:00:..`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The per-machine cpio (uncompressed newc) holding `/sistemo/config.env` and the keys.
pub fn machine_config_cpio(cfg: &GuestConfig) -> Vec<u8> {
    use crate::ssh::shell_quote;
    let dns = cfg
        .dns
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let env = format!(
        "SISTEMO_HOSTNAME={}\nSISTEMO_MACHINE_ID={}\nSISTEMO_MAC={}\nSISTEMO_ADDRESS={}\nSISTEMO_GATEWAY={}\nSISTEMO_DNS={}\n",
        shell_quote(&cfg.hostname),
        shell_quote(&cfg.machine_id),
        shell_quote(&format_mac(&cfg.mac)),
        shell_quote(&format!("{}/{}", cfg.ip, cfg.prefix)),
        shell_quote(&cfg.gateway.to_string()),
        shell_quote(&dns),
    );
    let mut keys = cfg.authorized_keys.join("\n");
    keys.push('\n');
    let mut w = CpioWriter::new();
    w.dir("sistemo", 0o700);
    w.file("sistemo/config.env", 0o600, env.as_bytes());
    w.file("sistemo/authorized_keys", 0o600, keys.as_bytes());
    w.file("sistemo/ssh_host_ed25519_key", 0o600, &cfg.host_key_private);
    w.file(
        "sistemo/ssh_host_ed25519_key.pub",
        0o644,
        format!("{}\n", cfg.host_key_public.trim()).as_bytes(),
    );
    w.finish()
}

/// Write `out` = base initramfs followed by the machine's config cpio (the kernel unpacks
/// concatenated archives in order). Mode 0600: it holds the guest's host key.
pub fn write_machine_initrd(base: &Path, cfg: &GuestConfig, out: &Path) -> Result<(), VmmError> {
    let mut data = std::fs::read(base).map_err(VmmError::io(format!("reading {}", base.display())))?;
    while !data.len().is_multiple_of(4) {
        data.push(0);
    }
    data.extend_from_slice(&machine_config_cpio(cfg));
    write_atomic(out, &data, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn host_busybox_is_recognised_as_static() {
        if let Ok(b) = std::fs::read("/bin/busybox") {
            assert!(is_static_elf(&b));
        }
        assert!(!is_static_elf(&std::fs::read("/bin/sh").unwrap_or_default()));
    }

    #[test]
    fn config_cpio_quotes_values() {
        let cfg = GuestConfig {
            hostname: "we'b".into(),
            machine_id: "0".repeat(32),
            mac: [0x52, 0x54, 0, 1, 2, 3],
            ip: "10.0.0.2".parse().unwrap(),
            prefix: 24,
            gateway: "10.0.0.1".parse().unwrap(),
            dns: vec!["1.1.1.1".parse().unwrap()],
            authorized_keys: vec!["ssh-ed25519 AAA k".into()],
            host_key_private: b"PRIV".to_vec(),
            host_key_public: "ssh-ed25519 BBB".into(),
        };
        let c = String::from_utf8_lossy(&machine_config_cpio(&cfg)).into_owned();
        assert!(c.contains(r"SISTEMO_HOSTNAME='we'\''b'"));
        assert!(c.contains("SISTEMO_MAC='52:54:00:01:02:03'"));
        assert!(c.contains("SISTEMO_ADDRESS='10.0.0.2/24'"));
    }
}
