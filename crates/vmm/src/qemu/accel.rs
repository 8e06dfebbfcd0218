//! Choosing how guest instructions run: KVM when `/dev/kvm` can run a stock guest kernel, TCG
//! otherwise or when asked; and the host TSC frequency a TCG guest needs to be told.

use std::path::Path;

/// How guest instructions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation (about 5x slower to boot; always works).
    Tcg,
}

/// Which accelerator to use: detected, or forced by the caller's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when `/dev/kvm` opens and the host's KVM is not `kvm_pvm`, else TCG.
    #[default]
    Auto,
    /// Always KVM (QEMU fails to start when the host cannot).
    Kvm,
    /// Always TCG.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;

    /// `auto`, `kvm` or `tcg`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!(
                "accelerator {s:?} is not valid (allowed: auto, kvm, tcg)"
            )),
        }
    }
}

/// The accelerator `choice` resolves to on this host: KVM when `/dev/kvm` opens and the host's
/// KVM is not `kvm_pvm` (which only runs PVM-patched guest kernels), else TCG.
pub(crate) fn detect_accel(choice: AccelChoice) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            if open_kvm().is_ok() && !Path::new("/sys/module/kvm_pvm").exists() {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    }
}

fn open_kvm() -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
}

/// Why `choice` resolves to what it does, in one line for `doctor`; starts with `KVM` or `TCG`.
pub fn accel_reason(choice: AccelChoice) -> String {
    match choice {
        AccelChoice::Kvm => return "KVM (hardware virtualisation): forced by the configuration".into(),
        AccelChoice::Tcg => return "TCG (software emulation): forced by the configuration".into(),
        AccelChoice::Auto => {}
    }
    match open_kvm() {
        Err(e) => format!("TCG (software emulation): /dev/kvm unusable: {e}"),
        Ok(_) if Path::new("/sys/module/kvm_pvm").exists() => {
            "TCG (software emulation): the host's KVM is kvm_pvm, which runs only PVM guest kernels".into()
        }
        Ok(_) => "KVM (hardware virtualisation)".into(),
    }
}

/// The host TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`).
pub(crate) fn host_tsc_khz() -> Option<u64> {
    parse_cpu_mhz_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// `cpu MHz : 2100.000` → 2100000.
fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_mhz() {
        assert_eq!(
            parse_cpu_mhz_khz("processor\t: 0\ncpu MHz\t\t: 2100.000\n"),
            Some(2_100_000)
        );
        assert_eq!(parse_cpu_mhz_khz("nothing"), None);
    }

    #[test]
    fn a_forced_choice_wins() {
        assert_eq!(detect_accel(AccelChoice::Tcg), Accel::Tcg);
        assert_eq!(detect_accel(AccelChoice::Kvm), Accel::Kvm);
        assert!(accel_reason(AccelChoice::Tcg).starts_with("TCG"));
        assert!(accel_reason(AccelChoice::Kvm).starts_with("KVM"));
        assert_eq!("tcg".parse(), Ok(AccelChoice::Tcg));
        assert!(
            "fast"
                .parse::<AccelChoice>()
                .unwrap_err()
                .contains("auto, kvm, tcg")
        );
    }
}
