//! A remote daemon's certificate, pinned by its SHA-256 fingerprint: given with `--fingerprint`
//! (`SISTEMO_FINGERPRINT`), or trusted on first use (asked on a terminal) and kept per user in
//! `~/.config/sistemo/known_hosts`; a certificate that differs is refused.

use super::ClientError;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A fingerprint as `sistemo up` and `sistemo config` print it: uppercase hex pairs joined by
/// `:`. Accepts that, plain hex, either case, and a `SHA256:` prefix; `None` if it is not 32
/// bytes of hex.
pub fn normalize(fp: &str) -> Option<String> {
    let t = fp.trim();
    let t = t
        .strip_prefix("SHA256:")
        .or_else(|| t.strip_prefix("sha256:"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|&c| c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let up = hex.to_ascii_uppercase();
    Some(
        up.as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).expect("ascii"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Where this user's pinned certificates live: `$XDG_CONFIG_HOME/sistemo/known_hosts`, else
/// `~/.config/sistemo/known_hosts`.
pub fn known_hosts_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("sistemo/known_hosts"))
}

/// The fingerprint pinned for `authority` (`HOST:PORT`) in `file`, if any. Lines are
/// `HOST:PORT FINGERPRINT`; `#` starts a comment.
pub fn lookup(file: &Path, authority: &str) -> Option<String> {
    let f = std::fs::File::open(file).ok()?;
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some(a), Some(fp)) if a == authority && !a.starts_with('#') => normalize(fp),
                _ => None,
            }
        })
}

/// Pin `fp` for `authority` in `file` (private to the user), replacing an older line.
pub fn remember(file: &Path, authority: &str, fp: &str) -> std::io::Result<()> {
    let dir = file.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let old = std::fs::read_to_string(file).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(authority))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!("{authority} {fp}\n"));
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}

/// Accepts exactly the certificate whose fingerprint is `expected` (any other, or every one
/// when `expected` is `None`, fails the handshake before anything is sent), and remembers the
/// fingerprint it saw. Signatures are still checked: the server must hold the key.
#[derive(Debug)]
pub struct PinVerifier {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// A verifier of `expected` (`None`: only see the fingerprint, trust nothing).
    pub fn new(expected: Option<String>, provider: Arc<CryptoProvider>) -> Arc<PinVerifier> {
        Arc::new(PinVerifier {
            expected,
            seen: Mutex::new(None),
            provider,
        })
    }

    /// The fingerprint of the certificate the server presented, once it did.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().expect("seen").clone()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = crate::tls::fingerprint(end_entity);
        *self.seen.lock().expect("seen") = Some(fp.clone());
        match &self.expected {
            Some(e) if *e == fp => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client configuration that trusts only `verifier`'s pin.
pub fn client_config(verifier: Arc<PinVerifier>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = verifier.provider.clone();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The crypto of our TLS (as the daemon's).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Ask on the terminal whether to trust `fp` for `authority`; only when both stdin and stderr
/// are terminals (else `None`: nobody to ask).
pub fn ask(authority: &str, fp: &str) -> Option<bool> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    eprintln!("The certificate of the sistemo daemon at {authority} is not known yet.");
    eprintln!("Its SHA-256 fingerprint is\n  {fp}");
    eprintln!("Compare it with `sistemo config` (tls_fingerprint) on that host.");
    eprint!("Trust it and remember it? [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok()?;
    Some(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str =
        "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn fingerprints_are_read_in_the_usual_spellings() {
        assert_eq!(normalize(FP).as_deref(), Some(FP));
        assert_eq!(
            normalize(&FP.replace(':', "").to_lowercase()).as_deref(),
            Some(FP)
        );
        assert_eq!(normalize(&format!("SHA256:{FP}")).as_deref(), Some(FP));
        assert_eq!(normalize("AB:CD"), None);
        assert_eq!(normalize(&FP.replace('A', "G")), None);
    }

    #[test]
    fn known_hosts_keep_one_private_line_per_host() {
        let dir = std::env::temp_dir().join(format!("sistemo-kh-{}", uuid::Uuid::new_v4()));
        let f = dir.join("sistemo/known_hosts");
        assert_eq!(lookup(&f, "h:1"), None);
        remember(&f, "h:1", FP).unwrap();
        remember(&f, "other:2", &FP.replace("AB", "00")).unwrap();
        assert_eq!(lookup(&f, "h:1").as_deref(), Some(FP));
        remember(&f, "h:1", &FP.replace("AB", "11")).unwrap();
        assert_eq!(lookup(&f, "h:1"), Some(FP.replace("AB", "11")));
        assert_eq!(lookup(&f, "other:2"), Some(FP.replace("AB", "00")));
        let text = std::fs::read_to_string(&f).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
