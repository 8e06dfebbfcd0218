//! Puts the dashboard's third-party browser libraries into the binary: xterm.js and its fit
//! addon, installed from the npm registry by `scripts/deps` (`npm ci` in
//! src/server/dashboard/vendor, pinned by its package-lock.json), never copied into the
//! repository. Without them (no `scripts/deps` yet) the build still succeeds: the files are
//! empty and the dashboard's terminal says how to get it.

use std::path::{Path, PathBuf};

/// One library file: its path under node_modules, and the package whose licence goes with it.
const JS: [(&str, &str); 2] = [
    ("@xterm/xterm/lib/xterm.js", "@xterm/xterm"),
    ("@xterm/addon-fit/lib/addon-fit.js", "@xterm/addon-fit"),
];
const CSS: &str = "@xterm/xterm/css/xterm.css";

fn version(pkg: &Path) -> String {
    let text = std::fs::read_to_string(pkg.join("package.json")).unwrap_or_default();
    text.split("\"version\"")
        .nth(1)
        .and_then(|r| r.split('"').nth(1))
        .unwrap_or("?")
        .to_string()
}

/// A library's text with its licence on top (MIT asks for it) and without its source-map
/// comment (the map is not served).
fn with_licence(modules: &Path, file: &str, pkg: &str) -> Option<String> {
    let text = std::fs::read_to_string(modules.join(file)).ok()?;
    let licence = std::fs::read_to_string(modules.join(pkg).join("LICENSE")).unwrap_or_default();
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("//# sourceMappingURL="))
        .collect::<Vec<_>>()
        .join("\n");
    Some(format!(
        "/*! {pkg} {} (from the npm registry)\n{}*/\n{body}\n",
        version(&modules.join(pkg)),
        licence.replace("*/", "* /")
    ))
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let vendor = manifest.join("src/server/dashboard/vendor");
    let modules = vendor.join("node_modules");
    // The folder, not the files: they may not exist yet, and appear with `scripts/deps`.
    println!("cargo:rerun-if-changed={}", vendor.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let js: Option<Vec<String>> = JS.iter().map(|(f, p)| with_licence(&modules, f, p)).collect();
    let css = std::fs::read_to_string(modules.join(CSS)).ok();
    let (js, css) = match (js, css) {
        (Some(js), Some(css)) => (js.concat(), css),
        _ => {
            println!(
                "cargo:warning=the dashboard's terminal is not built in: {} has no @xterm packages (run scripts/deps, then build again)",
                modules.display()
            );
            (String::new(), String::new())
        }
    };
    std::fs::write(out.join("xterm.js"), js).expect("writing xterm.js");
    std::fs::write(out.join("xterm.css"), css).expect("writing xterm.css");
}
