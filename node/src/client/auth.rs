//! The client's credentials: the bearer token (`--token`, `--token-file`,
//! `TIERSYNC_TOKEN`) and the CA it trusts for `https://` nodes.

use std::path::{Path, PathBuf};

use super::ClientError;

/// The environment variable holding a bearer token.
pub const TOKEN_ENV: &str = "TIERSYNC_TOKEN";
/// The environment variable naming the CA certificate of `https://` nodes.
pub const CA_ENV: &str = "TIERSYNC_CA";

/// What a client presents and trusts.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The bearer token, if any.
    pub token: Option<String>,
    /// The deployment CA certificate (PEM) that signs the nodes' API
    /// certificates, for `https://` URLs.
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("ca", &self.ca)
            .finish()
    }
}

fn credential_error(reason: String) -> ClientError {
    ClientError::Credentials { reason }
}

impl Credentials {
    /// The token from `token`, else the file `token_file`, else
    /// `$TIERSYNC_TOKEN`; the CA from `ca`, else `$TIERSYNC_CA`.
    pub fn resolve(
        token: Option<&str>,
        token_file: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token = match (token, token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    credential_error(format!(
                        "cannot read the token file {}: {e}",
                        file.display()
                    ))
                })?;
                let t = text.trim();
                if t.is_empty() {
                    return Err(credential_error(format!(
                        "the token file {} is empty",
                        file.display()
                    )));
                }
                Some(t.to_string())
            }
            (None, None) => env(TOKEN_ENV).map(|t| t.trim().to_string()),
        };
        if let Some(t) = &token
            && (t.is_empty() || t.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err(credential_error(
                "the token is empty or holds spaces or control characters".into(),
            ));
        }
        let ca = ca
            .map(Path::to_path_buf)
            .or_else(|| env(CA_ENV).map(PathBuf::from));
        Ok(Self { token, ca })
    }

    /// Just a token.
    pub fn token(token: impl Into<String>) -> Self {
        Self {
            token: Some(token.into()),
            ca: None,
        }
    }
}

/// A ureq TLS config trusting only the CA certificates in `ca` (PEM), with
/// the ring provider (the node's).
pub fn tls_config(ca: &Path) -> Result<ureq::tls::TlsConfig, ClientError> {
    let pem = std::fs::read(ca)
        .map_err(|e| credential_error(format!("cannot read the CA file {}: {e}", ca.display())))?;
    let mut roots = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => roots.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(credential_error(format!(
                    "{}: not a PEM certificate: {e}",
                    ca.display()
                )));
            }
        }
    }
    if roots.is_empty() {
        return Err(credential_error(format!(
            "{}: holds no certificate",
            ca.display()
        )));
    }
    Ok(ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .build())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn token_from_flag_then_file() {
        let c = Credentials::resolve(Some(" tst_a "), None, None).unwrap();
        assert_eq!(c.token.as_deref(), Some("tst_a"));
        assert!(!format!("{c:?}").contains("tst_a"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "tst_b\n").unwrap();
        let c = Credentials::resolve(None, Some(&f), None).unwrap();
        assert_eq!(c.token.as_deref(), Some("tst_b"));
        std::fs::write(&f, "\n").unwrap();
        assert!(Credentials::resolve(None, Some(&f), None).is_err());
        let missing = dir.path().join("none");
        let e = Credentials::resolve(None, Some(&missing), None).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        assert!(Credentials::resolve(Some("a b"), None, None).is_err());
    }
}
