//! Image references with Docker's rules (`nginx` is `docker.io/library/nginx:latest`), the
//! name sistemo tags a build with, and which registries may be reached over plain http.
//!
//! The grammar is checked here, not with `Reference`'s `FromStr`: that compiles a regex whose
//! Unicode classes under bounded repetition keep about 9.5 MB of the daemon's heap for good
//! (idle RSS went from 22 to 31 MB after the first lookup of a reference; `bench/machines`).
//! The result is built with `Reference`'s constructors, and a test checks both agree.

use crate::VmmError;
use oci_client::Reference;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(pub(crate) Reference);

impl ImageRef {
    /// Parse `s` with Docker's rules; a malformed one is refused, naming it.
    pub fn parse(s: &str) -> Result<ImageRef, VmmError> {
        grammar::parse(s).map(ImageRef).map_err(|e| VmmError::Invalid {
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

/// Docker's reference grammar (distribution's `reference` package), ASCII only as in Go.
mod grammar {
    use oci_client::Reference;

    /// Longest repository path.
    const NAME_MAX: usize = 255;

    /// A domain component: alphanumerics, inner hyphens.
    fn domain_label(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    }

    /// `host[.host…][:port]`.
    fn domain(s: &str) -> bool {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        host.split('.').all(domain_label)
            && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    }

    /// A path component: lowercase alphanumerics joined by one `.` or `_`, `__`, or dashes.
    fn path_component(s: &str) -> bool {
        let b = s.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let mut i = 0;
        let mut first = true;
        while i < b.len() {
            if !first {
                // A separator, then alphanumerics again.
                let sep = if b[i] == b'.' {
                    1
                } else if b[i] == b'_' {
                    if b.get(i + 1) == Some(&b'_') { 2 } else { 1 }
                } else {
                    b[i..].iter().take_while(|c| **c == b'-').count()
                };
                if sep == 0 {
                    return false;
                }
                i += sep;
            }
            let run = b[i..].iter().take_while(|c| alnum(**c)).count();
            if run == 0 {
                return false;
            }
            i += run;
            first = false;
        }
        !first
    }

    fn word(c: u8) -> bool {
        c.is_ascii_alphanumeric() || c == b'_'
    }

    /// `[\w][\w.-]{0,127}`.
    fn tag(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && word(b[0])
            && b.iter().all(|c| word(*c) || *c == b'.' || *c == b'-')
    }

    /// `ALGORITHM:HEX`, with the lengths of sha256, sha384 and sha512.
    fn digest(s: &str) -> Result<(), &'static str> {
        let (alg, hex) = s.split_once(':').ok_or("invalid reference format")?;
        let alg_ok = alg.split(['-', '_', '+', '.']).all(|p| {
            let b = p.as_bytes();
            !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
        });
        if !alg_ok || hex.len() < 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err("invalid reference format");
        }
        let want = match alg {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err("unsupported digest algorithm"),
        };
        if hex.len() != want {
            return Err("invalid checksum digest length");
        }
        Ok(())
    }

    /// `[DOMAIN/]PATH[:TAG][@DIGEST]`, normalised as Docker does (`docker.io`, `library/`,
    /// tag `latest` when neither tag nor digest is given); the reason when malformed.
    pub(super) fn parse(s: &str) -> Result<Reference, &'static str> {
        const BAD: &str = "invalid reference format";
        if s.is_empty() {
            return Err("repository name must have at least one component");
        }
        let (rest, dig) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        // A tag's colon comes after the last slash (a domain's port comes before it).
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tg) = match rest[slash..].find(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        let parts: Vec<&str> = name.split('/').collect();
        let all_paths = parts.iter().all(|p| path_component(p));
        let domain_first =
            parts.len() > 1 && domain(parts[0]) && parts[1..].iter().all(|p| path_component(p));
        if !(all_paths || domain_first) || tg.is_some_and(|t| !tag(t)) {
            return Err(BAD);
        }
        if let Some(d) = dig {
            digest(d)?;
        }
        // Docker's split: the first component is a registry when it looks like a host.
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((l, r)) if l.contains('.') || l.contains(':') || l == "localhost" => {
                (l.to_string(), r.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if registry == "index.docker.io" {
            registry = "docker.io".into();
        }
        if registry == "docker.io" && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.len() > NAME_MAX {
            return Err("repository name must not be more than 255 characters");
        }
        Ok(match (tg, dig) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t.into(), d.into()),
            (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
            (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grammar here and `Reference`'s own parser (a regex) agree, value for value.
    #[test]
    fn agrees_with_the_libraries_parser() {
        let h64 = "a".repeat(64);
        let cases: Vec<String> = [
            "busybox",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "lowercase:Uppercase",
            "Uppercase:tag",
            "sub-dom1.foo.com/bar/baz/quux",
            "foo_bar.com:8080",
            "foo/foo_bar.com:8080",
            "a__b/c",
            "a___b",
            "a.-b",
            "a--b-c",
            "a-",
            "-a",
            "a/",
            "/a",
            "a//b",
            "localhost/x",
            "localhost:5000/x/y:1",
            "127.0.0.1:5099/img:1",
            "index.docker.io/nginx",
            "docker.io/library/nginx:1.25",
            "ghcr.io/o/r:tag",
            "a:b:c",
            "a:",
            ":a",
            "a@",
            "x@sha256:12",
            "host.:5/a",
            "h-.io/a",
            "h.io:/a",
            "h.io:5x/a",
            "ab.c/d_e",
            "a:_tag",
            "a:.tag",
            "a:t.a-g_1",
            "café",
            "[::1]:5000/a",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("busybox@sha256:{h64}"),
            format!("busybox:1@sha256:{h64}"),
            format!("busybox@sha256:{}", "a".repeat(63)),
            format!("busybox@sha512:{}", "b".repeat(128)),
            format!("busybox@md5:{}", "c".repeat(32)),
            format!("busybox@sha256:{}", "g".repeat(64)),
            format!("a:{}", "t".repeat(128)),
            format!("a:{}", "t".repeat(129)),
            format!("{}/a", "b".repeat(300)),
            format!("x.io/{}", "b".repeat(252)),
        ])
        .collect();
        for c in &cases {
            let ours = grammar::parse(c);
            let theirs = c.parse::<Reference>();
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(
                    (a.whole(), a.registry(), a.repository(), a.tag(), a.digest()),
                    (b.whole(), b.registry(), b.repository(), b.tag(), b.digest()),
                    "{c}"
                ),
                (Err(_), Err(_)) => {}
                _ => panic!("{c}: ours {ours:?}, the library's {theirs:?}"),
            }
        }
        // One deliberate difference: a tag's word characters are ASCII, as in Docker's Go
        // grammar (the library's regex takes Unicode letters, which no registry accepts).
        assert!(grammar::parse("a:tág").is_err() && "a:tág".parse::<Reference>().is_ok());
    }

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
