//! OCI images: references ([`reference`]), registry pulls ([`pull`]), archive imports
//! ([`import`]), layers applied natively into a tree ([`layer`]) and made into the store's ext4
//! ([`convert`]), with the image config kept alongside ([`OciMeta`]) for the machine's workload.

pub mod blobs;
pub mod convert;
pub mod import;
pub mod layer;
pub mod pull;
pub mod reference;

use serde::{Deserialize, Serialize};
pub use sistemo_agent::init::Workload;

/// The file in a machine's folder holding its workload (JSON), written at deploy for images
/// that run one program; the machine's initramfs carries it to the guest at each boot.
pub const WORKLOAD_FILE: &str = "workload.json";

/// Write `w` as machine folder `dir`'s workload.
pub fn write_workload(dir: &std::path::Path, w: &Workload) -> Result<(), crate::VmmError> {
    crate::image::write_atomic(
        &dir.join(WORKLOAD_FILE),
        &serde_json::to_vec(w).expect("json"),
        0o600,
    )
}

/// The workload of machine folder `dir` as JSON, checked; `None` when the machine boots its
/// image's init.
pub(crate) fn read_workload(dir: &std::path::Path) -> Result<Option<Vec<u8>>, crate::VmmError> {
    let p = dir.join(WORKLOAD_FILE);
    match std::fs::read(&p) {
        Ok(b) => {
            serde_json::from_slice::<Workload>(&b).map_err(|e| crate::VmmError::Invalid {
                what: "machine workload",
                value: format!("{} ({e})", p.display()),
                allowed: "the JSON sistemo writes at deploy",
            })?;
            Ok(Some(b))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::VmmError::io(format!("reading {}", p.display()))(e)),
    }
}

/// What sistemo keeps of an image's config (the OCI `config` object).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, `K=V` each.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir` (empty: `/`).
    #[serde(default)]
    pub working_dir: String,
    /// `User` (`name`, `uid`, `uid:gid`; empty: root).
    #[serde(default)]
    pub user: String,
    /// `ExposedPorts`, e.g. `80/tcp`: hints, `--expose` publishes.
    #[serde(default)]
    pub exposed_ports: Vec<String>,
}

/// An OCI image in the store: where it came from and its config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OciMeta {
    /// The reference it was pulled or imported as, normalized
    /// (`docker.io/library/nginx:latest`, or `import:FILE`).
    pub reference: String,
    /// The image manifest's digest (`sha256:…`): the store converts one digest once.
    pub digest: String,
    /// The image's `created` time as the image says it (RFC 3339), if any.
    #[serde(default)]
    pub created: Option<String>,
    /// Layer blob digests, lowest first.
    #[serde(default)]
    pub layers: Vec<String>,
    /// The config.
    pub config: ImageConfig,
}

/// Commands that are an init system: images running one boot it as sistemo always did.
const INIT_SYSTEMS: &[&str] = &[
    "/sbin/init",
    "/usr/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
    "/bin/systemd",
    "/usr/bin/systemd",
];

impl ImageConfig {
    /// Parse an OCI (or Docker) image config blob: its `config` object, `created`, and checks
    /// that it is for linux/amd64.
    pub fn parse(json: &[u8]) -> Result<(ImageConfig, Option<String>), String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Inner {
            entrypoint: Option<Vec<String>>,
            cmd: Option<Vec<String>>,
            env: Option<Vec<String>>,
            working_dir: Option<String>,
            user: Option<String>,
            exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
        }
        #[derive(Deserialize)]
        struct Outer {
            architecture: Option<String>,
            os: Option<String>,
            created: Option<String>,
            config: Option<Inner>,
        }
        let o: Outer =
            serde_json::from_slice(json).map_err(|e| format!("the image config is not valid JSON: {e}"))?;
        if let Some(a) = o.architecture.as_deref().filter(|a| *a != "amd64") {
            return Err(format!("the image is for {a} (allowed: amd64)"));
        }
        if let Some(os) = o.os.as_deref().filter(|o| *o != "linux") {
            return Err(format!("the image is for {os} (allowed: linux)"));
        }
        let c = o.config.unwrap_or(Inner {
            entrypoint: None,
            cmd: None,
            env: None,
            working_dir: None,
            user: None,
            exposed_ports: None,
        });
        Ok((
            ImageConfig {
                entrypoint: c.entrypoint.unwrap_or_default(),
                cmd: c.cmd.unwrap_or_default(),
                env: c.env.unwrap_or_default(),
                working_dir: c.working_dir.unwrap_or_default(),
                user: c.user.unwrap_or_default(),
                exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            },
            o.created,
        ))
    }

    /// Whether the image's command (`Entrypoint` + `Cmd`) is an init system, which boots as
    /// for any other image rather than as a workload.
    pub fn runs_init_system(&self) -> bool {
        self.entrypoint
            .iter()
            .chain(&self.cmd)
            .next()
            .is_some_and(|p| INIT_SYSTEMS.contains(&p.as_str()))
    }

    /// The machine's main process: `Entrypoint` + `Cmd` with the config's environment, working
    /// directory and user. `None` when the image has no command, or its command is an init
    /// system: the image's `/sbin/init` boots as for any other image.
    pub fn workload(&self) -> Option<Workload> {
        let argv: Vec<String> = self.entrypoint.iter().chain(&self.cmd).cloned().collect();
        if argv.is_empty() || INIT_SYSTEMS.contains(&argv[0].as_str()) {
            return None;
        }
        Some(Workload {
            argv,
            env: self.env.clone(),
            cwd: Some(self.working_dir.clone()).filter(|w| !w.is_empty()),
            user: Some(self.user.clone()).filter(|u| !u.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_parsed_and_gives_the_workload() {
        let (c, created) = ImageConfig::parse(
            br#"{"architecture":"amd64","os":"linux","created":"2024-01-02T03:04:05Z",
                "config":{"Entrypoint":["/bin/busybox"],"Cmd":["httpd","-f"],"Env":["PATH=/bin"],
                "WorkingDir":"/www","User":"1000:1000","ExposedPorts":{"8080/tcp":{}}}}"#,
        )
        .unwrap();
        assert_eq!(created.as_deref(), Some("2024-01-02T03:04:05Z"));
        assert_eq!(c.exposed_ports, ["8080/tcp"]);
        let w = c.workload().unwrap();
        assert_eq!(w.argv, ["/bin/busybox", "httpd", "-f"]);
        assert_eq!(w.cwd.as_deref(), Some("/www"));
        assert_eq!(w.user.as_deref(), Some("1000:1000"));
        // Nulls are empty; an init system or no command boots the image's init.
        let (c, _) = ImageConfig::parse(br#"{"config":{"Cmd":null,"Entrypoint":null}}"#).unwrap();
        assert!(c.workload().is_none());
        let (c, _) = ImageConfig::parse(br#"{"config":{"Cmd":["/sbin/init"]}}"#).unwrap();
        assert!(c.workload().is_none());
        let e = ImageConfig::parse(br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(e.contains("arm64") && e.contains("amd64"), "{e}");
    }
}
