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
use crate::workbook::{Cell, CsvFormat, SheetData};

pub fn build(
    sheet: &SheetData,
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
    let mut row_number = 0u32;
    let mut row_numbers = Vec::new();
    // Rows above the header, then the header (with the key column if it was missing).
    for row in sheet
        .rows
        .iter()
        .filter(|row| row.row_number < plan.header_row_number)
    {
        writer
            .write_record((0..row.width()).map(|column_idx| raw(row.cell(column_idx))))
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
                escaped(header.clone())
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
