//! The .csv writer: the delimiter, encoding, BOM and line ending the file was read with.

use super::{looks_like_formula, OutCell, SheetPlan, WriteError};
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
    out.write_all(&bytes).map_err(|source| WriteError::Io {
        path: sheet.path.clone(),
        source,
    })?;
    Ok(row_numbers)
}
