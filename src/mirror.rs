//! The mirror: for each source file, what it held at its last sync — every row's cleaned values by
//! deal id, with a row hash — plus the row errors of its last sync. It is the "base" the next sync
//! diffs against, and always local SQLite, even when the CRM store is not.
//!
//! This module owns the `mirror_files`, `mirror_rows` and `row_errors` tables. It must not decide
//! anything: it stores and loads what the sync module tells it. The daemon's view of each file is
//! `status`, not this.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::deal::{DealId, ExtraMap, FieldMap};
use crate::mapping::{RowIssue, Severity};
use crate::store::{parse_timestamp, timestamp, StoreError};

/// One row as the file held it at the last sync.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorRow {
    pub deal_id: DealId,
    pub row_number: u32,
    pub row_hash: String,
    /// [`crate::workbook::SheetRow::raw_hash`] of the row's cells, when known.
    pub raw_hash: Option<i64>,
    pub fields: FieldMap,
    pub extras: ExtraMap,
}

/// The parts of a file's mirror that decide whether a sync can be skipped, without its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSummary {
    pub sheet: String,
    pub content_hash: String,
    pub config_hash: Option<String>,
    pub store_version: Option<i64>,
    pub n_rows: u64,
}

pub fn summary(connection: &Connection, file: &str) -> Result<Option<MirrorSummary>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT content_hash, config_hash, store_version, (SELECT count(*) FROM mirror_rows WHERE mirror_rows.file = mirror_files.file), sheet \
             FROM mirror_files WHERE file = ?1",
        )?
        .query_row([file], |row| {
            Ok(MirrorSummary {
                content_hash: row.get(0)?,
                config_hash: row.get(1)?,
                store_version: row.get(2)?,
                n_rows: row.get::<_, i64>(3)?.max(0) as u64,
                sheet: row.get(4)?,
            })
        })
        .optional()?)
}

/// The deals a file held at its last sync.
pub fn deal_ids(connection: &Connection, file: &str) -> Result<Vec<DealId>, StoreError> {
    let mut statement =
        connection.prepare_cached("SELECT deal_id FROM mirror_rows WHERE file = ?1")?;
    let rows = statement.query_map([file], |row| row.get::<_, DealId>(0))?;
    let mut ids = Vec::new();
    for row in rows {
        ids.push(row?);
    }
    Ok(ids)
}

/// The files whose mirror holds any of these deals.
pub fn files_holding(
    connection: &Connection,
    deal_ids: &[DealId],
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut files = std::collections::HashSet::new();
    for chunk in deal_ids.chunks(500) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let sql =
            format!("SELECT DISTINCT file FROM mirror_rows WHERE deal_id IN ({placeholders})");
        let mut statement = connection.prepare(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(chunk.iter()), |row| {
            row.get::<_, String>(0)
        })?;
        for row in rows {
            files.insert(row?);
        }
    }
    Ok(files)
}

/// A row error as stored, with its context.
#[derive(Debug, Clone, Serialize)]
pub struct StoredIssue {
    pub source: String,
    pub file: String,
    pub sheet: Option<String>,
    #[serde(flatten)]
    pub issue: RowIssue,
    pub seen_at: DateTime<Utc>,
}

/// A file's mirror without its rows: what it was at the last sync.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorHead {
    pub file: String,
    pub source: String,
    pub sheet: String,
    pub content_hash: String,
    pub header_row: u32,
    pub headers: Vec<String>,
    pub synced_at: DateTime<Utc>,
    /// A hash of the source's settings at that sync.
    pub config_hash: String,
    /// The store's change counter the file shows, when nothing was left to write back.
    pub store_version: Option<i64>,
    /// The store's change counter when the file was last synced.
    pub synced_version: Option<i64>,
    /// The store's change counter the file is known to show (kept while a write-back is owed).
    pub shown_version: Option<i64>,
    /// Hashes of the rows with errors the sync could not recognise and that were there beside
    /// every row the file held, so that they cannot be a row that goes missing later.
    pub known_error_rows: Vec<String>,
}

pub fn load_head(connection: &Connection, file: &str) -> Result<Option<MirrorHead>, StoreError> {
    let head = connection
        .prepare_cached(
            "SELECT source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version, known_error_rows, \
             synced_version, shown_version FROM mirror_files WHERE file = ?1",
        )?
        .query_row([file], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, u32>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, Option<String>>(6)?,
                row.get::<_, Option<i64>>(7)?,
                row.get::<_, Option<String>>(8)?,
                row.get::<_, Option<i64>>(9)?,
                row.get::<_, Option<i64>>(10)?,
            ))
        })
        .optional()?;
    let Some((
        source,
        sheet,
        content_hash,
        header_row,
        headers,
        synced_at,
        config_hash,
        store_version,
        known_error_rows,
        synced_version,
        shown_version,
    )) = head
    else {
        return Ok(None);
    };
    Ok(Some(MirrorHead {
        file: file.to_string(),
        source,
        sheet,
        content_hash,
        header_row,
        headers: serde_json::from_str(&headers)
            .map_err(|error| corrupt("mirror headers", error))?,
        synced_at: parse_timestamp(&synced_at)?,
        config_hash: config_hash.unwrap_or_default(),
        store_version,
        synced_version,
        shown_version,
        // Unknown (a store from before this was kept): every row with errors counts as new.
        known_error_rows: known_error_rows
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|error| corrupt("mirror error rows", error))?
            .unwrap_or_default(),
    }))
}

pub fn save_head(connection: &Connection, head: &MirrorHead) -> Result<(), StoreError> {
    let headers =
        serde_json::to_string(&head.headers).map_err(|error| corrupt("mirror headers", error))?;
    connection
        .prepare_cached(
            "INSERT INTO mirror_files (file, source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version, known_error_rows, synced_version, shown_version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT(file) DO UPDATE SET source = ?2, sheet = ?3, content_hash = ?4, header_row = ?5, headers = ?6, synced_at = ?7, \
             config_hash = ?8, store_version = ?9, known_error_rows = ?10, synced_version = ?11, shown_version = ?12",
        )?
        .execute(params![
            head.file,
            head.source,
            head.sheet,
            head.content_hash,
            head.header_row,
            headers,
            timestamp(head.synced_at),
            head.config_hash,
            head.store_version,
            serde_json::to_string(&head.known_error_rows)
                .map_err(|error| corrupt("mirror error rows", error))?,
            head.synced_version,
            head.shown_version,
        ])?;
    Ok(())
}

/// The compact index of a file's mirror: (raw hash, deal id) of every row whose raw hash is
/// known, sorted. What a sync holds of the whole mirror.
pub fn load_index(connection: &Connection, file: &str) -> Result<Vec<(i64, DealId)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT raw_hash, deal_id FROM mirror_rows WHERE file = ?1 AND raw_hash IS NOT NULL",
    )?;
    let rows = statement.query_map([file], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, DealId>(1)?))
    })?;
    let mut index = Vec::new();
    for row in rows {
        index.push(row?);
    }
    index.sort_unstable();
    Ok(index)
}

fn mirror_row_from(
    (deal_id, row_number, row_hash, raw_hash, fields, extras): (
        DealId,
        u32,
        String,
        Option<i64>,
        String,
        String,
    ),
) -> Result<MirrorRow, StoreError> {
    Ok(MirrorRow {
        deal_id,
        row_number,
        row_hash,
        raw_hash,
        fields: serde_json::from_str(&fields).map_err(|error| corrupt("mirror fields", error))?,
        extras: serde_json::from_str(&extras).map_err(|error| corrupt("mirror extras", error))?,
    })
}

/// The mirror rows of these deals (those the file holds), in no particular order.
pub fn load_rows(
    connection: &Connection,
    file: &str,
    deal_ids: &[DealId],
) -> Result<Vec<MirrorRow>, StoreError> {
    let mut rows = Vec::new();
    for chunk in deal_ids.chunks(500) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let sql = format!(
            "SELECT deal_id, row_number, row_hash, raw_hash, fields, extras FROM mirror_rows WHERE file = ? AND deal_id IN ({placeholders})"
        );
        let mut statement = connection.prepare(&sql)?;
        let mut parameters: Vec<&dyn rusqlite::ToSql> = vec![&file];
        parameters.extend(chunk.iter().map(|id| id as &dyn rusqlite::ToSql));
        let raw_rows = statement.query_map(parameters.as_slice(), |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            ))
        })?;
        for raw in raw_rows {
            rows.push(mirror_row_from(raw?)?);
        }
    }
    Ok(rows)
}

/// Every mirror row of a file, in row order.
pub fn load_all_rows(connection: &Connection, file: &str) -> Result<Vec<MirrorRow>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT deal_id, row_number, row_hash, raw_hash, fields, extras FROM mirror_rows WHERE file = ?1 ORDER BY row_number",
    )?;
    let raw_rows = statement.query_map([file], |row| {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
        ))
    })?;
    let mut rows = Vec::new();
    for raw in raw_rows {
        rows.push(mirror_row_from(raw?)?);
    }
    Ok(rows)
}

/// Writes (inserts or replaces) mirror rows of a file.
pub fn upsert_rows(
    connection: &Connection,
    file: &str,
    rows: &[MirrorRow],
) -> Result<(), StoreError> {
    use rusqlite::types::Value;
    // Many rows a statement: an import writes one mirror row per deal.
    for chunk in rows.chunks(64) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 7);
        for row in chunk {
            values.extend([
                Value::Text(file.to_string()),
                Value::Integer(row.deal_id),
                Value::Integer(i64::from(row.row_number)),
                Value::Text(row.row_hash.clone()),
                row.raw_hash.map_or(Value::Null, Value::Integer),
                Value::Text(
                    serde_json::to_string(&row.fields)
                        .map_err(|error| corrupt("mirror fields", error))?,
                ),
                Value::Text(
                    serde_json::to_string(&row.extras)
                        .map_err(|error| corrupt("mirror extras", error))?,
                ),
            ]);
        }
        let sql = format!(
            "INSERT INTO mirror_rows (file, deal_id, row_number, row_hash, raw_hash, fields, extras) VALUES {} \
             ON CONFLICT(file, deal_id) DO UPDATE SET row_number = excluded.row_number, row_hash = excluded.row_hash, \
             raw_hash = excluded.raw_hash, fields = excluded.fields, extras = excluded.extras",
            vec!["(?,?,?,?,?,?,?)"; chunk.len()].join(",")
        );
        connection
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(values.iter()))?;
    }
    Ok(())
}

/// Forgets mirror rows of a file.
pub fn delete_rows(
    connection: &Connection,
    file: &str,
    deal_ids: &[DealId],
) -> Result<(), StoreError> {
    let mut delete =
        connection.prepare_cached("DELETE FROM mirror_rows WHERE file = ?1 AND deal_id = ?2")?;
    for deal_id in deal_ids {
        delete.execute(params![file, deal_id])?;
    }
    Ok(())
}

pub use crate::deal::row_hash;

fn corrupt(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {error}"))
}

/// Records one more issue of a file beside those its sync stored (a write-back that failed after
/// the sync committed).
pub fn add_issue(
    connection: &Connection,
    source: &str,
    file: &str,
    sheet: Option<&str>,
    run_id: Option<i64>,
    issue: &RowIssue,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let severity = match issue.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    connection
        .prepare_cached(
            "INSERT INTO row_errors (source, file, sheet, row_number, column_name, value, severity, message, run_id, seen_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            source,
            file,
            sheet,
            issue.row_number,
            issue.column,
            issue.value,
            severity,
            issue.message,
            run_id,
            timestamp(now)
        ])?;
    Ok(())
}

/// Records that a file was looked at now (a pass that found it unchanged records no run), and,
/// when given, how its write-back went (`off`, `up_to_date`, `written`, `deferred`, `failed`,
/// with the reason).
pub fn record_check(
    connection: &Connection,
    file: &str,
    now: DateTime<Utc>,
    write_back: Option<(&str, Option<&str>)>,
) -> Result<(), StoreError> {
    match write_back {
        None => connection
            .prepare_cached("UPDATE mirror_files SET checked_at = ?1 WHERE file = ?2")?
            .execute(params![timestamp(now), file])?,
        Some((status, message)) => connection
            .prepare_cached(
                "UPDATE mirror_files SET checked_at = ?1, write_back = ?2, write_back_message = ?3 WHERE file = ?4",
            )?
            .execute(params![timestamp(now), status, message, file])?,
    };
    Ok(())
}

/// Replaces the stored row errors of one file with those of its latest sync (which is a run,
/// or not when it changed nothing).
pub fn replace_issues(
    connection: &Connection,
    source: &str,
    file: &str,
    sheet: Option<&str>,
    run_id: Option<i64>,
    issues: &[RowIssue],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    connection
        .prepare_cached("DELETE FROM row_errors WHERE file = ?1")?
        .execute([file])?;
    for issue in issues {
        add_issue(connection, source, file, sheet, run_id, issue, now)?;
    }
    Ok(())
}

/// Every stored row error and warning, by file and row.
pub fn current_issues(connection: &Connection) -> Result<Vec<StoredIssue>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT source, file, sheet, row_number, column_name, value, severity, message, seen_at FROM row_errors \
         ORDER BY file, row_number IS NOT NULL, row_number, id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, Option<String>>(2)?,
            row.get::<_, Option<u32>>(3)?,
            row.get::<_, Option<String>>(4)?,
            row.get::<_, Option<String>>(5)?,
            row.get::<_, String>(6)?,
            row.get::<_, String>(7)?,
            row.get::<_, String>(8)?,
        ))
    })?;
    let mut issues = Vec::new();
    for row in rows {
        let (source, file, sheet, row_number, column, value, severity, message, seen_at) = row?;
        let severity = if severity == "warning" {
            Severity::Warning
        } else {
            Severity::Error
        };
        issues.push(StoredIssue {
            source,
            file,
            sheet,
            issue: RowIssue {
                severity,
                row_number,
                column,
                value,
                message,
            },
            seen_at: parse_timestamp(&seen_at)?,
        });
    }
    Ok(issues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::{Field, FieldValue};

    #[test]
    fn row_hash_depends_on_content_only() {
        let mut fields = FieldMap::new();
        fields.insert(Field::Company, FieldValue::Text("Acme".to_string()));
        let extras = ExtraMap::new();
        let first = row_hash(&fields, &extras);
        assert_eq!(first, row_hash(&fields.clone(), &extras));
        fields.insert(Field::Amount, FieldValue::Amount(1.0));
        assert_ne!(first, row_hash(&fields, &extras));
        let moved = ExtraMap::from([("Company".to_string(), "Acme".to_string())]);
        assert_ne!(row_hash(&FieldMap::new(), &moved), first);
    }
}
