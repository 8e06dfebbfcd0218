//! Finding the host's Debian mirrors in its apt configuration: one-line `.list` files and
//! deb822 `.sources` stanzas; the first `deb … main` entry of the wanted archive wins.

use std::path::Path;

/// Which of Debian's archives an apt entry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// The release itself (`bookworm`, `stable`): what debootstrap builds from.
    Release,
    /// Its security updates (`bookworm-security`, or `bookworm/updates` before bullseye).
    Security,
}

impl Archive {
    fn serves(self, suite: &str) -> bool {
        let suite = suite.trim_end_matches('/');
        let release = match self {
            Archive::Release => Some(suite),
            Archive::Security => suite
                .strip_suffix("-security")
                .or_else(|| suite.strip_suffix("/updates")),
        };
        release.is_some_and(|r| DEBIAN_SUITES.contains(&r))
    }
}

/// The URI of the host's `archive` of Debian, from `etc_apt` (normally `/etc/apt`):
/// `sources.list`, then `sources.list.d/*.list` and `*.sources` in file-name order (as apt
/// reads them). The first `deb` entry with component `main`, a suite of that archive (for
/// [`Archive::Release`] not `-security`, `-updates` or `-backports`), and an `http`, `https` or
/// `file` URI wins. Comments, `deb-src` entries and stanzas with `Enabled: no` are skipped.
/// `None` when no entry qualifies (the caller then falls back to its default mirror).
pub fn apt_mirror(etc_apt: &Path, archive: Archive) -> Option<String> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    if let Some(uri) = read(&etc_apt.join("sources.list")).and_then(|t| from_one_line(&t, archive)) {
        return Some(uri);
    }
    let mut files: Vec<_> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.into_iter().find_map(|p| {
        let name = p.file_name()?.to_string_lossy().into_owned();
        if name.ends_with(".list") {
            from_one_line(&read(&p)?, archive)
        } else if name.ends_with(".sources") {
            from_deb822(&read(&p)?, archive)
        } else {
            None
        }
    })
}

/// Suites of Debian's own archive (codenames and aliases). An entry for another distribution
/// (an Ubuntu `noble`, a vendor repository) is not a mirror debootstrap can build Debian from.
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// A URI debootstrap can use as a mirror, without a trailing slash.
fn usable_uri(uri: &str) -> Option<String> {
    ["http://", "https://", "file:/"]
        .iter()
        .any(|s| uri.starts_with(s))
        .then(|| uri.trim_end_matches('/').to_string())
}

/// The one-line format: `deb [ option=value ... ] URI suite component...`.
fn from_one_line(text: &str, archive: Archive) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let mut rest = line.trim().strip_prefix("deb")?;
        if !rest.starts_with([' ', '\t']) {
            return None; // `deb-src`, or not an entry at all
        }
        rest = rest.trim_start();
        if let Some(opts) = rest.strip_prefix('[') {
            rest = &opts[opts.find(']')? + 1..];
        }
        let mut words = rest.split_whitespace();
        let (uri, suite) = (words.next()?, words.next()?);
        if !archive.serves(suite) || !words.any(|c| c == "main") {
            return None;
        }
        usable_uri(uri)
    })
}

/// The deb822 format: stanzas of `Field: value` lines separated by blank lines; values may
/// continue on lines starting with white space, which belong to the field before them.
fn from_deb822(text: &str, archive: Archive) -> Option<String> {
    let mut stanza: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if let Some(uri) = stanza_mirror(&stanza, archive) {
                return Some(uri);
            }
            stanza.clear();
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = stanza.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            stanza.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    stanza_mirror(&stanza, archive)
}

/// The mirror one deb822 stanza names, if it qualifies.
fn stanza_mirror(stanza: &[(String, String)], archive: Archive) -> Option<String> {
    let field = |k: &str| {
        stanza
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let enabled = !matches!(
        field("enabled").to_ascii_lowercase().as_str(),
        "no" | "false" | "0"
    );
    let words = |k: &str| field(k).split_whitespace().collect::<Vec<_>>();
    if !enabled
        || !words("types").contains(&"deb")
        || !words("components").contains(&"main")
        || !words("suites").into_iter().any(|s| archive.serves(s))
    {
        return None;
    }
    words("uris").into_iter().find_map(usable_uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc(files: &[(&str, &str)]) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sistemo-apt-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(d.join("sources.list.d")).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        d
    }

    fn mirror_of(files: &[(&str, &str)], archive: Archive) -> Option<String> {
        let d = etc(files);
        let m = apt_mirror(&d, archive);
        std::fs::remove_dir_all(&d).unwrap();
        m
    }

    fn mirror(files: &[(&str, &str)]) -> Option<String> {
        mirror_of(files, Archive::Release)
    }

    fn security(files: &[(&str, &str)]) -> Option<String> {
        mirror_of(files, Archive::Security)
    }

    #[test]
    fn one_line_entries() {
        let list = "# deb http://commented.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb http://security.debian.org/debian-security bookworm-security main\n\
                    deb http://m.example/debian bookworm-updates main\n\
                    deb http://m.example/debian bookworm-backports main\n\
                    deb http://contrib.example/debian bookworm contrib non-free\n\
                    deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://mirror.example/debian/ bookworm main contrib # the one\n";
        assert_eq!(
            mirror(&[("sources.list", list)]).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            security(&[("sources.list", list)]).as_deref(),
            Some("http://security.debian.org/debian-security")
        );
        assert_eq!(
            security(&[(
                "sources.list",
                "deb http://sec.example/debian-security buster/updates main\n"
            )])
            .as_deref(),
            Some("http://sec.example/debian-security"),
            "the security suite's name before bullseye"
        );
    }

    #[test]
    fn sources_list_comes_before_the_directory() {
        let files = [
            ("sources.list", "deb http://first.example/debian bookworm main\n"),
            (
                "sources.list.d/a.list",
                "deb http://second.example/debian bookworm main\n",
            ),
        ];
        assert_eq!(mirror(&files).as_deref(), Some("http://first.example/debian"));
    }

    #[test]
    fn deb822_stanzas() {
        let sources = "Types: deb\n\
                       # http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                       URIs: http://disabled.example/debian\n\
                       Suites: bookworm\n\
                       Components: main\n\
                       Enabled: no\n\
                       \n\
                       Types: deb-src\n\
                       URIs: http://src.example/debian\n\
                       Suites: bookworm\n\
                       Components: main\n\
                       \n\
                       Types: deb\n\
                       URIs: http://deb.example/debian-security\n\
                       Suites: bookworm-security\n\
                       Components: main\n\
                       \n\
                       types: deb deb-src\n\
                       uris: https://mirror.example/debian\n\
                       suites: bookworm bookworm-updates\n\
                       components: main contrib\n\
                       Signed-By:\n \
                        -----BEGIN PGP PUBLIC KEY BLOCK-----\n \
                        .\n \
                        Components: main\n \
                        -----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(
            mirror(&[("sources.list.d/debian.sources", sources)]).as_deref(),
            Some("https://mirror.example/debian")
        );
        assert_eq!(
            security(&[("sources.list.d/debian.sources", sources)]).as_deref(),
            Some("http://deb.example/debian-security")
        );
    }

    #[test]
    fn the_hosts_usual_debian_sources_file() {
        let sources = "Types: deb\n\
                       URIs: http://deb.debian.org/debian\n\
                       Suites: bookworm bookworm-updates\n\
                       Components: main\n\
                       Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
                       \n\
                       Types: deb\n\
                       URIs: http://deb.debian.org/debian-security\n\
                       Suites: bookworm-security\n\
                       Components: main\n";
        assert_eq!(
            mirror(&[
                ("sources.list.d/debian.sources", sources),
                (
                    "sources.list.d/other.list.disabled",
                    "deb http://x.example/d bookworm main\n"
                ),
            ])
            .as_deref(),
            Some("http://deb.debian.org/debian")
        );
    }

    #[test]
    fn nothing_usable_is_none() {
        assert_eq!(mirror(&[]), None);
        assert_eq!(
            mirror(&[(
                "sources.list",
                "deb http://archive.ubuntu.com/ubuntu noble main restricted\n"
            )]),
            None,
            "another distribution's archive cannot build Debian"
        );
        assert_eq!(
            mirror(&[(
                "sources.list.d/x.list",
                "deb cdrom:[Debian]/ bookworm main\ndeb http://only.example/debian bookworm-security main\n"
            )]),
            None
        );
        assert_eq!(
            security(&[(
                "sources.list",
                "deb http://m.example/debian bookworm main\n\
                 deb http://m.example/debian bookworm-updates main\n\
                 deb http://archive.ubuntu.com/ubuntu noble-security main\n"
            )]),
            None,
            "neither the release, its updates nor another distribution's security archive"
        );
        assert_eq!(
            apt_mirror(Path::new("/nonexistent/etc/apt"), Archive::Release),
            None
        );
    }
}
