//! Stage two: [`Config::from_raw`] checks every section of a [`RawConfig`] and builds the
//! [`Config`], collecting every problem (key and message; the line is found afterwards) instead of
//! stopping at the first. Paths are resolved against the config file's folder ([`resolve`]), every
//! duration is capped ([`parse_duration`]), and a keyword is one of a closed list ([`keyword`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    RawAlerts, RawConfig, RawLimits, RawRemind, RawReport, RawSmtp, RawSource, RawStage, RawStore,
    RawWatch,
};
use super::source::validate_source;
use super::*;
use crate::deal::normalize_label;

impl Config {
    /// Validates every section of the file as read (relative paths resolved against `base`, the
    /// config file's folder) and the sections' needs of one another; every problem at once.
    pub(super) fn from_raw(
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
        let store = validate_store(raw.store, base, &mut problem);
        let stages = match raw.stages {
            None => Stages::built_in(),
            Some(raw_stages) => validate_stages(raw_stages, &mut problem),
        };
        let sources = validate_sources(
            raw.sources,
            raw.n_sources_written,
            base,
            &stages,
            &mut problem,
        );
        let watch = validate_watch(raw.watch, &mut problem);
        let reps = validate_reps(raw.reps.unwrap_or_default(), &mut problem);
        let smtp = raw
            .smtp
            .and_then(|smtp| validate_smtp(smtp, base, &mut problem));
        let remind = raw
            .remind
            .and_then(|remind| validate_remind(remind, &mut problem));
        let report = raw
            .report
            .and_then(|report| validate_report(report, base, &mut problem));
        let alerts = raw
            .alerts
            .and_then(|alerts| validate_alerts(alerts, &mut problem));
        let http = raw
            .http
            .and_then(|http| http::validate_http(http, base, &mut problem));
        let limits = raw
            .limits
            .map(|limits| validate_limits(limits, &mut problem))
            .unwrap_or_default();
        check_mail_needs(
            smtp.as_ref(),
            remind.as_ref(),
            report.as_ref(),
            alerts.as_ref(),
            &mut problem,
        );
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
}

fn validate_store(
    raw: Option<RawStore>,
    base: &Path,
    problem: &mut impl FnMut(&str, String),
) -> Option<StoreConfig> {
    let Some(store) = raw else {
        problem(
            "store",
            "is missing: add a [store] section with `path = \"…/crm.db\"` (or `url = \"postgresql://…\"`)"
                .to_string(),
        );
        return None;
    };
    // The site and the location are checked apart, so that a config with problems in both
    // hears of both.
    let site = match store.site.as_deref().map(str::trim) {
        None => Some(crate::config::DEFAULT_SITE.to_string()),
        Some(site)
            if !site.is_empty()
                && site.len() <= 64
                && site
                    .chars()
                    .all(|character| character.is_alphanumeric() || "-_.".contains(character)) =>
        {
            Some(site.to_string())
        }
        Some(_) => {
            problem(
                "store.site",
                "must be a short name of letters, digits, `-`, `_` or `.` (such as \"beijing\")"
                    .to_string(),
            );
            None
        }
    };
    let location = match (store.path, store.url) {
        (Some(_), Some(_)) => {
            problem(
                "store",
                "has both `path` (a SQLite file) and `url` (a PostgreSQL database): keep one"
                    .to_string(),
            );
            return None;
        }
        (None, None) => {
            problem(
                "store",
                "names no store: add `path = \"…/crm.db\"` (SQLite) or `url = \"postgresql://…\"`"
                    .to_string(),
            );
            return None;
        }
        (Some(path), None) if path.trim().is_empty() => {
            problem("store.path", "must name a SQLite file".to_string());
            return None;
        }
        (Some(path), None) => {
            if store.password_file.is_some() {
                problem(
                    "store.password_file",
                    "is for a PostgreSQL store (`url`); a SQLite file has no password".to_string(),
                );
                return None;
            }
            StoreLocation::Sqlite(resolve(base, &path))
        }
        (None, Some(url)) => {
            let postgres = PostgresConfig {
                url,
                password_file: store.password_file.map(|file| resolve(base, &file)),
            };
            // Before anything else: a URL the driver would refuse may still hold one.
            if postgres.holds_password() {
                problem(
                    "store.url",
                    "holds a password (as user:password@ or ?password=), which would show wherever the URL does: put it in `password_file`, FUNNELSYNC_STORE_PASSWORD or the store-password credential instead"
                        .to_string(),
                );
                return None;
            }
            let scheme_ok = postgres.url.starts_with("postgresql://")
                || postgres.url.starts_with("postgres://");
            // `sslmode` and `sslrootcert` as libpq spells them, and the CA file they name.
            let connection = match postgres.connection_url() {
                Ok(connection) => connection,
                Err(message) => {
                    problem("store.url", message);
                    return None;
                }
            };
            if !scheme_ok || connection.driver_url.parse::<postgres::Config>().is_err() {
                problem(
                    "store.url",
                    "must be a PostgreSQL URL such as \"postgresql://funnelsync@db.example/crm?sslmode=verify-full\""
                        .to_string(),
                );
                return None;
            }
            if let super::StoreRootCerts::File(file) = &connection.root_certs {
                if let Err(message) = super::read_root_certs(file) {
                    problem("store.url", message);
                    return None;
                }
            }
            StoreLocation::Postgres(postgres)
        }
    };
    Some(StoreConfig {
        location,
        site: site?,
    })
}

/// Every source that is valid (each with a unique name); the others' problems are said.
fn validate_sources(
    raw_sources: Vec<RawSource>,
    n_written: usize,
    base: &Path,
    stages: &Stages,
    problem: &mut impl FnMut(&str, String),
) -> Vec<SourceConfig> {
    if n_written == 0 {
        problem(
            "sources",
            "no [[sources]] given: add at least one spreadsheet to sync".to_string(),
        );
    }
    let mut sources = Vec::new();
    let mut seen_names: HashMap<String, usize> = HashMap::new();
    for raw_source in raw_sources {
        let key = format!("sources[{}]", raw_source.position);
        // A source whose name was missing or not a text (which was said) has a stand-in name.
        let name_said = raw_source.said.iter().any(|said| said == "name");
        let previous = if name_said {
            None
        } else {
            seen_names.insert(raw_source.name.clone(), raw_source.position)
        };
        if let Some(previous) = previous {
            problem(
                &format!("{key}.name"),
                format!(
                    "\"{}\" is already the name of sources[{previous}]",
                    raw_source.name
                ),
            );
        }
        if let Some(source) = validate_source(raw_source, &key, base, stages, problem) {
            sources.push(source);
        }
    }
    sources
}

/// Owner names as written in sheets (folded with [`normalize_label`]) → email address.
fn validate_reps(
    raw: BTreeMap<String, String>,
    problem: &mut impl FnMut(&str, String),
) -> BTreeMap<String, String> {
    let mut reps = BTreeMap::new();
    for (owner, address) in raw {
        if address.parse::<lettre::Address>().is_err() {
            problem(
                &format!("reps.{owner}"),
                format!("\"{address}\" is not an email address"),
            );
        }
        reps.insert(normalize_label(&owner), address.trim().to_string());
    }
    reps
}

fn validate_alerts(raw: RawAlerts, problem: &mut impl FnMut(&str, String)) -> Option<AlertsConfig> {
    let to = check_address("alerts.to", &raw.to, problem)?;
    let every = match raw.every {
        None => DEFAULT_ALERT_EVERY,
        Some(written) => parse_duration("alerts.every", &written, MAX_ALERT_EVERY, problem)?,
    };
    Some(AlertsConfig { to, every })
}

/// What sends mail needs `[smtp]`, and the weekly digest goes to `[remind]`'s manager.
fn check_mail_needs(
    smtp: Option<&SmtpConfig>,
    remind: Option<&RemindConfig>,
    report: Option<&ReportConfig>,
    alerts: Option<&AlertsConfig>,
    problem: &mut impl FnMut(&str, String),
) {
    if alerts.is_some() && smtp.is_none() {
        problem(
            "alerts",
            "[alerts] needs an [smtp] section to send mail".to_string(),
        );
    }
    if report.is_some_and(|report| report.weekly_digest.is_some()) {
        if smtp.is_none() {
            problem(
                "report.weekly_digest",
                "needs an [smtp] section to send mail".to_string(),
            );
        }
        if remind.and_then(|remind| remind.manager.as_ref()).is_none() {
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
}

/// `[limits]`: each a whole number of at least 1; the ones not given keep their defaults.
fn validate_limits(raw: RawLimits, problem: &mut impl FnMut(&str, String)) -> Limits {
    let mut limits = Limits::default();
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
    if let Some(megabytes) = positive("limits.max_file_mb", raw.max_file_mb) {
        limits.max_file_bytes = megabytes.saturating_mul(1 << 20);
    }
    if let Some(megabytes) = positive("limits.max_unzipped_mb", raw.max_unzipped_mb) {
        limits.max_unzipped_bytes = megabytes.saturating_mul(1 << 20);
    }
    if let Some(megabytes) = positive("limits.max_shared_strings_mb", raw.max_shared_strings_mb) {
        limits.max_shared_strings_bytes = megabytes.saturating_mul(1 << 20);
    }
    if let Some(rows) = positive("limits.max_rows", raw.max_rows) {
        limits.max_rows = rows as usize;
    }
    if let Some(columns) = positive("limits.max_columns", raw.max_columns) {
        limits.max_columns = columns as usize;
    }
    if let Some(chars) = positive("limits.max_cell_chars", raw.max_cell_chars) {
        limits.max_cell_chars = chars as usize;
    }
    limits
}

/// A path from the file, resolved against the config's folder and written without `.` and `..`
/// (`config/../target/demo/crm.db` is `target/demo/crm.db`), as messages show it.
pub(super) fn resolve(base: &Path, written: &str) -> PathBuf {
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
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(24 * 3600);
const MAX_SETTLE: Duration = Duration::from_secs(3600);
/// How often an alert about one file and kind may go out when the config says nothing.
const DEFAULT_ALERT_EVERY: Duration = Duration::from_secs(3600);
const MAX_ALERT_EVERY: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_REPORT_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_SMTP_TIMEOUT: Duration = Duration::from_secs(600);

/// The value a keyword names among `choices`, listed in the order the message gives them; no
/// keyword is `default`. An unknown keyword is a problem that lists the choices, and gives the
/// default so that the rest of the section is still checked.
pub(super) fn keyword<T: Copy>(
    key: &str,
    written: Option<&str>,
    choices: &[(&str, T)],
    default: T,
    problem: &mut impl FnMut(&str, String),
) -> T {
    let Some(written) = written else {
        return default;
    };
    match choices.iter().find(|(word, _)| *word == written) {
        Some((_, value)) => *value,
        None => {
            let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
            problem(
                key,
                format!("\"{written}\" is not one of {}", words.join(", ")),
            );
            default
        }
    }
}

/// A duration of at most `longest`.
pub(super) fn parse_duration(
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
    watch.mode = keyword(
        "watch.mode",
        raw.mode.as_deref(),
        &[
            ("auto", WatchMode::Auto),
            ("events", WatchMode::Events),
            ("poll", WatchMode::Poll),
        ],
        watch.mode,
        problem,
    );
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
    let language = keyword(
        "remind.language",
        raw.language.as_deref(),
        &[("en", Language::English), ("zh", Language::Chinese)],
        Language::English,
        &mut fail,
    );
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
    let security = keyword(
        "smtp.security",
        raw.security.as_deref(),
        &[
            ("none", SmtpSecurity::None),
            ("starttls", SmtpSecurity::StartTls),
            ("tls", SmtpSecurity::Tls),
        ],
        SmtpSecurity::StartTls,
        &mut fail,
    );
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
        let terminal = keyword(
            &format!("{key}.terminal"),
            raw.terminal.as_deref(),
            &[("won", Some(Terminal::Won)), ("lost", Some(Terminal::Lost))],
            None,
            problem,
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyword_is_one_of_its_choices_or_a_problem_that_lists_them() {
        let choices = [
            ("archive", RowRemoved::Archive),
            ("delete", RowRemoved::Delete),
            ("ignore", RowRemoved::Ignore),
        ];
        let cases = [
            (None, RowRemoved::Archive, None),
            (Some("delete"), RowRemoved::Delete, None),
            (Some("ignore"), RowRemoved::Ignore, None),
            (
                Some("Delete"),
                RowRemoved::Archive,
                Some("\"Delete\" is not one of archive, delete, ignore"),
            ),
        ];
        for (written, expected, message) in cases {
            let mut problems = Vec::new();
            let value = keyword(
                "on_row_removed",
                written,
                &choices,
                RowRemoved::Archive,
                &mut |key: &str, message: String| problems.push((key.to_string(), message)),
            );
            assert_eq!(value, expected, "{written:?}");
            let expected_problems: Vec<(String, String)> = message
                .map(|message| ("on_row_removed".to_string(), message.to_string()))
                .into_iter()
                .collect();
            assert_eq!(problems, expected_problems, "{written:?}");
        }
    }
}
