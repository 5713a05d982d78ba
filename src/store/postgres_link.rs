//! Connecting to a PostgreSQL store: the URL from `[store] url`, the password from
//! `password_file`, `FUNNELSYNC_STORE_PASSWORD` or systemd's `store-password` credential (never
//! from the URL in a log line, never logged), TLS through rustls as the URL's `sslmode` asks
//! (`disable`, `prefer` — the default — `require`, `verify-ca` or `verify-full`). Whenever TLS is
//! used the server's certificate is checked, against the certificate authorities of the URL's
//! `sslrootcert` or else the system's trust store; only `verify-ca` lets it name another host
//! (see `config::store_tls`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::StoreError;
use crate::config::{ConnectionUrl, PostgresConfig, StoreRootCerts, StoreSslMode};

/// What PostgreSQL said, for an error message: its own message (the driver's `Display` says only
/// "db error"), or the driver's with its causes (which its `Display` leaves out: "error
/// performing TLS handshake" alone does not say the server offers no TLS).
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db_error) => format!("{}: {}", db_error.severity(), db_error.message()),
        None => {
            let mut message = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(current) = cause {
                let said = current.to_string();
                if !said.is_empty() && !message.ends_with(&said) {
                    message.push_str(": ");
                    message.push_str(&said);
                }
                cause = current.source();
            }
            message
        }
    }
}

/// The password, wherever the admin put it; `None` when the URL (or the server) needs none.
pub fn password(config: &PostgresConfig) -> Result<Option<String>, StoreError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|source| StoreError::PasswordFile {
                path: path.to_path_buf(),
                source,
            })
    };
    if let Some(path) = &config.password_file {
        return read(path).map(Some);
    }
    if let Ok(password) = std::env::var("FUNNELSYNC_STORE_PASSWORD") {
        return Ok(Some(password));
    }
    if let Some(folder) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = std::path::Path::new(&folder).join("store-password");
        if path.is_file() {
            return read(&path).map(Some);
        }
    }
    Ok(None)
}

/// Accepts a certificate that chains to a trusted authority whatever host it names
/// (`sslmode=verify-ca`): the chain is checked before the name, so a certificate refused only
/// for its name has passed every other check.
#[derive(Debug)]
struct ChainOnly(Arc<dyn rustls::client::danger::ServerCertVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &rustls::pki_types::CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0
            .verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &rustls::pki_types::CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0
            .verify_tls13_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Why a PostgreSQL store cannot be connected to: the cause of [`StoreError::Connect`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL, or the certificate authorities it names, cannot be used: said in the words
    /// `check-config` uses for the same problem.
    #[error("{0}")]
    Settings(String),
    #[error("cannot use the system's trust store: {0}")]
    SystemTrust(#[source] rustls::Error),
    #[error("sslrootcert {} holds a certificate that cannot be trusted: {source}", path.display())]
    UntrustedRoot {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("sslrootcert {}: {source}", path.display())]
    RootVerifier {
        path: PathBuf,
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    #[error("{0}")]
    TlsVersions(#[source] rustls::Error),
    /// The driver, the server or the network refused: `said` is what they said, causes
    /// included, with what to do where they do not say it (see `connect_failure`). The driver's
    /// error is kept whole beside it but is not this error's `source`: its `Display` says only
    /// "db error" or "error performing TLS handshake", and the binary, which prints every cause
    /// not already said, would repeat it after the clear message.
    #[error("{said}")]
    Refused {
        said: String,
        driver: postgres::Error,
    },
}

/// The TLS set-up `sslmode` and `sslrootcert` ask for.
fn tls(url: &ConnectionUrl) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match &url.root_certs {
        StoreRootCerts::System => Arc::new(
            rustls_platform_verifier::Verifier::new(provider.clone())
                .map_err(ConnectError::SystemTrust)?,
        ),
        StoreRootCerts::File(file) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in
                crate::config::read_root_certs(file).map_err(ConnectError::Settings)?
            {
                roots
                    .add(certificate)
                    .map_err(|source| ConnectError::UntrustedRoot {
                        path: file.clone(),
                        source,
                    })?;
            }
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|source| ConnectError::RootVerifier {
                path: file.clone(),
                source,
            })?
        }
    };
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
        if url.ssl_mode.checks_host_name() {
            verifier
        } else {
            Arc::new(ChainOnly(verifier))
        };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ConnectError::TlsVersions)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Why a connection failed, in words that say what to do where the driver's do not: a server
/// certificate refused, a password the server asked for and was not given.
fn connect_failure(error: &postgres::Error) -> String {
    let described = describe(error);
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        let inner = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => None,
        };
        if let Some(rustls::Error::InvalidCertificate(refusal)) =
            inner.unwrap_or(current).downcast_ref::<rustls::Error>()
        {
            let what_to_do = match refusal {
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => {
                    "connect by a host name the certificate holds (or use sslmode=verify-ca, which checks the certificate authority only)"
                }
                _ => "name the certificate authority that signed it with sslrootcert=/path/to/ca.pem in the URL",
            };
            return format!("{described} (the server's certificate was refused: {what_to_do})");
        }
        cause = inner.or_else(|| current.source());
    }
    if described.ends_with("password missing") {
        return format!(
            "{described} (the server asks for a password: put it in password_file, FUNNELSYNC_STORE_PASSWORD or the store-password credential)"
        );
    }
    described
}

/// A connection to the store's database.
pub fn connect(config: &PostgresConfig) -> Result<postgres::Client, StoreError> {
    let shown = config.shown_url();
    let refused = |source: ConnectError| StoreError::Connect {
        url: shown.clone(),
        source: Box::new(source),
    };
    let url = config
        .connection_url()
        .map_err(|message| refused(ConnectError::Settings(message)))?;
    let mut settings: postgres::Config =
        url.driver_url.parse().map_err(|driver: postgres::Error| {
            refused(ConnectError::Refused {
                said: describe(&driver),
                driver,
            })
        })?;
    if let Some(password) = password(config)? {
        settings.password(password);
    }
    if settings.get_connect_timeout().is_none() {
        settings.connect_timeout(Duration::from_secs(10));
    }
    settings.application_name("funnelsync");
    // A host that vanishes (powered off, cut from the network) keeps its backends, and the
    // advisory locks they hold (a site, a claimed job), until the server finds the connection
    // dead; keepalives make both ends find out within about a minute instead of hours.
    // The driver's own default idle time is two hours; one the URL gives is kept.
    if settings.get_keepalives() && settings.get_keepalives_idle() >= Duration::from_secs(7200) {
        settings.keepalives_idle(Duration::from_secs(30));
        if settings.get_keepalives_interval().is_none() {
            settings.keepalives_interval(Duration::from_secs(10));
        }
        if settings.get_keepalives_retries().is_none() {
            settings.keepalives_retries(3);
        }
    }
    let client = match url.ssl_mode {
        StoreSslMode::Disable => settings.connect(postgres::NoTls),
        _ => settings.connect(tls(&url).map_err(&refused)?),
    };
    client.map_err(|driver| {
        refused(ConnectError::Refused {
            said: connect_failure(&driver),
            driver,
        })
    })
}

/// A connection that listens on the change channel: each transaction that changes deals
/// notifies it with the change counter it committed.
pub struct Listener {
    client: postgres::Client,
}

impl Listener {
    pub fn start(config: &PostgresConfig) -> Result<Listener, StoreError> {
        let mut client = connect(config)?;
        client.batch_execute(&format!("LISTEN {}", super::CHANGES_CHANNEL))?;
        Ok(Listener { client })
    }

    /// Waits up to `timeout` for a notification: the highest change counter among those that
    /// came, or `None` when none came. An error means the connection is gone.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<i64>, StoreError> {
        use postgres::fallible_iterator::FallibleIterator;
        let latest = {
            let mut notifications = self.client.notifications();
            let first = notifications.timeout_iter(timeout).next()?;
            let mut latest: Option<i64> = first.and_then(|first| first.payload().parse().ok());
            // Whatever else is already there comes along at once.
            let mut queued = notifications.iter();
            while let Some(notification) = queued.next()? {
                let version: Option<i64> = notification.payload().parse().ok();
                latest = latest.max(version);
            }
            latest
        };
        if self.client.is_closed() {
            return Err(StoreError::Refused(
                "the connection to the store was closed".to_string(),
            ));
        }
        Ok(latest)
    }
}
