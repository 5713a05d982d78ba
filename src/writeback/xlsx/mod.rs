//! The in-place editor for .xlsx and .xlsm: the write-back patches the package instead of
//! rebuilding it. Every zip entry other than the managed sheet is copied through byte for byte
//! (its compressed data, untouched); the managed sheet's XML is streamed through and only the
//! cells the plan changes are replaced. A part other than the sheet changes only where the change
//! needs it, each said where it is done: `styles.xml` gains one date style when a date goes into a
//! column that has none, an Excel table's `ref` grows over appended rows, and `workbook.xml` asks
//! for a recalculation when a value a formula may depend on changed.
//!
//! This module knows the package format; it must not decide what a cell shows (that is the
//! plan) nor how the file reaches the disk (that is `replace`).

mod cellref;
mod package;
#[cfg(test)]
mod proptests;
mod safety;
mod sheet;
mod styles;
mod xml;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Write};

use quick_xml::events::Event;

use super::{OutCell, SheetPlan, WriteError, WriteSeek};
use crate::mapping::ColumnRole;
use crate::workbook::SheetData;
use cellref::{Range, RowShift};
use package::Package;
use sheet::{Fresh, RowEdit, SheetEdit};
use styles::Styles;

#[cfg(test)]
use sheet::date_serial;

/// What went wrong inside the package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("the workbook is not a valid zip package: {0}")]
    Zip(zip::result::ZipError),
    #[error("a part of the workbook is not valid XML: {0}")]
    Xml(#[from] quick_xml::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the workbook has no part {0}")]
    Missing(String),
    #[error("{0}")]
    Malformed(String),
}

impl From<zip::result::ZipError> for PackageError {
    /// A read or write that failed (a full disk, a file-size limit) is an I/O error, not a sign
    /// that the package is broken.
    fn from(error: zip::result::ZipError) -> PackageError {
        match error {
            zip::result::ZipError::Io(source) => PackageError::Io(source),
            other => PackageError::Zip(other),
        }
    }
}

impl From<quick_xml::events::attributes::AttrError> for PackageError {
    fn from(error: quick_xml::events::attributes::AttrError) -> PackageError {
        PackageError::Xml(quick_xml::Error::from(error))
    }
}

/// How hard the rewritten sheet part is compressed. Measured on a 100,000-row sheet (73 MB of
/// XML): level 3 writes it in about half the time of level 6 for a part about 10 % larger (level 1
/// is faster still but 60 % larger). Excel recompresses at its own level on its next save.
const SHEET_COMPRESSION_LEVEL: i64 = 3;

/// Writes the plan into the workbook `original` (the file the sync read, open), into `out`. Returns
/// the Excel row number of each planned row in the written file, in plan order.
pub fn build(
    sheet: &SheetData,
    original: &std::fs::File,
    plan: &SheetPlan,
    stage_names: &[String],
    out: &mut dyn WriteSeek,
) -> Result<Vec<u32>, WriteError> {
    let edit_error = |source: PackageError| WriteError::Edit {
        path: sheet.path.clone(),
        source,
    };
    build_package(sheet, original, plan, stage_names, out).map_err(edit_error)
}

fn build_package(
    sheet: &SheetData,
    original: &std::fs::File,
    plan: &SheetPlan,
    stage_names: &[String],
    out: &mut dyn WriteSeek,
) -> Result<Vec<u32>, PackageError> {
    let mut package = Package::open(BufReader::with_capacity(1 << 16, original))?;
    let SheetLocation {
        workbook,
        workbook_relationships,
        sheet_index,
        sheet_part,
        sheet_entry,
        sheet_relationships,
    } = locate_sheet(&mut package, &sheet.sheet_name)?;
    let styles_part = workbook_relationships
        .iter()
        .find(|relationship| relationship.kind == "styles")
        .and_then(|relationship| relationship.part.clone());
    let styles_bytes = match &styles_part {
        Some(part) => package.read(part)?,
        None => None,
    };
    let mut styles = match &styles_bytes {
        Some(bytes) => Styles::parse(bytes)?,
        None => Styles::default(),
    };

    let parts = safety::SheetParts {
        sheet_name: &sheet.sheet_name,
        sheet_index,
        sheet_part: &sheet_part,
        relationships: &sheet_relationships,
        workbook: &workbook,
        formula_cells: &sheet.formula_cells,
    };
    let mut removed = plan.removed.clone();
    removed.sort_unstable();
    let (shift, cleared) = decide_removals(&mut package, &parts, &removed, &sheet.path)?;

    let layout = Layout::of(plan, &removed, &shift);
    let (rows, new_rows, max_column) = row_edits(plan, &cleared, layout.first_new_row);
    let last_new_row = new_rows.last().map(|(row_number, _)| *row_number);
    let fresh = layout.is_fresh.then(|| {
        fresh_niceties(
            plan,
            stage_names,
            last_new_row.unwrap_or(plan.header_row_number),
        )
    });
    // The sync says which rows show the date styles (it does not keep the sheet's rows); a
    // caller holding the rows lets them be searched.
    let mut style_rows = plan.style_rows.clone();
    style_rows.extend(date_style_rows(sheet, &rows));
    let footprint = Footprint {
        cells: rows
            .iter()
            .flat_map(|(row_number, row_edit)| match row_edit {
                RowEdit::Cells(cells) => {
                    cells.keys().map(|column| (*row_number, *column)).collect()
                }
                RowEdit::Clear => Vec::new(),
            })
            .collect(),
        cleared_rows: cleared.clone(),
        first_deleted: removed.first().copied().filter(|_| !shift.is_empty()),
        appended: new_rows.first().map(|(first, _)| *first).zip(last_new_row),
    };
    let edit = SheetEdit {
        header_row: plan.header_row_number,
        style_rows,
        rows,
        shift: shift.clone(),
        new_rows,
        template_row: layout.template_row,
        extend: last_new_row.map(|last| (layout.first_new_row - 1, last)),
        max_column,
        fresh,
        date1904: workbook.date1904,
    };

    let (mut staged, outcome) =
        patch_into_staging(&mut package, sheet_entry, edit, &mut styles, &sheet.path)?;

    // The parts besides the sheet that this write changes.
    let mut changed_parts: HashMap<String, Vec<u8>> = HashMap::new();
    if let (Some(part), Some(bytes)) = (&styles_part, &styles_bytes) {
        if styles.is_changed() {
            // A date went into a column without a date style: one `xf` was added.
            changed_parts.insert(part.to_lowercase(), styles.write(bytes)?);
        }
    }
    for relationship in sheet_relationships
        .iter()
        .filter(|relationship| relationship.kind == "table")
    {
        let Some(part) = &relationship.part else {
            continue;
        };
        if let Some(bytes) = package.read(part)? {
            // Rows appended below an Excel table join it; deleted rows leave it.
            if let Some(edited) =
                edit_table(&bytes, &shift, layout.first_new_row - 1, last_new_row)?
            {
                changed_parts.insert(part.to_lowercase(), edited);
            }
        }
    }
    // A formula may read a changed cell when the sheet has formulas of its own, when the
    // workbook's calculation chain says formulas exist (Excel writes one whenever they do), when
    // a defined name covers a changed cell, or when a formula on another sheet reads one
    // (`=SUM(Pipeline!D2:D5)` on Summary, in a workbook without a calculation chain).
    let formulas_may_read_changes = |package: &mut Package<_>| -> Result<bool, PackageError> {
        if !sheet.formula_cells.is_empty()
            || workbook_relationships
                .iter()
                .any(|relationship| relationship.kind == "calcChain")
            || footprint.touches_names(&workbook, &sheet.sheet_name)
        {
            return Ok(true);
        }
        let other_sheets: Vec<String> = workbook_relationships
            .iter()
            .filter(|relationship| relationship.kind == "worksheet")
            .filter_map(|relationship| relationship.part.clone())
            .filter(|part| !part.eq_ignore_ascii_case(&sheet_part))
            .collect();
        let formulas = safety::formulas_naming_sheet(package, &other_sheets, &sheet.sheet_name)?;
        Ok(formulas
            .iter()
            .any(|formula| footprint.touches_formula(formula, &sheet.sheet_name)))
    };
    if outcome.values_changed && formulas_may_read_changes(&mut package)? {
        // Cached results of formulas that read the changed cells are stale: Excel and
        // LibreOffice recalculate on opening.
        if let Some(bytes) = package.read(&workbook.part)? {
            if let Some(edited) = request_recalculation(&bytes)? {
                changed_parts.insert(workbook.part.to_lowercase(), edited);
            }
        }
    }

    assemble(&mut package, sheet_entry, &mut staged, &changed_parts, out)?;

    Ok(written_row_numbers(plan, layout.first_new_row, &shift))
}

/// The cells to write into existing rows (changed cells, cleared rows, the CRM ID header) and
/// the new rows with their numbers, and the widest column either reaches.
fn row_edits(
    plan: &SheetPlan,
    cleared: &[u32],
    first_new_row: u32,
) -> (
    BTreeMap<u32, RowEdit>,
    Vec<(u32, BTreeMap<u32, OutCell>)>,
    u32,
) {
    let mut rows: BTreeMap<u32, RowEdit> = BTreeMap::new();
    let mut max_column = 0u32;
    for planned in &plan.rows {
        let Some(origin) = planned.origin else {
            continue;
        };
        if planned.overrides.is_empty() {
            continue;
        }
        let cells = column_cells(&planned.overrides, &mut max_column);
        rows.insert(origin, RowEdit::Cells(cells));
    }
    for row_number in cleared {
        rows.insert(*row_number, RowEdit::Clear);
    }
    if let Some(key_column) = plan.added_key_column {
        let column = u32::try_from(key_column).unwrap_or(u32::MAX);
        max_column = max_column.max(column);
        let mut header = BTreeMap::new();
        header.insert(column, OutCell::Text("CRM ID".to_string()));
        rows.insert(plan.header_row_number, RowEdit::Cells(header));
    }
    let new_rows: Vec<(u32, BTreeMap<u32, OutCell>)> = plan
        .rows
        .iter()
        .filter(|planned| planned.origin.is_none())
        .zip(first_new_row..)
        .map(|(planned, row_number)| {
            (
                row_number,
                column_cells(&planned.overrides, &mut max_column),
            )
        })
        .collect();
    (rows, new_rows, max_column)
}

/// Rows that leave are deleted (the rows below moving up) where nothing points below them, and
/// cleared where something might: the shift of the rows below, or the rows to clear.
fn decide_removals(
    package: &mut Package<BufReader<&std::fs::File>>,
    parts: &safety::SheetParts<'_>,
    removed: &[u32],
    path: &std::path::Path,
) -> Result<(RowShift, Vec<u32>), PackageError> {
    let Some(first_deleted) = removed.first().copied() else {
        return Ok((RowShift::default(), Vec::new()));
    };
    let candidate = RowShift::new(removed.to_vec());
    Ok(
        match safety::check(package, parts, &candidate, first_deleted)? {
            Ok(()) => (candidate, Vec::new()),
            Err(reason) => {
                tracing::info!(
                    "{}: {} row(s) left blank rather than deleted: {reason}",
                    path.display(),
                    removed.len()
                );
                (RowShift::default(), removed.to_vec())
            }
        },
    )
}

/// Where the managed sheet is in the package, and what the workbook says around it.
struct SheetLocation {
    workbook: package::WorkbookInfo,
    workbook_relationships: Vec<package::Relationship>,
    /// Its position among the workbook's sheets.
    sheet_index: usize,
    sheet_part: String,
    sheet_entry: usize,
    sheet_relationships: Vec<package::Relationship>,
}

fn locate_sheet(
    package: &mut Package<BufReader<&std::fs::File>>,
    sheet_name: &str,
) -> Result<SheetLocation, PackageError> {
    let workbook = package.workbook()?;
    let workbook_relationships = package.relationships(&workbook.part)?;
    let sheet_index = workbook
        .sheets
        .iter()
        .position(|(name, _)| *name == sheet_name)
        .ok_or_else(|| PackageError::Missing(format!("sheet \"{}\"", sheet_name)))?;
    let sheet_relationship_id = &workbook.sheets[sheet_index].1;
    let sheet_part = workbook_relationships
        .iter()
        .find(|relationship| &relationship.id == sheet_relationship_id)
        .and_then(|relationship| relationship.part.clone())
        .ok_or_else(|| PackageError::Missing(format!("the part of sheet \"{}\"", sheet_name)))?;
    let sheet_entry = package
        .index_of(&sheet_part)
        .ok_or_else(|| PackageError::Missing(sheet_part.clone()))?;
    let sheet_relationships = package.relationships(&sheet_part)?;
    Ok(SheetLocation {
        workbook,
        workbook_relationships,
        sheet_index,
        sheet_part,
        sheet_entry,
        sheet_relationships,
    })
}

/// Writes the new package: the staged sheet part, the changed parts, and every other entry
/// copied through as stored (compressed bytes untouched), in the original order.
fn assemble(
    package: &mut Package<BufReader<&std::fs::File>>,
    sheet_entry: usize,
    staged: &mut zip::ZipArchive<std::fs::File>,
    changed_parts: &HashMap<String, Vec<u8>>,
    out: &mut dyn WriteSeek,
) -> Result<(), PackageError> {
    let mut writer = zip::ZipWriter::new(out);
    for entry_idx in 0..package.archive.len() {
        if entry_idx == sheet_entry {
            writer.raw_copy_file(staged.by_index_raw(0)?)?;
            continue;
        }
        let name = package
            .archive
            .name_for_index(entry_idx)
            .transpose()?
            .map(|name| name.into_owned())
            .unwrap_or_default();
        match changed_parts.get(&name.trim_start_matches('/').to_lowercase()) {
            Some(bytes) => {
                let entry = package.archive.by_index_raw(entry_idx)?;
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(entry.compression())
                    .last_modified_time(entry.last_modified().unwrap_or_default());
                drop(entry);
                writer.start_file(name.as_str(), options)?;
                writer.write_all(bytes)?;
            }
            None => writer.raw_copy_file(package.archive.by_index_raw(entry_idx)?)?,
        }
    }
    let comment = package.archive.comment().to_vec();
    if !comment.is_empty() {
        writer.set_raw_comment(comment.into_boxed_slice())?;
    }
    writer.finish()?;
    Ok(())
}

/// The Excel row number of each planned row in the written file, in plan order: a kept row
/// where the deletions above moved it, a new row in the order appended.
fn written_row_numbers(plan: &SheetPlan, first_new_row: u32, shift: &RowShift) -> Vec<u32> {
    plan.rows
        .iter()
        .scan(first_new_row, |next_new_row, planned| {
            Some(match planned.origin {
                Some(origin) => shift.map(origin).unwrap_or(origin),
                None => {
                    let row_number = *next_new_row;
                    *next_new_row += 1;
                    row_number
                }
            })
        })
        .collect()
}

/// Patches the sheet part into an archive of its own, so that every entry of the new package
/// keeps its place and the parts written after it (styles) can use what the patch found.
fn patch_into_staging(
    package: &mut Package<BufReader<&std::fs::File>>,
    sheet_entry: usize,
    edit: SheetEdit,
    styles: &mut Styles,
    path: &std::path::Path,
) -> Result<(zip::ZipArchive<std::fs::File>, sheet::EditOutcome), PackageError> {
    let mut staging = zip::ZipWriter::new(std::io::BufWriter::with_capacity(
        1 << 16,
        tempfile::tempfile()?,
    ));
    let (sheet_entry_name, sheet_options) = {
        let entry = package.archive.by_index_raw(sheet_entry)?;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(SHEET_COMPRESSION_LEVEL))
            .last_modified_time(entry.last_modified().unwrap_or_default())
            .large_file(entry.size() >= u64::from(u32::MAX));
        (entry.name()?.into_owned(), options)
    };
    staging.start_file(sheet_entry_name.as_str(), sheet_options)?;
    let outcome = {
        let entry = package.archive.by_index(sheet_entry)?;
        // The patcher writes many small pieces; the compressor is fed in large ones.
        let mut sheet_writer = std::io::BufWriter::with_capacity(1 << 16, &mut staging);
        let outcome = sheet::patch(
            BufReader::with_capacity(1 << 16, entry),
            &mut sheet_writer,
            edit,
            styles,
        )?;
        sheet_writer.flush()?;
        outcome
    };
    for (row_number, column) in &outcome.kept_formulas {
        tracing::warn!(
            "{}: {} holds a formula; it was kept and not overwritten",
            path.display(),
            cellref::cell_name(*row_number, *column)
        );
    }
    let staged_file = staging
        .finish()?
        .into_inner()
        .map_err(|error| PackageError::Io(error.into_error()))?;
    let staged = zip::ZipArchive::new(staged_file)?;
    Ok((staged, outcome))
}

/// For each date going into an existing row, the nearest row above it that holds a date in the
/// same column: the patcher reads that row's style for the date (the rows in between are copied
/// without being parsed).
fn date_style_rows(
    sheet: &SheetData,
    rows: &BTreeMap<u32, RowEdit>,
) -> std::collections::BTreeSet<u32> {
    let mut wanted: Vec<(u32, usize)> = Vec::new();
    for (row_number, row_edit) in rows {
        if let RowEdit::Cells(cells) = row_edit {
            for (column, cell) in cells {
                if matches!(cell, OutCell::Date(_)) {
                    wanted.push((*row_number, *column as usize));
                }
            }
        }
    }
    let mut style_rows = std::collections::BTreeSet::new();
    if wanted.is_empty() {
        return style_rows;
    }
    // Per column written with dates, the rows that hold a date there, in order.
    let mut date_rows: HashMap<usize, Vec<u32>> = HashMap::new();
    for (_, column) in &wanted {
        date_rows.entry(*column).or_insert_with(|| {
            sheet
                .rows
                .iter()
                .filter(|row| matches!(row.cell(*column), crate::workbook::Cell::DateTime(_)))
                .map(|row| row.row_number)
                .collect()
        });
    }
    for (row_number, column) in wanted {
        let rows_with_dates = &date_rows[&column];
        let n_above = rows_with_dates.partition_point(|number| *number < row_number);
        if let Some(above) = n_above.checked_sub(1).map(|idx| rows_with_dates[idx]) {
            style_rows.insert(above);
        }
    }
    style_rows
}

/// The cells a write changes, for deciding whether a formula may read one of them.
struct Footprint {
    /// Changed cells (row as read, column).
    cells: Vec<(u32, u32)>,
    cleared_rows: Vec<u32>,
    /// The first deleted row when rows move up.
    first_deleted: Option<u32>,
    /// The first and last appended row.
    appended: Option<(u32, u32)>,
}

impl Footprint {
    fn touches(&self, range: &Range) -> bool {
        let rows = range.first_row..=range.last_row;
        let columns = range.first_column..=range.last_column;
        self.cells
            .iter()
            .any(|(row, column)| rows.contains(row) && columns.contains(column))
            || self.cleared_rows.iter().any(|row| rows.contains(row))
            || self
                .first_deleted
                .is_some_and(|first| first <= range.last_row)
            || self
                .appended
                .is_some_and(|(first, last)| first <= range.last_row && last >= range.first_row)
    }

    /// Whether a formula on another sheet reads a changed cell of the sheet. A formula that
    /// names the sheet in a way no range can be read from (`INDIRECT`, a name) is taken to.
    fn touches_formula(&self, formula: &safety::ForeignFormula, sheet_name: &str) -> bool {
        let ranges = ranges_on_sheet(&formula.text, sheet_name);
        ranges.is_empty()
            || ranges.into_iter().any(|range| {
                // A shared formula's references move with its cells: the range it reads grows
                // by as far as the formula's own range reaches.
                let grown = Range {
                    last_row: range.last_row.saturating_add(formula.rows_below),
                    last_column: range.last_column.saturating_add(formula.columns_right),
                    ..range
                };
                self.touches(&grown)
            })
    }

    /// Whether a defined name (other than the autofilter's) covers a changed cell of the sheet.
    fn touches_names(&self, workbook: &package::WorkbookInfo, sheet_name: &str) -> bool {
        workbook
            .defined_names
            .iter()
            .filter(|(name, _, _)| !name.eq_ignore_ascii_case("_xlnm._FilterDatabase"))
            .flat_map(|(_, _, formula)| ranges_on_sheet(formula, sheet_name))
            .any(|range| self.touches(&range))
    }
}

/// The ranges a formula names on one sheet: `Pipeline!$E$3:$E$6` or `'Pipe line'!A1`.
fn ranges_on_sheet(formula: &str, sheet_name: &str) -> Vec<Range> {
    let quoted = format!("'{}'!", sheet_name.replace('\'', "''"));
    let plain = format!("{sheet_name}!");
    let mut ranges = Vec::new();
    for prefix in [quoted.as_str(), plain.as_str()] {
        for (position, _) in formula.match_indices(prefix) {
            let text: String = formula[position + prefix.len()..]
                .chars()
                .take_while(|character| {
                    character.is_ascii_alphanumeric() || matches!(character, '$' | ':')
                })
                .filter(|character| *character != '$')
                .collect();
            ranges.extend(Range::parse(&text));
        }
    }
    ranges
}

/// Where rows go in the written sheet.
struct Layout {
    /// The first appended row's number.
    first_new_row: u32,
    /// The row new rows copy their styles from: the last data row as read.
    template_row: Option<u32>,
    /// The sheet had no data rows: funnelsync fills it from nothing.
    is_fresh: bool,
}

impl Layout {
    fn of(plan: &SheetPlan, removed: &[u32], shift: &RowShift) -> Layout {
        let origins: Vec<u32> = plan
            .rows
            .iter()
            .filter_map(|planned| planned.origin)
            .chain(removed.iter().copied())
            .collect();
        // The last data row as read: the plan's rows may be only those that change.
        let last_data_row = origins.iter().copied().chain(plan.last_data_row).max();
        // New rows go below the last row that is still there.
        let last_kept = last_data_row
            .and_then(|last| {
                (plan.header_row_number + 1..=last)
                    .rev()
                    .find_map(|row_number| {
                        shift
                            .map(row_number)
                            .filter(|_| !shift.is_deleted(row_number))
                    })
            })
            .unwrap_or(plan.header_row_number)
            .max(plan.header_row_number);
        Layout {
            first_new_row: last_kept + 1,
            template_row: last_data_row,
            is_fresh: last_data_row.is_none(),
        }
    }
}

fn column_cells(
    overrides: &BTreeMap<usize, OutCell>,
    max_column: &mut u32,
) -> BTreeMap<u32, OutCell> {
    overrides
        .iter()
        .filter_map(|(column_idx, cell)| {
            let column = u32::try_from(*column_idx).ok()?;
            *max_column = (*max_column).max(column);
            Some((column, cell.clone()))
        })
        .collect()
}

/// The frozen header, autofilter, widths and stage dropdown of a sheet funnelsync fills from
/// nothing.
fn fresh_niceties(plan: &SheetPlan, stage_names: &[String], last_row: u32) -> Fresh {
    let mut widths: Vec<usize> = plan
        .headers
        .iter()
        .map(|header| unicode_width::UnicodeWidthStr::width(header.as_str()).max(6) + 2)
        .collect();
    if let Some(key_column) = plan.added_key_column {
        if let Some(width) = widths.get_mut(key_column) {
            *width = 10;
        }
    }
    for planned in &plan.rows {
        for (column_idx, cell) in &planned.overrides {
            let width = match cell {
                OutCell::Empty => 0,
                OutCell::Text(text) => unicode_width::UnicodeWidthStr::width(text.as_str()),
                OutCell::Number(number) => crate::deal::format_amount(*number).len() + 2,
                OutCell::Date(_) => 10,
            };
            if let Some(column_width) = widths.get_mut(*column_idx) {
                *column_width = (*column_width).max(width + 2);
            }
        }
    }
    let stage_list = plan
        .roles
        .iter()
        .position(|role| role == &Some(ColumnRole::Field(crate::deal::Field::Stage)))
        .and_then(|column| {
            let list = stage_names
                .iter()
                .map(|name| name.replace('"', "\"\""))
                .collect::<Vec<_>>()
                .join(",");
            // Excel takes at most 255 characters in a literal list, and no commas in a name.
            let fits = list.len() <= 253 && stage_names.iter().all(|name| !name.contains(','));
            fits.then(|| (u32::try_from(column).unwrap_or(0), format!("\"{list}\"")))
        });
    Fresh {
        header_row: plan.header_row_number,
        widths: widths
            .into_iter()
            .map(|width| width.clamp(6, 50) as f64)
            .collect(),
        autofilter: Range {
            first_row: plan.header_row_number,
            first_column: 0,
            last_row,
            last_column: u32::try_from(plan.headers.len().saturating_sub(1)).unwrap_or(0),
        },
        stage_list,
    }
}

/// A table part with its `ref` (and its autofilter's) moved with deleted rows and grown over
/// appended ones; `None` when nothing changes.
fn edit_table(
    bytes: &[u8],
    shift: &RowShift,
    append_after: u32,
    last_new_row: Option<u32>,
) -> Result<Option<Vec<u8>>, PackageError> {
    let mut splices = Vec::new();
    let mut failed = None;
    // A table that ends in a totals row keeps it last: rows appended below it stay outside.
    let mut has_totals_row = false;
    xml::walk(bytes, |event, _, _| {
        if let Event::Start(element) | Event::Empty(element) = event {
            if element.local_name().as_ref() == "table" {
                has_totals_row =
                    xml::attribute(element, "totalsRowCount").is_some_and(|count| count != "0");
            }
        }
    })?;
    let last_new_row = last_new_row.filter(|_| !has_totals_row);
    xml::walk(bytes, |event, start, end| {
        let (element, empty) = match event {
            Event::Start(element) => (element, false),
            Event::Empty(element) => (element, true),
            _ => return,
        };
        if !matches!(
            element.local_name().as_ref(),
            "table" | "autoFilter" | "sortState"
        ) {
            return;
        }
        let Some(text) = xml::attribute(element, "ref") else {
            return;
        };
        let edited = cellref::edit_ranges(&text, |range| {
            let range = if shift.is_empty() {
                range
            } else {
                shift.range(range)?
            };
            Some(match last_new_row {
                Some(last_row) => cellref::extend_range(range, append_after, last_row),
                None => range,
            })
        });
        match edited {
            Some(edited) if edited != text => splices.push(xml::Splice {
                start,
                end,
                text: xml::tag_bytes(
                    &xml::with_attributes(element, &[("ref", Some(&edited))]),
                    empty,
                ),
            }),
            Some(_) => {}
            None => failed = Some(text),
        }
    })?;
    if let Some(text) = failed {
        return Err(PackageError::Malformed(format!(
            "a table's range {text} would be left empty"
        )));
    }
    Ok((!splices.is_empty()).then(|| xml::apply_splices(bytes, splices)))
}

/// `workbook.xml` with `fullCalcOnLoad="1"` on its `<calcPr>` (added if it has none); `None`
/// when it asks for that already.
fn request_recalculation(bytes: &[u8]) -> Result<Option<Vec<u8>>, PackageError> {
    // calcPr comes after these in CT_Workbook; a new one goes before the first element that
    // follows it, or before the end of the workbook.
    const AFTER_CALC_PR: [&str; 10] = [
        "oleSize",
        "customWorkbookViews",
        "pivotCaches",
        "smartTagPr",
        "smartTagTypes",
        "webPublishing",
        "fileRecoveryPr",
        "webPublishObjects",
        "extLst",
        "",
    ];
    let mut splice = None;
    let mut insert_at = None;
    let mut prefix = String::new();
    let mut depth = 0usize;
    xml::walk(bytes, |event, start, end| match event {
        Event::Start(element) | Event::Empty(element) => {
            let is_start = matches!(event, Event::Start(_));
            if depth == 0 {
                prefix = xml::prefix_of(element.name().as_ref());
            }
            if depth == 1 {
                let local = element.local_name();
                if local.as_ref() == "calcPr" {
                    if xml::attribute(element, "fullCalcOnLoad").as_deref() != Some("1") {
                        splice = Some(xml::Splice {
                            start,
                            end,
                            text: xml::tag_bytes(
                                &xml::with_attributes(element, &[("fullCalcOnLoad", Some("1"))]),
                                !is_start,
                            ),
                        });
                    }
                    insert_at = Some(usize::MAX);
                } else if insert_at.is_none() && AFTER_CALC_PR.contains(&local.as_ref()) {
                    insert_at = Some(start);
                }
            }
            if is_start {
                depth += 1;
            }
        }
        Event::End(_) => {
            depth = depth.saturating_sub(1);
            if depth == 0 && insert_at.is_none() {
                insert_at = Some(start);
            }
        }
        _ => {}
    })?;
    if let Some(splice) = splice {
        return Ok(Some(xml::apply_splices(bytes, vec![splice])));
    }
    match insert_at {
        Some(position) if position != usize::MAX => Ok(Some(xml::apply_splices(
            bytes,
            vec![xml::Splice {
                start: position,
                end: position,
                text: format!("<{prefix}calcPr fullCalcOnLoad=\"1\"/>").into_bytes(),
            }],
        ))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recalculation_is_requested_once() {
        let with = br#"<workbook xmlns="m"><sheets/><calcPr calcId="191029"/></workbook>"#;
        let edited = request_recalculation(with).expect("parse").expect("edited");
        assert_eq!(
            String::from_utf8_lossy(&edited),
            r#"<workbook xmlns="m"><sheets/><calcPr calcId="191029" fullCalcOnLoad="1"/></workbook>"#
        );
        assert!(request_recalculation(&edited).expect("parse").is_none());
        let without = br#"<x:workbook xmlns:x="m"><x:sheets/><x:extLst/></x:workbook>"#;
        let edited = request_recalculation(without)
            .expect("parse")
            .expect("edited");
        assert_eq!(
            String::from_utf8_lossy(&edited),
            r#"<x:workbook xmlns:x="m"><x:sheets/><x:calcPr fullCalcOnLoad="1"/><x:extLst/></x:workbook>"#
        );
    }

    #[test]
    fn tables_grow_over_appended_rows_and_shrink_over_deleted_ones() {
        let table =
            br#"<table id="1" ref="A1:C5" totalsRowShown="0"><autoFilter ref="A1:C5"/></table>"#;
        let grown = edit_table(table, &RowShift::default(), 5, Some(7))
            .expect("edit")
            .expect("changed");
        assert_eq!(
            String::from_utf8_lossy(&grown),
            r#"<table id="1" ref="A1:C7" totalsRowShown="0"><autoFilter ref="A1:C7"/></table>"#
        );
        let shrunk = edit_table(table, &RowShift::new(vec![3]), 4, None)
            .expect("edit")
            .expect("changed");
        assert_eq!(
            String::from_utf8_lossy(&shrunk),
            r#"<table id="1" ref="A1:C4" totalsRowShown="0"><autoFilter ref="A1:C4"/></table>"#
        );
        assert!(edit_table(table, &RowShift::default(), 9, Some(10))
            .expect("edit")
            .is_none());
    }

    #[test]
    fn a_defined_name_is_touched_only_by_changes_inside_it() {
        let ranges = ranges_on_sheet("SUM(Pipeline!$E$3:$E$6)+'Pipe line'!A1", "Pipeline");
        assert_eq!(ranges, vec![Range::parse("E3:E6").expect("range")]);
        let footprint = |cells: Vec<(u32, u32)>| Footprint {
            cells,
            cleared_rows: Vec::new(),
            first_deleted: None,
            appended: None,
        };
        assert!(footprint(vec![(4, 4)]).touches(&ranges[0]));
        assert!(
            !footprint(vec![(4, 8)]).touches(&ranges[0]),
            "the CRM ID column is outside"
        );
        assert!(!footprint(vec![(7, 4)]).touches(&ranges[0]));
        assert_eq!(
            ranges_on_sheet("'Pipe line'!$B$2", "Pipe line"),
            vec![Range::parse("B2").expect("range")]
        );
    }

    #[test]
    fn date_serials_follow_excel() {
        let date =
            |year, month, day| chrono::NaiveDate::from_ymd_opt(year, month, day).expect("date");
        assert_eq!(date_serial(date(2026, 11, 28), false), Some(46354));
        assert_eq!(date_serial(date(1900, 3, 1), false), Some(61));
        assert_eq!(date_serial(date(1900, 1, 1), false), Some(1));
        assert_eq!(date_serial(date(1904, 1, 2), true), Some(1));
        assert_eq!(date_serial(date(1899, 1, 1), false), None);
    }
}
