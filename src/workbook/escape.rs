//! What a cell's text means to a spreadsheet program: whether it could be run as a formula, and
//! the apostrophe escape that keeps such text inert in a .csv (Excel's own way of marking text),
//! with its exact inverse applied when reading.
//!
//! The reader and the writer of .csv files share these rules, so that every value written comes
//! back as it was. This module knows text only: no files, no deals.

/// Whether text written into a cell could be taken for a formula by a spreadsheet program.
pub fn looks_like_formula(text: &str) -> bool {
    text.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

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
pub fn escape_csv_field(text: String) -> String {
    if needs_csv_escape(&text) {
        format!("'{text}")
    } else {
        text
    }
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
            let written = escape_csv_field(text.to_string());
            assert_eq!(
                unescape_csv_field(&written),
                text,
                "{text:?} written as {written:?}"
            );
        }
    }
}
