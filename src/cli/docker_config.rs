//! `image pull --docker-config [PATH]`: the invoking user's Docker `config.json` read by the CLI,
//! whose `auths` entry for the reference's registry goes to the daemon for that pull only.
//! Only base64 `auth` entries are read: credential helpers (`credsStore`, `credHelpers`) are not
//! run, and a registry that only has one is refused by name.

use crate::api::RegistryCredentials;
use anyhow::{Result, bail};
use base64::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
}

/// Docker's default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` of the user who
/// runs the CLI (under sudo, the user who ran sudo).
pub fn default_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    let sudo_home = std::env::var("SUDO_USER")
        .ok()
        .filter(|_| nix::unistd::geteuid().is_root())
        .and_then(|u| nix::unistd::User::from_name(&u).ok().flatten())
        .map(|u| u.dir);
    let home = sudo_home.or_else(|| std::env::var_os("HOME").map(PathBuf::from))?;
    Some(home.join(".docker/config.json"))
}

/// The registry an `auths` key names: `https://index.docker.io/v1/` is `docker.io`, a scheme
/// and path are dropped.
fn registry_of(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        h => h.to_string(),
    }
}

/// The credentials for `registry` in config file `text` (named `file` in errors); `None` when
/// it has no entry for it.
fn parse(file: &Path, text: &str, registry: &str) -> Result<Option<RegistryCredentials>> {
    let f = file.display();
    let cfg: DockerConfig = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!("docker config {f} is not valid JSON ({e}); allowed: Docker's config.json")
    })?;
    let entry = cfg.auths.iter().find(|(k, _)| registry_of(k) == registry);
    match entry
        .and_then(|(_, e)| e.auth.as_deref())
        .filter(|a| !a.is_empty())
    {
        Some(a) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            let Some((u, p)) = raw.as_deref().and_then(|s| s.split_once(':')) else {
                bail!(
                    "docker config {f}: the auth of {registry} is not base64 of USER:PASSWORD (allowed: what `docker login` writes)"
                );
            };
            Ok(Some(RegistryCredentials {
                username: u.to_string(),
                password: p.to_string(),
            }))
        }
        None => {
            let helper = cfg
                .cred_helpers
                .iter()
                .find(|(k, _)| registry_of(k) == registry)
                .map(|(_, h)| h.clone())
                .or(cfg.creds_store);
            match helper {
                Some(h) => bail!(
                    "docker config {f}: {registry} is kept by credential helper {h:?}, which sistemo does not run (allowed: an auths entry with auth, e.g. `sistemo registry login {registry}`)"
                ),
                None => Ok(None),
            }
        }
    }
}

/// The credentials for `reference`'s registry from config file `path` (default:
/// [`default_path`]); `None` (with a note) when the file has none for it.
pub fn credentials(reference: &str, path: Option<PathBuf>) -> Result<Option<RegistryCredentials>> {
    let r = sistemo_vmm::image::oci::reference::ImageRef::parse(reference)?;
    let Some(path) = path.or_else(default_path) else {
        bail!("no docker config: HOME is not set (allowed: --docker-config PATH)");
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "docker config {} cannot be read ({e}); allowed: a readable config.json",
            path.display()
        )
    })?;
    let c = parse(&path, &text, r.registry())?;
    if c.is_none() {
        eprintln!(
            "… no credentials for {} in {}; pulling anonymously",
            r.registry(),
            path.display()
        );
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_are_read_and_helpers_refused() {
        let f = Path::new("/home/u/.docker/config.json");
        let text = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpwdzE="},
            "127.0.0.1:5000":{"auth":"YWxpY2U6czNjcjp0"}, "bad.io":{"auth":"!!"}},
            "credHelpers":{"gcr.io":"gcloud"}}"#;
        let c = parse(f, text, "docker.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "pw1"));
        let c = parse(f, text, "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cr:t"));
        assert!(parse(f, text, "quay.io").unwrap().is_none());
        let e = parse(f, text, "gcr.io").unwrap_err().to_string();
        assert!(
            e.contains("gcloud") && e.contains("gcr.io") && e.contains("allowed"),
            "{e}"
        );
        let e = parse(f, text, "bad.io").unwrap_err().to_string();
        assert!(e.contains("bad.io") && e.contains("base64"), "{e}");
        let e = parse(f, "{", "x").unwrap_err().to_string();
        assert!(e.contains("/home/u/.docker/config.json"), "{e}");
        assert!(format!("{c:?}").contains("hidden") && !format!("{c:?}").contains("s3cr"));
    }
}
