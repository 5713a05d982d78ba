//! The .csv writer: the delimiter, encoding, BOM and line ending the file was read with, and the
//! formula escape on every cell that a spreadsheet could take for a formula.

use super::{looks_like_formula, OutCell, SheetPlan, WriteError};

/// Whether a text must be written to a .csv with a leading apostrophe, the way Excel itself marks
/// text: it starts with `=`, `+`, `-`, `@`, tab or CR (a spreadsheet would run it as a formula),
/// unless it is a plain number such as `-500` or `+86 138 0000 0000`, which no spreadsheet
/// runs; or it is such an escaped text itself (`'=x`), so that reading strips exactly the one
/// apostrophe writing added and every value comes back as it was.
pub fn needs_csv_escape(text: &str) -> bool {
    match text.strip_prefix('\'') {
        Some(rest) => needs_csv_escape(rest),
        None => looks_like_formula(text) && !is_plain_number(text),
    }
}

/// The value of a .csv field as read: the field without the apostrophe [`needs_csv_escape`]
/// added when it was written.
pub fn unescape_csv_field(field: &str) -> &str {
    match field.strip_prefix('\'') {
        Some(rest) if needs_csv_escape(rest) => rest,
        _ => field,
    }
}

/// A sign followed by digits, spaces and separators only: a number, never a formula.
fn is_plain_number(text: &str) -> bool {
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    unsigned.starts_with(|character: char| character.is_ascii_digit())
        && unsigned
            .chars()
            .all(|character| character.is_ascii_digit() || matches!(character, '.' | ',' | ' '))
}

/// A cell as written to the .csv: escaped when [`needs_csv_escape`] says so.
fn escaped(text: String) -> String {
    if needs_csv_escape(&text) {
        format!("'{text}")
    } else {
        text
    }
}
use crate::workbook::{Cell, CsvFormat, SheetData, SheetRow};

/// Writes the planned file: the file as read (`original`, read again row by row, so that the sync
/// need not hold its rows), each row with the plan's changes, without the rows that leave, and
/// the new rows at the end.
pub fn build(
    sheet: &SheetData,
    original: &[u8],
    plan: &SheetPlan,
    out: &mut dyn std::io::Write,
) -> Result<Vec<u32>, WriteError> {
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
    // Every cell goes through the escape, whether funnelsync changed it or not: a value the rep
    // typed as `'=cmd|…` must not come back as a live formula.
    let raw = |cell: &Cell| escaped(cell.to_string());
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
                escaped(header.clone())
            }
        })
        .collect();
    let planned_at: std::collections::HashMap<u32, usize> = plan
        .rows
        .iter()
        .enumerate()
        .filter_map(|(plan_idx, planned)| planned.origin.map(|origin| (origin, plan_idx)))
        .collect();
    let removed: std::collections::HashSet<u32> = plan.removed.iter().copied().collect();
    let mut row_numbers = vec![0u32; plan.rows.len()];
    let mut n_written = 0u32;
    let write_planned = |writer: &mut csv::Writer<Vec<u8>>,
                         planned: &super::PlannedRow,
                         original: Option<&SheetRow>|
     -> Result<(), WriteError> {
        let n_columns = original.map(|row| row.width()).unwrap_or(0).max(
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
                Some(OutCell::Text(text)) => escaped(text.clone()),
                Some(OutCell::Number(number)) => escaped(crate::deal::format_amount(*number)),
                Some(OutCell::Date(date)) => date.format("%Y-%m-%d").to_string(),
                None => original
                    .map(|row| raw(row.cell(column_idx)))
                    .unwrap_or_default(),
            };
            record.push(text);
        }
        writer.write_record(&record).map_err(csv_error)
    };
    // The file as read, row by row.
    let mut header_written = false;
    let mut sink = |rows: Vec<SheetRow>| -> Result<(), crate::workbook::WorkbookError> {
        for row in rows {
            let outcome = if row.row_number < plan.header_row_number {
                writer
                    .write_record((0..row.width()).map(|column_idx| raw(row.cell(column_idx))))
                    .map_err(csv_error)
            } else if row.row_number == plan.header_row_number {
                header_written = true;
                writer.write_record(&headers).map_err(csv_error)
            } else if removed.contains(&row.row_number) {
                continue;
            } else if let Some(plan_idx) = planned_at.get(&row.row_number) {
                row_numbers[*plan_idx] = n_written + 1;
                write_planned(&mut writer, &plan.rows[*plan_idx], Some(&row))
            } else {
                writer
                    .write_record((0..row.width()).map(|column_idx| raw(row.cell(column_idx))))
                    .map_err(csv_error)
            };
            outcome.map_err(|error| crate::workbook::WorkbookError::Malformed {
                path: sheet.path.clone(),
                expected: "writable .csv",
                detail: error.to_string(),
            })?;
            n_written += 1;
        }
        Ok(())
    };
    crate::workbook::csv_reader::stream(
        &sheet.path,
        &mut std::io::Cursor::new(original),
        crate::config::CsvEncoding::Fixed(format.encoding),
        None,
        &crate::config::Limits::unbounded(),
        &mut sink,
    )
    .map_err(|error| WriteError::Build {
        path: sheet.path.clone(),
        message: error.to_string(),
    })?;
    if !header_written {
        writer.write_record(&headers).map_err(csv_error)?;
        n_written += 1;
    }
    // The deals new to the file, at the end.
    for (plan_idx, planned) in plan.rows.iter().enumerate() {
        if planned.origin.is_none() {
            write_planned(&mut writer, planned, None)?;
            n_written += 1;
            row_numbers[plan_idx] = n_written;
        }
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
    out.write_all(&bytes).map_err(|source| WriteError::Io {
        path: sheet.path.clone(),
        source,
    })?;
    Ok(row_numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_text_is_escaped_and_every_value_round_trips() {
        let cases = [
            ("=cmd|' /C calc'!A0", true),
            ("+1+1", true),
            ("-2+3", true),
            ("@SUM(A1)", true),
            ("\tx", true),
            ("\rx", true),
            ("'=x", true),
            ("''=x", true),
            ("-500", false),
            ("+86 138 0000 0000", false),
            ("-1,200.50", false),
            ("-", true),
            ("'", false),
            ("'-500", false),
            ("Acme", false),
            ("it's", false),
            ("", false),
        ];
        for (text, expected) in cases {
            assert_eq!(needs_csv_escape(text), expected, "{text:?}");
            let written = escaped(text.to_string());
            assert_eq!(
                unescape_csv_field(&written),
                text,
                "{text:?} written as {written:?}"
            );
        }
    }
}
