//! Cell references as a worksheet writes them (`B12`, `$A$1`, `A1:H20`, space-separated
//! `sqref` lists) and what deleting or appending rows does to them. Pure functions.

use std::fmt::Write as _;

/// Excel's last row number.
pub const MAX_ROW: u32 = 1_048_576;

/// The column letters of a 0-based column index: 0 → `A`, 27 → `AB`.
pub fn column_letters(column_idx: u32) -> String {
    crate::workbook::column_letters(column_idx as usize)
}

/// `B12` for row number 12 and column index 1.
pub fn cell_name(row_number: u32, column_idx: u32) -> String {
    let mut name = column_letters(column_idx);
    let _ = write!(name, "{row_number}");
    name
}

/// Parses `B12` or `$B$12` into (row number, 0-based column). A reference without a row (`B`)
/// or without a column (`12`) is not a cell.
pub fn parse_cell(reference: &[u8]) -> Option<(u32, u32)> {
    let (row, column) = parse_parts(reference)?;
    Some((row?, column?))
}

/// Parses the parts of a reference that may lack its row (`A` in `A:A`) or its column (`3` in
/// `3:5`).
fn parse_parts(reference: &[u8]) -> Option<(Option<u32>, Option<u32>)> {
    let mut position = 0;
    if reference.first() == Some(&b'$') {
        position += 1;
    }
    let mut column: Option<u32> = None;
    while let Some(byte) = reference
        .get(position)
        .filter(|byte| byte.is_ascii_alphabetic())
    {
        let digit = u32::from(byte.to_ascii_uppercase() - b'A') + 1;
        column = Some(column.unwrap_or(0).checked_mul(26)?.checked_add(digit)?);
        position += 1;
    }
    if reference.get(position) == Some(&b'$') {
        position += 1;
    }
    let digits = &reference[position..];
    let row = if digits.is_empty() {
        None
    } else {
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(std::str::from_utf8(digits).ok()?.parse::<u32>().ok()?)
    };
    if row.is_none() && column.is_none() {
        return None;
    }
    Some((row, column.map(|column| column - 1)))
}

/// A rectangular range of cells, inclusive, with 1-based rows and 0-based columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub first_row: u32,
    pub first_column: u32,
    pub last_row: u32,
    pub last_column: u32,
}

impl Range {
    pub fn parse(text: &str) -> Option<Range> {
        let (first, last) = text.split_once(':').unwrap_or((text, text));
        let (first_row, first_column) = parse_parts(first.as_bytes())?;
        let (last_row, last_column) = parse_parts(last.as_bytes())?;
        Some(Range {
            first_row: first_row.unwrap_or(1),
            first_column: first_column.unwrap_or(0),
            last_row: last_row.unwrap_or(MAX_ROW),
            last_column: last_column.unwrap_or(16_383),
        })
    }

    /// `A1:H20`, or `B3` for a single cell.
    pub fn format(&self) -> String {
        let first = cell_name(self.first_row, self.first_column);
        if self.first_row == self.last_row && self.first_column == self.last_column {
            first
        } else {
            format!("{first}:{}", cell_name(self.last_row, self.last_column))
        }
    }
}

/// Row numbers before and after deleting some rows: the rows below a deleted row move up.
#[derive(Debug, Clone, Default)]
pub struct RowShift {
    /// The deleted rows, sorted, without duplicates.
    deleted: Vec<u32>,
}

impl RowShift {
    pub fn new(mut deleted: Vec<u32>) -> RowShift {
        deleted.sort_unstable();
        deleted.dedup();
        RowShift { deleted }
    }

    pub fn is_empty(&self) -> bool {
        self.deleted.is_empty()
    }

    pub fn is_deleted(&self, row_number: u32) -> bool {
        self.deleted.binary_search(&row_number).is_ok()
    }

    /// Where a row ends up, or `None` for a deleted row.
    pub fn map(&self, row_number: u32) -> Option<u32> {
        match self.deleted.binary_search(&row_number) {
            Ok(_) => None,
            Err(n_above) => Some(row_number - n_above as u32),
        }
    }

    /// A range after the deletion: it shrinks by the rows deleted inside it and moves up by those
    /// above it. `None` when every row of it was deleted. A range that reaches the sheet's last row
    /// keeps reaching it.
    pub fn range(&self, range: Range) -> Option<Range> {
        let first_kept =
            (range.first_row..=range.last_row).find(|row_number| !self.is_deleted(*row_number))?;
        let last_kept = (range.first_row..=range.last_row)
            .rev()
            .find(|row_number| !self.is_deleted(*row_number))?;
        let last_row = if range.last_row == MAX_ROW {
            MAX_ROW
        } else {
            self.map(last_kept)?
        };
        Some(Range {
            first_row: self.map(first_kept)?,
            last_row,
            ..range
        })
    }
}

/// Rewrites each range of a space-separated `sqref`/`ref` list: `edit` returns the new range or
/// `None` to drop it. Returns `None` when no range is left, and the text unchanged where nothing
/// parsed.
pub fn edit_ranges(text: &str, edit: impl Fn(Range) -> Option<Range>) -> Option<String> {
    let mut kept = Vec::new();
    for part in text.split_whitespace() {
        match Range::parse(part) {
            Some(range) => {
                if let Some(edited) = edit(range) {
                    if edited == range {
                        kept.push(part.to_string());
                    } else {
                        kept.push(edited.format());
                    }
                }
            }
            None => kept.push(part.to_string()),
        }
    }
    (!kept.is_empty()).then(|| kept.join(" "))
}

/// A range that ends on `old_last_row` (the last data row) grows to `new_last_row`, so that rows
/// appended below the data are covered too.
pub fn extend_range(range: Range, old_last_row: u32, new_last_row: u32) -> Range {
    if range.last_row == old_last_row && new_last_row > old_last_row {
        Range {
            last_row: new_last_row,
            ..range
        }
    } else {
        range
    }
}

/// The highest row number a formula may refer to: every run of letters followed by digits
/// (`E12`, `$E$12`) and every whole-row reference (`$3:$5`) counts. It over-approximates on
/// purpose (a name such as `Q3` counts too): it decides whether moving rows is safe.
pub fn max_referenced_row(formula: &str) -> Option<u32> {
    let bytes = formula.as_bytes();
    let mut highest: Option<u32> = None;
    let mut position = 0;
    let mut in_string = false;
    while position < bytes.len() {
        let byte = bytes[position];
        if byte == b'"' {
            in_string = !in_string;
            position += 1;
            continue;
        }
        if in_string || !byte.is_ascii_digit() {
            position += 1;
            continue;
        }
        // A run of digits: a row when letters or `$` come right before it (`E12`, `$12`).
        let start = position;
        while position < bytes.len() && bytes[position].is_ascii_digit() {
            position += 1;
        }
        let before = start.checked_sub(1).map(|idx| bytes[idx]);
        let is_row = matches!(before, Some(byte) if byte.is_ascii_alphabetic() || byte == b'$')
            || bytes.get(position) == Some(&b':')
            || (start > 0 && bytes[start - 1] == b':');
        if is_row {
            if let Some(row) = std::str::from_utf8(&bytes[start..position])
                .ok()
                .and_then(|digits| digits.parse::<u32>().ok())
            {
                highest = Some(highest.map_or(row, |highest| highest.max(row)));
            }
        }
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_letters_and_cell_names() {
        for (column_idx, letters) in [(0, "A"), (25, "Z"), (26, "AA"), (27, "AB"), (16_383, "XFD")]
        {
            assert_eq!(column_letters(column_idx), letters);
            assert_eq!(
                parse_cell(format!("{letters}7").as_bytes()),
                Some((7, column_idx))
            );
        }
        assert_eq!(cell_name(12, 1), "B12");
        assert_eq!(parse_cell(b"$C$3"), Some((3, 2)));
        assert_eq!(parse_cell(b"C"), None);
        assert_eq!(parse_cell(b"3"), None);
        assert_eq!(parse_cell(b"C3x"), None);
        assert_eq!(parse_cell(b""), None);
    }

    #[test]
    fn ranges_parse_and_format() {
        let range = Range::parse("A1:H20").expect("range");
        assert_eq!(
            (range.first_row, range.last_row, range.last_column),
            (1, 20, 7)
        );
        assert_eq!(range.format(), "A1:H20");
        assert_eq!(Range::parse("B3").expect("cell").format(), "B3");
        let column = Range::parse("C:C").expect("whole column");
        assert_eq!((column.first_row, column.last_row), (1, MAX_ROW));
    }

    #[test]
    fn deleting_rows_moves_and_shrinks_ranges() {
        let shift = RowShift::new(vec![7, 5]);
        let cases = [
            ("A1:H20", Some("A1:H18")),
            ("A2:A4", Some("A2:A4")),
            ("E5", None),
            ("E5:E7", Some("E5")),
            ("A8:B9", Some("A6:B7")),
            ("C2:C1048576", Some("C2:C1048576")),
            ("A1:A3 E5 B10", Some("A1:A3 B8")),
        ];
        for (before, after) in cases {
            let edited = edit_ranges(before, |range| shift.range(range));
            assert_eq!(edited.as_deref(), after, "{before}");
        }
        assert_eq!(shift.map(4), Some(4));
        assert_eq!(shift.map(5), None);
        assert_eq!(shift.map(6), Some(5));
        assert_eq!(shift.map(8), Some(6));
    }

    #[test]
    fn appending_rows_extends_ranges_that_end_on_the_last_data_row() {
        let extend = |text: &str| edit_ranges(text, |range| Some(extend_range(range, 20, 22)));
        assert_eq!(extend("A1:H20").as_deref(), Some("A1:H22"));
        assert_eq!(extend("A1:H19").as_deref(), Some("A1:H19"));
        assert_eq!(extend("E2:E20 F2:F30").as_deref(), Some("E2:E22 F2:F30"));
    }

    #[test]
    fn the_highest_row_a_formula_refers_to() {
        let cases = [
            ("SUM(E2:E20)", Some(20)),
            ("Pipeline!$B$3*2", Some(3)),
            ("$3:$5", Some(5)),
            ("\"row 99\"&A1", Some(1)),
            ("TODAY()", None),
            ("1+2", None),
        ];
        for (formula, expected) in cases {
            assert_eq!(max_referenced_row(formula), expected, "{formula}");
        }
    }
}
