//! The mirror's tables: for each file of this site (`mirror_files`, `mirror_rows`), what it held
//! at its last sync, by deal id, with its row hashes; its compact index; the rows written many
//! to a statement; and the row errors of its last sync (`row_errors`). Every query the sync makes
//! is keyed by the site of the [`Db`] and the file, so daemons sharing a store never see each
//! other's files; only the admin's view of the row errors ([`current_issues`]) reads every
//! site's.
//!
//! This is storage only: what to keep is the sync's decision.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::crm::{IN_CHUNK, ROWS_PER_INSERT};
use super::sql::sql_params;
use super::sql::{placeholders, value_groups_sharing, Db, Param, Row, StatementText, Value};
use super::{parse_timestamp, timestamp, StoreError};
use crate::deal::{DealId, ExtraMap, FieldMap, RowIssue, Severity};

/// One row as the file held it at the last sync.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorRow {
    pub deal_id: DealId,
    pub row_number: u32,
    pub row_hash: String,
    /// The hash of the row's cells as read (`workbook::SheetRow::raw_hash`), when known.
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
    /// Whether the mirror holds any row (counting them all costs a pass over the file's rows,
    /// which a changed file's sync would wait for before reading a cell: [`count_rows`]).
    pub has_rows: bool,
}

/// A row error as stored, with its context.
#[derive(Debug, Clone, Serialize)]
pub struct StoredIssue {
    /// The site of the daemon that syncs the file (`[store] site`); left out while the store
    /// has files of one site only (see [`super::files::sites`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
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

/// Stored JSON that does not read back.
fn corrupt(what: &str, source: serde_json::Error) -> StoreError {
    StoreError::damaged(what.to_string(), source)
}

/// A value that cannot be written as JSON.
fn unencodable(what: &'static str, source: serde_json::Error) -> StoreError {
    StoreError::Encode { what, source }
}

pub fn summary(db: &Db<'_>, file: &str) -> Result<Option<MirrorSummary>, StoreError> {
    db.query_row(
        "SELECT content_hash, config_hash, store_version, \
         EXISTS (SELECT 1 FROM mirror_rows WHERE mirror_rows.site = mirror_files.site AND mirror_rows.file = mirror_files.file), sheet \
         FROM mirror_files WHERE site = ?1 AND file = ?2",
        &sql_params![db.site(), file],
        |row| {
            Ok(MirrorSummary {
                content_hash: row.get(0)?,
                config_hash: row.get(1)?,
                store_version: row.get(2)?,
                has_rows: row.get::<bool>(3)?,
                sheet: row.get(4)?,
            })
        },
    )
}

/// How many rows a file's mirror holds.
pub fn count_rows(db: &Db<'_>, file: &str) -> Result<u64, StoreError> {
    let n_rows: i64 = db.query_value(
        "SELECT count(*) FROM mirror_rows WHERE site = ?1 AND file = ?2",
        &sql_params![db.site(), file],
    )?;
    Ok(n_rows.max(0) as u64)
}

/// The deals a file held at its last sync.
pub fn deal_ids(db: &Db<'_>, file: &str) -> Result<Vec<DealId>, StoreError> {
    db.query(
        "SELECT deal_id FROM mirror_rows WHERE site = ?1 AND file = ?2",
        &sql_params![db.site(), file],
        |row| row.get::<DealId>(0),
    )
}

/// The files of this site whose mirror holds any of these deals.
pub fn files_holding(db: &Db<'_>, deal_ids: &[DealId]) -> Result<HashSet<String>, StoreError> {
    let mut files = HashSet::new();
    for chunk in deal_ids.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT DISTINCT file FROM mirror_rows WHERE site = ? AND deal_id IN ({})",
            placeholders(chunk.len())
        );
        let mut parameters = vec![Value::from(db.site())];
        parameters.extend(chunk.iter().map(|id| Value::Integer(*id)));
        files.extend(db.query(&sql, &parameters, |row| row.get::<String>(0))?);
    }
    Ok(files)
}

/// Which of these deals a file of any site other than this file holds (a row that moved to
/// another file, even one another daemon syncs, is no removal).
pub fn deals_in_other_files(
    db: &Db<'_>,
    file: &str,
    deal_ids: &[DealId],
) -> Result<HashSet<DealId>, StoreError> {
    let mut found = HashSet::new();
    for chunk in deal_ids.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT DISTINCT deal_id FROM mirror_rows WHERE NOT (site = ? AND file = ?) AND deal_id IN ({})",
            placeholders(chunk.len())
        );
        let mut parameters = vec![Value::from(db.site()), Value::from(file)];
        parameters.extend(chunk.iter().map(|id| Value::Integer(*id)));
        found.extend(db.query(&sql, &parameters, |row| row.get::<DealId>(0))?);
    }
    Ok(found)
}

/// The file each deal is shown in (the first by name, of any site): for the reminder digests.
pub fn deal_files(db: &Db<'_>) -> Result<std::collections::HashMap<DealId, String>, StoreError> {
    Ok(db
        .query(
            "SELECT deal_id, min(file) FROM mirror_rows GROUP BY deal_id",
            &[],
            |row| Ok((row.get::<DealId>(0)?, row.get::<String>(1)?)),
        )?
        .into_iter()
        .collect())
}

pub fn load_head(db: &Db<'_>, file: &str) -> Result<Option<MirrorHead>, StoreError> {
    db.query_row(
        "SELECT source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version, known_error_rows, \
         synced_version, shown_version FROM mirror_files WHERE site = ?1 AND file = ?2",
        &sql_params![db.site(), file],
        |row| {
            let headers: String = row.get(4)?;
            let known_error_rows: Option<String> = row.get(8)?;
            Ok(MirrorHead {
                file: file.to_string(),
                source: row.get(0)?,
                sheet: row.get(1)?,
                content_hash: row.get(2)?,
                header_row: row.get(3)?,
                headers: serde_json::from_str(&headers)
                    .map_err(|error| corrupt("mirror headers", error))?,
                synced_at: parse_timestamp(&row.get::<String>(5)?)?,
                config_hash: row.get::<Option<String>>(6)?.unwrap_or_default(),
                store_version: row.get(7)?,
                synced_version: row.get(9)?,
                shown_version: row.get(10)?,
                // Unknown (a store from before this was kept): every row with errors counts as
                // new.
                known_error_rows: known_error_rows
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(|error| corrupt("mirror error rows", error))?
                    .unwrap_or_default(),
            })
        },
    )
}

pub fn save_head(db: &Db<'_>, head: &MirrorHead) -> Result<(), StoreError> {
    let headers = serde_json::to_string(&head.headers)
        .map_err(|error| unencodable("mirror headers", error))?;
    db.execute(
        "INSERT INTO mirror_files (site, file, source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version, known_error_rows, synced_version, shown_version) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
         ON CONFLICT (site, file) DO UPDATE SET source = excluded.source, sheet = excluded.sheet, content_hash = excluded.content_hash, \
         header_row = excluded.header_row, headers = excluded.headers, synced_at = excluded.synced_at, config_hash = excluded.config_hash, \
         store_version = excluded.store_version, known_error_rows = excluded.known_error_rows, synced_version = excluded.synced_version, \
         shown_version = excluded.shown_version",
        &sql_params![
            db.site(),
            head.file.as_str(),
            head.source.as_str(),
            head.sheet.as_str(),
            head.content_hash.as_str(),
            head.header_row,
            headers,
            timestamp(head.synced_at),
            head.config_hash.as_str(),
            head.store_version,
            serde_json::to_string(&head.known_error_rows)
                .map_err(|error| unencodable("mirror error rows", error))?,
            head.synced_version,
            head.shown_version,
        ],
    )?;
    Ok(())
}

/// The keys of a file's mirror rows, what a sync holds of the whole mirror: its compact index,
/// (raw hash, deal id) of every row whose raw hash is known, in no particular order (the sync's
/// index sorts them); and the deals of the other rows (none, but for rows of a store older than
/// raw hashes). Between them they name every deal the file holds. One pass over the rows: a sync
/// reads them before it classes any row, while the reading thread waits.
pub fn load_keys(db: &Db<'_>, file: &str) -> Result<(Vec<(i64, DealId)>, Vec<DealId>), StoreError> {
    // Both are built as the rows come; the deals of hashed rows are not listed apart from the
    // index (at 100,000 rows that list was 1 MB of the one-cell sync's 7.6 MB heap).
    let mut index: Vec<(i64, DealId)> = Vec::new();
    let mut other_deal_ids: Vec<DealId> = Vec::new();
    db.with_scan_cache(|| {
        db.query(
            "SELECT deal_id, raw_hash FROM mirror_rows WHERE site = ?1 AND file = ?2",
            &sql_params![db.site(), file],
            |row| {
                let deal_id = row.get::<DealId>(0)?;
                match row.get::<Option<i64>>(1)? {
                    // The index marks a taken row by negating its deal: it holds positive ones.
                    Some(raw_hash) if deal_id > 0 => index.push((raw_hash, deal_id)),
                    _ => other_deal_ids.push(deal_id),
                }
                Ok(())
            },
        )
    })?;
    Ok((index, other_deal_ids))
}

/// What a mirror row holds as its fields when they are those of its deal's creation record: not
/// JSON, so never a real row's fields.
const FIELDS_AS_CREATED: &str = "";

/// The mirror row's fields as JSON, read from the deal's first creation record where the row
/// refers to it. A deal is created once; a later creation record (a deletion undone) is a copy
/// of the deal as it was then, not what the file held.
const FIELDS_COLUMN: &str = "CASE WHEN fields = '' THEN (SELECT new_value FROM changes \
     WHERE changes.deal_id = mirror_rows.deal_id AND changes.kind = 'create' ORDER BY changes.id LIMIT 1) \
     ELSE fields END";

fn mirror_row(row: &Row<'_>) -> Result<MirrorRow, StoreError> {
    let fields: String = row.get(4)?;
    let extras: String = row.get(5)?;
    Ok(MirrorRow {
        deal_id: row.get(0)?,
        row_number: row.get(1)?,
        row_hash: row.get(2)?,
        raw_hash: row.get(3)?,
        fields: serde_json::from_str(&fields).map_err(|error| corrupt("mirror fields", error))?,
        extras: serde_json::from_str(&extras).map_err(|error| corrupt("mirror extras", error))?,
    })
}

/// The mirror rows of these deals (those the file holds), in no particular order.
pub fn load_rows(
    db: &Db<'_>,
    file: &str,
    deal_ids: &[DealId],
) -> Result<Vec<MirrorRow>, StoreError> {
    let mut rows = Vec::new();
    for chunk in deal_ids.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT deal_id, row_number, row_hash, raw_hash, {FIELDS_COLUMN}, extras FROM mirror_rows \
             WHERE site = ? AND file = ? AND deal_id IN ({})",
            placeholders(chunk.len())
        );
        let mut parameters = vec![Value::from(db.site()), Value::from(file)];
        parameters.extend(chunk.iter().map(|id| Value::Integer(*id)));
        rows.extend(db.query(&sql, &parameters, mirror_row)?);
    }
    Ok(rows)
}

/// Every mirror row of a file, in row order.
pub fn load_all_rows(db: &Db<'_>, file: &str) -> Result<Vec<MirrorRow>, StoreError> {
    db.query(
        &format!(
            "SELECT deal_id, row_number, row_hash, raw_hash, {FIELDS_COLUMN}, extras FROM mirror_rows \
             WHERE site = ?1 AND file = ?2 ORDER BY row_number"
        ),
        &sql_params![db.site(), file],
        mirror_row,
    )
}

/// A mirror row to write, borrowing its values: the rows of a sync are not copied to be written.
#[derive(Debug, Clone, Copy)]
pub struct MirrorRowRef<'a> {
    pub deal_id: DealId,
    pub row_number: u32,
    pub row_hash: &'a str,
    pub raw_hash: Option<i64>,
    pub fields: &'a FieldMap,
    pub extras: &'a ExtraMap,
    /// `fields` and `extras` already encoded (as the row was hashed), if they were.
    pub json: Option<&'a crate::deal::RowJson>,
    /// Whether the deal's creation record (in `changes`, written in the same transaction) holds
    /// `fields` exactly, as for a row a sync has just created a deal from: the mirror row then
    /// refers to that record rather than hold the same JSON again.
    pub fields_as_created: bool,
}

impl<'a> From<&'a MirrorRow> for MirrorRowRef<'a> {
    fn from(row: &'a MirrorRow) -> MirrorRowRef<'a> {
        MirrorRowRef {
            deal_id: row.deal_id,
            row_number: row.row_number,
            row_hash: &row.row_hash,
            raw_hash: row.raw_hash,
            fields: &row.fields,
            extras: &row.extras,
            json: None,
            fields_as_created: false,
        }
    }
}

/// Writes (inserts or replaces) mirror rows of a file, many to a statement: an import writes one
/// mirror row per deal.
pub fn upsert_rows(db: &Db<'_>, file: &str, rows: &[MirrorRow]) -> Result<(), StoreError> {
    let rows: Vec<MirrorRowRef<'_>> = rows.iter().map(MirrorRowRef::from).collect();
    upsert_row_refs(db, file, &rows)
}

/// [`upsert_rows`] of rows whose values are borrowed.
pub fn upsert_row_refs(
    db: &Db<'_>,
    file: &str,
    rows: &[MirrorRowRef<'_>],
) -> Result<(), StoreError> {
    let mut statement = StatementText::new();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        // Rows arrive with their JSON when the sync encoded them as it hashed them; only the
        // others are encoded here. Everything is bound borrowed.
        let encoded: Vec<Option<(String, String)>> = chunk
            .iter()
            .map(|row| match row.json {
                Some(_) => Ok(None),
                None => Ok(Some((
                    serde_json::to_string(row.fields)
                        .map_err(|error| unencodable("mirror fields", error))?,
                    serde_json::to_string(row.extras)
                        .map_err(|error| unencodable("mirror extras", error))?,
                ))),
            })
            .collect::<Result<_, StoreError>>()?;
        // The site and the file, the same in every row, are bound once.
        let mut values: Vec<Param<'_>> = Vec::with_capacity(chunk.len() * 6 + 2);
        values.extend([Param::Text(db.site()), Param::Text(file)]);
        for (row, encoded) in chunk.iter().zip(&encoded) {
            let (fields, extras) = match (row.json, encoded) {
                (Some(json), _) => (json.fields.as_str(), json.extras.as_str()),
                (None, Some((fields, extras))) => (fields.as_str(), extras.as_str()),
                (None, None) => ("{}", "{}"),
            };
            let fields = if row.fields_as_created {
                FIELDS_AS_CREATED
            } else {
                fields
            };
            values.extend([
                Param::Integer(row.deal_id),
                Param::Integer(i64::from(row.row_number)),
                Param::Text(row.row_hash),
                row.raw_hash.map_or(Param::Null, Param::Integer),
                Param::Text(fields),
                Param::Text(extras),
            ]);
        }
        let sql = statement.get(chunk.len(), || {
            format!(
                "{} INTO mirror_rows (site, file, deal_id, row_number, row_hash, raw_hash, fields, extras) VALUES {} \
                 ON CONFLICT (site, file, deal_id) DO UPDATE SET row_number = excluded.row_number, row_hash = excluded.row_hash, \
                 raw_hash = excluded.raw_hash, fields = excluded.fields, extras = excluded.extras",
                db.bulk_insert(),
                value_groups_sharing(
                    chunk.len(),
                    &[Some(1), Some(2), None, None, None, None, None, None]
                )
            )
        });
        db.execute_params(sql, &values)?;
    }
    Ok(())
}

/// Forgets mirror rows of a file.
pub fn delete_rows(db: &Db<'_>, file: &str, deal_ids: &[DealId]) -> Result<(), StoreError> {
    for deal_id in deal_ids {
        db.execute(
            "DELETE FROM mirror_rows WHERE site = ?1 AND file = ?2 AND deal_id = ?3",
            &sql_params![db.site(), file, *deal_id],
        )?;
    }
    Ok(())
}

/// Records one more issue of a file beside those its sync stored (a write-back that failed after
/// the sync committed).
pub fn add_issue(
    db: &Db<'_>,
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
    db.execute(
        "INSERT INTO row_errors (site, source, file, sheet, row_number, column_name, value, severity, message, run_id, seen_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        &sql_params![
            db.site(),
            source,
            file,
            sheet,
            issue.row_number,
            issue.column.clone(),
            issue.value.clone(),
            severity,
            issue.message.as_str(),
            run_id,
            timestamp(now)
        ],
    )?;
    Ok(())
}

/// Records that a file was looked at now (a pass that found it unchanged records no run), and,
/// when given, how its write-back went (`off`, `up_to_date`, `written`, `deferred`, `failed`,
/// with the reason).
pub fn record_check(
    db: &Db<'_>,
    file: &str,
    now: DateTime<Utc>,
    write_back: Option<(&str, Option<&str>)>,
) -> Result<(), StoreError> {
    match write_back {
        None => db.execute(
            "UPDATE mirror_files SET checked_at = ?1 WHERE site = ?2 AND file = ?3",
            &sql_params![timestamp(now), db.site(), file],
        )?,
        Some((status, message)) => db.execute(
            "UPDATE mirror_files SET checked_at = ?1, write_back = ?2, write_back_message = ?3 WHERE site = ?4 AND file = ?5",
            &sql_params![timestamp(now), status, message, db.site(), file],
        )?,
    };
    Ok(())
}

/// Replaces the stored row errors of one file with those of its latest sync (which is a run,
/// or not when it changed nothing).
pub fn replace_issues(
    db: &Db<'_>,
    source: &str,
    file: &str,
    sheet: Option<&str>,
    run_id: Option<i64>,
    issues: &[RowIssue],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        "DELETE FROM row_errors WHERE site = ?1 AND file = ?2",
        &sql_params![db.site(), file],
    )?;
    for issue in issues {
        add_issue(db, source, file, sheet, run_id, issue, now)?;
    }
    Ok(())
}

/// Every stored row error and warning of every site's files, by site, file and row: for the
/// admin's views, which show the whole store.
pub fn current_issues(db: &Db<'_>) -> Result<Vec<StoredIssue>, StoreError> {
    let several_sites = super::files::sites(db)?.len() > 1;
    db.query(
        "SELECT source, file, sheet, row_number, column_name, value, severity, message, seen_at, site FROM row_errors \
         ORDER BY site, file, row_number IS NOT NULL, row_number, id",
        &[],
        |row| {
            let severity: String = row.get(6)?;
            Ok(StoredIssue {
                site: if several_sites {
                    Some(row.get(9)?)
                } else {
                    None
                },
                source: row.get(0)?,
                file: row.get(1)?,
                sheet: row.get(2)?,
                issue: RowIssue {
                    severity: if severity == "warning" {
                        Severity::Warning
                    } else {
                        Severity::Error
                    },
                    row_number: row.get(3)?,
                    column: row.get(4)?,
                    value: row.get(5)?,
                    message: row.get(7)?,
                },
                seen_at: parse_timestamp(&row.get::<String>(8)?)?,
            })
        },
    )
}
