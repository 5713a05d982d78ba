//! Connecting to a PostgreSQL store: the URL from `[store] url`, the password from
//! `password_file`, `FUNNELSYNC_STORE_PASSWORD` or systemd's `store-password` credential (never
//! from the URL in a log line, never logged), TLS through rustls as the URL's `sslmode` asks
//! (`disable`, `prefer` — the default — or `require`; the server's certificate is checked against
//! the system's trust store).

use std::sync::Arc;
use std::time::Duration;

use super::StoreError;
use crate::config::PostgresConfig;

/// What PostgreSQL said, for an error message: its own message (the driver's `Display` says only
/// "db error").
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db_error) => format!("{}: {}", db_error.severity(), db_error.message()),
        None => error.to_string(),
    }
}

/// The password, wherever the admin put it; `None` when the URL (or the server) needs none.
pub fn password(config: &PostgresConfig) -> Result<Option<String>, StoreError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|error| {
                StoreError::Refused(format!(
                    "cannot read the store's password from {}: {error}",
                    path.display()
                ))
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

fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_platform_verifier()
    .map_err(|error| error.to_string())?
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A connection to the store's database.
pub fn connect(config: &PostgresConfig) -> Result<postgres::Client, StoreError> {
    let shown = config.shown_url();
    let refused = |message: String| StoreError::Connect {
        url: shown.clone(),
        message,
    };
    let mut settings: postgres::Config = config
        .url
        .parse()
        .map_err(|error: postgres::Error| refused(describe(&error)))?;
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
    let client = match settings.get_ssl_mode() {
        postgres::config::SslMode::Disable => settings.connect(postgres::NoTls),
        _ => settings.connect(tls().map_err(&refused)?),
    };
    client.map_err(|error| refused(describe(&error)))
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
