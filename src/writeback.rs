//! Writing the store's view of a file back into it: .xlsx through rust_xlsxwriter, .csv through
//! the csv crate, always safely — never while the file is open in Excel or LibreOffice, never over
//! a file that changed since it was read, through a temp file in the same folder that is fsynced
//! and renamed over the original, with the previous version kept in `.funnelsync/backups/`.
//!
//! [`plan`] is pure: from the rows as read and the merge outcome it decides which cells change,
//! which rows leave and which come in. [`write`] does the I/O. This module must not decide what a
//! deal's values are (that is the merge in `sync`) nor touch the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
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
    pub stalled: bool,
}

/// The new content of the managed sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetPlan {
    /// Headers as they will be written (the key column appended when the sheet had none).
    pub headers: Vec<String>,
    pub roles: Vec<Option<ColumnRole>>,
    pub header_row_number: u32,
    pub rows: Vec<PlannedRow>,
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
    stalled: &HashSet<DealId>,
) -> SheetPlan {
    let mut headers = header.headers.clone();
    let mut roles = header.roles.clone();
    let key_column_idx = match header.key_column() {
        Some(column_idx) => column_idx,
        None => {
            let column_idx = n_columns.max(headers.len());
            headers.resize(column_idx, String::new());
            roles.resize(column_idx, None);
            headers.push(String::new());
            roles.push(Some(ColumnRole::Key));
            column_idx
        }
    };
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
            stalled: false,
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
            stalled: stalled.contains(&deal_id),
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
            stalled: stalled.contains(&deal.id),
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

/// Whether funnelsync can write this file: .xlsx and .csv (not .xlsm, whose macros would be
/// lost, nor the read-only .xls and .ods).
pub fn is_writable(sheet: &SheetData) -> bool {
    is_writable_path(&sheet.path)
}

/// [`is_writable`] by the file's name alone.
pub fn is_writable_path(path: &Path) -> bool {
    let is_xlsm = path
        .extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| extension.eq_ignore_ascii_case("xlsm"));
    matches!(
        crate::workbook::format_of(path),
        Some(FileFormat::Xlsx | FileFormat::Csv)
    ) && !is_xlsm
}

/// Whether text written into a cell could be taken for a formula by a spreadsheet program.
pub fn looks_like_formula(text: &str) -> bool {
    text.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

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
    #[error("cannot build the workbook for {path}: {message}")]
    Build { path: PathBuf, message: String },
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

/// The lock file that says a program has `path` open, if there is one: Excel's `~$NAME` owner
/// file (Excel drops the first two characters of long names) or LibreOffice's `.~lock.NAME#`.
pub fn open_by(path: &Path) -> Option<(&'static str, PathBuf)> {
    let folder = path.parent()?;
    let name = path.file_name()?.to_str()?;
    let libreoffice = folder.join(format!(".~lock.{name}#"));
    if libreoffice.exists() {
        return Some(("LibreOffice", libreoffice));
    }
    let mut excel_names = vec![format!("~${name}")];
    let characters: Vec<char> = name.chars().collect();
    if characters.len() > 2 {
        excel_names.push(format!("~${}", characters[2..].iter().collect::<String>()));
    }
    if characters.len() > 1 {
        excel_names.push(format!("~${}", characters[1..].iter().collect::<String>()));
    }
    excel_names
        .into_iter()
        .map(|owner| folder.join(owner))
        .find(|owner| owner.exists())
        .map(|owner| ("Excel", owner))
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
    if let Some((program, lock)) = open_by(path) {
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
    let (bytes, row_numbers) = match sheet.format {
        FileFormat::Xlsx => xlsx::build(sheet, &original, plan, stage_names)?,
        FileFormat::Csv => csv_out::build(sheet, plan)?,
        FileFormat::Xls | FileFormat::Ods => {
            return Err(WriteError::Unsupported {
                path: path.to_path_buf(),
                reason: "the format is read-only".to_string(),
            })
        }
    };
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".~funnelsync-")
        .suffix(".tmp")
        .tempfile_in(folder)
        .map_err(io_error)?;
    temp.write_all(&bytes).map_err(io_error)?;
    if let Ok(metadata) = std::fs::metadata(path) {
        // The new file keeps the old one's permissions, so the team can still open it.
        std::fs::set_permissions(temp.path(), metadata.permissions()).map_err(io_error)?;
    }
    temp.as_file().sync_all().map_err(io_error)?;
    if n_backups > 0 {
        keep_backup(path, &original, n_backups).map_err(io_error)?;
    }
    // A save that happened while we built the new content wins; we read it again next time.
    if crate::watch::fingerprint(path) != fingerprint_before || open_by(path).is_some() {
        return Err(WriteError::ChangedMeanwhile {
            path: path.to_path_buf(),
        });
    }
    // Swap the new file in atomically and look at what came out: if it is not the file we read
    // (someone saved in the last instant), swap back, so their save is never lost. Where the file
    // system cannot exchange (network shares), a plain rename is the fallback.
    let temp_path = temp.into_temp_path();
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        &*temp_path,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            if crate::watch::fingerprint(&temp_path) != fingerprint_before {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &*temp_path,
                    rustix::fs::CWD,
                    path,
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                return Err(WriteError::ChangedMeanwhile {
                    path: path.to_path_buf(),
                });
            }
            // The old version, now at the temp path, is removed when `temp_path` is dropped.
        }
        Err(_) => {
            temp_path
                .persist(path)
                .map_err(|error| io_error(error.error))?;
        }
    }
    if let Ok(folder_handle) = std::fs::File::open(folder) {
        let _ = folder_handle.sync_all();
    }
    Ok(Written {
        content_hash: crate::workbook::hash_bytes(&bytes),
        row_numbers,
    })
}

/// Copies the old content to `.funnelsync/backups/NAME.YYYYmmddTHHMMSS.ext` and keeps the newest
/// `n_backups` of that file.
fn keep_backup(path: &Path, original: &[u8], n_backups: usize) -> std::io::Result<()> {
    let folder = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(".funnelsync")
        .join("backups");
    std::fs::create_dir_all(&folder)?;
    let stem = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = path
        .extension()
        .map(|extension| extension.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    std::fs::write(folder.join(format!("{stem}.{stamp}.{extension}")), original)?;
    let prefix = format!("{stem}.");
    let mut backups: Vec<PathBuf> = std::fs::read_dir(&folder)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|backup| {
            backup
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(&prefix)
                        && name.ends_with(&format!(".{extension}"))
                        && name[prefix.len()..].starts_with(|c: char| c.is_ascii_digit())
                })
        })
        .collect();
    backups.sort();
    let excess = backups.len().saturating_sub(n_backups);
    for old in &backups[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

mod xlsx {
    //! The .xlsx writer.

    use super::{OutCell, SheetPlan, WriteError};
    use crate::mapping::ColumnRole;
    use crate::workbook::SheetData;
    use calamine::{Data, DataRef, Reader};
    use rust_xlsxwriter::{
        Color, DataValidation, DataValidationErrorStyle, ExcelDateTime, Format, Formula, Workbook,
        Worksheet,
    };
    use std::collections::HashMap;
    use std::io::Cursor;

    type Grid = HashMap<(u32, u32), Data>;
    type Formulas = HashMap<(u32, u32), String>;

    fn build_error(sheet: &SheetData, message: impl std::fmt::Display) -> WriteError {
        WriteError::Build {
            path: sheet.path.clone(),
            message: message.to_string(),
        }
    }

    /// Reads every cell value and formula of a sheet, by absolute (row, column), streaming: memory
    /// follows the cells present, not the sheet's dimension.
    fn read_cells(
        workbook: &mut calamine::Xlsx<Cursor<&[u8]>>,
        name: &str,
        sheet: &SheetData,
    ) -> Result<(Grid, Formulas), WriteError> {
        let mut values = Grid::new();
        let mut formulas = Formulas::new();
        let mut reader = workbook
            .worksheet_cells_reader(name)
            .map_err(|error| build_error(sheet, error))?;
        while let Some(cell) = reader
            .next_cell_with_formula()
            .map_err(|error| build_error(sheet, error))?
        {
            let value = match cell.value {
                DataRef::Empty => Data::Empty,
                DataRef::Int(value) => Data::Int(value),
                DataRef::Float(value) => Data::Float(value),
                DataRef::String(text) => Data::String(text),
                DataRef::SharedString(text) => Data::String(text.to_string()),
                DataRef::Bool(value) => Data::Bool(value),
                DataRef::DateTime(datetime) => Data::DateTime(datetime),
                DataRef::DateTimeIso(text) => Data::DateTimeIso(text),
                DataRef::DurationIso(text) => Data::DurationIso(text),
                DataRef::Error(error) => Data::Error(error),
            };
            if !matches!(value, Data::Empty) {
                values.insert(cell.pos, value);
            }
            if let Some(formula) = cell.formula.filter(|formula| !formula.is_empty()) {
                formulas.insert(cell.pos, formula);
            }
        }
        Ok((values, formulas))
    }

    /// Writes a cell as read: its formula (with the cached result) or its value.
    fn copy_cell(
        worksheet: &mut Worksheet,
        row: u32,
        column: u16,
        value: Option<&Data>,
        formula: Option<&String>,
        format: &Format,
        date_format: &Format,
    ) -> Result<(), rust_xlsxwriter::XlsxError> {
        if let Some(formula) = formula {
            let result = value.map(|value| value.to_string()).unwrap_or_default();
            worksheet.write_formula_with_format(
                row,
                column,
                Formula::new(formula).set_result(result),
                format,
            )?;
            return Ok(());
        }
        match value {
            None | Some(Data::Empty) => {}
            Some(Data::String(text))
            | Some(Data::DateTimeIso(text))
            | Some(Data::DurationIso(text)) => {
                worksheet.write_string_with_format(row, column, text, format)?;
            }
            Some(Data::Float(number)) => {
                worksheet.write_number_with_format(row, column, *number, format)?;
            }
            Some(Data::Int(number)) => {
                worksheet.write_number_with_format(row, column, *number as f64, format)?;
            }
            Some(Data::Bool(value)) => {
                worksheet.write_boolean_with_format(row, column, *value, format)?;
            }
            Some(Data::DateTime(datetime)) => {
                worksheet.write_number_with_format(row, column, datetime.as_f64(), date_format)?;
            }
            Some(Data::Error(error)) => {
                worksheet.write_string_with_format(row, column, error.to_string(), format)?;
            }
        }
        Ok(())
    }

    pub fn build(
        sheet: &SheetData,
        original: &[u8],
        plan: &SheetPlan,
        stage_names: &[String],
    ) -> Result<(Vec<u8>, Vec<u32>), WriteError> {
        let mut source: calamine::Xlsx<_> = calamine::open_workbook_from_rs(Cursor::new(original))
            .map_err(|error| build_error(sheet, error))?;
        let sheets = source.sheets_metadata().to_vec();
        if let Some(other) = sheets
            .iter()
            .find(|other| other.typ != calamine::SheetType::WorkSheet)
        {
            return Err(WriteError::Unsupported {
                path: sheet.path.clone(),
                reason: format!(
                    "it has a chart or dialog sheet (\"{}\") that would be lost",
                    other.name
                ),
            });
        }
        let mut workbook = Workbook::new();
        let plain = Format::new();
        let date_format = Format::new().set_num_format("yyyy-mm-dd");
        let stalled_fill = Color::RGB(0xFDE2E1);
        let mut row_numbers = Vec::new();
        for meta in &sheets {
            let (values, formulas) = read_cells(&mut source, &meta.name, sheet)?;
            let worksheet = workbook.add_worksheet();
            worksheet
                .set_name(&meta.name)
                .map_err(|error| build_error(sheet, error))?;
            if meta.visible != calamine::SheetVisible::Visible {
                worksheet.set_hidden(true);
            }
            if meta.name != sheet.sheet_name {
                for ((row, column), value) in &values {
                    copy_cell(
                        worksheet,
                        *row,
                        *column as u16,
                        Some(value),
                        formulas.get(&(*row, *column)),
                        &plain,
                        &date_format,
                    )
                    .map_err(|error| build_error(sheet, error))?;
                }
                for ((row, column), formula) in &formulas {
                    if !values.contains_key(&(*row, *column)) {
                        copy_cell(
                            worksheet,
                            *row,
                            *column as u16,
                            None,
                            Some(formula),
                            &plain,
                            &date_format,
                        )
                        .map_err(|error| build_error(sheet, error))?;
                    }
                }
                continue;
            }
            row_numbers = write_managed(
                worksheet,
                plan,
                &values,
                &formulas,
                stage_names,
                stalled_fill,
            )
            .map_err(|error| build_error(sheet, error))?;
        }
        let bytes = workbook
            .save_to_buffer()
            .map_err(|error| build_error(sheet, error))?;
        Ok((bytes, row_numbers))
    }

    fn write_managed(
        worksheet: &mut Worksheet,
        plan: &SheetPlan,
        values: &Grid,
        formulas: &Formulas,
        stage_names: &[String],
        stalled_fill: Color,
    ) -> Result<Vec<u32>, rust_xlsxwriter::XlsxError> {
        let header_idx = plan.header_row_number - 1;
        let n_columns = plan.headers.len().max(
            values
                .keys()
                .map(|(_, column)| *column as usize + 1)
                .max()
                .unwrap_or(0),
        );
        let column_kind = |column_idx: usize| match plan.roles.get(column_idx) {
            Some(Some(ColumnRole::Field(field))) => Some(field.kind()),
            _ => None,
        };
        // The six formats a cell can take, built once: plain, date and amount, each with or
        // without the stalled fill.
        let formats: Vec<Format> = [false, true]
            .into_iter()
            .flat_map(|stalled| {
                [
                    Format::new(),
                    Format::new().set_num_format("yyyy-mm-dd"),
                    Format::new().set_num_format("#,##0.00"),
                ]
                .map(|format| {
                    if stalled {
                        format.set_background_color(stalled_fill)
                    } else {
                        format
                    }
                })
            })
            .collect();
        let number_format = |stalled: bool, kind: Option<crate::deal::FieldKind>| -> &Format {
            let base = match kind {
                Some(crate::deal::FieldKind::Date) => 1,
                Some(crate::deal::FieldKind::Amount) => 2,
                _ => 0,
            };
            &formats[base + if stalled { 3 } else { 0 }]
        };
        let mut widths: Vec<usize> = plan
            .headers
            .iter()
            .map(|header| display_width(header) + 2)
            .collect();
        widths.resize(n_columns, 8);

        // Everything above and on the header row is copied as it is; the header gets the key
        // column if it had none, in bold.
        let bold = Format::new().set_bold();
        for ((row, column), value) in values.iter().filter(|((row, _), _)| *row < header_idx) {
            copy_cell(
                worksheet,
                *row,
                *column as u16,
                Some(value),
                formulas.get(&(*row, *column)),
                &Format::new(),
                number_format(false, Some(crate::deal::FieldKind::Date)),
            )?;
        }
        for (column_idx, header) in plan.headers.iter().enumerate() {
            let text = if header.is_empty()
                && plan.roles.get(column_idx) == Some(&Some(ColumnRole::Key))
            {
                "CRM ID"
            } else {
                header
            };
            match (
                values.get(&(header_idx, column_idx as u32)),
                formulas.get(&(header_idx, column_idx as u32)),
            ) {
                (Some(value), formula) if !text.is_empty() || formula.is_some() => {
                    copy_cell(
                        worksheet,
                        header_idx,
                        column_idx as u16,
                        Some(value),
                        formula,
                        &bold,
                        &bold,
                    )?;
                }
                _ if !text.is_empty() => {
                    worksheet.write_string_with_format(
                        header_idx,
                        column_idx as u16,
                        text,
                        &bold,
                    )?;
                }
                _ => {}
            }
        }

        // Data rows keep their positions when the sheet has formulas below the header (moving a
        // row would break its references); otherwise they are packed.
        let has_formulas = formulas.keys().any(|(row, _)| *row > header_idx);
        // The columns each row has cells in, found once rather than per row.
        let mut columns_of_row: HashMap<u32, Vec<usize>> = HashMap::new();
        for (row, column) in values.keys().chain(formulas.keys()) {
            columns_of_row
                .entry(*row)
                .or_default()
                .push(*column as usize);
        }
        let mut next_row = header_idx + 1;
        let mut row_numbers = Vec::with_capacity(plan.rows.len());
        let last_origin = plan
            .rows
            .iter()
            .filter_map(|row| row.origin)
            .max()
            .unwrap_or(plan.header_row_number);
        let mut appended_row = last_origin; // 0-based index of the first row after the last original
        for planned in &plan.rows {
            let row_idx = match (has_formulas, planned.origin) {
                (true, Some(origin)) => origin - 1,
                (true, None) => {
                    let row_idx = appended_row;
                    appended_row += 1;
                    row_idx
                }
                (false, _) => {
                    let row_idx = next_row;
                    next_row += 1;
                    row_idx
                }
            };
            row_numbers.push(row_idx + 1);
            let mut columns: Vec<usize> = planned.overrides.keys().copied().collect();
            if let Some(columns_there) = planned
                .origin
                .and_then(|origin| columns_of_row.get(&(origin - 1)))
            {
                columns.extend(columns_there.iter().copied());
            }
            if planned.stalled {
                columns.extend(0..plan.headers.len());
            }
            columns.sort_unstable();
            columns.dedup();
            for column_idx in columns {
                let format = number_format(planned.stalled, column_kind(column_idx));
                let column = column_idx as u16;
                match planned.overrides.get(&column_idx) {
                    Some(cell) => {
                        if let Some(width) = widths.get_mut(column_idx) {
                            *width = (*width).max(out_width(cell));
                        }
                        match cell {
                            OutCell::Empty => {
                                if planned.stalled {
                                    worksheet.write_blank(row_idx, column, format)?;
                                }
                            }
                            // Text is always written as text: a value from the store that looks
                            // like a formula stays a string.
                            OutCell::Text(text) => {
                                worksheet
                                    .write_string_with_format(row_idx, column, text, format)?;
                            }
                            OutCell::Number(number) => {
                                worksheet
                                    .write_number_with_format(row_idx, column, *number, format)?;
                            }
                            OutCell::Date(date) => {
                                let datetime = ExcelDateTime::from_ymd(
                                    u16::try_from(chrono::Datelike::year(date)).unwrap_or(1900),
                                    chrono::Datelike::month(date) as u8,
                                    chrono::Datelike::day(date) as u8,
                                )?;
                                worksheet.write_datetime_with_format(
                                    row_idx, column, datetime, format,
                                )?;
                            }
                        }
                    }
                    None => {
                        let origin_idx =
                            planned.origin.map(|origin| origin - 1).unwrap_or(u32::MAX);
                        let value = values.get(&(origin_idx, column_idx as u32));
                        let formula = formulas.get(&(origin_idx, column_idx as u32));
                        if value.is_none() && formula.is_none() {
                            if planned.stalled {
                                worksheet.write_blank(row_idx, column, format)?;
                            }
                            continue;
                        }
                        if let (Some(width), Some(value)) = (widths.get_mut(column_idx), value) {
                            *width = (*width).max(display_width(&value.to_string()));
                        }
                        let date_format =
                            number_format(planned.stalled, Some(crate::deal::FieldKind::Date));
                        copy_cell(
                            worksheet,
                            row_idx,
                            column,
                            value,
                            formula,
                            format,
                            date_format,
                        )?;
                    }
                }
            }
        }
        let last_row = row_numbers
            .iter()
            .copied()
            .max()
            .unwrap_or(plan.header_row_number)
            .max(plan.header_row_number)
            - 1;
        let last_column = plan.headers.len().saturating_sub(1) as u16;
        worksheet.set_freeze_panes(header_idx + 1, 0)?;
        worksheet.autofilter(header_idx, 0, last_row.max(header_idx), last_column)?;
        for (column_idx, width) in widths.iter().enumerate() {
            worksheet.set_column_width(column_idx as u16, (*width).clamp(6, 50) as f64)?;
        }
        if let Some(stage_column) = plan
            .roles
            .iter()
            .position(|role| role == &Some(ColumnRole::Field(crate::deal::Field::Stage)))
        {
            let total: usize = stage_names.iter().map(|name| name.len() + 1).sum();
            if total <= 255 {
                // A warning, not a hard stop: aliases such as 成交 are valid too.
                let validation = DataValidation::new()
                    .allow_list_strings(stage_names)?
                    .set_error_style(DataValidationErrorStyle::Warning);
                worksheet.add_data_validation(
                    header_idx + 1,
                    stage_column as u16,
                    1_048_575,
                    stage_column as u16,
                    &validation,
                )?;
            }
        }
        Ok(row_numbers)
    }

    fn display_width(text: &str) -> usize {
        unicode_width::UnicodeWidthStr::width(text)
    }

    fn out_width(cell: &OutCell) -> usize {
        match cell {
            OutCell::Empty => 0,
            OutCell::Text(text) => display_width(text),
            OutCell::Number(number) => crate::deal::format_amount(*number).len() + 4,
            OutCell::Date(_) => 10,
        }
    }
}

mod csv_out {
    //! The .csv writer: the delimiter, encoding, BOM and line ending the file was read with.

    use super::{looks_like_formula, OutCell, SheetPlan, WriteError};
    use crate::workbook::{Cell, CsvFormat, SheetData};

    pub fn build(sheet: &SheetData, plan: &SheetPlan) -> Result<(Vec<u8>, Vec<u32>), WriteError> {
        let format = sheet.csv_format.clone().unwrap_or(CsvFormat {
            delimiter: b',',
            encoding: encoding_rs::UTF_8,
            has_bom: false,
            line_ending_crlf: true,
        });
        let mut writer = csv::WriterBuilder::new()
            .delimiter(format.delimiter)
            .terminator(if format.line_ending_crlf {
                csv::Terminator::CRLF
            } else {
                csv::Terminator::Any(b'\n')
            })
            .flexible(true)
            .from_writer(Vec::new());
        let csv_error = |error: csv::Error| WriteError::Build {
            path: sheet.path.clone(),
            message: error.to_string(),
        };
        let raw = |cell: &Cell| cell.to_string();
        let mut row_number = 0u32;
        let mut row_numbers = Vec::new();
        // Rows above the header, then the header (with the key column if it was missing).
        for row in sheet
            .rows
            .iter()
            .filter(|row| row.row_number < plan.header_row_number)
        {
            writer
                .write_record(row.cells.iter().map(raw))
                .map_err(csv_error)?;
            row_number += 1;
        }
        let headers: Vec<String> = plan
            .headers
            .iter()
            .enumerate()
            .map(|(column_idx, header)| {
                if header.is_empty()
                    && plan.roles.get(column_idx) == Some(&Some(crate::mapping::ColumnRole::Key))
                {
                    "CRM ID".to_string()
                } else {
                    header.clone()
                }
            })
            .collect();
        writer.write_record(&headers).map_err(csv_error)?;
        row_number += 1;
        let by_number: std::collections::HashMap<u32, &crate::workbook::SheetRow> =
            sheet.rows.iter().map(|row| (row.row_number, row)).collect();
        for planned in &plan.rows {
            let original = planned
                .origin
                .and_then(|origin| by_number.get(&origin).copied());
            let n_columns = original.map(|row| row.cells.len()).unwrap_or(0).max(
                planned
                    .overrides
                    .keys()
                    .max()
                    .map(|max| max + 1)
                    .unwrap_or(0),
            );
            let mut record = Vec::with_capacity(n_columns);
            for column_idx in 0..n_columns {
                let text = match planned.overrides.get(&column_idx) {
                    Some(OutCell::Empty) => String::new(),
                    // A value from the store that a spreadsheet could take for a formula is
                    // escaped the way Excel itself marks text: a leading apostrophe.
                    Some(OutCell::Text(text)) if looks_like_formula(text) => format!("'{text}"),
                    Some(OutCell::Text(text)) => text.clone(),
                    Some(OutCell::Number(number)) => crate::deal::format_amount(*number),
                    Some(OutCell::Date(date)) => date.format("%Y-%m-%d").to_string(),
                    None => original
                        .map(|row| raw(row.cell(column_idx)))
                        .unwrap_or_default(),
                };
                record.push(text);
            }
            writer.write_record(&record).map_err(csv_error)?;
            row_number += 1;
            row_numbers.push(row_number);
        }
        let text = writer.into_inner().map_err(|error| WriteError::Build {
            path: sheet.path.clone(),
            message: error.to_string(),
        })?;
        let text = String::from_utf8_lossy(&text).into_owned();
        let mut bytes = Vec::new();
        if format.encoding == encoding_rs::UTF_16LE || format.encoding == encoding_rs::UTF_16BE {
            // encoding_rs does not encode UTF-16; do it by hand.
            let little_endian = format.encoding == encoding_rs::UTF_16LE;
            if format.has_bom {
                bytes.extend_from_slice(if little_endian {
                    &[0xFF, 0xFE]
                } else {
                    &[0xFE, 0xFF]
                });
            }
            for unit in text.encode_utf16() {
                bytes.extend_from_slice(&if little_endian {
                    unit.to_le_bytes()
                } else {
                    unit.to_be_bytes()
                });
            }
        } else {
            if format.has_bom && format.encoding == encoding_rs::UTF_8 {
                bytes.extend_from_slice(&[0xEF, 0xBB, 0xBF]);
            }
            let (encoded, _, had_unmappable) = format.encoding.encode(&text);
            if had_unmappable {
                return Err(WriteError::Unsupported {
                    path: sheet.path.clone(),
                    reason: format!(
                        "some values cannot be written in {}; set the file's encoding to UTF-8",
                        format.encoding.name()
                    ),
                });
            }
            bytes.extend_from_slice(&encoded);
        }
        Ok((bytes, row_numbers))
    }
}
