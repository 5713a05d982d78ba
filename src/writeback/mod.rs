//! Writing the store's view of a file back into it: .xlsx/.xlsm edited in place (only the changed
//! cells of the managed sheet, every other part copied byte for byte: [`xlsx`]), .csv through the
//! csv crate in the encoding it was read with, always safely — never while the file is open in
//! Excel or LibreOffice, never over a file that changed since it was read, through a temp file in
//! the same folder that is fsynced and exchanged with the original, with the previous version kept
//! in `.funnelsync/backups/` ([`replace`]).
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
    /// The row's extras (unmapped cells, by header) as read.
    pub extras: ExtraMap,
    /// What the merge says the row's named extra columns should show; `None` keeps them as
    /// they are. An extra the sheet has no column for is never written.
    pub merged_extras: Option<ExtraMap>,
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
        let mut extras = outcome.extras.clone();
        for (column_idx, role) in roles.iter().enumerate() {
            match role {
                Some(ColumnRole::Field(field)) => {
                    let wanted = merged.get(field);
                    if wanted != outcome.read.get(field) {
                        overrides.insert(column_idx, out_cell(*field, wanted));
                    }
                }
                Some(ColumnRole::Extra(name)) => {
                    let Some(merged_extras) = outcome.merged_extras.as_ref() else {
                        continue;
                    };
                    let wanted = merged_extras.get(name);
                    if wanted != outcome.extras.get(name) {
                        // An extra is text: written as a text cell, never as a formula.
                        overrides.insert(
                            column_idx,
                            wanted.map_or(OutCell::Empty, |value| OutCell::Text(value.clone())),
                        );
                        match wanted {
                            Some(value) => extras.insert(name.clone(), value.clone()),
                            None => extras.remove(name),
                        };
                    }
                }
                _ => {}
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
            extras,
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

/// Whether funnelsync can write this file, by its name: .xlsx, .xlsm (edited in place, so its
/// macros stay) and .csv, not the read-only .xls and .ods.
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
    // The file is read from its handle, never held whole: the write streams its parts through.
    let (original, original_hash) = open_original(path).map_err(io_error)?;
    if original_hash != sheet.content_hash {
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

/// Opens the file as it is now (never through a link) and hashes it in one streaming pass.
fn open_original(path: &std::path::Path) -> std::io::Result<(std::fs::File, String)> {
    use sha2::Digest;
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    file.rewind()?;
    let hash = hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok((file, hash))
}

mod csv;
mod replace;
mod xlsx;

pub use replace::BackupError;

#[cfg(test)]
mod tests {
    use super::*;

    /// Company, Amount, Close date, Region (an extra column) and, unless `without_key`, CRM ID.
    fn header(without_key: bool) -> HeaderMap {
        let mut columns = vec![
            ("Company", Some(ColumnRole::Field(Field::Company))),
            ("Amount", Some(ColumnRole::Field(Field::Amount))),
            ("Close", Some(ColumnRole::Field(Field::ExpectedClose))),
            ("Region", Some(ColumnRole::Extra("Region".to_string()))),
        ];
        if !without_key {
            columns.push(("CRM ID", Some(ColumnRole::Key)));
        }
        HeaderMap {
            row_number: 1,
            row_position: 0,
            headers: columns.iter().map(|(name, _)| name.to_string()).collect(),
            roles: columns.into_iter().map(|(_, role)| role).collect(),
        }
    }

    fn fields(company: &str, amount: Option<f64>, close: Option<&str>) -> FieldMap {
        let mut fields = FieldMap::new();
        fields.insert(Field::Company, FieldValue::Text(company.to_string()));
        if let Some(amount) = amount {
            fields.insert(Field::Amount, FieldValue::Amount(amount));
        }
        if let Some(close) = close {
            fields.insert(Field::ExpectedClose, FieldValue::Text(close.to_string()));
        }
        fields
    }

    fn deal(id: DealId, fields: FieldMap, region: Option<&str>) -> Deal {
        let at = chrono::DateTime::from_timestamp(1_790_000_000, 0).expect("time");
        Deal {
            id,
            fields,
            extra: region
                .map(|region| ExtraMap::from([("Region".to_string(), region.to_string())]))
                .unwrap_or_default(),
            created_at: at,
            updated_at: at,
            stage_entered_at: None,
            archived_at: None,
        }
    }

    /// A data row as read: its deal, what it holds, what the merge wants it to show.
    fn row(
        row_number: u32,
        deal_id: Option<DealId>,
        read: FieldMap,
        merged: Option<FieldMap>,
        key_cell: Option<DealId>,
    ) -> RowOutcome {
        RowOutcome {
            row_number,
            deal_id,
            read,
            merged,
            extras: ExtraMap::new(),
            merged_extras: None,
            key_cell,
        }
    }

    #[test]
    fn a_file_that_shows_the_store_already_is_left_as_it_is() {
        let acme = fields("Acme", Some(1000.0), Some("2026-12-01"));
        let plan = plan(
            &header(false),
            5,
            &[row(2, Some(7), acme.clone(), Some(acme.clone()), Some(7))],
            &[deal(7, acme.clone(), None)],
        );
        assert!(!plan.changed);
        assert_eq!(plan.rows.len(), 1);
        assert!(plan.rows[0].overrides.is_empty());
        assert_eq!(plan.rows[0].origin, Some(2));
        assert_eq!(plan.rows[0].fields, acme);
        assert!(plan.removed.is_empty());
        assert_eq!(plan.added_key_column, None);
    }

    #[test]
    fn only_the_cells_the_store_changed_are_written() {
        let read = fields("Acme", Some(1000.0), Some("2026-12-01"));
        /// What the merge wants the row to show, the id its key cell holds, the cells written.
        type Case = (
            &'static str,
            FieldMap,
            Option<DealId>,
            BTreeMap<usize, OutCell>,
        );
        let cases: Vec<Case> = vec![
            (
                "an amount is a number",
                fields("Acme", Some(2500.0), Some("2026-12-01")),
                Some(7),
                BTreeMap::from([(1, OutCell::Number(2500.0))]),
            ),
            (
                "a date is a date",
                fields("Acme", Some(1000.0), Some("2027-01-15")),
                Some(7),
                BTreeMap::from([(
                    2,
                    OutCell::Date(NaiveDate::from_ymd_opt(2027, 1, 15).expect("day")),
                )]),
            ),
            (
                "a cleared field is an empty cell",
                fields("Acme", None, Some("2026-12-01")),
                Some(7),
                BTreeMap::from([(1, OutCell::Empty)]),
            ),
            (
                "a row without its id gets it",
                read.clone(),
                None,
                BTreeMap::from([(4, OutCell::Number(7.0))]),
            ),
            (
                "a wrong id is set right",
                read.clone(),
                Some(8),
                BTreeMap::from([(4, OutCell::Number(7.0))]),
            ),
        ];
        for (name, merged, key_cell, expected) in cases {
            let plan = plan(
                &header(false),
                5,
                &[row(
                    2,
                    Some(7),
                    read.clone(),
                    Some(merged.clone()),
                    key_cell,
                )],
                &[deal(7, merged.clone(), None)],
            );
            assert!(plan.changed, "{name}");
            assert_eq!(plan.rows[0].overrides, expected, "{name}");
            assert_eq!(
                plan.rows[0].fields, merged,
                "{name}: the mirror gets what is written"
            );
        }
    }

    #[test]
    fn rows_leave_when_their_deal_leaves_the_view_or_is_shown_twice() {
        let acme = fields("Acme", Some(1000.0), None);
        let beta = fields("Beta", Some(200.0), None);
        let plan = plan(
            &header(false),
            5,
            &[
                row(2, Some(7), acme.clone(), Some(acme.clone()), Some(7)),
                row(3, Some(8), beta.clone(), Some(beta.clone()), Some(8)),
                row(4, Some(7), acme.clone(), Some(acme.clone()), Some(7)),
            ],
            // Beta was archived (or no longer matches the filter).
            &[deal(7, acme.clone(), None)],
        );
        assert!(plan.changed);
        assert_eq!(plan.removed, vec![3, 4]);
        assert_eq!(
            plan.removed_deals,
            vec![8],
            "a second row of a deal is not its leaving"
        );
        assert_eq!(
            plan.rows.iter().map(|row| row.origin).collect::<Vec<_>>(),
            vec![Some(2)]
        );
    }

    #[test]
    fn a_row_with_errors_stays_as_the_rep_wrote_it() {
        let written = fields("Acme", None, Some("next Tuesday"));
        // Not recognised at all, or recognised but with cells that could not be cleaned.
        for deal_id in [None, Some(7)] {
            let plan = plan(
                &header(false),
                5,
                &[row(2, deal_id, written.clone(), None, None)],
                &[],
            );
            assert!(!plan.changed);
            assert_eq!(plan.removed, Vec::<u32>::new());
            assert_eq!(plan.rows[0].origin, Some(2));
            assert!(plan.rows[0].overrides.is_empty());
            assert_eq!(plan.rows[0].fields, written);
        }
    }

    #[test]
    fn deals_new_to_the_file_are_added_at_the_end() {
        let acme = fields("Acme", Some(1000.0), None);
        let gamma = fields("Gamma", Some(300.0), Some("2026-12-24"));
        let plan = plan(
            &header(false),
            5,
            &[row(2, Some(7), acme.clone(), Some(acme.clone()), Some(7))],
            &[deal(7, acme, None), deal(9, gamma.clone(), Some("East"))],
        );
        assert!(plan.changed);
        let added = &plan.rows[1];
        assert_eq!(added.origin, None);
        assert_eq!(added.deal_id, Some(9));
        assert_eq!(
            added.overrides,
            BTreeMap::from([
                (0, OutCell::Text("Gamma".to_string())),
                (1, OutCell::Number(300.0)),
                (
                    2,
                    OutCell::Date(NaiveDate::from_ymd_opt(2026, 12, 24).expect("day"))
                ),
                (3, OutCell::Text("East".to_string())),
                (4, OutCell::Number(9.0)),
            ])
        );
        assert_eq!(added.fields, gamma);
        assert_eq!(
            added.extras,
            ExtraMap::from([("Region".to_string(), "East".to_string())])
        );
    }

    #[test]
    fn named_extra_columns_are_written_and_other_extras_are_not() {
        let acme = fields("Acme", Some(1000.0), None);
        let read_extras = ExtraMap::from([
            ("Region".to_string(), "North".to_string()),
            ("Column G".to_string(), "loose".to_string()),
        ]);
        let outcome = |merged_extras: Option<ExtraMap>| RowOutcome {
            extras: read_extras.clone(),
            merged_extras,
            ..row(2, Some(7), acme.clone(), Some(acme.clone()), Some(7))
        };
        let cases = [
            (
                "a changed extra is text",
                Some(ExtraMap::from([("Region".to_string(), "=1+2".to_string())])),
                BTreeMap::from([(3, OutCell::Text("=1+2".to_string()))]),
                Some("=1+2"),
            ),
            (
                "a removed extra is an empty cell",
                Some(ExtraMap::new()),
                BTreeMap::from([(3, OutCell::Empty)]),
                None,
            ),
            (
                "no merge keeps the row",
                None,
                BTreeMap::new(),
                Some("North"),
            ),
        ];
        for (name, merged_extras, expected, region) in cases {
            let plan = plan(
                &header(false),
                5,
                &[outcome(merged_extras)],
                &[deal(7, acme.clone(), Some("North"))],
            );
            assert_eq!(plan.rows[0].overrides, expected, "{name}");
            assert_eq!(
                plan.rows[0].extras.get("Region").map(String::as_str),
                region,
                "{name}: the mirror gets what is written"
            );
            assert_eq!(plan.rows[0].extras["Column G"], "loose", "{name}");
        }
    }

    #[test]
    fn a_missing_key_column_goes_after_the_widest_row() {
        let acme = fields("Acme", Some(1000.0), None);
        // The sheet has data under an empty header in column G (index 6).
        let planned = plan(
            &header(true),
            7,
            &[row(2, Some(7), acme.clone(), Some(acme.clone()), None)],
            &[deal(7, acme.clone(), None)],
        );
        assert!(planned.changed);
        assert_eq!(planned.added_key_column, Some(7));
        assert_eq!(planned.headers.len(), 8);
        assert_eq!(planned.roles[7], Some(ColumnRole::Key));
        assert_eq!(planned.roles[4..7], [None, None, None]);
        assert_eq!(
            planned.rows[0].overrides,
            BTreeMap::from([(7, OutCell::Number(7.0))])
        );
        // A sheet with no deal to show gets no key column.
        let empty = plan(&header(true), 4, &[], &[]);
        assert!(!empty.changed);
        assert_eq!(empty.added_key_column, None);
    }
}
