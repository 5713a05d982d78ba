//! The .csv writer: the delimiter, encoding, BOM and line ending the file was read with, and the
//! formula escape on every cell that a spreadsheet could take for a formula.

use super::{OutCell, SheetPlan, WriteError};

use crate::workbook::{escape_csv_field, Cell, CsvFormat, SheetData, SheetRow};

/// Writes the planned file: the file as read (`original`, read again row by row, so that the sync
/// need not hold its rows), each row with the plan's changes, without the rows that leave, and
/// the new rows at the end.
pub fn build(
    sheet: &SheetData,
    original: &std::fs::File,
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
        source: Box::new(error),
    };
    // Every cell goes through the escape, whether funnelsync changed it or not: a value the rep
    // typed as `'=cmd|…` must not come back as a live formula.
    let raw = |cell: &Cell| escape_csv_field(cell.to_string());
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
                escape_csv_field(header.clone())
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
                Some(OutCell::Text(text)) => escape_csv_field(text.clone()),
                Some(OutCell::Number(number)) => {
                    escape_csv_field(crate::deal::format_amount(*number))
                }
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
            outcome.map_err(|error| {
                crate::workbook::WorkbookError::rejected(&sheet.path, "writable .csv", error)
            })?;
            n_written += 1;
        }
        Ok(())
    };
    crate::workbook::csv_reader::stream(
        &sheet.path,
        &mut std::io::BufReader::with_capacity(1 << 16, original),
        crate::workbook::CsvEncoding::Fixed(format.encoding),
        None,
        &crate::workbook::Limits::unbounded(),
        &mut sink,
    )
    .map_err(|error| WriteError::Build {
        path: sheet.path.clone(),
        source: Box::new(error),
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
        source: Box::new(error.into_error()),
    })?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let bytes = encode(&text, &format).ok_or_else(|| WriteError::Unsupported {
        path: sheet.path.clone(),
        reason: format!(
            "some values cannot be written in {}; set the file's encoding to UTF-8",
            format.encoding.name()
        ),
    })?;
    out.write_all(&bytes).map_err(|source| WriteError::Io {
        path: sheet.path.clone(),
        source,
    })?;
    Ok(row_numbers)
}

/// The text of a .csv in the encoding it was read with, with its byte order mark if it had one;
/// `None` when some character has no place in that encoding.
fn encode(text: &str, format: &CsvFormat) -> Option<Vec<u8>> {
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
        return Some(bytes);
    }
    if format.has_bom && format.encoding == encoding_rs::UTF_8 {
        bytes.extend_from_slice(&[0xEF, 0xBB, 0xBF]);
    }
    let (encoded, _, had_unmappable) = format.encoding.encode(text);
    if had_unmappable {
        return None;
    }
    bytes.extend_from_slice(&encoded);
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(encoding: &'static encoding_rs::Encoding, has_bom: bool) -> CsvFormat {
        CsvFormat {
            delimiter: b',',
            encoding,
            has_bom,
            line_ending_crlf: true,
        }
    }

    #[test]
    fn a_csv_is_written_in_the_encoding_and_byte_order_it_was_read_with() {
        let text = "公司,€\r\n";
        let cases: [(&str, CsvFormat, Vec<u8>); 6] = [
            (
                "UTF-8",
                format(encoding_rs::UTF_8, false),
                text.as_bytes().to_vec(),
            ),
            (
                "UTF-8 with BOM",
                format(encoding_rs::UTF_8, true),
                [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat(),
            ),
            (
                "UTF-16LE with BOM",
                format(encoding_rs::UTF_16LE, true),
                vec![
                    0xFF, 0xFE, 0x6C, 0x51, 0xF8, 0x53, 0x2C, 0x00, 0xAC, 0x20, 0x0D, 0x00, 0x0A,
                    0x00,
                ],
            ),
            (
                "UTF-16BE with BOM",
                format(encoding_rs::UTF_16BE, true),
                vec![
                    0xFE, 0xFF, 0x51, 0x6C, 0x53, 0xF8, 0x00, 0x2C, 0x20, 0xAC, 0x00, 0x0D, 0x00,
                    0x0A,
                ],
            ),
            (
                "UTF-16LE without BOM",
                format(encoding_rs::UTF_16LE, false),
                vec![
                    0x6C, 0x51, 0xF8, 0x53, 0x2C, 0x00, 0xAC, 0x20, 0x0D, 0x00, 0x0A, 0x00,
                ],
            ),
            (
                "GB18030 (a BOM is for UTF-8 only)",
                format(encoding_rs::GB18030, true),
                vec![0xB9, 0xAB, 0xCB, 0xBE, 0x2C, 0xA2, 0xE3, 0x0D, 0x0A],
            ),
        ];
        for (name, format, expected) in cases {
            assert_eq!(encode(text, &format), Some(expected), "{name}");
        }
        // A character with a surrogate pair in UTF-16.
        assert_eq!(
            encode("😀", &format(encoding_rs::UTF_16LE, false)),
            Some(vec![0x3D, 0xD8, 0x00, 0xDE])
        );
        // Every value round-trips through the reader's decoding.
        for encoding in [
            encoding_rs::UTF_8,
            encoding_rs::UTF_16LE,
            encoding_rs::UTF_16BE,
        ] {
            let bytes = encode(text, &format(encoding, true)).expect("encodes");
            let (decoded, used, _) = encoding_rs::Encoding::for_bom(&bytes)
                .map(|(found, _)| found)
                .unwrap_or(encoding)
                .decode(&bytes);
            assert_eq!(used, encoding);
            assert_eq!(decoded, text, "{}", encoding.name());
        }
    }

    #[test]
    fn text_an_encoding_cannot_hold_is_refused_not_garbled() {
        assert_eq!(
            encode("Müller,€\r\n", &format(encoding_rs::WINDOWS_1252, false)),
            Some(vec![
                0x4D, 0xFC, 0x6C, 0x6C, 0x65, 0x72, 0x2C, 0x80, 0x0D, 0x0A
            ])
        );
        assert_eq!(
            encode("公司\r\n", &format(encoding_rs::WINDOWS_1252, false)),
            None
        );
        assert_eq!(encode("🙂", &format(encoding_rs::GBK, false)), None);
    }
}
