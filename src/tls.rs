//! TLS for the TCP listeners: the user's certificate and key (`tls_cert`, `tls_key`), or a
//! self-signed one generated on first start and kept (0600) in `data_dir/tls/`; its SHA-256
//! fingerprint is what remote CLIs pin.

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A server TLS configuration and its certificate's fingerprint.
pub struct Tls {
    /// For tokio-rustls.
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate (DER), as `AB:CD:…`.
    pub fingerprint: String,
}

/// Where the generated certificate and key live.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let d = data_dir.join("tls");
    (d.join("cert.pem"), d.join("key.pem"))
}

/// The SHA-256 fingerprint of a DER certificate: uppercase hex pairs joined by `:` (as
/// `openssl x509 -fingerprint -sha256` prints it).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fingerprint of the first certificate of a PEM file, if it has one.
pub fn fingerprint_of_file(path: &Path) -> Option<String> {
    CertificateDer::from_pem_file(path).ok().map(|c| fingerprint(&c))
}

/// Make a self-signed certificate for `names` (host names and addresses) at `cert`/`key`.
fn generate(cert: &Path, key: &Path, names: Vec<String>) -> Result<()> {
    let dir = cert.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let ck = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
    // The key first, private from its first byte; the certificate last (its presence says done).
    let write = |p: &Path, text: String| -> Result<()> {
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))?;
        Ok(())
    };
    write(key, ck.signing_key.serialize_pem())?;
    write(cert, ck.cert.pem())?;
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt;

/// The TLS configuration: the user's `cert`/`key` when given, else the generated pair
/// (made on first use, for `names`).
pub fn load(data_dir: &Path, user: Option<(&Path, &Path)>, names: Vec<String>) -> Result<Tls> {
    let (cert, key) = match user {
        Some((c, k)) => (c.to_path_buf(), k.to_path_buf()),
        None => {
            let (c, k) = generated_paths(data_dir);
            if !c.exists() || !k.exists() {
                generate(&c, &k, names)?;
                tracing::info!(cert = %c.display(), "generated a self-signed TLS certificate");
            }
            (c, k)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    let Some(leaf) = chain.first() else {
        bail!("the TLS certificate file {} holds no certificate", cert.display());
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key)
        .with_context(|| format!("reading the TLS key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| format!("the TLS key does not fit the certificate {}", cert.display()))?;
    Ok(Tls {
        config: Arc::new(config),
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_private_kept_and_fingerprinted() {
        let dir = std::env::temp_dir().join(format!("sistemo-tls-{}", uuid::Uuid::new_v4()));
        let a = load(&dir, None, vec!["localhost".into()]).unwrap();
        let (c, k) = generated_paths(&dir);
        for p in [&c, &k] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let b = load(&dir, None, vec!["localhost".into()]).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "kept across starts");
        assert_eq!(fingerprint_of_file(&c).unwrap(), a.fingerprint);
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
