//! Writing the store's view of a file back into it: .xlsx through rust_xlsxwriter, .csv through
//! the csv crate, always safely — never while the file is open in Excel or LibreOffice, never over
//! a file that changed since it was read, through a temp file in the same folder that is fsynced
//! and renamed over the original, with the previous version kept in `.funnelsync/backups/`.
//!
//! [`plan`] is pure: from the rows as read and the merge outcome it decides which cells change,
//! which rows leave and which come in. [`write`] does the I/O. This module must not decide what a
//! deal's values are (that is the merge in `sync`) nor touch the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::NaiveDate;

use crate::deal::{Deal, DealId, ExtraMap, Field, FieldKind, FieldMap, FieldValue};
use crate::mapping::{ColumnRole, HeaderMap};
use crate::workbook::{FileFormat, SheetData};

/// What a cell written from the store holds.
#[derive(Debug, Clone, PartialEq)]
pub enum OutCell {
    Empty,
    Text(String),
    Number(f64),
    Date(NaiveDate),
}

/// One row of the managed sheet as it will be written.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRow {
    /// The row's Excel number in the file as read, when it comes from there (its other cells,
    /// formulas included, are copied as they are).
    pub origin: Option<u32>,
    /// Cells to write over the original ones, by 0-based column.
    pub overrides: BTreeMap<usize, OutCell>,
    /// The deal the row shows, if any.
    pub deal_id: Option<DealId>,
    /// The row's mapped values after the write (for the mirror).
    pub fields: FieldMap,
    /// The row's unmapped values after the write (for the mirror).
    pub extras: ExtraMap,
}

/// The new content of the managed sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetPlan {
    /// Headers as they will be written (the key column appended when the sheet had none).
    pub headers: Vec<String>,
    pub roles: Vec<Option<ColumnRole>>,
    pub header_row_number: u32,
    pub rows: Vec<PlannedRow>,
    /// Excel row numbers of the rows as read whose deal left the view.
    pub removed: Vec<u32>,
    /// The deals of those rows.
    pub removed_deals: Vec<DealId>,
    /// Rows (as read) that show a column's date style, for dates written into cells without one.
    pub style_rows: std::collections::BTreeSet<u32>,
    /// The cells of the sheet that hold a formula, (Excel row number, 0-based column): a row
    /// below one of them is not moved.
    pub formula_cells: Vec<(u32, u32)>,
    /// The last data row of the sheet as read, when the plan's rows are only those that change
    /// (new rows go below it and take its styles).
    pub last_data_row: Option<u32>,
    /// The key column, when the sheet had none and the write adds it.
    pub added_key_column: Option<usize>,
    /// Whether anything differs from the file as read.
    pub changed: bool,
}

/// What the plan needs to know about each data row of the sheet as read.
#[derive(Debug, Clone)]
pub struct RowOutcome {
    pub row_number: u32,
    /// The deal the row is (after creation), or `None` for a row with errors not recognised.
    pub deal_id: Option<DealId>,
    /// The row's cleaned values as read.
    pub read: FieldMap,
    /// What the merge says the row's mapped cells should show; `None` keeps the row as it is
    /// (a row with errors).
    pub merged: Option<FieldMap>,
    pub extras: ExtraMap,
    /// The id the key cell holds now.
    pub key_cell: Option<DealId>,
}

/// Plans the new content of the managed sheet: rows keep their order; a row whose deal left the
/// view goes; deals of the view not in the file yet are added at the end.
///
/// `n_columns` is the width of the widest row of the sheet: a missing key column is added after
/// it, so it never lands on data under an empty header.
pub fn plan(
    header: &HeaderMap,
    n_columns: usize,
    outcomes: &[RowOutcome],
    view: &[Deal],
) -> SheetPlan {
    let mut headers = header.headers.clone();
    let mut roles = header.roles.clone();
    let mut added_key_column = None;
    let key_column_idx = match header.key_column() {
        Some(column_idx) => column_idx,
        None => {
            let column_idx = n_columns.max(headers.len());
            headers.resize(column_idx, String::new());
            roles.resize(column_idx, None);
            headers.push(String::new());
            roles.push(Some(ColumnRole::Key));
            added_key_column = Some(column_idx);
            column_idx
        }
    };
    let mut removed = Vec::new();
    let mut removed_deals = Vec::new();
    let mut changed = false;
    let in_view: HashMap<DealId, &Deal> = view.iter().map(|deal| (deal.id, deal)).collect();
    let mut shown: HashSet<DealId> = HashSet::new();
    let mut rows = Vec::new();
    for outcome in outcomes {
        let keep_as_is = PlannedRow {
            origin: Some(outcome.row_number),
            overrides: BTreeMap::new(),
            deal_id: outcome.deal_id,
            fields: outcome.read.clone(),
            extras: outcome.extras.clone(),
        };
        let (Some(deal_id), Some(merged)) = (outcome.deal_id, outcome.merged.as_ref()) else {
            // A row with errors stays exactly as the rep wrote it, for the rep to fix.
            rows.push(keep_as_is);
            continue;
        };
        if !in_view.contains_key(&deal_id) || shown.contains(&deal_id) {
            // The deal was archived, deleted or no longer matches the filter; or a second row
            // shows it already.
            changed = true;
            removed.push(outcome.row_number);
            if !in_view.contains_key(&deal_id) {
                removed_deals.push(deal_id);
            }
            continue;
        }
        shown.insert(deal_id);
        let mut overrides = BTreeMap::new();
        for (column_idx, role) in roles.iter().enumerate() {
            let Some(ColumnRole::Field(field)) = role else {
                continue;
            };
            let wanted = merged.get(field);
            if wanted != outcome.read.get(field) {
                overrides.insert(column_idx, out_cell(*field, wanted));
            }
        }
        if outcome.key_cell != Some(deal_id) {
            overrides.insert(key_column_idx, OutCell::Number(deal_id as f64));
        }
        changed |= !overrides.is_empty();
        let mut fields = outcome.read.clone();
        fields.retain(|field, _| header.column_of(*field).is_some());
        for (field, value) in merged {
            fields.insert(*field, value.clone());
        }
        for field in Field::ALL {
            if header.column_of(field).is_some() && !merged.contains_key(&field) {
                fields.remove(&field);
            }
        }
        rows.push(PlannedRow {
            origin: Some(outcome.row_number),
            overrides,
            deal_id: Some(deal_id),
            fields,
            extras: outcome.extras.clone(),
        });
    }
    for deal in view.iter().filter(|deal| !shown.contains(&deal.id)) {
        changed = true;
        let mut overrides = BTreeMap::new();
        let mut fields = FieldMap::new();
        let mut extras = ExtraMap::new();
        for (column_idx, role) in roles.iter().enumerate() {
            match role {
                Some(ColumnRole::Field(field)) => {
                    if let Some(value) = deal.fields.get(field) {
                        overrides.insert(column_idx, out_cell(*field, Some(value)));
                        fields.insert(*field, value.clone());
                    }
                }
                Some(ColumnRole::Key) => {
                    overrides.insert(column_idx, OutCell::Number(deal.id as f64));
                }
                Some(ColumnRole::Extra(name)) => {
                    if let Some(value) = deal.extra.get(name) {
                        overrides.insert(column_idx, OutCell::Text(value.clone()));
                        extras.insert(name.clone(), value.clone());
                    }
                }
                None => {}
            }
        }
        rows.push(PlannedRow {
            origin: None,
            overrides,
            deal_id: Some(deal.id),
            fields,
            extras,
        });
    }
    if header.key_column().is_none() && rows.iter().any(|row| row.deal_id.is_some()) {
        changed = true;
    }
    SheetPlan {
        headers,
        roles,
        header_row_number: header.row_number,
        rows,
        removed,
        removed_deals,
        style_rows: Default::default(),
        formula_cells: Vec::new(),
        last_data_row: None,
        added_key_column: added_key_column.filter(|_| changed),
        changed,
    }
}

/// The cell a field's value is written as: dates as dates, amounts as numbers, the rest as text.
fn out_cell(field: Field, value: Option<&FieldValue>) -> OutCell {
    match (field.kind(), value) {
        (_, None) => OutCell::Empty,
        (_, Some(FieldValue::Amount(amount))) => OutCell::Number(*amount),
        (FieldKind::Date, Some(FieldValue::Text(text))) => {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(OutCell::Date)
                .unwrap_or_else(|_| OutCell::Text(text.clone()))
        }
        (_, Some(FieldValue::Text(text))) => OutCell::Text(text.clone()),
    }
}

/// Whether funnelsync can write this file: .xlsx, .xlsm (edited in place, so its macros stay)
/// and .csv, not the read-only .xls and .ods.
pub fn is_writable(sheet: &SheetData) -> bool {
    is_writable_path(&sheet.path)
}

/// [`is_writable`] by the file's name alone.
pub fn is_writable_path(path: &Path) -> bool {
    matches!(
        crate::workbook::format_of(path),
        Some(FileFormat::Xlsx | FileFormat::Csv)
    )
}

/// Where a writer puts a new file: the zip writer of the .xlsx editor needs to seek back.
pub trait WriteSeek: std::io::Write + std::io::Seek {}

impl<T: std::io::Write + std::io::Seek> WriteSeek for T {}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path} is open in {program} ({lock}); the write-back waits until it is closed")]
    Locked {
        path: PathBuf,
        program: &'static str,
        lock: String,
    },
    #[error("{path} changed since it was read; it will be read again before writing")]
    ChangedMeanwhile { path: PathBuf },
    #[error("{path} cannot be written back: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the workbook for {path}: {source}")]
    Build {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot edit {path} in place: {source}")]
    Edit {
        path: PathBuf,
        #[source]
        source: xlsx::PackageError,
    },
    #[error(
        "the backup failed, so {path} was not written: cannot keep a backup in {folder}: {source}"
    )]
    Backup {
        path: PathBuf,
        folder: PathBuf,
        #[source]
        source: BackupError,
    },
}

impl WriteError {
    /// Whether the write should simply be tried again later (the file is open or just changed).
    pub fn is_deferred(&self) -> bool {
        matches!(
            self,
            WriteError::Locked { .. } | WriteError::ChangedMeanwhile { .. }
        )
    }
}

/// What a write produced.
#[derive(Debug, Clone)]
pub struct Written {
    /// SHA-256 of the new file's bytes.
    pub content_hash: String,
    /// Excel row numbers of the planned rows in the written file, in plan order.
    pub row_numbers: Vec<u32>,
}

/// Writes the plan into the file: checks it is not open and unchanged since it was read, builds
/// the new content, writes it to a temp file beside it, fsyncs, keeps a backup of the old one and
/// renames the new one into place.
pub fn write(
    sheet: &SheetData,
    plan: &SheetPlan,
    stage_names: &[String],
    n_backups: usize,
) -> Result<Written, WriteError> {
    let path = sheet.path.as_path();
    if std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_symlink()) {
        return Err(WriteError::Unsupported {
            path: path.to_path_buf(),
            reason: "it is a symbolic link; funnelsync never writes through or replaces a link"
                .to_string(),
        });
    }
    if let Some((program, lock)) = crate::watch::open_by(path) {
        return Err(WriteError::Locked {
            path: path.to_path_buf(),
            program,
            lock: lock.display().to_string(),
        });
    }
    let io_error = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let fingerprint_before = crate::watch::fingerprint(path);
    let original = std::fs::read(path).map_err(io_error)?;
    if crate::workbook::hash_bytes(&original) != sheet.content_hash {
        return Err(WriteError::ChangedMeanwhile {
            path: path.to_path_buf(),
        });
    }
    let (content_hash, row_numbers) = replace::replace_file(
        path,
        &original,
        fingerprint_before,
        n_backups,
        |out| match sheet.format {
            FileFormat::Xlsx => xlsx::build(sheet, &original, plan, stage_names, out),
            FileFormat::Csv => csv::build(sheet, &original, plan, out),
            FileFormat::Xls | FileFormat::Ods => Err(WriteError::Unsupported {
                path: path.to_path_buf(),
                reason: "the format is read-only".to_string(),
            }),
        },
    )?;
    Ok(Written {
        content_hash,
        row_numbers,
    })
}

mod csv;
mod replace;
mod xlsx;

pub use replace::BackupError;
