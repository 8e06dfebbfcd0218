//! Image references with Docker's rules (`nginx` is `docker.io/library/nginx:latest`), the
//! name sistemo tags a build with, and which registries may be reached over plain http.

use crate::VmmError;
use oci_client::Reference;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(pub(crate) Reference);

impl ImageRef {
    /// Parse `s` with Docker's rules; a malformed one is refused, naming it.
    pub fn parse(s: &str) -> Result<ImageRef, VmmError> {
        s.parse::<Reference>()
            .map(ImageRef)
            .map_err(|e| VmmError::Invalid {
                what: "image reference",
                value: format!("{s} ({e})"),
                allowed: "[REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST], lowercase repository",
            })
    }

    /// The full form: `docker.io/library/nginx:latest`, `ghcr.io/o/r@sha256:…`.
    pub fn normalized(&self) -> String {
        self.0.whole()
    }

    /// The registry as written in the reference (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        self.0.registry()
    }

    /// The host the client actually talks to (`index.docker.io` for Docker Hub).
    pub fn registry_host(&self) -> &str {
        self.0.resolve_registry()
    }

    /// The pinned manifest digest, if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.0.digest()
    }

    /// The repository's last component (`node` for `node:20`, `r` for `ghcr.io/o/r`): the tag
    /// `image build REF` gives the image.
    pub fn short_name(&self) -> String {
        self.0
            .repository()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Whether the registry is on a loopback address (`localhost`, `127.0.0.0/8`, `[::1]`),
    /// which may be reached over plain http as with Docker.
    pub fn is_loopback(&self) -> bool {
        let r = self.registry();
        let host = if let Some(rest) = r.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else {
            r.split(':').next().unwrap_or_default()
        };
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether the registry may be reached over plain http: loopback, or listed in
    /// `insecure_registries` (as `host` or `host:port`).
    pub fn plain_http(&self, insecure: &[String]) -> bool {
        let host = self.registry().split(':').next().unwrap_or_default();
        self.is_loopback() || insecure.iter().any(|i| i == self.registry() || i == host)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.normalized())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(r.normalized(), "docker.io/library/nginx:latest");
        assert_eq!(r.registry_host(), "index.docker.io");
        assert_eq!(r.short_name(), "nginx");
        assert!(!r.is_loopback() && !r.plain_http(&[]));
        assert_eq!(
            ImageRef::parse("node:20").unwrap().normalized(),
            "docker.io/library/node:20"
        );
        assert_eq!(ImageRef::parse("node:20").unwrap().short_name(), "node");
        assert_eq!(
            ImageRef::parse("user/app").unwrap().normalized(),
            "docker.io/user/app:latest"
        );
        let g = ImageRef::parse("ghcr.io/o/r:tag").unwrap();
        assert_eq!((g.registry(), g.short_name().as_str()), ("ghcr.io", "r"));
        let d = format!("busybox@sha256:{}", "a".repeat(64));
        let d = ImageRef::parse(&d).unwrap();
        assert_eq!(d.digest(), Some(format!("sha256:{}", "a".repeat(64)).as_str()));
        let l = ImageRef::parse("127.0.0.1:5000/web:1").unwrap();
        assert!(l.is_loopback() && l.plain_http(&[]));
        assert_eq!(l.registry(), "127.0.0.1:5000");
        assert!(ImageRef::parse("localhost:5000/a").unwrap().is_loopback());
        let h = ImageRef::parse("reg.lan:5000/a").unwrap();
        assert!(!h.plain_http(&[]));
        assert!(h.plain_http(&["reg.lan:5000".into()]));
        assert!(h.plain_http(&["reg.lan".into()]));
        assert!(!h.plain_http(&["other.lan".into()]));
        for bad in ["", "UPPER/Case", "a:b:c", "x@sha256:12", "-lead"] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("image reference") && e.contains("allowed"),
                "{bad}: {e}"
            );
        }
    }
}
