//! The guest's initramfs: the base archive (static busybox, virtio modules, `/init` from
//! `init.sh`) and each machine's config cpio appended to it at start (address, keys, hostname).

use crate::cpio::CpioWriter;
use crate::{VmmError, format_mac, shell_quote};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The guest's `/init`: load modules, mount the root disk, apply the machine's config inside it,
/// and hand over to its `/sbin/init`. Any failure ends in a kernel panic, which stops the VMM.
pub(super) const INIT_SCRIPT: &str = include_str!("init.sh");

/// True when `elf` is an ELF executable without a program interpreter (statically linked).
fn is_static_elf(elf: &[u8]) -> bool {
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

pub(super) fn find_static_busybox() -> Result<PathBuf, VmmError> {
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

/// Build the base initramfs (gzip'd newc) from a static busybox and module files (loaded in
/// file-name order).
pub(super) fn build_base_initramfs(busybox: &Path, modules: &[PathBuf]) -> Result<Vec<u8>, VmmError> {
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

/// What one machine's guest is told at boot: hostname, network (the interface with `mac` gets
/// `ip/prefix`, a default route via `gateway`, resolv.conf with `dns`), and SSH keys.
#[derive(Debug, Clone)]
pub(crate) struct GuestConfig {
    pub(crate) hostname: String,
    /// `/etc/machine-id` (32 lowercase hex digits).
    pub(crate) machine_id: String,
    pub(crate) mac: [u8; 6],
    pub(crate) ip: Ipv4Addr,
    pub(crate) prefix: u8,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) dns: Vec<Ipv4Addr>,
    /// Lines for root's `authorized_keys`.
    pub(crate) authorized_keys: Vec<String>,
    /// The guest's SSH host private key (OpenSSH format).
    pub(crate) host_key_private: Vec<u8>,
    /// The guest's SSH host public key line.
    pub(crate) host_key_public: String,
    /// The image's single program as JSON (`sistemo_agent::init::Workload`), for images that
    /// run one (OCI images): the agent runs it as PID 1 instead of the image's `/sbin/init`.
    pub(crate) workload: Option<Vec<u8>>,
    /// Volumes the guest's init mounts: `SERIAL:MOUNT:ro|rw` (see [`guest_volumes`]).
    pub(crate) volumes: Vec<String>,
    /// Boot as a template: no address, route or network file (clones get theirs from the
    /// agent), the interface left down.
    pub(crate) template: bool,
    /// The VMM offers virtio-vsock: the guest's init loads its transport, and the agent then
    /// also serves vsock connections.
    pub(crate) vsock: bool,
}

/// The `SISTEMO_VOLUMES` entries of a machine: each volume with a mount point, as
/// `SERIAL:MOUNT:ro|rw` (serials and mount points hold no `:` or space).
pub(crate) fn guest_volumes(spec: &crate::MachineSpec) -> Vec<String> {
    spec.volumes
        .iter()
        .filter_map(|v| {
            let m = v.mount.as_ref()?;
            Some(format!(
                "{}:{m}:{}",
                v.serial,
                if v.read_only { "ro" } else { "rw" }
            ))
        })
        .collect()
}

/// The per-machine cpio (uncompressed newc) holding `/sistemo/config.env` and the keys.
fn machine_config_cpio(cfg: &GuestConfig) -> Vec<u8> {
    let dns = cfg
        .dns
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let env = format!(
        "SISTEMO_HOSTNAME={}\nSISTEMO_MACHINE_ID={}\nSISTEMO_MAC={}\nSISTEMO_ADDRESS={}\nSISTEMO_GATEWAY={}\nSISTEMO_DNS={}\nSISTEMO_VOLUMES={}\nSISTEMO_TEMPLATE={}\nSISTEMO_VSOCK={}\n",
        shell_quote(&cfg.hostname),
        shell_quote(&cfg.machine_id),
        shell_quote(&format_mac(&cfg.mac)),
        shell_quote(&format!("{}/{}", cfg.ip, cfg.prefix)),
        shell_quote(&cfg.gateway.to_string()),
        shell_quote(&dns),
        shell_quote(&cfg.volumes.join(" ")),
        u8::from(cfg.template),
        u8::from(cfg.vsock),
    );
    let mut keys = cfg.authorized_keys.join("\n");
    keys.push('\n');
    let mut w = CpioWriter::new();
    w.dir("sistemo", 0o700);
    w.file("sistemo/config.env", 0o600, env.as_bytes());
    w.file("sistemo/authorized_keys", 0o600, keys.as_bytes());
    w.file("sistemo/ssh_host_ed25519_key", 0o600, &cfg.host_key_private);
    if let Some(wl) = &cfg.workload {
        w.file("sistemo/workload.json", 0o600, wl);
    }
    w.file(
        "sistemo/ssh_host_ed25519_key.pub",
        0o644,
        format!("{}\n", cfg.host_key_public.trim()).as_bytes(),
    );
    // The guest agent (init.sh starts it before the image's own init): its header here, its
    // bytes copied after it by `write_machine_initrd`.
    w.file_header("sistemo/agent", 0o700, crate::AGENT_BINARY.len());
    w.into_bytes()
}

/// Write `out` = base initramfs followed by the machine's config cpio (the kernel unpacks
/// concatenated archives in order). Mode 0600: it holds the guest's host key.
///
/// Streamed: the base archive and the agent are copied file to file by the kernel
/// (`copy_file_range`; the agent from our own executable, see [`super::embedded`]), so a start
/// neither reads megabytes into the heap nor maps the embedded agent into the daemon. No
/// fsync: the file is written again at every start.
pub(crate) fn write_machine_initrd(base: &Path, cfg: &GuestConfig, out: &Path) -> Result<(), VmmError> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let ctx = || format!("writing {}", out.display());
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(VmmError::io(ctx()))?;
        let mut b = std::fs::File::open(base).map_err(VmmError::io(format!("reading {}", base.display())))?;
        let n = std::io::copy(&mut b, &mut f).map_err(VmmError::io(ctx()))?;
        let mut tail = vec![0u8; pad4(n as usize)];
        tail.extend_from_slice(&machine_config_cpio(cfg));
        f.write_all(&tail).map_err(VmmError::io(ctx()))?;
        let len = crate::AGENT_BINARY.len();
        let copied = match super::embedded::agent_in_exe() {
            Some(mut a) => {
                a.file
                    .seek(SeekFrom::Start(a.offset))
                    .map_err(VmmError::io("reading the agent from our executable"))?;
                std::io::copy(&mut (&mut a.file).take(len as u64), &mut f).map_err(VmmError::io(ctx()))?
            }
            None => {
                f.write_all(crate::AGENT_BINARY).map_err(VmmError::io(ctx()))?;
                len as u64
            }
        };
        if copied != len as u64 {
            return Err(VmmError::Io {
                context: ctx(),
                source: std::io::Error::other(format!("copied {copied} of the agent's {len} bytes")),
            });
        }
        let mut end = vec![0u8; pad4(len)];
        end.extend_from_slice(&CpioWriter::new().finish());
        f.write_all(&end).map_err(VmmError::io(ctx()))
    })();
    match res {
        Ok(()) => std::fs::rename(&tmp, out).map_err(VmmError::io(ctx())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Zero bytes that bring `n` to a multiple of 4 (newc alignment).
fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busybox_is_recognised_as_static() {
        if let Ok(b) = std::fs::read("/bin/busybox") {
            assert!(is_static_elf(&b));
        }
        assert!(!is_static_elf(&std::fs::read("/bin/sh").unwrap_or_default()));
    }

    /// Entries (name, data) of concatenated newc archives, as the kernel reads them.
    fn newc_entries(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let field = |h: &[u8], i: usize| {
            usize::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
        };
        loop {
            while b.first() == Some(&0) {
                b = &b[1..];
            }
            if b.is_empty() {
                return out;
            }
            assert!(b.starts_with(b"070701"), "no newc header");
            let (size, namesize) = (field(b, 6), field(b, 11));
            let name = String::from_utf8_lossy(&b[110..110 + namesize - 1]).into_owned();
            let data_at = (110 + namesize).next_multiple_of(4);
            out.push((name, b[data_at..data_at + size].to_vec()));
            b = &b[(data_at + size).next_multiple_of(4)..];
        }
    }

    #[test]
    fn the_machine_initrd_carries_the_agent_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("sistemo-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        let mut w = CpioWriter::new();
        w.file("init", 0o755, b"#!/bin/sh\n");
        // An odd length, so the config archive starts after padding.
        let mut bytes = w.finish();
        bytes.push(0);
        std::fs::write(&base, &bytes).unwrap();
        let out = dir.join("initrd.img");
        write_machine_initrd(&base, &test_config(), &out).unwrap();
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(data.starts_with(&bytes) && data.len().is_multiple_of(4));
        let e = newc_entries(&data);
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"init"));
        assert_eq!(names.last(), Some(&"TRAILER!!!"));
        assert!(names.contains(&"sistemo/config.env"), "{names:?}");
        let agent = e
            .iter()
            .find(|(n, _)| n == "sistemo/agent")
            .expect("sistemo/agent");
        assert!(
            agent.1 == crate::AGENT_BINARY,
            "the agent in the initrd differs from the embedded one"
        );
    }

    fn test_config() -> GuestConfig {
        GuestConfig {
            hostname: "web".into(),
            machine_id: "0".repeat(32),
            mac: [0x52, 0x54, 0, 1, 2, 3],
            ip: "10.0.0.2".parse().unwrap(),
            prefix: 24,
            gateway: "10.0.0.1".parse().unwrap(),
            dns: vec![],
            authorized_keys: vec![],
            host_key_private: b"PRIV".to_vec(),
            host_key_public: "ssh-ed25519 BBB".into(),
            volumes: vec![],
            workload: None,
            template: false,
            vsock: false,
        }
    }

    /// How many of the pages holding `data` are mapped in this process (`/proc/self/pagemap`,
    /// bit 63 of each page's entry), and how many there are.
    fn resident_pages(data: &[u8]) -> (usize, usize) {
        use std::os::unix::fs::FileExt;
        let (first, last) = (
            data.as_ptr() as u64 / 4096,
            (data.as_ptr() as u64 + data.len() as u64 - 1) / 4096,
        );
        let n = (last - first + 1) as usize;
        let mut buf = vec![0u8; n * 8];
        std::fs::File::open("/proc/self/pagemap")
            .unwrap()
            .read_exact_at(&mut buf, first * 8)
            .unwrap();
        let present = buf
            .chunks(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count();
        (present, n)
    }

    /// Writing a machine's initrd must not map the embedded agent into the daemon (2 MiB of
    /// RSS for good). Measured in a child process running only this test, so that no other
    /// test has touched those pages.
    #[test]
    fn writing_an_initrd_leaves_the_embedded_agent_out_of_memory() {
        const NAME: &str =
            "image::initramfs::tests::writing_an_initrd_leaves_the_embedded_agent_out_of_memory";
        if std::env::var_os("SISTEMO_TEST_PAGES_CHILD").is_some() {
            let dir = std::env::temp_dir().join(format!("sistemo-pages-test-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("base.img"), CpioWriter::new().finish()).unwrap();
            write_machine_initrd(&dir.join("base.img"), &test_config(), &dir.join("initrd.img")).unwrap();
            let len = std::fs::metadata(dir.join("initrd.img")).unwrap().len();
            std::fs::remove_dir_all(&dir).unwrap();
            assert!(len > crate::AGENT_BINARY.len() as u64);
            let (present, total) = resident_pages(crate::AGENT_BINARY);
            println!("RESIDENT {present} OF {total}");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env("SISTEMO_TEST_PAGES_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (present, total) = text
            .lines()
            .find_map(|l| {
                let (p, t) = l.split_once("RESIDENT ")?.1.split_once(" OF ")?;
                Some((p.parse::<usize>().ok()?, t.trim().parse::<usize>().ok()?))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no RESIDENT line from the child: {text} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        // Fault-around may map a few pages at the edges of the agent (neighbouring data).
        assert!(
            present * 10 < total,
            "{present} of the embedded agent's {total} pages are mapped after writing an initrd"
        );
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
            volumes: vec!["sv-1:/data:rw".into(), "sv-2:/srv/ro:ro".into()],
            workload: Some(br#"{"argv":["/bin/app"]}"#.to_vec()),
            template: false,
            vsock: false,
        };
        let c = String::from_utf8_lossy(&machine_config_cpio(&cfg)).into_owned();
        assert!(c.contains(r"SISTEMO_HOSTNAME='we'\''b'"));
        assert!(c.contains("SISTEMO_MAC=52:54:00:01:02:03\n"));
        assert!(c.contains("SISTEMO_ADDRESS=10.0.0.2/24\n"));
        assert!(c.contains("SISTEMO_DNS=1.1.1.1\n"));
        assert!(
            c.contains("SISTEMO_VOLUMES='sv-1:/data:rw sv-2:/srv/ro:ro'\n"),
            "{c}"
        );
        assert!(c.contains("sistemo/workload.json") && c.contains(r#"{"argv":["/bin/app"]}"#));
    }
}
