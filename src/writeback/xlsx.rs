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
    out: &mut dyn std::io::Write,
) -> Result<Vec<u32>, WriteError> {
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
    out.write_all(&bytes).map_err(|source| WriteError::Io {
        path: sheet.path.clone(),
        source,
    })?;
    Ok(row_numbers)
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
        let text =
            if header.is_empty() && plan.roles.get(column_idx) == Some(&Some(ColumnRole::Key)) {
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
                worksheet.write_string_with_format(header_idx, column_idx as u16, text, &bold)?;
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
                            worksheet.write_string_with_format(row_idx, column, text, format)?;
                        }
                        OutCell::Number(number) => {
                            worksheet.write_number_with_format(row_idx, column, *number, format)?;
                        }
                        OutCell::Date(date) => {
                            let datetime = ExcelDateTime::from_ymd(
                                u16::try_from(chrono::Datelike::year(date)).unwrap_or(1900),
                                chrono::Datelike::month(date) as u8,
                                chrono::Datelike::day(date) as u8,
                            )?;
                            worksheet
                                .write_datetime_with_format(row_idx, column, datetime, format)?;
                        }
                    }
                }
                None => {
                    let origin_idx = planned.origin.map(|origin| origin - 1).unwrap_or(u32::MAX);
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
