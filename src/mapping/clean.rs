//! Cleaning one cell into one field value. Each function takes a cell and returns the cleaned value
//! or the reason it cannot be cleaned, worded to follow the quoted raw value
//! (`"twelve" is not a number`).

use chrono::NaiveDate;

use crate::config::{DateOrder, Stages};
use crate::deal::{DealId, FieldValue};
use crate::workbook::Cell;

pub type Cleaned<T> = Result<T, String>;

/// Excel's serial day 0 for the 1900 date system (day 60, the phantom 1900-02-29, is skipped by
/// starting at 1899-12-30).
fn excel_epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1899, 12, 30).unwrap_or(NaiveDate::MIN)
}

fn error_value(cell: &Cell) -> Option<String> {
    match cell {
        Cell::Error(error) => Some(format!(
            "is an error value in the sheet ({error}); fix the formula or clear the cell"
        )),
        _ => None,
    }
}

/// Free text: trimmed; numbers without a trailing ".0"; dates as ISO.
pub fn text(cell: &Cell) -> Cleaned<FieldValue> {
    if let Some(why) = error_value(cell) {
        return Err(why);
    }
    Ok(FieldValue::Text(cell.text().trim().to_string()))
}

/// The deal id in the key column: a whole positive number.
pub fn deal_id(cell: &Cell) -> Option<DealId> {
    match cell {
        Cell::Number(number) if number.fract() == 0.0 && *number >= 1.0 && *number < 9.0e15 => {
            Some(*number as DealId)
        }
        Cell::Text(text) => text.trim().parse::<DealId>().ok().filter(|id| *id >= 1),
        _ => None,
    }
}

pub fn email(cell: &Cell) -> Cleaned<FieldValue> {
    if let Some(why) = error_value(cell) {
        return Err(why);
    }
    let written = cell.text();
    let mut address = written.trim();
    // "Bob <bob@acme.com>" and "mailto:bob@acme.com" come from pasting out of mail programs.
    if let (Some(start), Some(end)) = (address.rfind('<'), address.rfind('>')) {
        if start < end {
            address = &address[start + 1..end];
        }
    }
    let address = address
        .strip_prefix("mailto:")
        .unwrap_or(address)
        .trim()
        .to_lowercase();
    let valid = {
        let mut parts = address.split('@');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(local), Some(domain), None) => {
                !local.is_empty()
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.contains("..")
                    && !address.chars().any(|character| {
                        character.is_whitespace() || character == ',' || character == ';'
                    })
            }
            _ => false,
        }
    };
    if valid {
        Ok(FieldValue::Text(address))
    } else {
        Err("is not an email address".to_string())
    }
}

pub fn phone(cell: &Cell) -> Cleaned<FieldValue> {
    if let Some(why) = error_value(cell) {
        return Err(why);
    }
    let written = match cell {
        // A phone typed into a number cell comes back as a float.
        Cell::Number(number) if number.fract() == 0.0 => {
            std::borrow::Cow::Owned(format!("{number:.0}"))
        }
        other => other.text(),
    };
    let trimmed = written.trim();
    let mut cleaned = String::new();
    for (position, character) in trimmed.chars().enumerate() {
        match character {
            '0'..='9' => cleaned.push(character),
            '０'..='９' => cleaned.push(char::from(b'0' + (character as u32 - '０' as u32) as u8)),
            '+' | '＋' if position == 0 => cleaned.push('+'),
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' | '\u{3000}' | '－' | '（' | '）' => {}
            _ => return Err("is not a phone number (only digits, spaces, - . ( ) / and a leading + are allowed)".to_string()),
        }
    }
    let n_digits = cleaned.chars().filter(char::is_ascii_digit).count();
    if !(3..=20).contains(&n_digits) {
        return Err("is not a phone number (it needs 3 to 20 digits)".to_string());
    }
    Ok(FieldValue::Text(cleaned))
}

pub fn stage(cell: &Cell, stages: &Stages) -> Cleaned<FieldValue> {
    if let Some(why) = error_value(cell) {
        return Err(why);
    }
    let written = cell.text();
    match stages.resolve(&written) {
        Some(stage) => Ok(FieldValue::Text(stage.name.clone())),
        None => Err(format!(
            "is not a known stage ({})",
            stages.names().join(", ")
        )),
    }
}

/// Maps a currency symbol or word to its ISO code.
fn currency_code(symbol: &str) -> Option<&'static str> {
    let code = match symbol.trim().to_uppercase().as_str() {
        "¥" | "￥" | "元" | "RMB" | "CNY" | "人民币" => "CNY",
        "$" | "US$" | "USD" | "美元" => "USD",
        "€" | "EUR" | "欧元" => "EUR",
        "£" | "GBP" => "GBP",
        "HK$" | "HKD" | "港币" => "HKD",
        "JPY" | "円" | "日元" => "JPY",
        "CHF" => "CHF",
        "A$" | "AUD" => "AUD",
        "C$" | "CAD" => "CAD",
        "S$" | "SGD" => "SGD",
        "₩" | "KRW" => "KRW",
        "₹" | "INR" => "INR",
        _ => return None,
    };
    Some(code)
}

pub fn currency(cell: &Cell) -> Cleaned<FieldValue> {
    if let Some(why) = error_value(cell) {
        return Err(why);
    }
    let written = cell.text();
    match currency_code(&written) {
        Some(code) => Ok(FieldValue::Text(code.to_string())),
        None if written.trim().len() == 3
            && written.trim().chars().all(|c| c.is_ascii_alphabetic()) =>
        {
            Ok(FieldValue::Text(written.trim().to_uppercase()))
        }
        None => Err("is not a currency (use a code such as CNY, USD, EUR)".to_string()),
    }
}

/// Parses an amount: numbers, `12,000`, `¥12,000.50`, `$1,200`, `1 200,50 €`, `1.200,50`,
/// `(500)` and `12万`. Returns the amount and the currency its symbol names, if any.
pub fn amount(cell: &Cell) -> Cleaned<(f64, Option<&'static str>)> {
    let not_a_number = || "is not a number".to_string();
    let written = match cell {
        Cell::Number(number) if number.is_finite() => return Ok((round_cents(*number), None)),
        Cell::Number(_) => return Err(not_a_number()),
        Cell::Error(_) => return Err(error_value(cell).unwrap_or_else(not_a_number)),
        Cell::Bool(_) | Cell::DateTime(_) | Cell::Empty => return Err(not_a_number()),
        Cell::Text(text) => text.trim().to_string(),
    };
    let mut text = written.as_str();
    let mut negative = false;
    if let Some(inner) = text
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
    {
        negative = true;
        text = inner.trim();
    }
    // Split off a currency symbol or code at either end.
    let mut currency = None;
    let mut number_part = String::new();
    let mut symbol = String::new();
    for character in text.chars() {
        if character.is_ascii_digit()
            || matches!(character, ',' | '.' | '-' | '+')
            || character.is_whitespace()
            || character == '\''
        {
            number_part.push(character);
        } else {
            symbol.push(character);
        }
    }
    let mut multiplier = 1.0;
    let symbol = symbol.trim().to_string();
    if !symbol.is_empty() {
        let mut remaining = symbol.as_str();
        if let Some(rest) = remaining.strip_suffix('万') {
            multiplier = 10_000.0;
            remaining = rest;
        } else if let Some(rest) = remaining.strip_suffix("万元") {
            multiplier = 10_000.0;
            currency = Some("CNY");
            remaining = rest;
        }
        let remaining = remaining.trim();
        if !remaining.is_empty() {
            currency = Some(currency_code(remaining).ok_or_else(not_a_number)?);
        }
    }
    let mut digits: String = number_part
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '\'')
        .collect();
    if let Some(rest) = digits.strip_prefix('-') {
        negative = !negative;
        digits = rest.to_string();
    } else if let Some(rest) = digits.strip_prefix('+') {
        digits = rest.to_string();
    }
    if digits.is_empty() || digits.contains(['-', '+']) {
        return Err(not_a_number());
    }
    let normalized = normalize_separators(&digits).ok_or_else(not_a_number)?;
    let value: f64 = normalized.parse().map_err(|_| not_a_number())?;
    if !value.is_finite() {
        return Err(not_a_number());
    }
    let value = value * multiplier;
    Ok((round_cents(if negative { -value } else { value }), currency))
}

fn round_cents(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Turns `12,000.50`, `1.200,50`, `1200,5` into `12000.50`, `1200.50`, `1200.5`.
fn normalize_separators(digits: &str) -> Option<String> {
    let n_commas = digits.matches(',').count();
    let n_dots = digits.matches('.').count();
    let decimal = match (n_commas, n_dots) {
        (0, 0) => None,
        (_, 0) if n_commas > 1 => None,
        (0, _) if n_dots > 1 => None,
        (1, 0) => {
            // "12,000" is twelve thousand; "1200,50" is a decimal comma.
            let after = digits.split(',').nth(1).unwrap_or("");
            if after.len() == 3 {
                None
            } else {
                Some(',')
            }
        }
        (0, 1) => Some('.'),
        _ => {
            // Both present: the last one is the decimal separator.
            let last_comma = digits.rfind(',').unwrap_or(0);
            let last_dot = digits.rfind('.').unwrap_or(0);
            let decimal = if last_comma > last_dot { ',' } else { '.' };
            if digits.matches(decimal).count() > 1 {
                return None;
            }
            Some(decimal)
        }
    };
    let thousands = match decimal {
        Some(',') => '.',
        _ => ',',
    };
    let mut out = String::with_capacity(digits.len());
    let groups: Vec<&str> = digits.split(thousands).collect();
    if groups.len() > 1 {
        // Thousands groups after the first must have exactly three digits.
        for group in &groups[1..] {
            let integer_part = match decimal {
                Some(separator) => group.split(separator).next().unwrap_or(""),
                None => group,
            };
            if integer_part.len() != 3 {
                return None;
            }
        }
    }
    for character in digits.chars() {
        if character == thousands {
            continue;
        }
        if Some(character) == decimal {
            out.push('.');
        } else if character.is_ascii_digit() {
            out.push(character);
        } else {
            return None;
        }
    }
    if out.is_empty() || out == "." {
        return None;
    }
    Some(out)
}

/// Parses a date from a date cell, an Excel serial number or text in the formats reps type.
pub fn date(cell: &Cell, order: DateOrder) -> Cleaned<NaiveDate> {
    let not_a_date = || "is not a date (use 2026-11-28)".to_string();
    match cell {
        Cell::DateTime(datetime) => Ok(datetime.date()),
        Cell::Number(serial) => from_serial(*serial).ok_or_else(not_a_date),
        Cell::Error(_) => Err(error_value(cell).unwrap_or_else(not_a_date)),
        Cell::Bool(_) | Cell::Empty => Err(not_a_date()),
        Cell::Text(text) => parse_date_text(text.trim(), order),
    }
}

fn from_serial(serial: f64) -> Option<NaiveDate> {
    // 1 is 1900-01-01 and 2958465 is 9999-12-31, Excel's range.
    if !(1.0..=2_958_465.0).contains(&serial) {
        return None;
    }
    excel_epoch().checked_add_signed(chrono::Duration::days(serial.floor() as i64))
}

fn parse_date_text(text: &str, order: DateOrder) -> Cleaned<NaiveDate> {
    let not_a_date = || "is not a date (use 2026-11-28)".to_string();
    // Drop a time part: "2026-11-28 10:30" or "2026-11-28T10:30:00".
    let date_part = text.split(['T', ' ']).next().unwrap_or(text);
    let date_part = date_part.trim_end_matches('日');
    let numbers: Vec<&str> = date_part.split(['-', '/', '.', '年', '月']).collect();
    if numbers.len() == 1 {
        // A serial number typed as text, as CSV exports of date columns sometimes have.
        return match date_part.parse::<f64>() {
            Ok(serial) if date_part.len() >= 4 && date_part.len() <= 7 => {
                from_serial(serial).ok_or_else(not_a_date)
            }
            _ => Err(not_a_date()),
        };
    }
    if numbers.len() != 3
        || numbers
            .iter()
            .any(|part| part.is_empty() || !part.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(not_a_date());
    }
    let parse = |part: &str| part.parse::<u32>().map_err(|_| not_a_date());
    let (first, second, third) = (parse(numbers[0])?, parse(numbers[1])?, parse(numbers[2])?);
    let make = |year: u32, month: u32, day: u32| {
        let year = if year < 100 { 2000 + year } else { year };
        NaiveDate::from_ymd_opt(year as i32, month, day).ok_or_else(not_a_date)
    };
    if numbers[0].len() == 4 {
        return make(first, second, third);
    }
    if numbers[2].len() != 4 && numbers[2].len() != 2 {
        return Err(not_a_date());
    }
    // Year last: day and month order is ambiguous unless one of them is above 12.
    if first > 12 && second <= 12 {
        return make(third, second, first);
    }
    if second > 12 && first <= 12 {
        return make(third, first, second);
    }
    if first == second {
        return make(third, first, second);
    }
    match order {
        DateOrder::DayMonthYear => make(third, second, first),
        DateOrder::MonthDayYear => make(third, first, second),
        DateOrder::YearMonthDay => {
            Err("is ambiguous (day/month or month/day?); write 2026-11-28 or set date_order = \"dmy\" or \"mdy\"".to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDateTime;

    fn text_cell(text: &str) -> Cell {
        Cell::Text(text.into())
    }

    fn ymd(year: i32, month: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(year, month, day).expect("valid test date")
    }

    #[test]
    fn dates() {
        let cases: Vec<(Cell, DateOrder, Result<NaiveDate, &str>)> = vec![
            (
                text_cell("2026-11-28"),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("2026/11/28"),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("2026.11.28"),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("2026年11月28日"),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("2026-11-28 10:30"),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("03/04/2026"),
                DateOrder::DayMonthYear,
                Ok(ymd(2026, 4, 3)),
            ),
            (
                text_cell("03/04/2026"),
                DateOrder::MonthDayYear,
                Ok(ymd(2026, 3, 4)),
            ),
            (
                text_cell("03/04/2026"),
                DateOrder::YearMonthDay,
                Err("ambiguous"),
            ),
            (
                text_cell("28/11/2026"),
                DateOrder::MonthDayYear,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("11/28/2026"),
                DateOrder::DayMonthYear,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("2026-02-30"),
                DateOrder::YearMonthDay,
                Err("not a date"),
            ),
            (
                text_cell("next week"),
                DateOrder::YearMonthDay,
                Err("not a date"),
            ),
            (
                Cell::Number(46354.0),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                text_cell("46354"),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                Cell::Number(-5.0),
                DateOrder::YearMonthDay,
                Err("not a date"),
            ),
            (
                Cell::DateTime(
                    NaiveDateTime::parse_from_str("2026-11-28 09:00:00", "%Y-%m-%d %H:%M:%S")
                        .expect("valid"),
                ),
                DateOrder::YearMonthDay,
                Ok(ymd(2026, 11, 28)),
            ),
            (
                Cell::Error("#N/A".to_string()),
                DateOrder::YearMonthDay,
                Err("error value"),
            ),
        ];
        for (cell, order, expected) in cases {
            let got = date(&cell, order);
            match (&got, expected) {
                (Ok(got), Ok(expected)) => assert_eq!(*got, expected, "{cell:?}"),
                (Err(why), Err(fragment)) => assert!(why.contains(fragment), "{cell:?}: {why}"),
                _ => panic!("{cell:?} with {order:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn amounts() {
        type Expected = Option<(f64, Option<&'static str>)>;
        let cases: Vec<(Cell, Expected)> = vec![
            (Cell::Number(12000.0), Some((12000.0, None))),
            (text_cell("12,000"), Some((12000.0, None))),
            (text_cell("¥12,000.50"), Some((12000.5, Some("CNY")))),
            (text_cell("￥8,800"), Some((8800.0, Some("CNY")))),
            (text_cell("$1,200"), Some((1200.0, Some("USD")))),
            (text_cell("1 200,50 €"), Some((1200.5, Some("EUR")))),
            (text_cell("1.200,50"), Some((1200.5, None))),
            (text_cell("1200,5"), Some((1200.5, None))),
            (text_cell("1,234,567.89"), Some((1234567.89, None))),
            (text_cell("USD 500"), Some((500.0, Some("USD")))),
            (text_cell("(500)"), Some((-500.0, None))),
            (text_cell("-42.5"), Some((-42.5, None))),
            (text_cell("12万"), Some((120000.0, None))),
            (text_cell("3.5万元"), Some((35000.0, Some("CNY")))),
            (text_cell("5000元"), Some((5000.0, Some("CNY")))),
            (text_cell("twelve"), None),
            (text_cell("12,00,0"), None),
            (text_cell("1.2.3"), None),
            (text_cell("12abc"), None),
            (text_cell("$"), None),
            (text_cell("1-2"), None),
            (Cell::Bool(true), None),
        ];
        for (cell, expected) in cases {
            let got = amount(&cell);
            match (got, expected) {
                (Ok((value, currency)), Some((expected_value, expected_currency))) => {
                    assert_eq!(
                        (value, currency),
                        (expected_value, expected_currency),
                        "{cell:?}"
                    )
                }
                (Err(why), None) => assert_eq!(why, "is not a number", "{cell:?}"),
                (got, expected) => panic!("{cell:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn emails_and_phones() {
        assert_eq!(
            email(&text_cell("  Bob@Acme.COM ")),
            Ok(FieldValue::Text("bob@acme.com".to_string()))
        );
        assert_eq!(
            email(&text_cell("Bob <bob@acme.com>")),
            Ok(FieldValue::Text("bob@acme.com".to_string()))
        );
        for bad in [
            "bob",
            "bob@",
            "@acme.com",
            "bob@acme",
            "a b@c.com",
            "a@b@c.com",
            "x@y..z",
        ] {
            assert!(email(&text_cell(bad)).is_err(), "{bad} should be rejected");
        }
        assert_eq!(
            phone(&text_cell(" +86 138-0013-8000 ")),
            Ok(FieldValue::Text("+8613800138000".to_string()))
        );
        assert_eq!(
            phone(&text_cell("(021) 6543.2100")),
            Ok(FieldValue::Text("02165432100".to_string()))
        );
        assert_eq!(
            phone(&Cell::Number(13800138000.0)),
            Ok(FieldValue::Text("13800138000".to_string()))
        );
        assert_eq!(
            phone(&text_cell("１３８００１３８０００")),
            Ok(FieldValue::Text("13800138000".to_string()))
        );
        assert!(phone(&text_cell("call me")).is_err());
        assert!(phone(&text_cell("12")).is_err());
        assert!(phone(&text_cell("1+2345")).is_err());
    }

    #[test]
    fn deal_ids() {
        assert_eq!(deal_id(&Cell::Number(12.0)), Some(12));
        assert_eq!(deal_id(&text_cell(" 12 ")), Some(12));
        assert_eq!(deal_id(&Cell::Number(12.5)), None);
        assert_eq!(deal_id(&text_cell("abc")), None);
        assert_eq!(deal_id(&text_cell("0")), None);
    }

    fn text_value(cell: &Cell) -> Cleaned<FieldValue> {
        text(cell)
    }

    proptest::proptest! {
        /// Cleaning never panics, whatever a rep typed.
        #[test]
        fn cleaning_arbitrary_text_never_panics(text in "\\PC{0,40}") {
            let cell = Cell::Text(text.into());
            let _ = amount(&cell);
            let _ = date(&cell, DateOrder::DayMonthYear);
            let _ = date(&cell, DateOrder::YearMonthDay);
            let _ = phone(&cell);
            let _ = email(&cell);
            let _ = currency(&cell);
            let _ = deal_id(&cell);
        }

        /// Cleaning what cleaning produced gives the same value: a value written back into a
        /// sheet and read again does not drift.
        #[test]
        fn cleaning_is_idempotent(text in "\\PC{0,30}") {
            let cell = Cell::Text(text.into());
            if let Ok((value, _)) = amount(&cell) {
                let again = amount(&Cell::Text(crate::deal::format_amount(value).into())).map(|(again, _)| again);
                proptest::prop_assert_eq!(again, Ok(value));
            }
            for order in [DateOrder::YearMonthDay, DateOrder::DayMonthYear, DateOrder::MonthDayYear] {
                if let Ok(day) = date(&cell, order) {
                    proptest::prop_assert_eq!(date(&Cell::Text(day.format("%Y-%m-%d").to_string().into()), order), Ok(day));
                }
            }
            for clean in [email, phone, currency, text_value] {
                if let Ok(value) = clean(&cell) {
                    proptest::prop_assert_eq!(clean(&Cell::Text(value.to_string().into())), Ok(value));
                }
            }
        }

        #[test]
        fn cleaning_arbitrary_numbers_never_panics(number in proptest::num::f64::ANY) {
            let cell = Cell::Number(number);
            let _ = amount(&cell);
            let _ = date(&cell, DateOrder::YearMonthDay);
            let _ = phone(&cell);
            let _ = deal_id(&cell);
        }
    }
}
