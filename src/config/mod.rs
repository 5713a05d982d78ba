//! The configuration: one TOML file, read in two stages. [`RawConfig`] mirrors the file exactly
//! (serde, unknown keys rejected: [`raw`]); [`Config::from_raw`] validates it into a [`Config`]
//! with resolved paths, durations and funnel stages, collecting every problem instead of stopping
//! at the first ([`validate`]; a source's section in [`source`], `[http]` in [`http`]).
//!
//! This module owns the file's shape, its defaults and its error messages. It must not touch the
//! store or any spreadsheet; it only looks at the file system to resolve relative paths.

mod http;
mod raw;
mod source;
mod store_tls;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::deal::normalize_label;
use crate::workbook::Limits;

pub use http::{HttpConfig, Role, TlsFiles, TokenSource, DEFAULT_LISTEN};
use raw::locate_key;
use raw::RawConfig;
pub use source::{
    ConflictPolicy, DateOrder, HeaderRow, MaxDelete, RowRemoved, SourceConfig, SourcePath, View,
};
pub use store_tls::{read_root_certs, ConnectionUrl, StoreRootCerts, StoreSslMode};

/// The config path used when neither `--config` nor `FUNNELSYNC_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/funnelsync/funnelsync.toml";

/// One thing wrong with the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key the problem is about, as a path such as `sources[2].header_row`.
    pub key: String,
    /// The 1-based line in the file, where known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(line), false) => {
                write!(formatter, "line {line}: `{}`: {}", self.key, self.message)
            }
            (Some(line), true) => write!(formatter, "line {line}: {}", self.message),
            (None, _) => write!(formatter, "`{}`: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), format_problems(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

fn format_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// The validated config.

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from.
    pub path: PathBuf,
    pub store: StoreConfig,
    pub sources: Vec<SourceConfig>,
    pub stages: Stages,
    pub watch: WatchConfig,
    pub remind: Option<RemindConfig>,
    /// Owner names as written in sheets (folded with [`normalize_label`]) → email address.
    pub reps: BTreeMap<String, String>,
    pub smtp: Option<SmtpConfig>,
    pub report: Option<ReportConfig>,
    pub alerts: Option<AlertsConfig>,
    pub limits: Limits,
    /// `[http]`: the API and the pages; off when absent.
    pub http: Option<HttpConfig>,
    pub log_level: Option<String>,
}

/// Where problems that need a person go.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub to: String,
    /// At most one alert per file (and kind) this often.
    pub every: Duration,
}

/// When the daemon rewrites the report file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRefresh {
    AfterSync,
    Every(Duration),
}

#[derive(Debug, Clone)]
pub struct ReportConfig {
    pub path: PathBuf,
    pub refresh: ReportRefresh,
    /// How many days back the report's period starts.
    pub period_days: u32,
    /// The weekly digest to the manager: the weekday and the local time (in [remind]'s time
    /// zone, else UTC).
    pub weekly_digest: Option<(chrono::Weekday, chrono::NaiveTime)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    English,
    Chinese,
}

#[derive(Debug, Clone)]
pub struct RemindConfig {
    pub at: chrono::NaiveTime,
    pub timezone: chrono_tz::Tz,
    pub weekdays_only: bool,
    pub repeat_every_days: u32,
    pub escalate_after: u32,
    pub manager: Option<String>,
    pub fallback_to: Option<String>,
    pub language: Language,
    pub business_days: bool,
    pub holidays: Vec<chrono::NaiveDate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    None,
    StartTls,
    Tls,
}

#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    /// Where the password is read from when mail is sent: this file, else the
    /// `FUNNELSYNC_SMTP_PASSWORD` environment variable, else systemd's credential
    /// `$CREDENTIALS_DIRECTORY/smtp-password`. The password itself is never kept in the config.
    pub password_file: Option<PathBuf>,
    /// The sender, "Name <address>".
    pub from: String,
    pub timeout: Duration,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("from", &self.from)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Config {
    /// The time zone in which time stamps become days and the schedules run: `[remind]`'s, else
    /// UTC.
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.remind
            .as_ref()
            .map(|remind| remind.timezone)
            .unwrap_or(chrono_tz::UTC)
    }

    /// The email address for an owner as written in a sheet (case and spaces ignored).
    pub fn rep_address(&self, owner: &str) -> Option<&str> {
        self.reps.get(&normalize_label(owner)).map(String::as_str)
    }

    /// Whether a path is the funnel report file, which is never read as a source.
    pub fn is_report(&self, path: &Path) -> bool {
        self.report.as_ref().is_some_and(|report| {
            report.path == path
                || std::fs::canonicalize(path)
                    .ok()
                    .zip(std::fs::canonicalize(&report.path).ok())
                    .is_some_and(|(left, right)| left == right)
        })
    }

    /// What is valid but unsafe, for `check-config` to warn about: an SMTP password file that
    /// is missing or readable by others than its owner, and a login sent in clear.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for user in self.http.iter().flat_map(|http| &http.users) {
            if let TokenSource::File(path) = &user.token {
                warnings.extend(secret_file_warning(
                    &format!("http user \"{}\": token_file", user.name),
                    path,
                    "the server does not start until it can",
                ));
            }
        }
        let Some(smtp) = &self.smtp else {
            return warnings;
        };
        if let Some(path) = &smtp.password_file {
            warnings.extend(secret_file_warning(
                "smtp.password_file",
                path,
                "mail will fail until it can",
            ));
        }
        if smtp.username.is_some() && smtp.security == SmtpSecurity::None {
            warnings.push(
                "smtp: the login crosses the network in clear (security = \"none\", \
                 allow_plaintext_auth = true)"
                    .to_string(),
            );
        }
        warnings
    }
}

/// Where the store is and which site this process syncs files for.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub location: StoreLocation,
    /// The name of this daemon's share among those that use the same store (`[store] site`,
    /// default [`DEFAULT_SITE`]): its files' mirror and states are kept under it.
    pub site: String,
}

/// The site of a store whose config names none.
pub const DEFAULT_SITE: &str = "local";

#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// One SQLite file (`[store] path`).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`[store] url`), which several daemons may share.
    Postgres(PostgresConfig),
}

/// A PostgreSQL store: the connection URL (which may carry `sslmode`) and where its password is
/// read from. The password itself is never kept in the config.
#[derive(Clone, PartialEq)]
pub struct PostgresConfig {
    pub url: String,
    /// A file holding the password; else `FUNNELSYNC_STORE_PASSWORD`, else systemd's credential
    /// `$CREDENTIALS_DIRECTORY/store-password`.
    pub password_file: Option<PathBuf>,
}

/// Never prints a password a URL may carry.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresConfig")
            .field("url", &self.shown_url())
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl PostgresConfig {
    /// The URL with any password in it left out: for messages.
    pub fn shown_url(&self) -> String {
        shown_postgres_url(&self.url)
    }

    /// Whether the URL carries a password, in either form the driver takes
    /// (`postgresql://user:password@host/db` or `…?password=…`): a URL is shown in logs and
    /// messages, and a password in it would end up there too.
    pub fn holds_password(&self) -> bool {
        let parsed = self
            .url
            .parse::<postgres::Config>()
            .is_ok_and(|parsed| parsed.get_password().is_some());
        let (_, authority, _, query) = url_parts(&self.url);
        parsed
            || authority
                .rsplit_once('@')
                .is_some_and(|(credentials, _)| credentials.contains(':'))
            || query.is_some_and(|query| query.split('&').any(is_password_parameter))
    }
}

/// A PostgreSQL URL split into its scheme, authority (`user@host:port`), path and query, each
/// as written; the scheme is empty when there is none.
fn url_parts(url: &str) -> (&str, &str, &str, Option<&str>) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(slash) => before_query.split_at(slash),
        None => (before_query, ""),
    };
    (scheme, authority, path, query)
}

/// Whether a query parameter (`key=value`) of a URL is its password.
fn is_password_parameter(parameter: &str) -> bool {
    let key = parameter.split('=').next().unwrap_or("");
    percent_decoded(key).eq_ignore_ascii_case("password")
}

/// `text` with its `%XX` escapes decoded (an escape that is not one is kept as written).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = (bytes[index] == b'%')
            .then(|| text.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// A PostgreSQL URL rebuilt from its parts without its password: the user but not `:password`
/// before the host, every query parameter but `password`. Anything that is not a URL is not
/// shown at all, since it may be a connection string with a password anywhere in it.
pub fn shown_postgres_url(url: &str) -> String {
    let (scheme, authority, path, query) = url_parts(url);
    if scheme.is_empty() {
        return "(a connection string that is not a postgresql:// URL)".to_string();
    }
    let authority = match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or("");
            format!("{user}@{host}")
        }
        None => authority.to_string(),
    };
    let query = match query {
        Some(query) if query.split('&').any(is_password_parameter) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|parameter| !is_password_parameter(parameter))
                .collect();
            if kept.is_empty() {
                String::new()
            } else {
                format!("?{}", kept.join("&"))
            }
        }
        Some(query) => format!("?{query}"),
        None => String::new(),
    };
    format!("{scheme}://{authority}{path}{query}")
}

impl StoreConfig {
    /// A SQLite store at `path`, of the default site.
    pub fn sqlite(path: PathBuf) -> StoreConfig {
        StoreConfig {
            location: StoreLocation::Sqlite(path),
            site: DEFAULT_SITE.to_string(),
        }
    }

    /// The SQLite file, if the store is one.
    pub fn path(&self) -> Option<&Path> {
        match &self.location {
            StoreLocation::Sqlite(path) => Some(path),
            StoreLocation::Postgres(_) => None,
        }
    }

    /// The file, or the URL without its password: for messages.
    pub fn describe(&self) -> String {
        match &self.location {
            StoreLocation::Sqlite(path) => path.display().to_string(),
            StoreLocation::Postgres(postgres) => postgres.shown_url(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    Won,
    Lost,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub aliases: Vec<String>,
    pub probability: f64,
    pub stall_after_days: Option<u32>,
    pub terminal: Option<Terminal>,
}

/// The funnel, in order, with a lookup from any accepted spelling to the canonical stage.
#[derive(Debug, Clone)]
pub struct Stages {
    pub stages: Vec<Stage>,
    by_label: HashMap<String, usize>,
}

impl Stages {
    pub fn new(stages: Vec<Stage>) -> Stages {
        let mut by_label = HashMap::new();
        for (index, stage) in stages.iter().enumerate() {
            by_label
                .entry(normalize_label(&stage.name))
                .or_insert(index);
            for alias in &stage.aliases {
                by_label.entry(normalize_label(alias)).or_insert(index);
            }
        }
        Stages { stages, by_label }
    }

    /// The canonical stage for a name or alias as written in a sheet.
    pub fn resolve(&self, written: &str) -> Option<&Stage> {
        self.by_label
            .get(&normalize_label(written))
            .map(|index| &self.stages[*index])
    }

    pub fn first(&self) -> &Stage {
        &self.stages[0]
    }

    pub fn names(&self) -> Vec<&str> {
        self.stages
            .iter()
            .map(|stage| stage.name.as_str())
            .collect()
    }

    pub fn built_in() -> Stages {
        let stage = |name: &str,
                     aliases: &[&str],
                     probability: f64,
                     stall: Option<u32>,
                     terminal: Option<Terminal>| Stage {
            name: name.to_string(),
            aliases: aliases.iter().map(|alias| alias.to_string()).collect(),
            probability,
            stall_after_days: stall,
            terminal,
        };
        Stages::new(vec![
            stage(
                "Lead",
                &["Leads", "New", "潜在客户", "线索"],
                0.10,
                Some(7),
                None,
            ),
            stage(
                "Prospect",
                &["Prospects", "Qualified", "意向客户", "意向"],
                0.30,
                Some(10),
                None,
            ),
            stage(
                "Opportunity",
                &["Opportunities", "Proposal", "Negotiation", "机会", "商机"],
                0.60,
                Some(14),
                None,
            ),
            stage(
                "Won",
                &["Closed Won", "成交", "赢单"],
                1.0,
                None,
                Some(Terminal::Won),
            ),
            stage(
                "Lost",
                &["Closed Lost", "丢单", "失败"],
                0.0,
                None,
                Some(Terminal::Lost),
            ),
        ])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    Auto,
    Events,
    Poll,
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub mode: WatchMode,
    pub poll_interval: Duration,
    pub settle: Duration,
    /// Failed reads of one file before it is reported as an error and left alone until it changes.
    pub max_attempts: u32,
    /// Files synced at the same time.
    pub parallel: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            mode: WatchMode::Auto,
            poll_interval: Duration::from_secs(10),
            settle: Duration::from_secs(2),
            max_attempts: 5,
            parallel: 2,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_text(&text, path)
    }

    /// Validates the text of a config file that lives at `path` (relative paths in it are
    /// resolved against that file's folder).
    pub fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        };
        let (raw, mut problems) = RawConfig::parse_partial(text);
        let Some(raw) = raw else {
            return Err(invalid(problems));
        };
        let base = path
            .parent()
            .map(|parent| {
                if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        // A section that did not parse is missing from `raw`; do not also report it as missing.
        let store_unreadable = problems
            .iter()
            .any(|problem| problem.key.starts_with("store"));
        match Config::from_raw(raw, path, &base) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => {
                problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
                Err(invalid(problems))
            }
            Err(more) => {
                let located = more.into_iter().map(|mut problem| {
                    problem.line = problem.line.or_else(|| locate_key(text, &problem.key));
                    problem
                });
                problems.extend(
                    located.filter(|problem| !(store_unreadable && problem.key == "store")),
                );
                problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
                Err(invalid(problems))
            }
        }
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|source| source.name == name)
    }
}

/// A file holding a secret that cannot be read, or that others than the service user may read.
fn secret_file_warning(key: &str, path: &Path, consequence: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(error) => Some(format!(
            "{key}: {} cannot be read ({error}); {consequence}",
            path.display()
        )),
        Ok(metadata) if metadata.permissions().mode() & 0o077 != 0 => Some(format!(
            "{key}: {} is readable by {} (mode {:o}); make it readable by \
             the service user only: chmod 600 {}",
            path.display(),
            if metadata.permissions().mode() & 0o007 != 0 {
                "everyone"
            } else {
                "its group"
            },
            metadata.permissions().mode() & 0o777,
            path.display()
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::Field;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match Config::from_text(text, Path::new("/tmp/test.toml")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn a_shown_postgres_url_never_holds_its_password() {
        let shown = |url: &str| {
            let config = PostgresConfig {
                url: url.to_string(),
                password_file: None,
            };
            (config.shown_url(), config.holds_password())
        };
        assert_eq!(
            shown("postgresql://funnelsync@db.example:5433/crm?sslmode=require"),
            (
                "postgresql://funnelsync@db.example:5433/crm?sslmode=require".to_string(),
                false
            )
        );
        assert_eq!(
            shown("postgresql://funnelsync:hunter2@db.example/crm"),
            ("postgresql://funnelsync@db.example/crm".to_string(), true)
        );
        assert_eq!(
            shown("postgres://u@h/db?sslmode=require&password=hunter2&application_name=x"),
            (
                "postgres://u@h/db?sslmode=require&application_name=x".to_string(),
                true
            )
        );
        assert_eq!(
            shown("postgresql://u@h/db?%50ASSWORD=hunter2"),
            ("postgresql://u@h/db".to_string(), true)
        );
        let (text, holds) = shown("host=db.example user=u password=hunter2");
        assert!(!text.contains("hunter2") && holds, "{text}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let text =
            "[store]\npath = \"crm.db\"\n[[sources]]\nname = \"p\"\npath = \"sales/*.xlsx\"\n";
        let config =
            Config::from_text(text, Path::new("/etc/funnelsync/funnelsync.toml")).expect("valid");
        assert_eq!(
            config.store.path(),
            Some(Path::new("/etc/funnelsync/crm.db"))
        );
        assert_eq!(
            config.sources[0].path,
            SourcePath::Glob("/etc/funnelsync/sales/*.xlsx".to_string())
        );
        assert_eq!(config.sources[0].key_column, "CRM ID");
        assert_eq!(config.sources[0].match_on, vec![Field::Email]);
        assert_eq!(
            config.stages.names(),
            vec!["Lead", "Prospect", "Opportunity", "Won", "Lost"]
        );
        assert_eq!(
            config
                .stages
                .resolve(" 意向客户 ")
                .map(|stage| stage.name.as_str()),
            Some("Prospect")
        );
        assert_eq!(config.watch.poll_interval, Duration::from_secs(10));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[store]
path = "crm.db"

[[sources]]
name = "a"
path = "a.xlsx"
header_row = 0
on_row_removed = "shred"

[[sources]]
name = "b"
pathh = "b.xlsx"

[[stages]]
name = "Lead"
probability = 1.5

[watch]
poll_interval = "often"
"#;
        let found = problems(text);
        let keys: Vec<&str> = found.iter().map(|problem| problem.key.as_str()).collect();
        assert!(keys.contains(&"sources[2].pathh"), "{found:?}");
        assert_eq!(
            found
                .iter()
                .find(|problem| problem.key == "sources[2].pathh")
                .and_then(|problem| problem.line),
            Some(13)
        );
        // The unreadable source does not hide the problems of the sections that did read.
        assert!(keys.contains(&"sources[1].header_row"), "{found:?}");
        assert_eq!(
            found
                .iter()
                .find(|problem| problem.key == "sources[1].header_row")
                .and_then(|problem| problem.line),
            Some(8)
        );
        assert_eq!(
            found
                .iter()
                .find(|problem| problem.key == "watch.poll_interval")
                .and_then(|problem| problem.line),
            Some(20)
        );

        let fixed = text.replace("pathh", "path");
        let found = problems(&fixed);
        let keys: Vec<&str> = found.iter().map(|problem| problem.key.as_str()).collect();
        for expected in [
            "sources[1].header_row",
            "sources[1].on_row_removed",
            "stages[1].probability",
            "stages",
            "watch.poll_interval",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {found:?}");
        }
    }

    #[test]
    fn unknown_top_level_key_names_its_line() {
        let found = problems("[store]\npath = \"x.db\"\n\n[stor]\npath = \"y\"\n[[sources]]\nname = \"p\"\npath = \"p.txt\"\n");
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].key, "stor");
        assert_eq!(found[0].line, Some(4));
        assert_eq!(found[1].key, "sources[1].path");
        assert_eq!(found[1].line, Some(8));
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in ["config/funnelsync.example.toml", "config/demo.toml"] {
            let config =
                Config::load(&repo.join(name)).unwrap_or_else(|error| panic!("{name}: {error}"));
            assert!(!config.sources.is_empty(), "{name}");
        }
    }

    #[test]
    fn conflicting_column_aliases_are_errors() {
        let text = "[store]\npath = \"crm.db\"\n[[sources]]\nname = \"p\"\npath = \"a.csv\"\n[sources.columns]\ncompany = \"Name\"\ncontact = [\"Name\"]\n";
        let found = problems(text);
        assert!(
            found
                .iter()
                .any(|problem| problem.message.contains("also listed")),
            "{found:?}"
        );
    }

    #[test]
    fn configured_alias_is_taken_from_other_fields_defaults() {
        let text = "[store]\npath = \"crm.db\"\n[[sources]]\nname = \"p\"\npath = \"a.csv\"\n[sources.columns]\ncompany = \"Name\"\n";
        let config = Config::from_text(text, Path::new("/tmp/c.toml")).expect("valid");
        let source = &config.sources[0];
        assert_eq!(source.columns[&Field::Company], vec!["name".to_string()]);
        assert!(!source.columns[&Field::Contact].contains(&"name".to_string()));
    }
}
