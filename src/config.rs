//! The configuration: one TOML file, read in two stages. [`RawConfig`] mirrors the file exactly
//! (serde, unknown keys rejected); [`Config::from_raw`] validates it into a [`Config`] with resolved
//! paths, durations and funnel stages, collecting every problem instead of stopping at the first.
//!
//! This module owns the file's shape, its defaults and its error messages. It must not touch the
//! store or any spreadsheet; it only looks at the file system to resolve relative paths.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::deal::{normalize_label, Field};
use crate::workbook::{CsvEncoding, Limits};

mod http;
pub use http::{parse_sha256, HttpConfig, HttpUser, Role, TlsFiles, TokenSource, DEFAULT_LISTEN};

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

// ---------------------------------------------------------------------------------------------
// Stage one: the file as written.

/// The top level of the file. Each section is kept as a spanned TOML value so that every section
/// (and every `[[sources]]` entry) is checked on its own and all their problems are reported.
#[derive(Debug, Deserialize)]
struct RawTopLevel {
    store: Option<Spanned<toml::Value>>,
    #[serde(default)]
    sources: Vec<Spanned<toml::Value>>,
    stages: Option<Vec<Spanned<toml::Value>>>,
    watch: Option<Spanned<toml::Value>>,
    remind: Option<Spanned<toml::Value>>,
    reps: Option<Spanned<toml::Value>>,
    smtp: Option<Spanned<toml::Value>>,
    report: Option<Spanned<toml::Value>>,
    alerts: Option<Spanned<toml::Value>>,
    limits: Option<Spanned<toml::Value>>,
    http: Option<Spanned<toml::Value>>,
    log_level: Option<Spanned<String>>,
    /// Keys funnelsync does not know. They are errors, collected here (rather than by serde's
    /// `deny_unknown_fields`, which stops at the first) so all of them are reported at once.
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

const TOP_LEVEL_KEYS: &str =
    "store, sources, stages, watch, remind, reps, smtp, report, alerts, limits, http, log_level";

/// The whole file, as written, once every section has been read.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub store: Option<RawStore>,
    pub sources: Vec<RawSource>,
    /// How many `[[sources]]` the file has, read or not.
    pub n_sources_written: usize,
    pub stages: Option<Vec<RawStage>>,
    pub watch: Option<RawWatch>,
    pub remind: Option<RawRemind>,
    pub reps: Option<BTreeMap<String, String>>,
    pub smtp: Option<RawSmtp>,
    pub report: Option<RawReport>,
    pub alerts: Option<RawAlerts>,
    pub limits: Option<RawLimits>,
    pub http: Option<RawHttp>,
    pub log_level: Option<String>,
}

/// `[http]`: the API and the pages. Its `[[http.users]]` are read one by one (see
/// [`RawConfig::parse_partial`]) so that every user's problems are reported.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub language: Option<String>,
    pub request_timeout: Option<String>,
    pub max_body_kb: Option<i64>,
    pub session_ttl: Option<String>,
    pub secure_cookie: Option<bool>,
    pub hidden_fields: Option<BTreeMap<String, Vec<String>>>,
    #[serde(skip)]
    pub users: Vec<RawHttpUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpUser {
    /// 1-based position among the file's `[[http.users]]`, for messages.
    #[serde(skip)]
    pub position: usize,
    pub name: String,
    pub role: String,
    pub rep: Option<String>,
    pub token_sha256: Option<String>,
    pub token_file: Option<String>,
    pub hidden_fields: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub to: String,
    pub every: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_file_mb: Option<i64>,
    pub max_unzipped_mb: Option<i64>,
    pub max_rows: Option<i64>,
    pub max_columns: Option<i64>,
    pub max_cell_chars: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    pub path: String,
    pub refresh: Option<String>,
    pub period_days: Option<i64>,
    pub weekly_digest: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemind {
    pub at: Option<String>,
    pub timezone: Option<String>,
    pub weekdays_only: Option<bool>,
    pub repeat_every_days: Option<i64>,
    pub escalate_after: Option<i64>,
    pub manager: Option<String>,
    pub fallback_to: Option<String>,
    pub language: Option<String>,
    pub business_days: Option<bool>,
    pub holidays: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: String,
    pub port: Option<i64>,
    pub security: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub from: String,
    pub timeout: Option<String>,
    pub allow_plaintext_auth: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// 1-based position among the file's `[[sources]]`, for messages.
    #[serde(skip)]
    pub position: usize,
    pub name: String,
    pub path: String,
    pub sheet: Option<String>,
    pub header_row: Option<RawHeaderRow>,
    pub key_column: Option<String>,
    pub match_on: Option<Vec<String>>,
    pub on_row_removed: Option<String>,
    pub date_order: Option<String>,
    pub encoding: Option<String>,
    pub columns: Option<BTreeMap<String, OneOrMany>>,
    pub write_back: Option<bool>,
    pub max_delete: Option<RawMaxDelete>,
    pub conflict: Option<String>,
    pub filter: Option<BTreeMap<String, OneOrMany>>,
    pub view: Option<String>,
    pub backups: Option<i64>,
    pub follow_symlinks: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawHeaderRow {
    Number(i64),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawMaxDelete {
    Count(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    /// 1-based position among the file's `[[stages]]`, for messages.
    #[serde(skip)]
    pub position: usize,
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub probability: Option<f64>,
    pub stall_after_days: Option<i64>,
    pub terminal: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    pub mode: Option<String>,
    pub poll_interval: Option<String>,
    pub settle: Option<String>,
    pub max_attempts: Option<i64>,
    pub parallel: Option<i64>,
}

impl RawConfig {
    /// Parses what can be parsed: a file with a syntax error gives `None`; otherwise every section
    /// that reads cleanly is kept, so that stage two can still check it, and the problems of the
    /// others are returned beside it.
    pub fn parse_partial(text: &str) -> (Option<RawConfig>, Vec<ConfigProblem>) {
        let top: RawTopLevel = match toml::from_str(text) {
            Ok(top) => top,
            Err(error) => {
                let problem = ConfigProblem {
                    key: unknown_field_name(error.message()).unwrap_or_default(),
                    line: error.span().map(|span| line_of(text, span.start)),
                    message: error.message().trim().trim_end_matches('.').to_string(),
                };
                return (None, vec![problem]);
            }
        };
        let mut problems = Vec::new();
        for key in top.unknown.keys() {
            let line = text.lines().position(|line| {
                let line = line.trim();
                [format!("[{key}]"), format!("[[{key}]]")].contains(&line.to_string())
                    || line.starts_with(&format!("[{key}."))
                    || line
                        .strip_prefix(key.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            problems.push(ConfigProblem {
                key: key.clone(),
                line: line.map(|line_idx| line_idx + 1),
                message: format!("unknown key `{key}`, expected one of {TOP_LEVEL_KEYS}"),
            });
        }
        let mut raw = RawConfig {
            log_level: top.log_level.map(Spanned::into_inner),
            ..RawConfig::default()
        };
        raw.store = read_section(text, "store", top.store, &mut problems);
        raw.watch = read_section(text, "watch", top.watch, &mut problems);
        raw.remind = read_section(text, "remind", top.remind, &mut problems);
        raw.reps = read_section(text, "reps", top.reps, &mut problems);
        raw.smtp = read_section(text, "smtp", top.smtp, &mut problems);
        raw.report = read_section(text, "report", top.report, &mut problems);
        raw.alerts = read_section(text, "alerts", top.alerts, &mut problems);
        raw.limits = read_section(text, "limits", top.limits, &mut problems);
        raw.http = read_http(text, top.http, &mut problems);
        raw.n_sources_written = top.sources.len();
        for (index, source) in top.sources.into_iter().enumerate() {
            let key = format!("sources[{}]", index + 1);
            // Unknown keys are reported one by one, each at its line, and set aside, so that the
            // source's other problems are still found.
            let source = set_aside_unknown_keys(text, &key, source, SOURCE_KEYS, &mut problems);
            if let Some(mut source) =
                read_section::<RawSource>(text, &key, Some(source), &mut problems)
            {
                source.position = index + 1;
                raw.sources.push(source);
            }
        }
        if let Some(stages) = top.stages {
            let mut read = Vec::new();
            for (index, stage) in stages.into_iter().enumerate() {
                if let Some(mut stage) = read_section::<RawStage>(
                    text,
                    &format!("stages[{}]", index + 1),
                    Some(stage),
                    &mut problems,
                ) {
                    stage.position = index + 1;
                    read.push(stage);
                }
            }
            raw.stages = Some(read);
        }
        (Some(raw), problems)
    }
}

/// The keys a `[[sources]]` entry may have.
const SOURCE_KEYS: &[&str] = &[
    "name",
    "path",
    "sheet",
    "header_row",
    "key_column",
    "match_on",
    "on_row_removed",
    "date_order",
    "encoding",
    "columns",
    "write_back",
    "max_delete",
    "conflict",
    "filter",
    "view",
    "backups",
    "follow_symlinks",
];

/// Reports every key of a table section that is not one of `known` (each at its own line) and
/// returns the section without them.
fn set_aside_unknown_keys(
    text: &str,
    key: &str,
    value: Spanned<toml::Value>,
    known: &[&str],
    problems: &mut Vec<ConfigProblem>,
) -> Spanned<toml::Value> {
    let span = value.span();
    let line = line_of(text, span.start);
    let mut inner = value.into_inner();
    if let toml::Value::Table(table) = &mut inner {
        let unknown: Vec<String> = table
            .keys()
            .filter(|name| !known.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in unknown {
            table.remove(&name);
            problems.push(ConfigProblem {
                key: format!("{key}.{name}"),
                line: Some(line_of_key(text, line, &name).unwrap_or(line)),
                message: format!(
                    "unknown field `{name}`, expected one of {}",
                    known.join(", ")
                ),
            });
        }
    }
    Spanned::new(span, inner)
}

/// `[http]` without its users, then each `[[http.users]]` entry on its own.
fn read_http(
    text: &str,
    value: Option<Spanned<toml::Value>>,
    problems: &mut Vec<ConfigProblem>,
) -> Option<RawHttp> {
    let value = value?;
    let span = value.span();
    let mut inner = value.into_inner();
    let users = match inner.as_table_mut().and_then(|table| table.remove("users")) {
        Some(toml::Value::Array(users)) => users,
        Some(_) => {
            problems.push(ConfigProblem {
                key: "http.users".to_string(),
                line: locate_key(text, "http.users"),
                message: "must be a list of [[http.users]] tables".to_string(),
            });
            Vec::new()
        }
        None => Vec::new(),
    };
    let mut http = read_section::<RawHttp>(text, "http", Some(Spanned::new(span, inner)), problems);
    for (index, user) in users.into_iter().enumerate() {
        let key = format!("http.users[{}]", index + 1);
        match user.try_into::<RawHttpUser>() {
            Ok(mut user) => {
                user.position = index + 1;
                if let Some(http) = http.as_mut() {
                    http.users.push(user);
                }
            }
            Err(error) => {
                let message = error.message().trim_end_matches('.').to_string();
                let key = unknown_field_name(&message)
                    .map(|inner| format!("{key}.{inner}"))
                    .unwrap_or(key);
                problems.push(ConfigProblem {
                    line: locate_key(text, &key),
                    key,
                    message,
                });
            }
        }
    }
    http
}

fn read_section<T: serde::de::DeserializeOwned>(
    text: &str,
    key: &str,
    value: Option<Spanned<toml::Value>>,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    let value = value?;
    let line = line_of(text, value.span().start);
    match value.into_inner().try_into::<T>() {
        Ok(section) => Some(section),
        Err(error) => {
            let message = error.message().trim_end_matches('.').to_string();
            // Name the offending key inside the section where serde tells it.
            let inner = unknown_field_name(&message);
            // Point at the key's own line when it can be found below the section's start.
            let line = inner
                .as_deref()
                .and_then(|inner| line_of_key(text, line, inner))
                .unwrap_or(line);
            let inner_key = inner
                .map(|inner| format!("{key}.{inner}"))
                .unwrap_or_else(|| key.to_string());
            problems.push(ConfigProblem {
                key: inner_key,
                line: Some(line),
                message,
            });
            None
        }
    }
}

/// The line of a validated key such as `sources[2].header_row` or `watch.settle`: the line that
/// assigns it inside its section, else the section's header line.
fn locate_key(text: &str, key: &str) -> Option<usize> {
    // A key of a nested array of tables (`http.users[2].role`) is under the second
    // `[[http.users]]`.
    let nested = key.split_once('.').and_then(|(section, rest)| {
        let (sub, after) = rest.split_once('[')?;
        if sub.contains('.') {
            return None;
        }
        let (index, field) = after.split_once(']')?;
        Some((
            format!("{section}.{sub}[{index}]"),
            field.trim_start_matches('.').to_string(),
        ))
    });
    let (section, rest) = match &nested {
        Some((section, rest)) => (section.as_str(), rest.as_str()),
        None => key.split_once('.').unwrap_or((key, "")),
    };
    let (name, index) = match section.split_once('[') {
        Some((name, index)) => (name, index.trim_end_matches(']').parse::<usize>().ok()?),
        None => (section, 1),
    };
    let headers = [format!("[[{name}]]"), format!("[{name}]")];
    let header_line = text
        .lines()
        .enumerate()
        .filter(|(_, line)| headers.iter().any(|header| line.trim() == header.as_str()))
        .nth(index - 1)
        .map(|(line_idx, _)| line_idx + 1)?;
    let field = rest.rsplit('.').next().unwrap_or("");
    if field.is_empty() {
        return Some(header_line);
    }
    let subtable = format!("[{name}.");
    let end_line = text
        .lines()
        .enumerate()
        .skip(header_line)
        .find(|(_, line)| {
            line.trim_start().starts_with('[') && !line.trim_start().starts_with(&subtable)
        })
        .map(|(line_idx, _)| line_idx + 1)
        .unwrap_or(usize::MAX);
    // A key inside an inline table (`filter = { stag = "x" }`) is on the line of its parent.
    let parent = rest.rsplit('.').nth(1);
    let in_inline_table = || {
        let parent = parent?;
        text.lines()
            .enumerate()
            .skip(header_line)
            .take(end_line.saturating_sub(header_line + 1))
            .find(|(_, line)| {
                let line = line.trim_start();
                line.strip_prefix(parent)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
                    && line.contains(field)
            })
            .map(|(line_idx, _)| line_idx + 1)
    };
    line_of_key(text, header_line, field)
        .filter(|line| *line < end_line)
        .or_else(in_inline_table)
        .or(Some(header_line))
}

/// The first line at or after `from_line` that assigns `key` (`key = …`).
fn line_of_key(text: &str, from_line: usize, key: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from_line.saturating_sub(1))
        .find_map(|(index, line)| {
            let rest = line.trim_start().strip_prefix(key)?;
            rest.trim_start().starts_with('=').then_some(index + 1)
        })
}

fn unknown_field_name(message: &str) -> Option<String> {
    for prefix in ["unknown field `", "missing field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.split('`').next().map(str::to_string);
        }
    }
    None
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|byte| **byte == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------------
// Stage two: the validated config.

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

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRow {
    Auto,
    /// A 1-based row number, as Excel shows it.
    Fixed(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowRemoved {
    Archive,
    Delete,
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateOrder {
    YearMonthDay,
    DayMonthYear,
    MonthDayYear,
}

/// Where a source's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourcePath {
    File(PathBuf),
    Folder(PathBuf),
    Glob(String),
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub path: SourcePath,
    pub sheet: Option<String>,
    pub header_row: HeaderRow,
    pub key_column: String,
    pub match_on: Vec<Field>,
    pub on_row_removed: RowRemoved,
    pub date_order: DateOrder,
    pub encoding: CsvEncoding,
    /// Accepted header texts per field, already normalised with [`normalize_label`].
    pub columns: BTreeMap<Field, Vec<String>>,
    /// Whether store changes are written back into the source's .xlsx/.xlsm/.csv files.
    pub write_back: bool,
    pub conflict: ConflictPolicy,
    /// The deals the source's files show: every listed field must hold one of the listed values
    /// (compared with [`normalize_label`]; stages by canonical name). Empty: every live deal. A new
    /// row takes the first listed value of each field it leaves empty.
    pub filter: BTreeMap<Field, Vec<String>>,
    /// Which deals a file of this source shows: its own rows' deals, or every live deal the
    /// filter lets through.
    pub view: View,
    /// How many previous versions of a file to keep in `.funnelsync/backups/` beside it.
    pub backups: usize,
    /// The most rows one sync of a file may archive or delete before it is held.
    pub max_delete: MaxDelete,
    /// Whether a symbolic link in the source's folder is read as a source, when the file it
    /// points to lies inside that folder. Off by default: a link is never a source. A followed
    /// link is read-only (write-back never writes through or replaces a link).
    pub follow_symlinks: bool,
}

/// Which deals a source's files show (and so which store changes are written into them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The deals whose rows the file holds (rows added to it included): a file receives changes
    /// to those deals from anywhere, and no deal it never held. The default without a filter.
    Rows,
    /// Every live deal the source's filter lets through (all of them without one): new deals are
    /// added to the file. The default with a filter; `view = "all"` for a master file.
    All,
}

/// The mass-delete guard's limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxDelete {
    /// A share of the rows the file held at its last sync.
    Share(f64),
    Count(u64),
}

impl MaxDelete {
    /// Whether removing `n_removed` of `n_rows` rows goes past the limit.
    pub fn exceeded(self, n_removed: usize, n_rows: usize) -> bool {
        match self {
            MaxDelete::Share(share) => n_removed > 0 && n_removed as f64 > share * n_rows as f64,
            MaxDelete::Count(count) => n_removed as u64 > count,
        }
    }
}

impl SourceConfig {
    /// Whether a deal with these fields belongs in this source's files.
    pub fn filter_matches(&self, fields: &crate::deal::FieldMap) -> bool {
        self.filter.iter().all(|(field, accepted)| {
            fields
                .get(field)
                .map(|value| normalize_label(&value.to_string()))
                .is_some_and(|value| {
                    accepted
                        .iter()
                        .any(|accepted| normalize_label(accepted) == value)
                })
        })
    }
}

/// Who wins when the sheet and the store changed the same field to different values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// The store's value wins (default).
    Store,
    /// The sheet's value wins.
    Sheet,
    /// The later of the file's modification time and the deal's `updated_at` wins.
    Newest,
}

impl ConflictPolicy {
    pub fn name(self) -> &'static str {
        match self {
            ConflictPolicy::Store => "store",
            ConflictPolicy::Sheet => "sheet",
            ConflictPolicy::Newest => "newest",
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
            Ok(_) => Err(invalid(problems)),
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

    pub fn from_raw(
        raw: RawConfig,
        path: &Path,
        base: &Path,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem {
                key: key.to_string(),
                line: None,
                message,
            })
        };

        let store = match raw.store {
            Some(store) if store.path.trim().is_empty() => {
                problem("store.path", "must name a SQLite file".to_string());
                None
            }
            Some(store) => Some(StoreConfig {
                path: resolve(base, &store.path),
            }),
            None => {
                problem(
                    "store",
                    "is missing: add a [store] section with `path = \"…/crm.db\"`".to_string(),
                );
                None
            }
        };

        let stages = match raw.stages {
            None => Stages::built_in(),
            Some(raw_stages) => validate_stages(raw_stages, &mut problem),
        };

        if raw.n_sources_written == 0 {
            problem(
                "sources",
                "no [[sources]] given: add at least one spreadsheet to sync".to_string(),
            );
        }
        let mut sources = Vec::new();
        let mut seen_names: HashMap<String, usize> = HashMap::new();
        for raw_source in raw.sources {
            let key = format!("sources[{}]", raw_source.position);
            if let Some(previous) = seen_names.insert(raw_source.name.clone(), raw_source.position)
            {
                problem(
                    &format!("{key}.name"),
                    format!(
                        "\"{}\" is already the name of sources[{previous}]",
                        raw_source.name
                    ),
                );
            }
            if let Some(source) = validate_source(raw_source, &key, base, &stages, &mut problem) {
                sources.push(source);
            }
        }

        let watch = validate_watch(raw.watch, &mut problem);
        let mut reps = BTreeMap::new();
        for (owner, address) in raw.reps.unwrap_or_default() {
            if address.parse::<lettre::Address>().is_err() {
                problem(
                    &format!("reps.{owner}"),
                    format!("\"{address}\" is not an email address"),
                );
            }
            reps.insert(normalize_label(&owner), address.trim().to_string());
        }
        let smtp = raw
            .smtp
            .and_then(|smtp| validate_smtp(smtp, base, &mut problem));
        let remind = raw
            .remind
            .and_then(|remind| validate_remind(remind, &mut problem));
        let report = raw
            .report
            .and_then(|report| validate_report(report, base, &mut problem));
        let alerts = raw.alerts.and_then(|alerts| {
            let to = check_address("alerts.to", &alerts.to, &mut problem)?;
            let every = match alerts.every {
                None => Duration::from_secs(3600),
                Some(written) => {
                    parse_duration("alerts.every", &written, MAX_ALERT_EVERY, &mut problem)?
                }
            };
            Some(AlertsConfig { to, every })
        });
        if alerts.is_some() && smtp.is_none() {
            problem(
                "alerts",
                "[alerts] needs an [smtp] section to send mail".to_string(),
            );
        }
        let mut limits = Limits::default();
        if let Some(raw_limits) = raw.limits {
            let mut positive = |key: &str, value: Option<i64>| -> Option<u64> {
                let value = value?;
                match u64::try_from(value) {
                    Ok(value) if value >= 1 => Some(value),
                    _ => {
                        problem(key, format!("{value} must be a whole number of at least 1"));
                        None
                    }
                }
            };
            if let Some(megabytes) = positive("limits.max_file_mb", raw_limits.max_file_mb) {
                limits.max_file_bytes = megabytes.saturating_mul(1 << 20);
            }
            if let Some(megabytes) = positive("limits.max_unzipped_mb", raw_limits.max_unzipped_mb)
            {
                limits.max_unzipped_bytes = megabytes.saturating_mul(1 << 20);
            }
            if let Some(rows) = positive("limits.max_rows", raw_limits.max_rows) {
                limits.max_rows = rows as usize;
            }
            if let Some(columns) = positive("limits.max_columns", raw_limits.max_columns) {
                limits.max_columns = columns as usize;
            }
            if let Some(chars) = positive("limits.max_cell_chars", raw_limits.max_cell_chars) {
                limits.max_cell_chars = chars as usize;
            }
        }
        if report
            .as_ref()
            .is_some_and(|report| report.weekly_digest.is_some())
        {
            if smtp.is_none() {
                problem(
                    "report.weekly_digest",
                    "needs an [smtp] section to send mail".to_string(),
                );
            }
            if remind
                .as_ref()
                .and_then(|remind| remind.manager.as_ref())
                .is_none()
            {
                problem(
                    "report.weekly_digest",
                    "is sent to the manager: set `manager` in [remind]".to_string(),
                );
            }
        }
        if remind.is_some() && smtp.is_none() {
            problem(
                "smtp",
                "[remind] needs an [smtp] section to send mail".to_string(),
            );
        }

        let http = raw
            .http
            .and_then(|http| http::validate_http(http, base, &mut problem));

        let log_level = raw.log_level;
        if let Some(level) = &log_level {
            if tracing_subscriber::EnvFilter::try_new(level).is_err() {
                problem(
                    "log_level",
                    format!("\"{level}\" is not a log level (error, warn, info, debug, trace)"),
                );
            }
        }

        match (store, problems.is_empty()) {
            (Some(store), true) => Ok(Config {
                path: path.to_path_buf(),
                store,
                sources,
                stages,
                watch,
                remind,
                reps,
                smtp,
                report,
                alerts,
                limits,
                http,
                log_level,
            }),
            _ => Err(problems),
        }
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|source| source.name == name)
    }
}

/// A path from the file, resolved against the config's folder and written without `.` and `..`
/// (`config/../target/demo/crm.db` is `target/demo/crm.db`), as messages show it.
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

fn resolve(base: &Path, written: &str) -> PathBuf {
    let path = Path::new(written);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let mut normal = PathBuf::new();
    for component in joined.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !normal.pop() {
                    normal.push(component);
                }
            }
            other => normal.push(other),
        }
    }
    normal
}

/// The longest value each duration key accepts: far beyond any sensible setting, and short
/// enough that no clock arithmetic in the daemon can overflow with it.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_SETTLE: Duration = Duration::from_secs(3600);
pub const MAX_ALERT_EVERY: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MAX_REPORT_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);
pub const MAX_SMTP_TIMEOUT: Duration = Duration::from_secs(600);

/// A duration of at most `longest`.
fn parse_duration(
    key: &str,
    written: &str,
    longest: Duration,
    problem: &mut impl FnMut(&str, String),
) -> Option<Duration> {
    match humantime::parse_duration(written) {
        Ok(duration) if duration > longest => {
            problem(
                key,
                format!(
                    "\"{written}\" is too long: at most \"{}\"",
                    humantime::format_duration(longest)
                ),
            );
            None
        }
        Ok(duration) => Some(duration),
        Err(error) => {
            problem(
                key,
                format!("\"{written}\" is not a duration like \"10s\" or \"2m\" ({error})"),
            );
            None
        }
    }
}

fn validate_watch(raw: Option<RawWatch>, problem: &mut impl FnMut(&str, String)) -> WatchConfig {
    let mut watch = WatchConfig::default();
    let Some(raw) = raw else { return watch };
    if let Some(mode) = raw.mode {
        match mode.as_str() {
            "auto" => watch.mode = WatchMode::Auto,
            "events" => watch.mode = WatchMode::Events,
            "poll" => watch.mode = WatchMode::Poll,
            other => problem(
                "watch.mode",
                format!("\"{other}\" is not one of auto, events, poll"),
            ),
        }
    }
    if let Some(written) = raw.poll_interval {
        if let Some(duration) =
            parse_duration("watch.poll_interval", &written, MAX_POLL_INTERVAL, problem)
        {
            if duration < Duration::from_millis(100) {
                problem(
                    "watch.poll_interval",
                    format!("\"{written}\" is too short: use at least 100ms"),
                );
            } else {
                watch.poll_interval = duration;
            }
        }
    }
    if let Some(written) = raw.settle {
        if let Some(duration) = parse_duration("watch.settle", &written, MAX_SETTLE, problem) {
            watch.settle = duration;
        }
    }
    if let Some(attempts) = raw.max_attempts {
        match u32::try_from(attempts) {
            Ok(attempts) if attempts >= 1 => watch.max_attempts = attempts,
            _ => problem(
                "watch.max_attempts",
                format!("{attempts} must be a whole number of at least 1"),
            ),
        }
    }
    if let Some(parallel) = raw.parallel {
        match usize::try_from(parallel) {
            Ok(parallel) if (1..=64).contains(&parallel) => watch.parallel = parallel,
            _ => problem(
                "watch.parallel",
                format!("{parallel} must be between 1 and 64"),
            ),
        }
    }
    watch
}

fn check_address(
    key: &str,
    written: &str,
    problem: &mut impl FnMut(&str, String),
) -> Option<String> {
    match written.trim().parse::<lettre::Address>() {
        Ok(_) => Some(written.trim().to_string()),
        Err(_) => {
            problem(key, format!("\"{written}\" is not an email address"));
            None
        }
    }
}

fn validate_remind(raw: RawRemind, problem: &mut impl FnMut(&str, String)) -> Option<RemindConfig> {
    let mut ok = true;
    let mut fail = |key: &str, message: String| {
        problem(key, message);
        ok = false;
    };
    let at_text = raw.at.unwrap_or_else(|| "09:00".to_string());
    let at = chrono::NaiveTime::parse_from_str(&at_text, "%H:%M")
        .or_else(|_| chrono::NaiveTime::parse_from_str(&at_text, "%H:%M:%S"))
        .unwrap_or_else(|_| {
            fail(
                "remind.at",
                format!("\"{at_text}\" is not a time of day like \"09:00\""),
            );
            chrono::NaiveTime::MIN
        });
    let timezone_text = raw.timezone.unwrap_or_else(|| "UTC".to_string());
    let timezone = timezone_text.parse::<chrono_tz::Tz>().unwrap_or_else(|_| {
        fail(
            "remind.timezone",
            format!("\"{timezone_text}\" is not an IANA time zone such as \"Asia/Shanghai\""),
        );
        chrono_tz::UTC
    });
    let positive = |key: &str,
                    value: Option<i64>,
                    default: u32,
                    fail: &mut dyn FnMut(&str, String)| match value {
        None => default,
        Some(value) => match u32::try_from(value) {
            Ok(value) if value >= 1 => value,
            _ => {
                fail(key, format!("{value} must be a whole number of at least 1"));
                default
            }
        },
    };
    let repeat_every_days = positive(
        "remind.repeat_every_days",
        raw.repeat_every_days,
        2,
        &mut fail,
    );
    let escalate_after = positive("remind.escalate_after", raw.escalate_after, 3, &mut fail);
    let mut address = |key: &str, written: Option<String>| {
        written.and_then(|written| {
            check_address(key, &written, &mut |key, message| fail(key, message))
        })
    };
    let manager = address("remind.manager", raw.manager);
    let fallback_to = address("remind.fallback_to", raw.fallback_to);
    let language = match raw.language.as_deref() {
        None | Some("en") => Language::English,
        Some("zh") => Language::Chinese,
        Some(other) => {
            fail(
                "remind.language",
                format!("\"{other}\" is not one of en, zh"),
            );
            Language::English
        }
    };
    let mut holidays = Vec::new();
    for day in raw.holidays.unwrap_or_default() {
        match chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d") {
            Ok(day) => holidays.push(day),
            Err(_) => fail(
                "remind.holidays",
                format!("\"{day}\" is not a date like \"2026-10-01\""),
            ),
        }
    }
    let remind = RemindConfig {
        at,
        timezone,
        weekdays_only: raw.weekdays_only.unwrap_or(true),
        repeat_every_days,
        escalate_after,
        manager,
        fallback_to,
        language,
        business_days: raw.business_days.unwrap_or(false),
        holidays,
    };
    ok.then_some(remind)
}

fn validate_report(
    raw: RawReport,
    base: &Path,
    problem: &mut impl FnMut(&str, String),
) -> Option<ReportConfig> {
    let mut ok = true;
    let mut fail = |key: &str, message: String| {
        problem(key, message);
        ok = false;
    };
    let path = resolve(base, &raw.path);
    if path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
        != Some("xlsx")
    {
        fail(
            "report.path",
            format!("\"{}\" must be an .xlsx file", raw.path),
        );
    }
    let refresh = match raw.refresh.as_deref() {
        None | Some("after-sync") => ReportRefresh::AfterSync,
        Some(written) => match humantime::parse_duration(written) {
            Ok(every) if every >= Duration::from_secs(10) && every <= MAX_REPORT_REFRESH => {
                ReportRefresh::Every(every)
            }
            _ => {
                fail(
                    "report.refresh",
                    format!(
                        "\"{written}\" must be \"after-sync\" or an interval such as \"1h\" (at least 10s, at most \"{}\")",
                        humantime::format_duration(MAX_REPORT_REFRESH)
                    ),
                );
                ReportRefresh::AfterSync
            }
        },
    };
    let period_days = match raw.period_days {
        None => 90,
        Some(days) => match u32::try_from(days) {
            Ok(days) if (1..=3650).contains(&days) => days,
            _ => {
                fail(
                    "report.period_days",
                    format!("{days} must be between 1 and 3650"),
                );
                90
            }
        },
    };
    let weekly_digest = raw.weekly_digest.and_then(|written| {
        let mut parts = written.split_whitespace();
        let weekday = parts
            .next()
            .and_then(|day| day.parse::<chrono::Weekday>().ok());
        let time = parts
            .next()
            .and_then(|time| chrono::NaiveTime::parse_from_str(time, "%H:%M").ok());
        match (weekday, time, parts.next()) {
            (Some(weekday), Some(time), None) => Some((weekday, time)),
            _ => {
                fail(
                    "report.weekly_digest",
                    format!("\"{written}\" must be a weekday and a time such as \"mon 08:30\""),
                );
                None
            }
        }
    });
    let report = ReportConfig {
        path,
        refresh,
        period_days,
        weekly_digest,
    };
    ok.then_some(report)
}

fn validate_smtp(
    raw: RawSmtp,
    base: &Path,
    problem: &mut impl FnMut(&str, String),
) -> Option<SmtpConfig> {
    let mut ok = true;
    let mut fail = |key: &str, message: String| {
        problem(key, message);
        ok = false;
    };
    if raw.host.trim().is_empty() {
        fail("smtp.host", "must name the mail server".to_string());
    }
    let security = match raw.security.as_deref() {
        None | Some("starttls") => SmtpSecurity::StartTls,
        Some("tls") => SmtpSecurity::Tls,
        Some("none") => SmtpSecurity::None,
        Some(other) => {
            fail(
                "smtp.security",
                format!("\"{other}\" is not one of none, starttls, tls"),
            );
            SmtpSecurity::StartTls
        }
    };
    let default_port = match security {
        SmtpSecurity::None => 25,
        SmtpSecurity::StartTls => 587,
        SmtpSecurity::Tls => 465,
    };
    let port = match raw.port {
        None => default_port,
        Some(port) => u16::try_from(port)
            .ok()
            .filter(|port| *port > 0)
            .unwrap_or_else(|| {
                fail("smtp.port", format!("{port} is not a port number"));
                default_port
            }),
    };
    if raw.from.parse::<lettre::message::Mailbox>().is_err() {
        fail(
            "smtp.from",
            format!(
                "\"{}\" is not a sender such as \"Funnel Sync <funnelsync@example.com>\"",
                raw.from
            ),
        );
    }
    let timeout = match raw.timeout {
        None => Duration::from_secs(30),
        Some(written) => match humantime::parse_duration(&written) {
            Ok(duration) if duration <= MAX_SMTP_TIMEOUT => duration,
            _ => {
                fail(
                    "smtp.timeout",
                    format!(
                        "\"{written}\" is not a duration like \"30s\" of at most \"{}\"",
                        humantime::format_duration(MAX_SMTP_TIMEOUT)
                    ),
                );
                Duration::from_secs(30)
            }
        },
    };
    let username = raw.username.filter(|username| !username.is_empty());
    if username.is_some()
        && security == SmtpSecurity::None
        && raw.allow_plaintext_auth != Some(true)
    {
        fail(
            "smtp.username",
            "with security = \"none\" the login would cross the network in clear: use \
             \"starttls\" or \"tls\", or set allow_plaintext_auth = true for a server on this \
             machine"
                .to_string(),
        );
    }
    let smtp = SmtpConfig {
        host: raw.host.trim().to_string(),
        port,
        security,
        username,
        password_file: raw.password_file.map(|file| resolve(base, &file)),
        from: raw.from,
        timeout,
    };
    ok.then_some(smtp)
}

fn validate_stages(raw_stages: Vec<RawStage>, problem: &mut impl FnMut(&str, String)) -> Stages {
    let mut stages = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for raw in raw_stages {
        let key = format!("stages[{}]", raw.position);
        if raw.name.trim().is_empty() {
            problem(&format!("{key}.name"), "must not be empty".to_string());
        }
        for label in std::iter::once(&raw.name).chain(raw.aliases.iter()) {
            let normalized = normalize_label(label);
            if let Some(owner) = seen.insert(normalized, raw.name.clone()) {
                problem(
                    &format!("{key}.aliases"),
                    format!("\"{label}\" is already used by stage \"{owner}\""),
                );
            }
        }
        let terminal = match raw.terminal.as_deref() {
            None => None,
            Some("won") => Some(Terminal::Won),
            Some("lost") => Some(Terminal::Lost),
            Some(other) => {
                problem(
                    &format!("{key}.terminal"),
                    format!("\"{other}\" is not one of won, lost"),
                );
                None
            }
        };
        let default_probability = match terminal {
            Some(Terminal::Won) => 1.0,
            Some(Terminal::Lost) => 0.0,
            None => 0.0,
        };
        let probability = raw.probability.unwrap_or(default_probability);
        if !(0.0..=1.0).contains(&probability) {
            problem(
                &format!("{key}.probability"),
                format!("{probability} must be between 0 and 1"),
            );
        }
        let stall_after_days = match raw.stall_after_days {
            None => None,
            Some(days) => match u32::try_from(days) {
                Ok(days) if days >= 1 => Some(days),
                _ => {
                    problem(
                        &format!("{key}.stall_after_days"),
                        format!("{days} must be a whole number of days, at least 1"),
                    );
                    None
                }
            },
        };
        stages.push(Stage {
            name: raw.name.trim().to_string(),
            aliases: raw.aliases,
            probability,
            stall_after_days,
            terminal,
        });
    }
    if !stages.iter().any(|stage| stage.terminal.is_none()) {
        problem(
            "stages",
            "the funnel needs at least one stage that is not terminal".to_string(),
        );
    }
    if !stages
        .iter()
        .any(|stage| stage.terminal == Some(Terminal::Won))
    {
        problem(
            "stages",
            "the funnel needs a stage with `terminal = \"won\"`".to_string(),
        );
    }
    if stages.is_empty() {
        return Stages::built_in();
    }
    Stages::new(stages)
}

fn validate_source(
    raw: RawSource,
    key: &str,
    base: &Path,
    stages: &Stages,
    problem: &mut impl FnMut(&str, String),
) -> Option<SourceConfig> {
    let mut ok = true;
    let mut fail = |suffix: &str, message: String| {
        problem(&format!("{key}.{suffix}"), message);
        ok = false;
    };
    if raw.name.trim().is_empty() {
        fail("name", "must not be empty".to_string());
    }
    // The history names command-line edits, API edits and undos by these.
    if ["cli", "api", "undo"].contains(&raw.name.trim()) {
        fail(
            "name",
            format!(
                "\"{}\" is reserved for changes made on the command line or through the API; choose another name",
                raw.name.trim()
            ),
        );
    }

    let path = if raw.path.trim().is_empty() {
        fail("path", "must name a file, a folder or a glob".to_string());
        None
    } else if raw.path.contains(['*', '?', '[']) {
        let pattern = resolve(base, &raw.path).to_string_lossy().into_owned();
        match glob::Pattern::new(&pattern) {
            Ok(_) => Some(SourcePath::Glob(pattern)),
            Err(error) => {
                fail(
                    "path",
                    format!("\"{}\" is not a valid glob: {error}", raw.path),
                );
                None
            }
        }
    } else {
        let resolved = resolve(base, &raw.path);
        // A path without an extension is a folder even before it exists (a share not mounted yet).
        if resolved.is_dir() || (resolved.extension().is_none() && !resolved.is_file()) {
            Some(SourcePath::Folder(resolved))
        } else {
            let extension = resolved
                .extension()
                .and_then(|ext| ext.to_str())
                .unwrap_or("")
                .to_lowercase();
            if !crate::workbook::SUPPORTED_EXTENSIONS.contains(&extension.as_str()) {
                fail(
                    "path",
                    format!(
                        "\"{}\" is neither a folder nor a spreadsheet (.xlsx .xlsm .xls .ods .csv)",
                        raw.path
                    ),
                );
                None
            } else {
                Some(SourcePath::File(resolved))
            }
        }
    };

    let header_row = match raw.header_row {
        None => HeaderRow::Auto,
        Some(RawHeaderRow::Word(word)) if word == "auto" => HeaderRow::Auto,
        Some(RawHeaderRow::Word(word)) => {
            fail(
                "header_row",
                format!("\"{word}\" must be \"auto\" or a row number such as 1"),
            );
            HeaderRow::Auto
        }
        Some(RawHeaderRow::Number(number)) => match u32::try_from(number) {
            Ok(number) if (1..=1_048_576).contains(&number) => HeaderRow::Fixed(number),
            _ => {
                fail(
                    "header_row",
                    format!("{number} is not a row number (1 to 1048576)"),
                );
                HeaderRow::Auto
            }
        },
    };

    let key_column = raw.key_column.unwrap_or_else(|| "CRM ID".to_string());
    if key_column.trim().is_empty() {
        fail("key_column", "must not be empty".to_string());
    }

    let mut match_on = Vec::new();
    for name in raw.match_on.unwrap_or_else(|| vec!["email".to_string()]) {
        match Field::from_name(&name) {
            Some(field) => match_on.push(field),
            None => fail(
                "match_on",
                format!("\"{name}\" is not a field ({})", field_list()),
            ),
        }
    }

    let on_row_removed = match raw.on_row_removed.as_deref() {
        None | Some("archive") => RowRemoved::Archive,
        Some("delete") => RowRemoved::Delete,
        Some("ignore") => RowRemoved::Ignore,
        Some(other) => {
            fail(
                "on_row_removed",
                format!("\"{other}\" is not one of archive, delete, ignore"),
            );
            RowRemoved::Archive
        }
    };

    let date_order = match raw.date_order.as_deref() {
        None | Some("ymd") => DateOrder::YearMonthDay,
        Some("dmy") => DateOrder::DayMonthYear,
        Some("mdy") => DateOrder::MonthDayYear,
        Some(other) => {
            fail(
                "date_order",
                format!("\"{other}\" is not one of ymd, dmy, mdy"),
            );
            DateOrder::YearMonthDay
        }
    };

    let encoding = match raw.encoding.as_deref() {
        None | Some("auto") => CsvEncoding::Auto,
        Some(label) => match encoding_rs::Encoding::for_label(label.as_bytes()) {
            Some(encoding) => CsvEncoding::Fixed(encoding),
            None => {
                fail("encoding", format!("\"{label}\" is not an encoding label such as utf-8, gb18030 or windows-1252"));
                CsvEncoding::Auto
            }
        },
    };

    // Aliases the config gives for a field replace the built-in ones for that field; a header
    // text the config claims for one field is taken away from every other field's built-ins.
    let mut configured: BTreeMap<Field, Vec<String>> = BTreeMap::new();
    for (name, aliases) in raw.columns.unwrap_or_default() {
        match Field::from_name(&name) {
            Some(field) => {
                let aliases: Vec<String> = aliases
                    .into_vec()
                    .iter()
                    .map(|alias| normalize_label(alias))
                    .collect();
                if aliases.iter().any(String::is_empty) {
                    fail(
                        &format!("columns.{name}"),
                        "a header text must not be empty".to_string(),
                    );
                }
                configured.insert(field, aliases);
            }
            None => fail(
                &format!("columns.{name}"),
                format!("\"{name}\" is not a field ({})", field_list()),
            ),
        }
    }
    let mut claimed: HashMap<String, Field> = HashMap::new();
    for (field, aliases) in &configured {
        for alias in aliases {
            if let Some(other) = claimed.insert(alias.clone(), *field) {
                if other != *field {
                    fail(
                        &format!("columns.{field}"),
                        format!("header \"{alias}\" is also listed for {other}"),
                    );
                }
            }
        }
    }
    let normalized_key = normalize_label(&key_column);
    let mut columns = BTreeMap::new();
    for field in Field::ALL {
        let aliases = match configured.get(&field) {
            Some(aliases) => aliases.clone(),
            None => field
                .default_aliases()
                .iter()
                .map(|alias| normalize_label(alias))
                .filter(|alias| !claimed.contains_key(alias))
                .collect(),
        };
        if aliases.contains(&normalized_key) {
            fail(
                "key_column",
                format!("\"{key_column}\" is also a header of the {field} field"),
            );
        }
        columns.insert(field, aliases);
    }

    // .xls and .ods cannot be written; a source made only of them cannot write back.
    let read_only = {
        let written = raw.path.to_ascii_lowercase();
        written.ends_with(".xls") || written.ends_with(".ods")
    };
    let write_back = match raw.write_back {
        Some(true) if read_only => {
            fail("write_back", format!("\"{}\" is a read-only format (.xls, .ods): funnelsync can read it but not write it; save it as .xlsx to sync both ways, or set write_back = false", raw.path));
            false
        }
        Some(write_back) => write_back,
        None => !read_only,
    };
    let conflict = match raw.conflict.as_deref() {
        None | Some("store") => ConflictPolicy::Store,
        Some("sheet") => ConflictPolicy::Sheet,
        Some("newest") => ConflictPolicy::Newest,
        Some(other) => {
            fail(
                "conflict",
                format!("\"{other}\" is not one of store, sheet, newest"),
            );
            ConflictPolicy::Store
        }
    };
    let mut filter = BTreeMap::new();
    for (name, values) in raw.filter.unwrap_or_default() {
        let Some(field) = Field::from_name(&name) else {
            fail(
                &format!("filter.{name}"),
                format!("\"{name}\" is not a field ({})", field_list()),
            );
            continue;
        };
        let mut accepted = Vec::new();
        for value in values.into_vec() {
            if field == Field::Stage {
                match stages.resolve(&value) {
                    Some(stage) => accepted.push(stage.name.clone()),
                    None => fail(
                        &format!("filter.{name}"),
                        format!("\"{value}\" is not a stage ({})", stages.names().join(", ")),
                    ),
                }
            } else {
                accepted.push(value.trim().to_string());
            }
        }
        if accepted.is_empty() {
            fail(
                &format!("filter.{name}"),
                "needs at least one value".to_string(),
            );
        }
        filter.insert(field, accepted);
    }
    let view = match raw.view.as_deref() {
        None if filter.is_empty() => View::Rows,
        None => View::All,
        Some("rows") => View::Rows,
        Some("all") => View::All,
        Some(other) => {
            fail("view", format!("\"{other}\" is not one of rows, all"));
            View::Rows
        }
    };
    let backups = match raw.backups {
        None => 5,
        Some(count) => match usize::try_from(count) {
            Ok(count) if count <= 1000 => count,
            _ => {
                fail("backups", format!("{count} must be between 0 and 1000"));
                5
            }
        },
    };

    let max_delete = match raw.max_delete {
        None => MaxDelete::Share(0.5),
        Some(RawMaxDelete::Count(count)) => match u64::try_from(count) {
            Ok(count) => MaxDelete::Count(count),
            Err(_) => {
                fail("max_delete", format!("{count} must not be negative"));
                MaxDelete::Share(0.5)
            }
        },
        Some(RawMaxDelete::Text(text)) => match text
            .trim()
            .strip_suffix('%')
            .map(|number| number.trim().parse::<f64>())
        {
            Some(Ok(percent)) if (0.0..=100.0).contains(&percent) => {
                MaxDelete::Share(percent / 100.0)
            }
            _ => {
                fail(
                    "max_delete",
                    format!("\"{text}\" must be a share such as \"50%\" or a count such as 200"),
                );
                MaxDelete::Share(0.5)
            }
        },
    };

    let source = SourceConfig {
        name: raw.name.trim().to_string(),
        path: path?,
        sheet: raw.sheet.filter(|sheet| !sheet.trim().is_empty()),
        header_row,
        key_column,
        match_on,
        on_row_removed,
        date_order,
        encoding,
        columns,
        write_back,
        conflict,
        filter,
        view,
        backups,
        max_delete,
        follow_symlinks: raw.follow_symlinks.unwrap_or(false),
    };
    ok.then_some(source)
}

fn field_list() -> String {
    Field::ALL
        .iter()
        .map(|field| field.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match Config::from_text(text, Path::new("/tmp/test.toml")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let text =
            "[store]\npath = \"crm.db\"\n[[sources]]\nname = \"p\"\npath = \"sales/*.xlsx\"\n";
        let config =
            Config::from_text(text, Path::new("/etc/funnelsync/funnelsync.toml")).expect("valid");
        assert_eq!(config.store.path, PathBuf::from("/etc/funnelsync/crm.db"));
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
