//! A streaming check of an .ods's `content.xml` before calamine opens it. calamine expands every
//! repeated cell and row of every sheet into a full grid at open (`table:number-columns-repeated`,
//! `table:number-rows-repeated`), so a few hundred bytes can ask for gigabytes: one value repeated
//! over 16,384 columns, in a row repeated a million times. This scan counts what the grid would
//! hold, keeping a few numbers per sheet, and refuses a value past `max_columns` or `max_rows` and
//! a grid larger than the bytes `max_unzipped_mb` allows a workbook to unpack to.
//!
//! It knows the ODF table elements and their repeat attributes, not what a cell means.

use std::io::{BufReader, Read};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::xml_guard::Refusal;
use super::Limits;

/// What calamine keeps per cell of the grid: a `Data` and a formula `String`.
const BYTES_PER_GRID_CELL: u64 = 56;

/// The extent of one sheet as calamine would build it.
#[derive(Debug, Default)]
struct SheetExtent {
    /// Rows so far, repeats counted.
    n_rows: u64,
    /// The first and last row (0-based, repeats counted) holding a value.
    first_row_with_value: Option<u64>,
    last_row_end: u64,
    /// One past the furthest column holding a value.
    column_end: u64,
}

/// Refuses `content.xml` when calamine would build a grid beyond the limits.
pub fn check_content(part: impl Read, limits: &Limits) -> Result<(), Refusal> {
    let mut reader = Reader::from_reader(BufReader::with_capacity(1 << 16, part));
    reader.config_mut().check_end_names = false;
    let mut buffer = Vec::new();
    let mut sheet = SheetExtent::default();
    let mut grid_cells: u64 = 0;
    // The row being read: its repeat count, the columns so far, and one past its last value.
    let mut row: Option<(u64, u64, u64)> = None;
    let max_grid_cells = limits.max_unzipped_bytes / BYTES_PER_GRID_CELL;
    loop {
        buffer.clear();
        let event = reader
            .read_event_into(&mut buffer)
            .map_err(|error| Refusal::Malformed(error.to_string()))?;
        match event {
            Event::Eof => return Ok(()),
            Event::Start(element) if element.name().as_ref() == "table:table" => {
                sheet = SheetExtent::default();
            }
            Event::Start(element) if element.name().as_ref() == "table:table-row" => {
                row = Some((repeats(&element, "table:number-rows-repeated")?, 0, 0));
            }
            Event::Empty(element) if element.name().as_ref() == "table:table-row" => {
                sheet.n_rows = sheet
                    .n_rows
                    .saturating_add(repeats(&element, "table:number-rows-repeated")?);
            }
            ref cell @ (Event::Start(ref element) | Event::Empty(ref element))
                if matches!(
                    element.name().as_ref(),
                    "table:table-cell" | "table:covered-table-cell"
                ) =>
            {
                let Some((_, n_columns, value_end)) = &mut row else {
                    continue;
                };
                let n_repeats = repeats(element, "table:number-columns-repeated")?;
                let start = *n_columns;
                *n_columns = n_columns.saturating_add(n_repeats);
                // A cell with content (a value type, a formula, or text inside it) is a value;
                // an empty one only moves the column.
                let has_value = matches!(cell, Event::Start(_))
                    || has_attribute(element, "office:value-type")
                    || has_attribute(element, "table:formula");
                if has_value {
                    *value_end = *n_columns;
                    if *n_columns > limits.max_columns as u64 {
                        return Err(Refusal::OverLimit {
                            what: format!(
                                "row {} with a value repeated to column {} (from column {})",
                                sheet.n_rows + 1,
                                n_columns,
                                start + 1
                            ),
                            limit: format!("{} columns", limits.max_columns),
                        });
                    }
                }
            }
            Event::End(element) if element.name().as_ref() == "table:table-row" => {
                let Some((n_repeats, _, value_end)) = row.take() else {
                    continue;
                };
                if value_end > 0 {
                    sheet.first_row_with_value.get_or_insert(sheet.n_rows);
                    sheet.last_row_end = sheet.n_rows.saturating_add(n_repeats);
                    sheet.column_end = sheet.column_end.max(value_end);
                    if sheet.last_row_end > limits.max_rows as u64 {
                        return Err(Refusal::OverLimit {
                            what: format!(
                                "a row with values repeated to row {}",
                                sheet.last_row_end
                            ),
                            limit: format!("{} rows", limits.max_rows),
                        });
                    }
                }
                sheet.n_rows = sheet.n_rows.saturating_add(n_repeats);
            }
            Event::End(element) if element.name().as_ref() == "table:table" => {
                let n_grid_rows = sheet
                    .first_row_with_value
                    .map_or(0, |first| sheet.last_row_end.saturating_sub(first));
                grid_cells =
                    grid_cells.saturating_add(n_grid_rows.saturating_mul(sheet.column_end));
                if grid_cells > max_grid_cells {
                    return Err(Refusal::OverLimit {
                        what: format!(
                            "the sheets' cells once repeated rows and columns are expanded \
                             ({grid_cells} cells, about {} MB)",
                            grid_cells.saturating_mul(BYTES_PER_GRID_CELL) >> 20
                        ),
                        limit: format!("{} MB", limits.max_unzipped_bytes >> 20),
                    });
                }
                sheet = SheetExtent::default();
            }
            _ => {}
        }
    }
}

fn has_attribute(element: &BytesStart<'_>, name: &str) -> bool {
    element
        .attributes()
        .flatten()
        .any(|attribute| attribute.key.as_ref() == name)
}

/// A repeat attribute's count (1 when absent); a count that is not a number is malformed.
fn repeats(element: &BytesStart<'_>, name: &str) -> Result<u64, Refusal> {
    let Some(attribute) = element
        .attributes()
        .flatten()
        .find(|attribute| attribute.key.as_ref() == name)
    else {
        return Ok(1);
    };
    attribute
        .value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|count| count.max(1))
        .ok_or_else(|| Refusal::Malformed(format!("{} is not a count: {}", name, attribute.value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(body: &str) -> String {
        format!(
            "<office:document-content><office:body><office:spreadsheet>{body}\
             </office:spreadsheet></office:body></office:document-content>"
        )
    }

    fn check(body: &str) -> Result<(), Refusal> {
        check_content(content(body).as_bytes(), &Limits::default())
    }

    #[test]
    fn repeated_values_are_counted_as_calamine_expands_them() {
        let value =
            r#"<table:table-cell office:value-type="string"><text:p>x</text:p></table:table-cell>"#;
        let cases: Vec<(String, Option<&str>)> = vec![
            // What LibreOffice writes: a few values, empty cells and rows repeated to the edge.
            (
                format!(
                    r#"<table:table table:name="S"><table:table-row>{value}{value}<table:table-cell table:number-columns-repeated="16382"/></table:table-row><table:table-row table:number-rows-repeated="1048575"><table:table-cell table:number-columns-repeated="16384"/></table:table-row></table:table>"#
                ),
                None,
            ),
            // One value repeated over every column.
            (
                format!(
                    r#"<table:table table:name="S"><table:table-row><table:table-cell table:number-columns-repeated="16384" office:value-type="float" office:value="1"/></table:table-row></table:table>"#
                ),
                Some("column 16384"),
            ),
            // A value reached after empty repeated cells.
            (
                format!(
                    r#"<table:table table:name="S"><table:table-row><table:table-cell table:number-columns-repeated="5000"/>{value}</table:table-row></table:table>"#
                ),
                Some("column 5001"),
            ),
            // A row of values repeated past the rows allowed.
            (
                format!(
                    r#"<table:table table:name="S"><table:table-row table:number-rows-repeated="2000000">{value}</table:table-row></table:table>"#
                ),
                Some("rows"),
            ),
            // 900 columns × 1,000,000 rows: within both, but a 50 GB grid.
            (
                format!(
                    r#"<table:table table:name="S"><table:table-row table:number-rows-repeated="1000000"><table:table-cell table:number-columns-repeated="900" office:value-type="float" office:value="1"/></table:table-row></table:table>"#
                ),
                Some("expanded"),
            ),
            (
                r#"<table:table table:name="S"><table:table-row table:number-rows-repeated="many"/></table:table>"#.to_string(),
                Some("not a count"),
            ),
        ];
        for (body, refused_for) in cases {
            let result = check(&body);
            match refused_for {
                None => assert_eq!(result, Ok(()), "{body}"),
                Some(fragment) => {
                    let text = format!("{result:?}");
                    assert!(text.contains(fragment), "{body}: {text}");
                }
            }
        }
    }
}
