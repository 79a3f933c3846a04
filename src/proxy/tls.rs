//! TLS for both sides of the proxy, with rustls on the `ring` provider: the client
//! configuration for `https://` TF Serving upstreams (custom CA or the webpki roots,
//! optional client certificate) and the server configuration of mltap's own listeners.
//!
//! Certificate and key files are read and checked once at start-up so that a missing
//! or unparsable file stops `serve` with a message naming its key. This module never
//! logs key material and never falls back to cleartext when a TLS setting is present.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// ALPN for the gRPC side (HTTP/2 only).
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// ALPN for the REST side (HTTP/1.1 only).
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The `[tls]` section of the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA certificates that sign the upstream's certificate, for a TF Serving
    /// behind a private CA; without it the webpki roots are trusted.
    pub upstream_ca_file: Option<PathBuf>,
    /// PEM certificate chain mltap presents to an upstream that requires mutual TLS.
    pub upstream_client_cert_file: Option<PathBuf>,
    /// PEM private key of `upstream_client_cert_file`.
    pub upstream_client_key_file: Option<PathBuf>,
    /// PEM certificate chain of mltap's own gRPC and REST listeners; with
    /// `listen_key_file` the listeners speak TLS instead of cleartext.
    pub listen_cert_file: Option<PathBuf>,
    /// PEM private key of `listen_cert_file`.
    pub listen_key_file: Option<PathBuf>,
}

/// A problem with one key of the `[tls]` section: the key (without the section) and
/// what is wrong.
pub type TlsProblem = (&'static str, String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Chosen explicitly: with more than one provider compiled in, rustls cannot pick.
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| (key, format!("cannot read {shown}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (key, format!("{shown} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err((key, format!("{shown} holds no PEM certificate")));
    }
    Ok(certs)
}

fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsProblem> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| (key, format!("{} holds no usable PEM private key: {e}", path.display())))
}

/// Both files of a certificate/key pair, or neither; one alone is a mistake.
fn pair<'a>(
    cert: (&'static str, &'a Option<PathBuf>),
    key: (&'static str, &'a Option<PathBuf>),
) -> Result<Option<(&'a Path, &'a Path)>, TlsProblem> {
    match (cert.1, key.1) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err((key.0, format!("must be set together with {}", cert.0))),
        (None, Some(_)) => Err((cert.0, format!("must be set together with {}", key.0))),
    }
}

impl TlsConfig {
    /// Reads every configured file and builds both configurations once, so that
    /// start-up fails on the first bad file.
    pub fn validate(&self) -> Result<(), TlsProblem> {
        self.client_config(ALPN_H2)?;
        self.server_config(ALPN_H2)?;
        Ok(())
    }

    /// Whether mltap's own listeners speak TLS.
    pub fn listeners_use_tls(&self) -> bool {
        self.listen_cert_file.is_some() && self.listen_key_file.is_some()
    }

    /// The client configuration for `https://` upstreams, offering `alpn` only.
    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsProblem> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.upstream_ca_file {
            Some(path) => {
                for cert in read_certs("upstream_ca_file", path)? {
                    roots.add(cert).map_err(|e| {
                        ("upstream_ca_file", format!("{} holds an unusable CA certificate: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("upstream_ca_file", format!("TLS cannot be set up: {e}")))?
            .with_root_certificates(roots);
        let client_pair = pair(
            ("upstream_client_cert_file", &self.upstream_client_cert_file),
            ("upstream_client_key_file", &self.upstream_client_key_file),
        )?;
        let mut config = match client_pair {
            Some((cert, key)) => {
                let certs = read_certs("upstream_client_cert_file", cert)?;
                let key = read_key("upstream_client_key_file", key)?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    ("upstream_client_key_file", format!("does not match upstream_client_cert_file: {e}"))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// The server configuration of a listener offering `alpn` only, or `None` when the
    /// listeners speak cleartext.
    pub fn server_config(&self, alpn: &[u8]) -> Result<Option<rustls::ServerConfig>, TlsProblem> {
        let Some((cert, key)) =
            pair(("listen_cert_file", &self.listen_cert_file), ("listen_key_file", &self.listen_key_file))?
        else {
            return Ok(None);
        };
        let certs = read_certs("listen_cert_file", cert)?;
        let key = read_key("listen_key_file", key)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("listen_cert_file", format!("TLS cannot be set up: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| ("listen_key_file", format!("does not match listen_cert_file: {e}")))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_without_its_key_names_the_missing_key() {
        let tls = TlsConfig { listen_cert_file: Some("/nonexistent.pem".into()), ..TlsConfig::default() };
        assert_eq!(tls.validate().unwrap_err().0, "listen_key_file");
        let tls = TlsConfig { upstream_client_key_file: Some("/nonexistent.pem".into()), ..TlsConfig::default() };
        assert_eq!(tls.validate().unwrap_err().0, "upstream_client_cert_file");
    }

    #[test]
    fn a_missing_ca_file_names_its_key() {
        let tls = TlsConfig { upstream_ca_file: Some("/nonexistent/ca.pem".into()), ..TlsConfig::default() };
        let (key, problem) = tls.validate().unwrap_err();
        assert_eq!(key, "upstream_ca_file");
        assert!(problem.contains("/nonexistent/ca.pem"), "{problem}");
    }

    #[test]
    fn no_settings_means_webpki_roots_and_cleartext_listeners() {
        let tls = TlsConfig::default();
        assert!(tls.client_config(ALPN_HTTP1).is_ok());
        assert!(tls.server_config(ALPN_HTTP1).unwrap().is_none());
    }
}
