//! QEMU's command line for one machine: the `-M microvm` argv (disk, TAP, console, QMP,
//! pidfile) and the guest kernel's command line, which depends on the accelerator.

use super::jail::{SANDBOX, jail_dir};
use super::{Accel, Qemu, agent_path, console_path, initrd_path, pid_path, qmp_path};
use crate::{MachineSpec, format_mac};
use std::path::{Path, PathBuf};

impl Qemu {
    /// The kernel command line.
    pub(crate) fn kernel_cmdline(&self) -> String {
        let mut c = String::from("console=ttyS0 quiet panic=-1 pci=off i8042.noaux i8042.nokbd");
        // Trust the CPU's RDRAND (see `qemu_args`) to seed the RNG, and skip the crypto
        // self-tests (about 0.3 s of a TCG boot).
        c.push_str(" random.trust_cpu=on cryptomgr.notests");
        if self.accel == Accel::Tcg
            && let Some(khz) = self.tsc_khz
        {
            // Without HPET/PM timer, TSC calibration against the PIT fails at random under TCG
            // and the boot hangs; give the kernel the frequency.
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if self.accel == Accel::Tcg {
            // Under TCG the emulated TSC follows the host clock, while jiffies lag whenever the
            // host is busy: the clocksource watchdog then condemns the TSC and the guest falls
            // back to 4 ms jiffies timekeeping. Trust the TSC.
            c.push_str(" tsc=reliable");
            // The emulated CPU advertises no hardware fixes, so the guest would enable page-table
            // isolation and friends; under TCG the guest cannot speculate across its own
            // privilege levels, and PTI's address-space switches are costly for the soft MMU.
            c.push_str(" mitigations=off");
        }
        if let Some(extra) = self.options.cmdline_extra.as_deref().map(str::trim)
            && !extra.is_empty()
        {
            c.push(' ');
            c.push_str(extra);
        }
        c
    }

    /// QEMU's argument vector for `spec` (without the program).
    pub(crate) fn qemu_args(&self, spec: &MachineSpec, disk: &Path, boot: Boot<'_>) -> Vec<String> {
        let p = |x: PathBuf| x.display().to_string();
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("sistemo-{}", spec.name),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-M".into(),
            match boot {
                Boot::Cold => "microvm,acpi=on".into(),
                // Guest RAM in a file: what `x-ignore-shared` leaves out of the saved state.
                Boot::Template { .. } | Boot::Restore { .. } => "microvm,acpi=on,memory-backend=ram".into(),
            },
            // Modern (virtio 1.x) devices on virtio-mmio, as QEMU's microvm docs recommend.
            "-global".into(),
            "virtio-mmio.force-legacy=false".into(),
        ];
        match self.accel {
            Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
            // QEMU's default TCG CPU plus RDRAND (backed by the host's getrandom): the guest's
            // RNG is ready at once instead of after seconds of jitter entropy, and sshd no
            // longer blocks on getrandom() during the first connection.
            Accel::Tcg => a.extend([
                "-accel".into(),
                format!("tcg,tb-size={}", super::TCG_TB_MIB),
                "-cpu".into(),
                "qemu64,+rdrand".into(),
            ]),
        }
        let mib = spec.memory_mib.max(128);
        a.extend([
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-m".into(),
            format!("{mib}M"),
        ]);
        match boot {
            Boot::Cold | Boot::Template { .. } => a.extend([
                "-kernel".into(),
                p(self.assets.kernel.clone()),
                "-initrd".into(),
                p(initrd_path(spec)),
                "-append".into(),
                self.kernel_cmdline(),
            ]),
            // The kernel is in the saved RAM already; loading it again would write over it.
            Boot::Restore { .. } => {}
        }
        match boot {
            Boot::Cold => {}
            // The template writes its RAM into the file (shared); a clone maps the same file
            // privately: copy on write, the file never changes.
            Boot::Template { ram } | Boot::Restore { ram } => a.extend([
                "-object".into(),
                format!(
                    "memory-backend-file,id=ram,size={mib}M,mem-path={},share={}",
                    escape_opt(&ram.display().to_string()),
                    if matches!(boot, Boot::Template { .. }) {
                        "on"
                    } else {
                        "off"
                    }
                ),
            ]),
        }
        if let Boot::Restore { .. } = boot {
            // The state arrives on stdin once QMP has set the migration's capabilities.
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a.extend([
            // `auto-read-only=off`: QEMU would otherwise reopen the disk by its path when a save
            // drops write access, which fails once it is chrooted and unprivileged.
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=d0,cache=writeback,auto-read-only=off{}",
                escape_opt(&disk.display().to_string()),
                drive_throttling(&spec.io)
            ),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
            "-netdev".into(),
            format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                spec.net.host_ifname
            ),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", format_mac(&spec.net.mac)),
            "-chardev".into(),
            format!(
                "file,id=con0,path={},append=on",
                escape_opt(&p(console_path(spec)))
            ),
            "-serial".into(),
            "chardev:con0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", escape_opt(&p(qmp_path(spec)))),
            // The guest agent's channel: a virtio-serial port on a Unix socket QEMU listens on.
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent0,path={},server=on,wait=off",
                escape_opt(&p(agent_path(spec)))
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent0,name={}",
                sistemo_agent::proto::PORT_NAME
            ),
            // The guest's invalid device accesses, on stderr (qemu.log).
            "-d".into(),
            "guest_errors".into(),
            "-pidfile".into(),
            p(pid_path(spec)),
            "-sandbox".into(),
            SANDBOX.into(),
        ]);
        a.extend(volume_args(spec));
        // The agent's faster channel on hosts with vhost-vsock; only for cold boots (a template's
        // saved device state has none, and its clones keep the serial port).
        if self.vsock && matches!(boot, Boot::Cold) {
            a.extend([
                "-device".into(),
                format!("vhost-vsock-device,id=vsock0,guest-cid={}", Qemu::vsock_cid(spec)),
            ]);
        }
        if let Some((uid, gid)) = self.vmm_ids(spec) {
            // Applied after every file above is open, just before the guest's first instruction.
            a.extend([
                "-chroot".into(),
                p(jail_dir(&spec.dir)),
                "-runas".into(),
                format!("{uid}:{gid}"),
            ]);
        }
        a
    }
}

/// How a machine's VMM starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Boot<'a> {
    /// A fresh boot of the kernel.
    Cold,
    /// A fresh boot whose RAM lives in the file `ram`, to be saved as a template.
    Template {
        /// The RAM file.
        ram: &'a Path,
    },
    /// Restored from a template whose RAM is the file `ram`.
    Restore {
        /// The template's RAM file.
        ram: &'a Path,
    },
}

/// One `-drive` and `virtio-blk-device` per volume, after the root disk (so the guest sees them
/// as vdb, vdc, … in order), each with its serial for the guest to find it by, and in the root
/// disk's throttle group: the machine's disk limits cover its volumes too.
fn volume_args(spec: &MachineSpec) -> Vec<String> {
    let mut a = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let ro = if v.read_only { ",readonly=on" } else { "" };
        a.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=v{i},cache=writeback{ro}{}",
                escape_opt(&v.path.display().to_string()),
                drive_throttling(&spec.io)
            ),
            "-device".into(),
            format!("virtio-blk-device,drive=v{i},serial={}", escape_opt(&v.serial)),
        ]);
    }
    a
}

/// The `-drive` options that throttle a disk to `io`'s limits (QEMU's leaky bucket, which lets
/// a tenth of a second's worth through at once): empty when it is unlimited. Every drive of a
/// machine joins one throttle group, so the limits are the machine's, whatever disk the guest
/// uses: a volume is no way around them (and two disks do not double them).
fn drive_throttling(io: &crate::IoLimits) -> String {
    if io.iops == 0 && io.disk_bw_mbps == 0 {
        return String::new();
    }
    let mut o = format!(",throttling.group={THROTTLE_GROUP}");
    if io.iops > 0 {
        o.push_str(&format!(",throttling.iops-total={}", io.iops));
    }
    if io.disk_bw_mbps > 0 {
        o.push_str(&format!(
            ",throttling.bps-total={}",
            u64::from(io.disk_bw_mbps) << 20
        ));
    }
    o
}

/// The throttle group of a machine's drives (one QEMU process runs one machine).
const THROTTLE_GROUP: &str = "disks";

/// Escape a value for a QEMU option list (commas are doubled).
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::super::QemuOptions;
    use super::*;
    use crate::image::BootAssets;
    use crate::ssh::ClientKey;

    fn dummy(accel: Accel) -> (Qemu, MachineSpec) {
        let q = Qemu {
            binary: super::super::QEMU.into(),
            assets: BootAssets {
                kernel: "/k/vmlinux".into(),
                initramfs: "/k/initramfs.img".into(),
                kernel_version: "6.1".into(),
            },
            client: ClientKey {
                private: "/d/ssh/id_ed25519".into(),
                public: "ssh-ed25519 AAAA x".into(),
            },
            accel,
            tsc_khz: Some(2_100_000),
            netns: None,
            options: QemuOptions::default(),
            user: Some(super::super::VmmUser {
                name: "sistemo-vmm".into(),
                uid: 998,
                gid: 997,
            }),
            vsock: false,
            cgroups: crate::cgroup::Cgroups::Unavailable("test".into()),
            agents: Default::default(),
            qemu: std::sync::Arc::new(super::super::binary::QemuBinary::new("/nonexistent/qemu-7.2")),
        };
        let spec = MachineSpec {
            id: uuid::Uuid::nil(),
            name: "web".into(),
            vcpus: 1,
            memory_mib: 512,
            dir: "/m/web".into(),
            disk: Some("/m/web/disk.raw".into()),
            net: crate::NetAttachment {
                host_ifname: "tap-web".into(),
                bridge: "br0".into(),
                mac: [0x52, 0x54, 0, 0, 0, 2],
                ip: "10.200.0.2".parse().unwrap(),
                prefix: 24,
                gateway: "10.200.0.1".parse().unwrap(),
                dns: vec![],
            },
            slot: 7,
            cpu_limit_milli: 0,
            ssh_pubkey: None,
            volumes: vec![],
            io: crate::IoLimits::default(),
        };
        (q, spec)
    }

    #[test]
    fn templates_keep_ram_in_a_file_and_restores_load_no_kernel() {
        let (q, spec) = dummy(Accel::Tcg);
        let ram = Path::new("/t/ram");
        let t = q
            .qemu_args(&spec, Path::new("/d"), Boot::Template { ram })
            .join(" ");
        assert!(
            t.contains("memory-backend=ram") && t.contains("mem-path=/t/ram,share=on"),
            "{t}"
        );
        assert!(t.contains("-kernel") && !t.contains("-incoming"), "{t}");
        let r = q
            .qemu_args(&spec, Path::new("/d"), Boot::Restore { ram })
            .join(" ");
        assert!(
            r.contains("mem-path=/t/ram,share=off") && r.contains("-incoming defer"),
            "{r}"
        );
        // The kernel is in the saved RAM: loading it again would overwrite the running guest.
        assert!(!r.contains("-kernel") && !r.contains("-initrd"), "{r}");
        let c = q.qemu_args(&spec, Path::new("/d"), Boot::Cold).join(" ");
        assert!(!c.contains("memory-backend") && !c.contains("-incoming"), "{c}");
    }

    #[test]
    fn a_template_key_changes_with_the_shape_and_the_qemu() {
        use crate::Templates;
        let (q, _) = dummy(Accel::Tcg);
        let k = q.template_key("abc", 1, 512);
        assert_eq!(k, q.template_key("abc", 1, 512));
        assert_ne!(k, q.template_key("abd", 1, 512));
        assert_ne!(k, q.template_key("abc", 2, 512));
        assert_ne!(k, q.template_key("abc", 1, 1024));
        let (mut other, _) = dummy(Accel::Tcg);
        other.qemu = std::sync::Arc::new(super::super::binary::QemuBinary::new("/nonexistent/qemu-8.2"));
        assert_ne!(
            k,
            other.template_key("abc", 1, 512),
            "another QEMU must not restore it"
        );
        let (kvm, _) = dummy(Accel::Kvm);
        assert_ne!(k, kvm.template_key("abc", 1, 512));
    }

    #[test]
    fn tcg_gets_the_tsc_workarounds_and_kvm_does_not() {
        let (q, _) = dummy(Accel::Tcg);
        let c = q.kernel_cmdline();
        assert!(
            c.contains("tsc_early_khz=2100000") && c.contains("tsc=reliable"),
            "{c}"
        );
        let (q, _) = dummy(Accel::Kvm);
        assert!(!q.kernel_cmdline().contains("tsc"));
    }

    #[test]
    fn extra_cmdline_is_appended() {
        let (mut q, _) = dummy(Accel::Kvm);
        q.options.cmdline_extra = Some(" loglevel=7 \n".into());
        assert!(q.kernel_cmdline().ends_with(" loglevel=7"));
        q.options.cmdline_extra = Some("  ".into());
        assert!(!q.kernel_cmdline().ends_with(' '));
    }

    #[test]
    fn qemu_argv_wires_disk_tap_console_and_qmp() {
        let (q, spec) = dummy(Accel::Tcg);
        let a = q
            .qemu_args(&spec, Path::new("/m/web/disk.raw"), Boot::Cold)
            .join(" ");
        for want in [
            "-M microvm,acpi=on",
            "-accel tcg,tb-size=128 -cpu qemu64,+rdrand",
            "-kernel /k/vmlinux",
            "-initrd /m/web/initrd.img",
            "file=/m/web/disk.raw,format=raw,if=none,id=d0",
            "virtio-blk-device,drive=d0",
            "tap,id=n0,ifname=tap-web,script=no,downscript=no",
            "virtio-net-device,netdev=n0,mac=52:54:00:00:00:02",
            "path=/m/web/console.log",
            "unix:/m/web/qmp.sock,server=on,wait=off",
            "socket,id=agent0,path=/m/web/agent.sock,server=on,wait=off",
            "virtserialport,chardev=agent0,name=sistemo.agent",
            "-pidfile /m/web/qemu.pid",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
    }

    #[test]
    fn cold_boots_get_a_vsock_device_with_the_slots_cid_where_the_host_has_one() {
        let (mut q, spec) = dummy(Accel::Tcg);
        let disk = Path::new("/m/web/disk.raw");
        assert!(!q.qemu_args(&spec, disk, Boot::Cold).join(" ").contains("vsock"));
        q.vsock = true;
        let a = q.qemu_args(&spec, disk, Boot::Cold).join(" ");
        assert!(
            a.contains(&format!(
                "-device vhost-vsock-device,id=vsock0,guest-cid={}",
                0x5100_0000 + 7
            )),
            "{a}"
        );
        let ram = Path::new("/t/ram");
        for boot in [Boot::Template { ram }, Boot::Restore { ram }] {
            assert!(
                !q.qemu_args(&spec, disk, boot).join(" ").contains("vsock"),
                "{boot:?}"
            );
        }
    }

    #[test]
    fn qemu_is_sandboxed_chrooted_and_unprivileged() {
        let (mut q, spec) = dummy(Accel::Tcg);
        let argv = q.qemu_args(&spec, Path::new("/m/web/disk.raw"), Boot::Cold);
        let a = argv.join(" ");
        for want in [
            "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
            "-chroot /m/web/jail",
            "-runas 1879048199:1879048199",
            "-accel tcg,tb-size=128",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        // A fork after the seccomp filter is fatal (spawn=deny): QEMU must not daemonize.
        assert!(!argv.iter().any(|x| x == "-daemonize"), "{a}");
        // -D would reopen a log by path; stderr is the log instead.
        assert!(!argv.iter().any(|x| x == "-D"), "{a}");
        q.user = None;
        let a = q
            .qemu_args(&spec, Path::new("/m/web/disk.raw"), Boot::Cold)
            .join(" ");
        assert!(a.contains("-sandbox on,") && !a.contains("-runas") && !a.contains("-chroot"));
        let (q, spec) = dummy(Accel::Kvm);
        assert!(
            q.qemu_args(&spec, Path::new("/d"), Boot::Cold)
                .join(" ")
                .contains("-accel kvm -cpu host")
        );
    }

    #[test]
    fn volumes_are_extra_disks_with_serials() {
        let (q, mut spec) = dummy(Accel::Tcg);
        spec.volumes = vec![
            crate::VolumeAttachment {
                path: "/v/a.raw".into(),
                read_only: false,
                serial: "sv-a".into(),
                mount: Some("/data".into()),
            },
            crate::VolumeAttachment {
                path: "/v/b,c.raw".into(),
                read_only: true,
                serial: "sv-b".into(),
                mount: None,
            },
        ];
        let a = q
            .qemu_args(&spec, Path::new("/m/web/disk.raw"), Boot::Cold)
            .join(" ");
        for want in [
            "-drive file=/v/a.raw,format=raw,if=none,id=v0,cache=writeback -device virtio-blk-device,drive=v0,serial=sv-a",
            "file=/v/b,,c.raw,format=raw,if=none,id=v1,cache=writeback,readonly=on",
            "virtio-blk-device,drive=v1,serial=sv-b",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        assert!(
            a.find("id=d0").unwrap() < a.find("id=v0").unwrap(),
            "the root disk stays vda"
        );
    }

    #[test]
    fn disk_limits_become_drive_throttling() {
        let (q, mut spec) = dummy(Accel::Tcg);
        let a = q.qemu_args(&spec, Path::new("/d"), Boot::Cold).join(" ");
        assert!(!a.contains("throttling"), "{a}");
        spec.io = crate::IoLimits {
            iops: 300,
            disk_bw_mbps: 8,
            ..Default::default()
        };
        let a = q.qemu_args(&spec, Path::new("/d"), Boot::Cold).join(" ");
        assert!(
            a.contains("id=d0,cache=writeback,auto-read-only=off,throttling.group=disks,throttling.iops-total=300,throttling.bps-total=8388608 "),
            "{a}"
        );
    }

    #[test]
    fn volumes_share_the_root_disks_throttle_group() {
        let (q, mut spec) = dummy(Accel::Tcg);
        spec.volumes = vec![
            crate::VolumeAttachment {
                path: "/v/a.raw".into(),
                read_only: false,
                serial: "sv-a".into(),
                mount: Some("/data".into()),
            },
            crate::VolumeAttachment {
                path: "/v/b.raw".into(),
                read_only: true,
                serial: "sv-b".into(),
                mount: None,
            },
        ];
        let a = q.qemu_args(&spec, Path::new("/d"), Boot::Cold).join(" ");
        assert!(!a.contains("throttling"), "unlimited: {a}");
        spec.io = crate::IoLimits {
            iops: 60,
            disk_bw_mbps: 4,
            ..Default::default()
        };
        let a = q.qemu_args(&spec, Path::new("/d"), Boot::Cold).join(" ");
        let limits = "throttling.group=disks,throttling.iops-total=60,throttling.bps-total=4194304";
        for want in [
            format!("id=d0,cache=writeback,auto-read-only=off,{limits} "),
            format!("id=v0,cache=writeback,{limits} "),
            format!("id=v1,cache=writeback,readonly=on,{limits} "),
        ] {
            assert!(a.contains(&want), "missing {want:?} in {a}");
        }
        // Only the IOPS limit: the group still binds every drive.
        spec.io.disk_bw_mbps = 0;
        let a = q.qemu_args(&spec, Path::new("/d"), Boot::Cold).join(" ");
        assert_eq!(
            a.matches("throttling.group=disks,throttling.iops-total=60 ")
                .count(),
            3,
            "{a}"
        );
    }

    #[test]
    fn qemu_options_escape_commas() {
        assert_eq!(escape_opt("/a,b"), "/a,,b");
    }
}
