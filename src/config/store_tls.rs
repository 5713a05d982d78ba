//! How the connection to a PostgreSQL store is secured, from its URL's `sslmode` and
//! `sslrootcert` as libpq spells them. The driver knows only `disable`, `prefer` and `require`, and
//! no `sslrootcert`: [`PostgresConfig::connection_url`] hands it a URL in its own words and keeps
//! the rest for the TLS set-up.
//!
//! Whenever TLS is used the server's certificate is checked: against the certificates of
//! `sslrootcert` (a PEM file, given as an absolute path), or the system's trust store when it is
//! absent or `system`. `verify-ca` checks the chain only; every other mode checks the host name
//! too (libpq's `prefer` and `require` check nothing: funnelsync never talks to a server it has
//! not recognised).

use std::path::{Path, PathBuf};

use super::{percent_decoded, url_parts, PostgresConfig};

/// `sslmode`: whether TLS is used, and how much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreSslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it (the default); the certificate checked as `VerifyFull`.
    Prefer,
    /// TLS or no connection; the certificate checked as `VerifyFull`.
    Require,
    /// TLS; the certificate must chain to a trusted authority, whatever host it names.
    VerifyCa,
    /// TLS; the certificate must chain to a trusted authority and name the host connected to.
    VerifyFull,
}

impl StoreSslMode {
    /// Whether the certificate must name the host.
    pub fn checks_host_name(self) -> bool {
        self != StoreSslMode::VerifyCa
    }
}

/// Which certificate authorities the server's certificate may chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreRootCerts {
    /// The system's trust store (no `sslrootcert`, or `sslrootcert=system`).
    System,
    /// Only those in this PEM file.
    File(PathBuf),
}

/// A store URL taken apart for connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionUrl {
    /// The URL as the driver takes it: `verify-ca`/`verify-full` written as `require`, no
    /// `sslrootcert`.
    pub driver_url: String,
    pub ssl_mode: StoreSslMode,
    pub root_certs: StoreRootCerts,
}

impl PostgresConfig {
    /// The URL taken apart for connecting; a `sslmode` or `sslrootcert` that cannot be used is
    /// said in words (with nothing else of the URL in them).
    pub fn connection_url(&self) -> Result<ConnectionUrl, String> {
        let (scheme, authority, path, query) = url_parts(&self.url);
        let mut ssl_mode = StoreSslMode::Prefer;
        let mut root_certs = StoreRootCerts::System;
        let mut kept = Vec::new();
        for parameter in query.unwrap_or("").split('&') {
            if parameter.is_empty() {
                continue;
            }
            let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            let (key, value) = (percent_decoded(key), percent_decoded(value));
            match key.as_str() {
                "sslmode" => {
                    ssl_mode = match value.as_str() {
                        "disable" => StoreSslMode::Disable,
                        "prefer" => StoreSslMode::Prefer,
                        "require" => StoreSslMode::Require,
                        "verify-ca" => StoreSslMode::VerifyCa,
                        "verify-full" => StoreSslMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode \"{other}\" is not one funnelsync knows: use disable, prefer, require, verify-ca or verify-full"
                            ))
                        }
                    };
                }
                "sslrootcert" if value == "system" => root_certs = StoreRootCerts::System,
                "sslrootcert" => {
                    let file = PathBuf::from(&value);
                    if !file.is_absolute() {
                        return Err(format!(
                            "sslrootcert \"{value}\" must be an absolute path (to a PEM file of the certificate authorities to trust) or \"system\""
                        ));
                    }
                    root_certs = StoreRootCerts::File(file);
                }
                _ => kept.push(parameter),
            }
        }
        let driver_mode = match ssl_mode {
            StoreSslMode::Disable => "disable",
            StoreSslMode::Prefer => "prefer",
            _ => "require",
        };
        kept.push(match driver_mode {
            "disable" => "sslmode=disable",
            "prefer" => "sslmode=prefer",
            _ => "sslmode=require",
        });
        let separator = if scheme.is_empty() { "" } else { "://" };
        Ok(ConnectionUrl {
            driver_url: format!("{scheme}{separator}{authority}{path}?{}", kept.join("&")),
            ssl_mode,
            root_certs,
        })
    }
}

/// The certificates of a PEM file of certificate authorities (`sslrootcert`): at least one.
pub fn read_root_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|error| {
        format!(
            "cannot read the certificate authorities of sslrootcert {}: {error}",
            path.display()
        )
    })?;
    let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            format!(
                "sslrootcert {} is not a PEM file of certificates: {error}",
                path.display()
            )
        })?;
    if certificates.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no certificate (a PEM file with -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken_apart(url: &str) -> Result<ConnectionUrl, String> {
        PostgresConfig {
            url: url.to_string(),
            password_file: None,
        }
        .connection_url()
    }

    #[test]
    fn libpq_ssl_modes_and_root_certs_become_what_the_driver_takes() {
        let url = taken_apart(
            "postgresql://fs@db.example:5433/crm?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .expect("valid");
        assert_eq!(
            url.driver_url,
            "postgresql://fs@db.example:5433/crm?application_name=x&sslmode=require"
        );
        assert_eq!(url.ssl_mode, StoreSslMode::VerifyFull);
        assert_eq!(url.root_certs, StoreRootCerts::File("/etc/ca.pem".into()));
        assert!(url.driver_url.parse::<postgres::Config>().is_ok());

        let url = taken_apart("postgresql://fs@db/crm?sslmode=verify-ca&sslrootcert=system")
            .expect("valid");
        assert_eq!(url.ssl_mode, StoreSslMode::VerifyCa);
        assert!(!url.ssl_mode.checks_host_name());
        assert_eq!(url.root_certs, StoreRootCerts::System);

        let url = taken_apart("postgresql://fs@db/crm").expect("valid");
        assert_eq!(url.ssl_mode, StoreSslMode::Prefer);
        assert_eq!(url.driver_url, "postgresql://fs@db/crm?sslmode=prefer");
        assert_eq!(
            taken_apart("postgresql://fs@db/crm?sslmode=disable")
                .expect("valid")
                .ssl_mode,
            StoreSslMode::Disable
        );

        let refused = taken_apart("postgresql://fs@db/crm?sslmode=verify_full").unwrap_err();
        assert!(refused.contains("verify-full"), "{refused}");
        let refused = taken_apart("postgresql://fs@db/crm?sslrootcert=ca.pem").unwrap_err();
        assert!(refused.contains("absolute path"), "{refused}");
    }

    #[test]
    fn a_root_cert_file_must_hold_a_certificate() {
        let folder = tempfile::tempdir().expect("temp dir");
        let missing = read_root_certs(&folder.path().join("missing.pem")).unwrap_err();
        assert!(missing.starts_with("cannot read"), "{missing}");
        let empty = folder.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let refused = read_root_certs(&empty).unwrap_err();
        assert!(refused.contains("holds no certificate"), "{refused}");
    }
}
