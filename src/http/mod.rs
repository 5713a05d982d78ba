//! The HTTP side of funnelsync: the JSON API under `/api/v1` ([`api`]), the server-rendered pages
//! for phones and desktops ([`pages`]), `/metrics` and `/healthz` ([`metrics`]), served on a tokio
//! runtime of its own (so a burst of requests never slows the sync loop) by `funnelsync run` when
//! `[http]` is configured, and by `funnelsync serve` without watching files.
//!
//! This module owns the server's life (start, reload of users, graceful stop), the middleware
//! (tracing, compression, timeouts, body limits, security headers, request counts), the JSON
//! error shape and the bridge from async handlers to the blocking store: every store access runs
//! on a blocking thread with a connection of its own. Who may do what is decided in [`auth`] only;
//! what an edit means is decided in [`crate::edit`]. It must not know how files are synced.

pub mod api;
pub mod auth;
pub mod metrics;
pub mod pages;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tracing::{error, info, warn};

use crate::config::{Config, HttpConfig};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("[http] is not configured: add an [http] section with `listen` and [[http.users]]")]
    NotConfigured,
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load the TLS certificate {cert} and key {key}: {source}")]
    Tls {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the daemon shares with the server: its heartbeat and watcher state (for `/healthz` and
/// `/metrics`) and a way to ask it to
/// apply a held file. `funnelsync serve` has no daemon.
pub struct DaemonLink {
    pub heartbeat: Arc<Heartbeat>,
    /// Asks the daemon's loop to sync this file (by its key) with the mass-delete guard lifted.
    pub force_sync: Box<dyn Fn(String) -> bool + Send + Sync>,
}

/// The daemon's signs of life for `/healthz` and `/metrics`: the loop's last beat, in Unix
/// seconds, and the state of its file watcher.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last_beat: AtomicI64,
    watcher: Mutex<WatcherHealth>,
    /// File syncs that found nothing to change since the daemon started: they record no run in
    /// the store, so only the daemon can count them.
    unchanged_syncs: std::sync::atomic::AtomicU64,
}

/// Whether the daemon's file watcher works.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WatcherHealth {
    /// It watches every source's folder.
    #[default]
    Alive,
    /// `[watch] mode = "poll"`: no watcher is wanted; the rescan sees every change.
    Polling,
    /// It could not start, could not watch a folder, or failed since: events are missed, and
    /// only a rescan (if the mode has one) still sees the changes. The text says why.
    Failed(String),
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_beat
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    /// Seconds since the last beat.
    pub fn age(&self) -> i64 {
        chrono::Utc::now().timestamp() - self.last_beat.load(Ordering::Relaxed)
    }

    /// Says how the watcher is (when it starts, and when it fails).
    pub fn set_watcher(&self, health: WatcherHealth) {
        *self
            .watcher
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = health;
    }

    /// Counts a file sync that found nothing to change.
    pub fn count_unchanged_sync(&self) {
        self.unchanged_syncs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unchanged_syncs(&self) -> u64 {
        self.unchanged_syncs.load(Ordering::Relaxed)
    }

    pub fn watcher(&self) -> WatcherHealth {
        self.watcher
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

/// What every handler shares.
pub struct AppState {
    config: RwLock<Arc<Config>>,
    users: RwLock<Arc<auth::Users>>,
    pub(crate) sessions: auth::Sessions,
    pub(crate) limiter: auth::LoginLimiter,
    pub(crate) metrics: metrics::HttpMetrics,
    pub(crate) daemon: Option<DaemonLink>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    pub fn http(&self) -> HttpConfig {
        self.config()
            .http
            .clone()
            .expect("the server runs only with [http]")
    }

    pub fn users(&self) -> Arc<auth::Users> {
        Arc::clone(
            &self
                .users
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }
}

/// An error as the API answers it: `{"error": {"code", "message", "field"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// A failure of the server itself: logged in full, answered without details.
    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        error!("request failed: {error}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed; its log says why",
        )
    }

    pub fn from_refusal(refusal: auth::Refusal, what: &str) -> ApiError {
        match refusal {
            auth::Refusal::NotFound => ApiError::not_found(format!("there is no {what}")),
            auth::Refusal::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        ApiError::internal(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        (self.status, Json(body)).into_response()
    }
}

/// Runs a job against the store on a blocking thread, with a connection of its own.
pub async fn with_store<T: Send + 'static>(
    state: &SharedState,
    job: impl FnOnce(&mut Store, &Config) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let config = state.config();
    tokio::task::spawn_blocking(move || {
        let _scope = crate::store::BlockingScope::enter();
        crate::store::with_store(&config.store, true, |store: &mut Store| job(store, &config))
    })
    .await
    .map_err(ApiError::internal)?
}

/// The client's address, for the login limiter: the TCP peer, or, when the peer is one of
/// `[http] trusted_proxies`, the last address in `X-Forwarded-For` that is not a trusted proxy
/// (entries left of it are written by the client and may be forged).
pub struct ClientAddress(pub std::net::IpAddr);

impl FromRequestParts<SharedState> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| address.ip())
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        let trusted = state
            .config()
            .http
            .as_ref()
            .map(|http| http.trusted_proxies.clone())
            .unwrap_or_default();
        Ok(ClientAddress(client_address(
            peer,
            &parts.headers,
            &trusted,
        )))
    }
}

/// The client behind a chain of proxies: walking `X-Forwarded-For` from its right end (the
/// entry the nearest proxy wrote) while the hop is trusted. A value that is not an address
/// stops the walk at the last trusted hop, so a forged entry never names the client.
pub fn client_address(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> std::net::IpAddr {
    let canonical = |address: std::net::IpAddr| address.to_canonical();
    let is_trusted = |address: std::net::IpAddr| {
        trusted
            .iter()
            .any(|proxy| canonical(*proxy) == canonical(address))
    };
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        let Ok(address) = entry.parse::<std::net::IpAddr>() else {
            break;
        };
        client = address;
        if !is_trusted(address) {
            break;
        }
    }
    client
}

/// The OpenAPI document of `/api/v1`, embedded.
pub const OPENAPI: &str = include_str!("openapi.json");

fn router(state: SharedState, http: &HttpConfig) -> Router {
    use tower_http::set_header::SetResponseHeaderLayer;
    Router::new()
        .nest("/api/v1", api::routes())
        .route("/healthz", get(metrics::healthz))
        .route("/metrics", get(metrics::metrics))
        .merge(pages::routes())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            count_request,
        ))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            http.max_body_bytes,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            http.request_timeout,
        ))
        .layer(tower_http::compression::CompressionLayer::new())
        // Outside the limits and the timeout, so that their refusals of API requests are JSON too.
        .layer(axum::middleware::from_fn(api::json_errors))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                 form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        // Spans carry the method and path, never headers (tokens and cookies stay out of logs).
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Counts every request by method, route and status for `/metrics`.
async fn count_request(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    state
        .metrics
        .count(&method, &route, response.status().as_u16());
    response
}

/// A running server. Dropping it does not stop it; call [`Server::stop`].
pub struct Server {
    state: SharedState,
    handle: axum_server::Handle<SocketAddr>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds the address (so a port in use is an error now, not later) and serves on a runtime
    /// of its own thread.
    pub fn start(config: Arc<Config>, daemon: Option<DaemonLink>) -> Result<Server, HttpError> {
        let http = config.http.clone().ok_or(HttpError::NotConfigured)?;
        let users = auth::Users::load(&http)?;
        let listener =
            std::net::TcpListener::bind(http.listen).map_err(|source| HttpError::Bind {
                address: http.listen,
                source,
            })?;
        let local_address = listener.local_addr().map_err(|source| HttpError::Bind {
            address: http.listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| HttpError::Bind {
                address: http.listen,
                source,
            })?;
        let tls = match &http.tls {
            None => None,
            Some(files) => Some(load_tls(files)?),
        };
        let state = Arc::new(AppState {
            config: RwLock::new(Arc::clone(&config)),
            users: RwLock::new(Arc::new(users)),
            sessions: auth::Sessions::default(),
            limiter: auth::LoginLimiter::default(),
            metrics: metrics::HttpMetrics::default(),
            daemon,
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("funnelsync-http")
            .enable_all()
            .build()
            .map_err(HttpError::Runtime)?;
        let handle = axum_server::Handle::new();
        let app =
            router(Arc::clone(&state), &http).into_make_service_with_connect_info::<SocketAddr>();
        let server_handle = handle.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let thread = std::thread::Builder::new()
            .name("funnelsync-http".to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let result = match tls {
                        Some(tls) => match axum_server::from_tcp_rustls(listener, tls) {
                            Ok(server) => server.handle(server_handle).serve(app).await,
                            Err(error) => Err(error),
                        },
                        None => match axum_server::from_tcp(listener) {
                            Ok(server) => server.handle(server_handle).serve(app).await,
                            Err(error) => Err(error),
                        },
                    };
                    if let Err(error) = result {
                        error!("the HTTP server stopped: {error}");
                    }
                });
            })
            .map_err(HttpError::Runtime)?;
        info!(address = %local_address, "serving the API and the pages on {scheme}://{local_address}");
        Ok(Server {
            state,
            handle,
            thread: Some(thread),
        })
    }

    /// Takes a reloaded config: users, tokens, hidden fields, limits of new requests. A new
    /// `listen` address or TLS files need a restart.
    pub fn reload(&self, config: Arc<Config>) -> Result<(), HttpError> {
        let Some(http) = &config.http else {
            warn!("[http] was removed from the config; the server stops at the next restart");
            return Ok(());
        };
        let users = auth::Users::load(http)?;
        let old = self.state.http();
        if old.listen != http.listen || old.tls != http.tls {
            warn!("a new [http] listen address or TLS files take effect only after a restart");
        }
        *self
            .state
            .users
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(users);
        *self
            .state
            .config
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = config;
        Ok(())
    }

    /// Stops accepting, lets requests in progress finish (up to a few seconds), and waits.
    pub fn stop(mut self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(5)));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn load_tls(
    files: &crate::config::TlsFiles,
) -> Result<axum_server::tls_rustls::RustlsConfig, HttpError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_error = |source: std::io::Error| HttpError::Tls {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let invalid = |error: rustls::pki_types::pem::Error| {
        tls_error(std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    };
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(invalid)?
        .collect::<Result<_, _>>()
        .map_err(invalid)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(invalid)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(std::io::Error::new(std::io::ErrorKind::InvalidData, error)))?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|error| tls_error(std::io::Error::new(std::io::ErrorKind::InvalidData, error)))?;
    let mut server_config = server_config;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(
        Arc::new(server_config),
    ))
}

/// `funnelsync serve`: the API and the pages without watching files, until SIGTERM or SIGINT.
/// SIGHUP reloads the users.
pub fn serve(config: Config) -> Result<(), HttpError> {
    let config_path = config.path.clone();
    let server = Server::start(Arc::new(config), None)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HttpError::Runtime)?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            error!("cannot listen for signals");
            return;
        };
        crate::systemd::ready();
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => match Config::load(&config_path) {
                    Ok(new_config) => {
                        if let Err(error) = server.reload(Arc::new(new_config)) {
                            error!("cannot reload the users; still serving the old ones: {error}");
                        } else {
                            info!("config reloaded");
                        }
                    }
                    Err(error) => error!("the new config is not valid; still serving on the old one: {error}"),
                },
            }
        }
    });
    crate::systemd::stopping();
    server.stop();
    info!("funnelsync serve stopped");
    Ok(())
}
