//! Guest images and boot artefacts: the kernel + base initramfs ([`ensure_boot_assets`]), each
//! machine's config initrd, and the ext4 image store with disk cloning ([`ImageStore`]).

mod boot;
mod store;

pub use boot::{
    BootAssets, Compression, GuestConfig, INIT_SCRIPT, build_base_initramfs, ensure_boot_assets,
    extract_vmlinux, find_compressed_payloads, format_mac, is_static_elf, machine_config_cpio,
    module_depends, module_name, parse_kernel_dependency, write_machine_initrd,
};
pub use store::{
    BASE_PACKAGES, ImageInfo, ImageStore, MASKED_GENERATORS, MASKED_UNITS, clone_disk, grow_disk, make_ext4,
    sha256_file,
};
