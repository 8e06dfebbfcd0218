//! Builds `sistemo-agent` as a static binary (its own cargo run, its own target folder) and
//! hands its path to the crate, which packs it into every guest's initramfs.

use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest.join("../..");
    for p in ["crates/agent/src", "crates/agent/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=SISTEMO_AGENT_BINARY");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let dest = out.join("sistemo-agent");
    // A prebuilt agent (packaging, cross builds) skips the nested build.
    if let Ok(prebuilt) = std::env::var("SISTEMO_AGENT_BINARY") {
        std::fs::copy(&prebuilt, &dest).unwrap_or_else(|e| panic!("copying {prebuilt}: {e}"));
        return;
    }
    // One agent build shared by every profile of the outer build: <target>/agent.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "sistemo-agent",
            "--bin",
            "sistemo-agent",
        ])
        .args(["--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        // The outer build's wrappers (clippy) and flags are not the agent's.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .status()
        .expect("running cargo to build sistemo-agent");
    assert!(status.success(), "building sistemo-agent failed");
    let built = target_dir.join(TARGET).join("release/sistemo-agent");
    std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
}
