//! From rows of cells to cleaned rows of CRM fields: finding the header row, mapping columns to
//! fields by their header texts, and cleaning each value (dates, amounts, phones, emails, stages).
//!
//! This module is pure: it takes a sheet's rows and the source's settings and returns
//! `(Vec<CleanRow>, Vec<RowIssue>)`. It never fails because of a bad row — a bad cell becomes a
//! [`RowIssue`] and the row is marked so it is not applied. It must not know about the store, the
//! mirror or the file system.

pub mod clean;

use std::collections::BTreeMap;

use crate::config::{HeaderRow, SourceConfig, Stages};
use crate::deal::{normalize_label, DealId, ExtraMap, Field, FieldKind, FieldMap, FieldValue};
pub use crate::deal::{RowIssue, Severity};
use crate::workbook::{column_letters, Cell, SheetRow};

/// How many rows from the top are searched for the header row.
pub const HEADER_SEARCH_ROWS: usize = 20;

/// What one column of the sheet holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnRole {
    Field(Field),
    /// funnelsync's own id column.
    Key,
    /// A column that maps to no field, kept under this name in the deal's extra fields.
    Extra(String),
}

/// The header row and what each column means.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMap {
    pub row_number: u32,
    /// Index in the sheet's rows of the header row.
    pub row_position: usize,
    /// The header text of each column as written ("" where the header cell is empty).
    pub headers: Vec<String>,
    pub roles: Vec<Option<ColumnRole>>,
}

impl HeaderMap {
    pub fn column_of(&self, field: Field) -> Option<usize> {
        self.roles
            .iter()
            .position(|role| role == &Some(ColumnRole::Field(field)))
    }

    pub fn key_column(&self) -> Option<usize> {
        self.roles
            .iter()
            .position(|role| role == &Some(ColumnRole::Key))
    }

    /// The name a column goes by in messages: its header, or its letter when the header is empty.
    pub fn column_name(&self, column_idx: usize) -> String {
        match self.headers.get(column_idx) {
            Some(header) if !header.trim().is_empty() => header.trim().to_string(),
            _ => format!("Column {}", column_letters(column_idx)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the sheet is empty")]
    EmptySheet,
    #[error("no header row found in the first {HEADER_SEARCH_ROWS} rows: expected at least two headers such as {expected}")]
    NotFound { expected: String },
    #[error("row {row_number} (the configured header_row) has no header funnelsync knows; it holds: {found}")]
    FixedRowUnknown { row_number: u32, found: String },
}

/// A cleaned data row.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanRow {
    pub row_number: u32,
    /// The deal id in the key column, when it holds one.
    pub id: Option<DealId>,
    pub fields: FieldMap,
    pub extras: ExtraMap,
    /// True when some cell could not be cleaned: the row must not be applied. Its fields hold
    /// only the values that did clean, which are still good enough to recognise the row.
    pub has_error: bool,
    /// [`crate::deal::row_hash`] of `fields` and `extras`, computed once.
    pub hash: String,
    /// For a row with errors: a hash of every cell as written (the bad values included), so a
    /// later sync can tell whether the row is the same as before or new or changed.
    pub error_hash: Option<String>,
    /// `fields` and `extras` as JSON, as they were hashed: the mirror row and a created deal's
    /// change record reuse them instead of encoding the row again.
    pub json: Option<crate::deal::RowJson>,
}

/// Finds the header row: the configured one, or the row among the first
/// [`HEADER_SEARCH_ROWS`] that matches the most distinct known headers (at least two).
pub fn locate_header(rows: &[SheetRow], source: &SourceConfig) -> Result<HeaderMap, HeaderError> {
    if rows.is_empty() {
        return Err(HeaderError::EmptySheet);
    }
    match source.header_row {
        HeaderRow::Fixed(row_number) => {
            let row_position = rows.iter().position(|row| row.row_number == row_number);
            let header =
                row_position.map(|position| build_header(&rows[position], position, source));
            match header {
                Some(header)
                    if header
                        .roles
                        .iter()
                        .any(|role| matches!(role, Some(ColumnRole::Field(_)))) =>
                {
                    Ok(header)
                }
                Some(header) => Err(HeaderError::FixedRowUnknown {
                    row_number,
                    found: header
                        .headers
                        .iter()
                        .filter(|text| !text.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
                None => Err(HeaderError::FixedRowUnknown {
                    row_number,
                    found: "nothing (the row is empty)".to_string(),
                }),
            }
        }
        HeaderRow::Auto => {
            let mut best: Option<(usize, HeaderMap)> = None;
            for (position, row) in rows.iter().enumerate().take(HEADER_SEARCH_ROWS) {
                let header = build_header(row, position, source);
                let n_known = header
                    .roles
                    .iter()
                    .filter(|role| {
                        matches!(role, Some(ColumnRole::Field(_)) | Some(ColumnRole::Key))
                    })
                    .count();
                if n_known >= 2
                    && best
                        .as_ref()
                        .is_none_or(|(best_known, _)| n_known > *best_known)
                {
                    best = Some((n_known, header));
                }
            }
            best.map(|(_, header)| header)
                .ok_or_else(|| HeaderError::NotFound {
                    expected: ["Company", "Contact", "Stage", "Amount", "Owner"].join(", "),
                })
        }
    }
}

fn build_header(row: &SheetRow, row_position: usize, source: &SourceConfig) -> HeaderMap {
    let key = normalize_label(&source.key_column);
    let mut headers = Vec::with_capacity(row.width());
    let mut roles = Vec::with_capacity(row.width());
    let mut taken_fields = Vec::new();
    let mut extra_names: BTreeMap<String, usize> = BTreeMap::new();
    let mut has_key = false;
    for column_idx in 0..row.width() {
        let cell = row.cell(column_idx);
        let text = match cell {
            Cell::Text(text) => text.trim().to_string(),
            Cell::Empty => String::new(),
            other => other.to_string(),
        };
        let folded = normalize_label(&text);
        let role = if folded.is_empty() {
            None
        } else if folded == key && !has_key {
            has_key = true;
            Some(ColumnRole::Key)
        } else {
            let field = source
                .columns
                .iter()
                .find(|(field, aliases)| {
                    !taken_fields.contains(*field) && aliases.contains(&folded)
                })
                .map(|(field, _)| *field);
            match field {
                Some(field) => {
                    taken_fields.push(field);
                    Some(ColumnRole::Field(field))
                }
                None => {
                    // A second column with the same header keeps its data under a numbered name.
                    let count = extra_names.entry(text.clone()).or_insert(0);
                    *count += 1;
                    let name = if *count == 1 {
                        text.clone()
                    } else {
                        format!("{text} ({count})")
                    };
                    let _ = column_idx;
                    Some(ColumnRole::Extra(name))
                }
            }
        };
        headers.push(text);
        roles.push(role);
    }
    HeaderMap {
        row_number: row.row_number,
        row_position,
        headers,
        roles,
    }
}

/// Maps and cleans every data row below the header. Rows whose cells are all empty are skipped.
pub fn map_rows(
    rows: &[SheetRow],
    header: &HeaderMap,
    source: &SourceConfig,
    stages: &Stages,
) -> (Vec<CleanRow>, Vec<RowIssue>) {
    let mut clean_rows = Vec::new();
    let mut issues = Vec::new();
    for row in rows.iter().skip(header.row_position + 1) {
        if row.is_blank() {
            continue;
        }
        let (clean_row, row_issues) = map_row(row, header, source, stages);
        clean_rows.push(clean_row);
        issues.extend(row_issues);
    }
    (clean_rows, issues)
}

/// Cleans one data row into a [`CleanRow`] and its issues.
pub fn map_row(
    row: &SheetRow,
    header: &HeaderMap,
    source: &SourceConfig,
    stages: &Stages,
) -> (CleanRow, Vec<RowIssue>) {
    let mut issues = Vec::new();
    let mut fields = FieldMap::new();
    let mut extras = ExtraMap::new();
    let mut id = None;
    let mut currency_from_amount = None;
    for (column_idx, cell) in row.cells() {
        let role = match header.roles.get(column_idx) {
            Some(Some(role)) => role.clone(),
            // Data under an empty header (or past the last header) is kept, named by its letter.
            _ => ColumnRole::Extra(header.column_name(column_idx)),
        };
        let column = || Some(header.column_name(column_idx));
        match role {
            ColumnRole::Key => match clean::deal_id(cell) {
                Some(deal_id) => id = Some(deal_id),
                None => issues.push(RowIssue {
                    severity: Severity::Warning,
                    row_number: Some(row.row_number),
                    column: column(),
                    value: Some(cell.to_string()),
                    message: "is not a funnelsync id; the row is treated as having none"
                        .to_string(),
                }),
            },
            ColumnRole::Extra(name) => {
                extras.insert(name, cell.text().into_owned());
            }
            ColumnRole::Field(field) => {
                let cleaned = match field.kind() {
                    FieldKind::Text => clean::text(cell),
                    FieldKind::Email => clean::email(cell),
                    FieldKind::Phone => clean::phone(cell),
                    FieldKind::Stage => clean::stage(cell, stages),
                    FieldKind::Currency => clean::currency(cell),
                    FieldKind::Date => clean::date(cell, source.date_order).map(FieldValue::date),
                    FieldKind::Amount => clean::amount(cell).map(|(amount, currency)| {
                        currency_from_amount = currency;
                        FieldValue::Amount(amount)
                    }),
                };
                match cleaned {
                    Ok(value) => {
                        fields.insert(field, value);
                    }
                    Err(why) => issues.push(RowIssue::error(
                        row.row_number,
                        column(),
                        Some(cell.to_string()),
                        why,
                    )),
                }
            }
        }
    }
    if let Some(currency) = currency_from_amount {
        // A currency column, when there is one, says more than a symbol in the amount.
        fields
            .entry(Field::Currency)
            .or_insert(FieldValue::Text(currency.to_string()));
    }
    let has_identity = [Field::Company, Field::Contact, Field::Email]
        .iter()
        .any(|field| fields.contains_key(field));
    let failed_identity = issues.iter().any(|issue| issue.severity == Severity::Error);
    if !has_identity && !failed_identity {
        issues.push(RowIssue::error(
            row.row_number,
            None,
            None,
            "has no company, contact or email, so it cannot be a deal",
        ));
    }
    let has_error = issues.iter().any(|issue| issue.severity == Severity::Error);
    let (hash, json) = crate::deal::encode_row(&fields, &extras);
    let error_hash = has_error.then(|| raw_row_hash(row));
    (
        CleanRow {
            row_number: row.row_number,
            id,
            fields,
            extras,
            has_error,
            hash,
            error_hash,
            json,
        },
        issues,
    )
}

/// A hash of a row's cells as written, in column order.
fn raw_row_hash(row: &SheetRow) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for column_idx in 0..row.width() {
        hasher.update(row.cell(column_idx).to_string().as_bytes());
        hasher.update([0x1f]);
    }
    crate::deal::short_hex(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn source() -> (SourceConfig, Stages) {
        let text = "[store]\npath = \"crm.db\"\n[[sources]]\nname = \"p\"\npath = \"p.csv\"\n";
        let config = Config::from_text(text, Path::new("/tmp/x.toml")).expect("valid config");
        (config.sources[0].clone(), config.stages)
    }

    fn row(row_number: u32, cells: &[&str]) -> SheetRow {
        SheetRow::new(
            row_number,
            cells
                .iter()
                .map(|text| {
                    if text.is_empty() {
                        Cell::Empty
                    } else {
                        Cell::Text((*text).into())
                    }
                })
                .collect(),
        )
    }

    #[test]
    fn header_is_found_below_a_title_and_chinese_headers_map() {
        let (source, _) = source();
        let rows = vec![
            row(1, &["2026 销售管道"]),
            row(3, &["公司", "联系人", "阶段", "金额", "负责人", "备注"]),
            row(4, &["甲公司", "张三", "机会", "¥12,000", "王伟", "VIP"]),
        ];
        let header = locate_header(&rows, &source).expect("header found");
        assert_eq!(header.row_number, 3);
        assert_eq!(header.roles[2], Some(ColumnRole::Field(Field::Stage)));
        assert_eq!(header.roles[5], Some(ColumnRole::Extra("备注".to_string())));
    }

    #[test]
    fn full_width_and_cased_headers_match() {
        let (source, _) = source();
        let rows = vec![row(1, &["  COMPANY ", "ＳＴＡＧＥ", "crm id"])];
        let header = locate_header(&rows, &source).expect("header found");
        assert_eq!(header.roles[0], Some(ColumnRole::Field(Field::Company)));
        assert_eq!(header.roles[1], Some(ColumnRole::Field(Field::Stage)));
        assert_eq!(header.roles[2], Some(ColumnRole::Key));
    }

    #[test]
    fn missing_header_is_an_error() {
        let (source, _) = source();
        let rows = vec![row(1, &["foo", "bar"]), row(2, &["1", "2"])];
        assert!(matches!(
            locate_header(&rows, &source),
            Err(HeaderError::NotFound { .. })
        ));
        assert_eq!(locate_header(&[], &source), Err(HeaderError::EmptySheet));
    }

    #[test]
    fn bad_cells_become_issues_and_the_rest_maps() {
        let (source, stages) = source();
        let rows = vec![
            row(1, &["Company", "Stage", "Amount", "Email", "", "CRM ID"]),
            row(
                2,
                &[
                    "Acme",
                    "Closed Won",
                    "$1,200",
                    "  Bob@Acme.COM ",
                    "loose note",
                    "7",
                ],
            ),
            row(14, &["Beta", "Lead", "twelve"]),
            row(15, &["Gamma", "Negotiating"]),
            row(16, &["", "", "100"]),
        ];
        let header = locate_header(&rows, &source).expect("header");
        let (clean_rows, issues) = map_rows(&rows, &header, &source, &stages);
        assert_eq!(clean_rows.len(), 4);
        let acme = &clean_rows[0];
        assert!(!acme.has_error);
        assert_eq!(acme.id, Some(7));
        assert_eq!(
            acme.fields[&Field::Stage],
            FieldValue::Text("Won".to_string())
        );
        assert_eq!(acme.fields[&Field::Amount], FieldValue::Amount(1200.0));
        assert_eq!(
            acme.fields[&Field::Currency],
            FieldValue::Text("USD".to_string())
        );
        assert_eq!(
            acme.fields[&Field::Email],
            FieldValue::Text("bob@acme.com".to_string())
        );
        assert_eq!(acme.extras["Column E"], "loose note");

        assert!(clean_rows[1].has_error);
        assert_eq!(
            issues[0].to_string(),
            "row 14, column \"Amount\": \"twelve\" is not a number"
        );
        assert!(clean_rows[2].has_error);
        assert!(
            issues[1].message.contains("not a known stage"),
            "{:?}",
            issues[1]
        );
        assert!(clean_rows[3].has_error);
        assert_eq!(issues[2].row_number, Some(16));
    }

    #[test]
    fn duplicate_extra_headers_are_numbered() {
        let (source, stages) = source();
        let rows = vec![
            row(1, &["Company", "Stage", "Note", "Note"]),
            row(2, &["A", "Lead", "x", "y"]),
        ];
        let header = locate_header(&rows, &source).expect("header");
        let (clean_rows, _) = map_rows(&rows, &header, &source, &stages);
        assert_eq!(clean_rows[0].extras["Note"], "x");
        assert_eq!(clean_rows[0].extras["Note (2)"], "y");
    }
}
