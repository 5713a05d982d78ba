//! Stage one: the file as written. [`RawConfig`] mirrors the TOML (`RawStore`, `RawSource`,
//! `RawStage`, `RawWatch`, `RawHttp`, …, all `deny_unknown_fields`); each section is deserialised
//! on its own so one broken section does not hide the others, and a source's unknown keys and
//! values of the wrong type are set aside one by one ([`set_aside_unknown_keys`],
//! [`set_aside_bad_source_values`]), each said at its own line, so its other problems are still
//! found.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigProblem;

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
    pub trusted_proxies: Option<Vec<String>>,
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
    pub max_shared_strings_mb: Option<i64>,
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
    pub path: Option<String>,
    pub url: Option<String>,
    pub site: Option<String>,
    pub password_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// 1-based position among the file's `[[sources]]`, for messages.
    #[serde(skip)]
    pub position: usize,
    /// The keys (`write_back`, `name`) whose problem was already said while reading: a value of
    /// the wrong type, set aside, or a missing name or path, standing in as empty. Stage two says
    /// nothing more about them, and does not accept the source.
    #[serde(skip)]
    pub said: Vec<String>,
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
    pub(super) fn into_vec(self) -> Vec<String> {
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
            let known: Vec<&str> = SOURCE_KEYS.iter().map(|(name, _)| *name).collect();
            let source = set_aside_unknown_keys(text, &key, source, &known, &mut problems);
            // So are keys whose value has the wrong type, and a missing name or path.
            let (source, said) = set_aside_bad_source_values(text, &key, source, &mut problems);
            if let Some(mut source) =
                read_section::<RawSource>(text, &key, Some(source), &mut problems)
            {
                source.position = index + 1;
                source.said = said;
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

/// The keys a `[[sources]]` entry may have, each with what its value must be (for a value of the
/// wrong type).
const SOURCE_KEYS: &[(&str, &str)] = &[
    ("name", "a name in quotes, such as \"pipeline\""),
    (
        "path",
        "a file, folder or glob in quotes, such as \"share/*.xlsx\"",
    ),
    ("sheet", "a sheet name in quotes"),
    ("header_row", "\"auto\" or a row number such as 1"),
    ("key_column", "a header text in quotes"),
    ("match_on", "a list of fields, such as [\"email\"]"),
    (
        "on_row_removed",
        "one of \"archive\", \"delete\", \"ignore\"",
    ),
    ("date_order", "one of \"ymd\", \"dmy\", \"mdy\""),
    ("encoding", "an encoding label in quotes, such as \"utf-8\""),
    (
        "columns",
        "a table of field = header text(s), such as [sources.columns]",
    ),
    ("write_back", "true or false"),
    (
        "max_delete",
        "a share such as \"50%\" or a count such as 200",
    ),
    ("conflict", "one of \"store\", \"sheet\", \"newest\""),
    (
        "filter",
        "a table of field = value(s), such as filter = { stage = \"Lead\" }",
    ),
    ("view", "\"rows\" or \"all\""),
    ("backups", "a count such as 5"),
    ("follow_symlinks", "true or false"),
];

/// The keys of `[sources.columns]` and `[sources.filter]` each map a field to what they must be.
const SOURCE_TABLE_ENTRIES: &[(&str, &str)] = &[
    (
        "columns",
        "a header text or a list of them, such as [\"Amount\", \"Total\"]",
    ),
    (
        "filter",
        "a value or a list of values, such as [\"Lead\", \"Qualified\"]",
    ),
];

/// The keys a source cannot do without.
const REQUIRED_SOURCE_KEYS: &[&str] = &["name", "path"];

/// Reports every key of a `[[sources]]` entry whose value has the wrong type (each at its own
/// line, in plain words) and returns the entry without them, with the keys whose problems were
/// said. Each key is tried on its own, and each entry of `columns` and `filter`, so one wrong type
/// does not hide the source's other problems. A missing (or set aside) name or path is said once
/// and given an empty stand-in, so that the rest of the source is still checked.
fn set_aside_bad_source_values(
    text: &str,
    key: &str,
    value: Spanned<toml::Value>,
    problems: &mut Vec<ConfigProblem>,
) -> (Spanned<toml::Value>, Vec<String>) {
    let span = value.span();
    let mut inner = value.into_inner();
    let mut said = Vec::new();
    let Some(table) = inner.as_table_mut() else {
        return (Spanned::new(span, inner), said);
    };
    let mut report = |name: &str, message: String| {
        let full = format!("{key}.{name}");
        problems.push(ConfigProblem {
            line: locate_key(text, &full),
            key: full,
            message,
        });
    };
    for (name, expected) in SOURCE_KEYS {
        let Some(value) = table.get_mut(*name) else {
            continue;
        };
        let entry_expected = SOURCE_TABLE_ENTRIES
            .iter()
            .find(|(table_name, _)| table_name == name)
            .map(|(_, expected)| *expected);
        if let (Some(entry_expected), toml::Value::Table(entries)) = (entry_expected, &mut *value) {
            let bad: Vec<String> = entries
                .iter()
                .filter(|(_, entry)| !is_text_or_texts(entry))
                .map(|(entry_name, _)| entry_name.clone())
                .collect();
            for entry_name in bad {
                if let Some(entry) = entries.remove(&entry_name) {
                    report(
                        &format!("{name}.{entry_name}"),
                        format!("must be {entry_expected}, not {}", describe(&entry)),
                    );
                }
            }
            continue;
        }
        if value_fits(name, value) {
            continue;
        }
        if let Some(value) = table.remove(*name) {
            report(
                name,
                format!("must be {expected}, not {}", describe(&value)),
            );
            said.push((*name).to_string());
        }
    }
    for name in REQUIRED_SOURCE_KEYS {
        if table.contains_key(*name) {
            continue;
        }
        if !said.iter().any(|said| said == name) {
            report(name, format!("missing field `{name}`"));
            said.push((*name).to_string());
        }
        table.insert((*name).to_string(), toml::Value::String(String::new()));
    }
    (Spanned::new(span, inner), said)
}

/// Whether `value` is a fitting value for the `[[sources]]` key `name`: [`RawSource`] is tried
/// with that key alone (it then misses its required keys, which does not count).
fn value_fits(name: &str, value: &toml::Value) -> bool {
    let mut alone = toml::Table::new();
    alone.insert(name.to_string(), value.clone());
    match toml::Value::Table(alone).try_into::<RawSource>() {
        Ok(_) => true,
        Err(error) => error.message().starts_with("missing field `"),
    }
}

fn is_text_or_texts(value: &toml::Value) -> bool {
    match value {
        toml::Value::String(_) => true,
        toml::Value::Array(items) => items.iter().all(toml::Value::is_str),
        _ => false,
    }
}

/// A value as a message names it: `the text "yes"`, `the number 5`, `a list`.
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("the text {text:?}"),
        toml::Value::Integer(number) => format!("the number {number}"),
        toml::Value::Float(number) => format!("the number {number}"),
        toml::Value::Boolean(flag) => flag.to_string(),
        toml::Value::Datetime(date) => format!("the date {date}"),
        toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => {
            "a list of texts".to_string()
        }
        toml::Value::Array(_) => "a list with values that are not texts".to_string(),
        toml::Value::Table(_) => "a table".to_string(),
    }
}

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
pub(super) fn locate_key(text: &str, key: &str) -> Option<usize> {
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
