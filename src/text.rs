//! Text for people: numbers with their thousands grouped and tables aligned for a terminal.
//!
//! This module owns how figures and tables look in plain text, for the command line, the mail
//! digests and the report alike. It knows nothing of deals, the store or the config.

use std::io::Write;

use unicode_width::UnicodeWidthStr;

/// "1234567.5" → "1,234,567.5".
pub fn group_thousands(number: &str) -> String {
    let (sign, rest) = number
        .strip_prefix('-')
        .map(|rest| ("-", rest))
        .unwrap_or(("", number));
    let (integer, fraction) = rest
        .split_once('.')
        .map(|(integer, fraction)| (integer, Some(fraction)))
        .unwrap_or((rest, None));
    let mut grouped = String::new();
    for (position, digit) in integer.chars().enumerate() {
        if position > 0 && (integer.len() - position) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    match fraction {
        Some(fraction) => format!("{sign}{grouped}.{fraction}"),
        None => format!("{sign}{grouped}"),
    }
}

/// Prints rows as an aligned table, measuring text by terminal width (CJK characters take two
/// columns). The first row is the header.
pub fn write_table(
    out: &mut impl Write,
    rows: &[Vec<String>],
    right_aligned: &[bool],
) -> std::io::Result<()> {
    let n_columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; n_columns];
    for row in rows {
        for (column_idx, cell) in row.iter().enumerate() {
            widths[column_idx] = widths[column_idx].max(UnicodeWidthStr::width(cell.as_str()));
        }
    }
    for row in rows {
        let mut line = String::new();
        for (column_idx, cell) in row.iter().enumerate() {
            let padding = " ".repeat(widths[column_idx] - UnicodeWidthStr::width(cell.as_str()));
            if column_idx > 0 {
                line.push_str("  ");
            }
            if right_aligned.get(column_idx).copied().unwrap_or(false) {
                line.push_str(&padding);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&padding);
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// Amounts for a table column: thousands grouped and the same number of decimals on every line
/// (two when any amount has cents, else none), so that right-aligned they line up on the digit.
pub fn amount_column(amounts: &[Option<f64>]) -> Vec<String> {
    let cents = amounts
        .iter()
        .flatten()
        .any(|amount| (amount * 100.0).round() % 100.0 != 0.0);
    amounts
        .iter()
        .map(|amount| match amount {
            Some(amount) if cents => group_thousands(&format!("{:.2}", amount + 0.0)),
            Some(amount) => group_thousands(&format!("{:.0}", amount + 0.0)),
            None => String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        let cases = [
            ("0", "0"),
            ("999", "999"),
            ("1000", "1,000"),
            ("1234567.5", "1,234,567.5"),
            ("-12000", "-12,000"),
        ];
        for (input, expected) in cases {
            assert_eq!(group_thousands(input), expected);
        }
    }

    #[test]
    fn tables_align_wide_characters() {
        let rows = vec![
            vec!["公司".to_string(), "n".to_string()],
            vec!["Acme".to_string(), "10".to_string()],
        ];
        let mut out = Vec::new();
        write_table(&mut out, &rows, &[false, true]).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(text, "公司   n\nAcme  10\n");
    }
}
