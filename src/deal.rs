//! The plain data every stage of the flow talks in: CRM fields, cleaned field values, deal ids and
//! deals as the store holds them.
//!
//! This module owns no behaviour beyond naming, formatting and comparing values. It must not know
//! about files, SQLite or configuration.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// The id funnelsync gives a deal. It is what the key column ("CRM ID") of a sheet holds.
pub type DealId = i64;

/// A CRM field that a sheet column can map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Company,
    Contact,
    Email,
    Phone,
    Stage,
    Amount,
    Currency,
    Owner,
    NextStep,
    LastContact,
    ExpectedClose,
    /// The day the deal entered its current stage, when a sheet says so (or funnelsync saw it).
    StageSince,
    /// The day the deal was created, as a sheet says.
    CreatedOn,
}

/// How a field's values are cleaned and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Text,
    Email,
    Phone,
    Stage,
    Amount,
    Currency,
    Date,
}

impl Field {
    pub const ALL: [Field; 13] = [
        Field::Company,
        Field::Contact,
        Field::Email,
        Field::Phone,
        Field::Stage,
        Field::Amount,
        Field::Currency,
        Field::Owner,
        Field::NextStep,
        Field::LastContact,
        Field::ExpectedClose,
        Field::StageSince,
        Field::CreatedOn,
    ];

    /// The name used in the config file, in JSON and as the store's column name.
    pub fn name(self) -> &'static str {
        match self {
            Field::Company => "company",
            Field::Contact => "contact",
            Field::Email => "email",
            Field::Phone => "phone",
            Field::Stage => "stage",
            Field::Amount => "amount",
            Field::Currency => "currency",
            Field::Owner => "owner",
            Field::NextStep => "next_step",
            Field::LastContact => "last_contact",
            Field::ExpectedClose => "expected_close",
            Field::StageSince => "stage_since",
            Field::CreatedOn => "created_on",
        }
    }

    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.name() == name)
    }

    pub fn kind(self) -> FieldKind {
        match self {
            Field::Company | Field::Contact | Field::Owner | Field::NextStep => FieldKind::Text,
            Field::Email => FieldKind::Email,
            Field::Phone => FieldKind::Phone,
            Field::Stage => FieldKind::Stage,
            Field::Amount => FieldKind::Amount,
            Field::Currency => FieldKind::Currency,
            Field::LastContact | Field::ExpectedClose | Field::StageSince | Field::CreatedOn => {
                FieldKind::Date
            }
        }
    }

    /// The header texts accepted for this field when the config does not list its own.
    pub fn default_aliases(self) -> &'static [&'static str] {
        match self {
            Field::Company => &[
                "Company",
                "Account",
                "Customer",
                "Client",
                "公司",
                "客户名称",
                "客户",
            ],
            Field::Contact => &["Contact", "Contact Name", "Name", "联系人"],
            Field::Email => &["Email", "E-mail", "Email Address", "邮箱", "电子邮件"],
            Field::Phone => &["Phone", "Mobile", "Tel", "Telephone", "电话", "手机"],
            Field::Stage => &["Stage", "Status", "Pipeline Stage", "阶段", "状态"],
            Field::Amount => &[
                "Amount",
                "Deal Size",
                "Value",
                "Deal Value",
                "金额",
                "合同金额",
            ],
            Field::Currency => &["Currency", "币种", "货币"],
            Field::Owner => &["Owner", "Rep", "Sales Rep", "负责人", "销售"],
            Field::NextStep => &["Next Step", "Next Steps", "下一步"],
            Field::LastContact => &["Last Contact", "Last Contacted", "最近联系", "最后联系"],
            Field::ExpectedClose => &["Expected Close", "Close Date", "预计成交", "预计成交日期"],
            Field::StageSince => &[
                "Stage Since",
                "Stage Date",
                "In Stage Since",
                "Stage Entered",
                "阶段日期",
                "进入阶段日期",
            ],
            Field::CreatedOn => &[
                "Created",
                "Created On",
                "Created Date",
                "Date Created",
                "创建日期",
                "创建时间",
            ],
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A cleaned value of one field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldValue {
    Amount(f64),
    Text(String),
}

impl FieldValue {
    pub fn date(date: NaiveDate) -> FieldValue {
        use chrono::Datelike;
        // Written directly rather than through a strftime pattern, which is parsed each time: a
        // sheet of dates formats one per row and column. Years outside four digits keep chrono's
        // spelling (a sign and more digits).
        if let Ok(year @ 0..=9999) = u32::try_from(date.year()) {
            // Digit by digit: `format!` took a tenth of cleaning a row of a sheet with two dates.
            fn push_digits(text: &mut String, value: u32, n_digits: u32) {
                for position in (0..n_digits).rev() {
                    let digit = (value / 10u32.pow(position)) % 10;
                    text.push(char::from(b'0' + digit as u8));
                }
            }
            let mut text = String::with_capacity(10);
            push_digits(&mut text, year, 4);
            text.push('-');
            push_digits(&mut text, date.month(), 2);
            text.push('-');
            push_digits(&mut text, date.day(), 2);
            FieldValue::Text(text)
        } else {
            FieldValue::Text(date.format("%Y-%m-%d").to_string())
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            FieldValue::Text(text) => Some(text),
            FieldValue::Amount(_) => None,
        }
    }

    pub fn as_amount(&self) -> Option<f64> {
        match self {
            FieldValue::Amount(amount) => Some(*amount),
            FieldValue::Text(_) => None,
        }
    }
}

impl fmt::Display for FieldValue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::Text(text) => formatter.write_str(text),
            FieldValue::Amount(amount) => write!(formatter, "{}", format_amount(*amount)),
        }
    }
}

/// Formats an amount without a trailing ".0" and with at most two decimals.
pub fn format_amount(amount: f64) -> String {
    if amount.fract() == 0.0 && amount.abs() < 1e15 {
        format!("{amount:.0}")
    } else {
        let text = format!("{amount:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The mapped fields of one row or deal. An absent field is an empty cell.
pub type FieldMap = BTreeMap<Field, FieldValue>;

/// Columns of a sheet that map to no field, by header text. They are kept so nothing is lost.
pub type ExtraMap = BTreeMap<String, String>;

/// Field-level changes to a deal: a new value, or `None` to clear the field.
pub type FieldChanges = Vec<(Field, Option<FieldValue>)>;

/// Changes to a deal's extra fields: a new value, or `None` to remove the key.
pub type ExtraChanges = Vec<(String, Option<String>)>;

/// A deal as the CRM store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    pub id: DealId,
    pub fields: FieldMap,
    pub extra: ExtraMap,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub stage_entered_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

impl Deal {
    /// The deal as the command line's and the API's JSON show it: `id`, every field by name (null
    /// when empty; amounts as numbers), `extra`, and the time stamps in the store's RFC 3339 form
    /// with milliseconds (null when unknown).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Value};
        let timestamp = |at: DateTime<Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut object = serde_json::Map::new();
        object.insert("id".to_string(), json!(self.id));
        for field in Field::ALL {
            let value = match self.fields.get(&field) {
                Some(FieldValue::Amount(amount)) => json!(amount),
                Some(FieldValue::Text(text)) => json!(text),
                None => Value::Null,
            };
            object.insert(field.name().to_string(), value);
        }
        object.insert("extra".to_string(), json!(self.extra));
        object.insert("created_at".to_string(), json!(timestamp(self.created_at)));
        object.insert("updated_at".to_string(), json!(timestamp(self.updated_at)));
        object.insert(
            "stage_entered_at".to_string(),
            json!(self.stage_entered_at.map(timestamp)),
        );
        object.insert(
            "archived_at".to_string(),
            json!(self.archived_at.map(timestamp)),
        );
        Value::Object(object)
    }

    pub fn text(&self, field: Field) -> Option<&str> {
        self.fields.get(&field).and_then(FieldValue::as_text)
    }

    /// A date field's day, when it holds one.
    pub fn date(&self, field: Field) -> Option<NaiveDate> {
        self.text(field)
            .and_then(|text| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
    }
}

/// How bad a problem with a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The row was not applied.
    Error,
    /// The row was applied, but something about it needs a look.
    Warning,
}

/// A problem with one row (or one cell) of a sheet. The file and sheet are the caller's context.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowIssue {
    pub severity: Severity,
    /// The row number as Excel shows it.
    pub row_number: Option<u32>,
    /// The column's header text (or its letter when it has none).
    pub column: Option<String>,
    /// The raw value as written in the cell.
    pub value: Option<String>,
    pub message: String,
}

impl RowIssue {
    pub fn error(
        row_number: u32,
        column: Option<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) -> RowIssue {
        RowIssue {
            severity: Severity::Error,
            row_number: Some(row_number),
            column,
            value,
            message: message.into(),
        }
    }

    pub fn warning(row_number: Option<u32>, message: impl Into<String>) -> RowIssue {
        RowIssue {
            severity: Severity::Warning,
            row_number,
            column: None,
            value: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for RowIssue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(row_number) = self.row_number {
            parts.push(format!("row {row_number}"));
        }
        if let Some(column) = &self.column {
            parts.push(format!("column \"{column}\""));
        }
        let location = parts.join(", ");
        let message = match &self.value {
            Some(value) => format!("\"{value}\" {}", self.message),
            None => self.message.clone(),
        };
        if location.is_empty() {
            formatter.write_str(&message)
        } else {
            write!(formatter, "{location}: {message}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_format_without_noise() {
        let cases = [
            (12000.0, "12000"),
            (12000.5, "12000.5"),
            (0.1, "0.1"),
            (-3.0, "-3"),
            (1.239, "1.24"),
        ];
        for (amount, expected) in cases {
            assert_eq!(format_amount(amount), expected, "amount {amount}");
        }
    }

    #[test]
    fn field_names_round_trip() {
        for field in Field::ALL {
            assert_eq!(Field::from_name(field.name()), Some(field));
        }
        assert_eq!(Field::from_name("nonsense"), None);
    }

    #[test]
    fn field_names_are_plain_sql_column_names() {
        // SQL column names are built only from these (ARCHITECTURE.md): each must be a bare
        // identifier that needs no quoting and can carry nothing else into a statement.
        for field in Field::ALL {
            let name = field.name();
            assert!(
                name.starts_with(|character: char| character.is_ascii_lowercase())
                    && name
                        .chars()
                        .all(|character| character.is_ascii_lowercase() || character == '_'),
                "{name}"
            );
        }
    }
}

/// The hash of a row's cleaned content: equal hashes mean nothing in the row changed.
pub fn row_hash(fields: &FieldMap, extras: &ExtraMap) -> String {
    encode_row(fields, extras).0
}

/// A row's fields and extras as the JSON the store keeps them in (the mirror row, a created
/// deal's change record), encoded once while the row is hashed.
#[derive(Debug, Clone, PartialEq)]
pub struct RowJson {
    pub fields: String,
    pub extras: String,
}

/// [`row_hash`], with the JSON it hashed (none if either map did not encode).
pub fn encode_row(fields: &FieldMap, extras: &ExtraMap) -> (String, Option<RowJson>) {
    use sha2::{Digest, Sha256};
    let fields_json = serde_json::to_string(fields);
    let extras_json = serde_json::to_string(extras);
    let mut hasher = Sha256::new();
    // BTreeMaps serialise in key order, so equal content gives equal bytes.
    hasher.update(fields_json.as_deref().unwrap_or_default().as_bytes());
    hasher.update([0]);
    hasher.update(extras_json.as_deref().unwrap_or_default().as_bytes());
    let json = match (fields_json, extras_json) {
        (Ok(fields), Ok(extras)) => Some(RowJson { fields, extras }),
        _ => None,
    };
    (short_hex(&hasher.finalize()), json)
}

/// The first 16 bytes of a digest as hex: enough to tell rows apart, short enough to store per row.
pub fn short_hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(32);
    for byte in digest.iter().take(16) {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Folds a header text or stage name for matching: Unicode compatibility form (so full-width
/// "ＡＢＣ" and half-width "ABC" agree), lower case, inner white space collapsed, ends trimmed.
pub fn normalize_label(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    // NFKC leaves ASCII as it is, and ASCII lowercases byte by byte: the common case (English
    // labels, stage names, companies) skips the normalization, which is most of the cost.
    let folded: String = if text.is_ascii() {
        text.to_ascii_lowercase()
    } else {
        text.nfkc().collect::<String>().to_lowercase()
    };
    let mut joined = String::with_capacity(folded.len());
    for word in folded.split_whitespace() {
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(word);
    }
    joined
}

#[cfg(test)]
mod encode_tests {
    use super::{encode_row, row_hash, ExtraMap, Field, FieldMap, FieldValue};

    #[test]
    fn a_row_is_encoded_as_the_store_would_encode_it_and_hashed_from_those_bytes() {
        let mut fields = FieldMap::new();
        fields.insert(
            Field::Company,
            FieldValue::Text("Acme \"East\" 东".to_string()),
        );
        fields.insert(Field::Amount, FieldValue::Amount(12_500.5));
        let mut extras = ExtraMap::new();
        extras.insert("Region".to_string(), "华东".to_string());
        let (hash, json) = encode_row(&fields, &extras);
        let json = json.expect("both maps encode");
        assert_eq!(json.fields, serde_json::to_string(&fields).expect("fields"));
        assert_eq!(json.extras, serde_json::to_string(&extras).expect("extras"));
        assert_eq!(hash, row_hash(&fields, &extras));
        extras.insert("Notes".to_string(), String::new());
        assert_ne!(encode_row(&fields, &extras).0, hash);
    }

    /// Stored hashes and dates are compared with what the next sync computes: their spelling
    /// must stay as it was.
    #[test]
    fn hashes_and_dates_are_spelled_as_stored_before() {
        let digest: Vec<u8> = (0u8..20).map(|byte| byte.wrapping_mul(37)).collect();
        assert_eq!(
            super::short_hex(&digest),
            digest[..16]
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
        );
        for (year, month, day) in [
            (2026, 12, 3),
            (1, 1, 1),
            (999, 10, 31),
            (9999, 12, 31),
            (10_000, 1, 1),
            (-5, 3, 9),
        ] {
            let date = chrono::NaiveDate::from_ymd_opt(year, month, day).expect("a real day");
            assert_eq!(
                FieldValue::date(date),
                FieldValue::Text(date.format("%Y-%m-%d").to_string()),
                "{date:?}"
            );
        }
    }
}

#[cfg(test)]
mod label_tests {
    use super::normalize_label;

    #[test]
    fn labels_fold_width_case_and_spaces() {
        let cases = [
            ("  Deal   Size ", "deal size"),
            ("ＡＭＯＵＮＴ", "amount"),
            ("阶段", "阶段"),
            ("Ｅｍａｉｌ\u{3000}", "email"),
            ("CRM ID", "crm id"),
            ("\tACME\x0b  Ltd\r\n", "acme ltd"),
            ("Ａcme", "acme"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize_label(input), expected, "input {input:?}");
        }
    }
}
