//! A source's section (`[[sources]]`): the validated [`SourceConfig`] — where its files are
//! ([`SourcePath`]), how their header, rows and cells are read, which deals they show ([`View`],
//! the filter), how conflicts and removed rows are handled — and its validation from a
//! [`RawSource`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::raw::{OneOrMany, RawHeaderRow, RawMaxDelete, RawSource};
use super::validate::{keyword, resolve};
use super::Stages;
use crate::deal::{normalize_label, Field};
use crate::workbook::CsvEncoding;

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

/// The key column's header when the config names none.
const DEFAULT_KEY_COLUMN: &str = "CRM ID";
/// What a row is matched on when the config says nothing.
const DEFAULT_MATCH_ON: &str = "email";
/// How many previous versions of a file are kept when the config says nothing.
const DEFAULT_BACKUPS: usize = 5;
/// The mass-delete guard when the config says nothing: half of a file's rows.
const DEFAULT_MAX_DELETE: MaxDelete = MaxDelete::Share(0.5);

/// Validates one `[[sources]]` entry (`key` is its place, `sources[N]`), saying every problem
/// through `problem`; `None` when there was one.
pub(super) fn validate_source(
    mut raw: RawSource,
    key: &str,
    base: &Path,
    stages: &Stages,
    problem: &mut impl FnMut(&str, String),
) -> Option<SourceConfig> {
    // A key whose problem was said while reading (a wrong type, a missing name or path) has a
    // stand-in value here: nothing more is said about it, and the source is not accepted.
    let mut ok = raw.said.is_empty();
    let said = std::mem::take(&mut raw.said);
    let mut fail = |suffix: &str, message: String| {
        let field = suffix.split('.').next().unwrap_or(suffix);
        if !said.iter().any(|said| said == field) {
            problem(&format!("{key}.{suffix}"), message);
        }
        ok = false;
    };
    check_name(&raw.name, &mut fail);
    let path = source_path(&raw.path, base, &mut fail);
    let header_row = header_row(raw.header_row, &mut fail);
    let key_column = raw
        .key_column
        .unwrap_or_else(|| DEFAULT_KEY_COLUMN.to_string());
    if key_column.trim().is_empty() {
        fail("key_column", "must not be empty".to_string());
    }
    let mut match_on = Vec::new();
    for name in raw
        .match_on
        .unwrap_or_else(|| vec![DEFAULT_MATCH_ON.to_string()])
    {
        match Field::from_name(&name) {
            Some(field) => match_on.push(field),
            None => fail(
                "match_on",
                format!("\"{name}\" is not a field ({})", field_list()),
            ),
        }
    }
    let on_row_removed = keyword(
        "on_row_removed",
        raw.on_row_removed.as_deref(),
        &[
            ("archive", RowRemoved::Archive),
            ("delete", RowRemoved::Delete),
            ("ignore", RowRemoved::Ignore),
        ],
        RowRemoved::Archive,
        &mut fail,
    );
    let date_order = keyword(
        "date_order",
        raw.date_order.as_deref(),
        &[
            ("ymd", DateOrder::YearMonthDay),
            ("dmy", DateOrder::DayMonthYear),
            ("mdy", DateOrder::MonthDayYear),
        ],
        DateOrder::YearMonthDay,
        &mut fail,
    );
    let encoding = encoding(raw.encoding.as_deref(), &mut fail);
    let columns = columns(raw.columns.unwrap_or_default(), &key_column, &mut fail);
    let write_back = write_back(&raw.path, raw.write_back, &mut fail);
    let conflict = keyword(
        "conflict",
        raw.conflict.as_deref(),
        &[
            ("store", ConflictPolicy::Store),
            ("sheet", ConflictPolicy::Sheet),
            ("newest", ConflictPolicy::Newest),
        ],
        ConflictPolicy::Store,
        &mut fail,
    );
    let filter = filter(raw.filter.unwrap_or_default(), stages, &mut fail);
    // A filtered source shows every deal the filter lets through, unless it says otherwise.
    let view = keyword(
        "view",
        raw.view.as_deref(),
        &[("rows", View::Rows), ("all", View::All)],
        if filter.is_empty() {
            View::Rows
        } else {
            View::All
        },
        &mut fail,
    );
    let backups = match raw.backups {
        None => DEFAULT_BACKUPS,
        Some(count) => match usize::try_from(count) {
            Ok(count) if count <= 1000 => count,
            _ => {
                fail("backups", format!("{count} must be between 0 and 1000"));
                DEFAULT_BACKUPS
            }
        },
    };
    let max_delete = max_delete(raw.max_delete, &mut fail);
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

fn check_name(name: &str, fail: &mut impl FnMut(&str, String)) {
    if name.trim().is_empty() {
        fail("name", "must not be empty".to_string());
    }
    // The history names command-line edits, API edits and undos by these.
    if ["cli", "api", "undo"].contains(&name.trim()) {
        fail(
            "name",
            format!(
                "\"{}\" is reserved for changes made on the command line or through the API; choose another name",
                name.trim()
            ),
        );
    }
}

/// Where the source's files are: a glob when the path has a wildcard, a folder when it is one
/// (or names no file type: a share not mounted yet), else a spreadsheet file.
fn source_path(
    written: &str,
    base: &Path,
    fail: &mut impl FnMut(&str, String),
) -> Option<SourcePath> {
    if written.trim().is_empty() {
        fail("path", "must name a file, a folder or a glob".to_string());
        return None;
    }
    if written.contains(['*', '?', '[']) {
        let pattern = resolve(base, written).to_string_lossy().into_owned();
        return match glob::Pattern::new(&pattern) {
            Ok(_) => Some(SourcePath::Glob(pattern)),
            Err(error) => {
                fail(
                    "path",
                    format!("\"{written}\" is not a valid glob: {error}"),
                );
                None
            }
        };
    }
    let resolved = resolve(base, written);
    if resolved.is_dir() || (resolved.extension().is_none() && !resolved.is_file()) {
        return Some(SourcePath::Folder(resolved));
    }
    let extension = resolved
        .extension()
        .and_then(|ext| ext.to_str())
        .unwrap_or("")
        .to_lowercase();
    if crate::workbook::SUPPORTED_EXTENSIONS.contains(&extension.as_str()) {
        Some(SourcePath::File(resolved))
    } else {
        fail(
            "path",
            format!(
                "\"{written}\" is neither a folder nor a spreadsheet (.xlsx .xlsm .xls .ods .csv)"
            ),
        );
        None
    }
}

fn header_row(raw: Option<RawHeaderRow>, fail: &mut impl FnMut(&str, String)) -> HeaderRow {
    match raw {
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
    }
}

fn encoding(label: Option<&str>, fail: &mut impl FnMut(&str, String)) -> CsvEncoding {
    match label {
        None | Some("auto") => CsvEncoding::Auto,
        Some(label) => match encoding_rs::Encoding::for_label(label.as_bytes()) {
            Some(encoding) => CsvEncoding::Fixed(encoding),
            None => {
                fail(
                    "encoding",
                    format!("\"{label}\" is not an encoding label such as utf-8, gb18030 or windows-1252"),
                );
                CsvEncoding::Auto
            }
        },
    }
}

/// The accepted header texts per field. Aliases the config gives for a field replace the
/// built-in ones for that field; a header text the config claims for one field is taken away
/// from every other field's built-ins. No field may claim the key column's header.
fn columns(
    written: BTreeMap<String, OneOrMany>,
    key_column: &str,
    fail: &mut impl FnMut(&str, String),
) -> BTreeMap<Field, Vec<String>> {
    let mut configured: BTreeMap<Field, Vec<String>> = BTreeMap::new();
    for (name, aliases) in written {
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
    let normalized_key = normalize_label(key_column);
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
    columns
}

/// Whether the source writes back: by default unless its path names a read-only format (.xls and
/// .ods cannot be written), which may not write back at all.
fn write_back(path: &str, written: Option<bool>, fail: &mut impl FnMut(&str, String)) -> bool {
    let read_only = {
        let path = path.to_ascii_lowercase();
        path.ends_with(".xls") || path.ends_with(".ods")
    };
    match written {
        Some(true) if read_only => {
            fail("write_back", format!("\"{path}\" is a read-only format (.xls, .ods): funnelsync can read it but not write it; save it as .xlsx to sync both ways, or set write_back = false"));
            false
        }
        Some(write_back) => write_back,
        None => !read_only,
    }
}

/// The deals the source's files show: per field, the values let through (stages by canonical
/// name, the rest trimmed).
fn filter(
    written: BTreeMap<String, OneOrMany>,
    stages: &Stages,
    fail: &mut impl FnMut(&str, String),
) -> BTreeMap<Field, Vec<String>> {
    let mut filter = BTreeMap::new();
    for (name, values) in written {
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
    filter
}

/// The mass-delete guard: a count of rows, or a share such as "50%".
fn max_delete(raw: Option<RawMaxDelete>, fail: &mut impl FnMut(&str, String)) -> MaxDelete {
    match raw {
        None => DEFAULT_MAX_DELETE,
        Some(RawMaxDelete::Count(count)) => match u64::try_from(count) {
            Ok(count) => MaxDelete::Count(count),
            Err(_) => {
                fail("max_delete", format!("{count} must not be negative"));
                DEFAULT_MAX_DELETE
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
                DEFAULT_MAX_DELETE
            }
        },
    }
}

pub(super) fn field_list() -> String {
    Field::ALL
        .iter()
        .map(|field| field.name())
        .collect::<Vec<_>>()
        .join(", ")
}
