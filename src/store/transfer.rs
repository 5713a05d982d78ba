//! `funnelsync store copy`: a SQLite store copied into an empty PostgreSQL database in one
//! transaction — every table, with its ids, the change counter and the sequences after them —
//! and then checked: each table's row count and a checksum of its rows (independent of their
//! order) must be the same on both sides. The mirror, the row errors and the file states move to
//! the site of the config the copy runs with.

use super::schema::TABLES;
use super::sql::sql_params;
use super::sql::{value_groups, Db, Engine, Value};
use super::{Store, StoreError};

/// What was copied: per table, its rows and their checksum.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    pub tables: Vec<(String, u64, String)>,
}

/// The tables whose rows belong to a site: the copy gives them the target's.
fn site_column(columns: &[&str]) -> Option<usize> {
    columns.iter().position(|column| *column == "site")
}

fn rows_of(
    db: &Db<'_>,
    table: &str,
    columns: &[&str],
    site: Option<&str>,
) -> Result<Vec<Vec<Value>>, StoreError> {
    let site_at = site_column(columns);
    db.query(
        &format!("SELECT {} FROM {table}", columns.join(", ")),
        &[],
        |row| {
            let mut values = (0..columns.len())
                .map(|column| row.value(column))
                .collect::<Result<Vec<Value>, StoreError>>()?;
            if let (Some(site), Some(at)) = (site, site_at) {
                if values[at] != Value::Null {
                    values[at] = Value::from(site);
                }
            }
            Ok(values)
        },
    )
}

/// A checksum of a table's rows that does not depend on their order: the sum of each row's
/// hash, with numbers written alike whichever engine kept them as integers or reals.
fn checksum(rows: &[Vec<Value>]) -> String {
    let mut sum: u64 = 0;
    for row in rows {
        let mut text = String::new();
        for value in row {
            match value {
                Value::Null => text.push_str("\u{0}N"),
                Value::Integer(number) => text.push_str(&format!("\u{0}I{number}")),
                Value::Real(number) if number.fract() == 0.0 && number.abs() < 9.0e15 => {
                    text.push_str(&format!("\u{0}I{}", *number as i64))
                }
                Value::Real(number) => text.push_str(&format!("\u{0}R{}", number.to_bits())),
                Value::Text(string) => text.push_str(&format!("\u{0}T{}:{string}", string.len())),
                Value::Blob(bytes) => {
                    text.push_str(&format!(
                        "\u{0}B{}:{:032x}",
                        bytes.len(),
                        xxhash_rust::xxh3::xxh3_128(bytes)
                    ));
                }
            }
        }
        sum = sum.wrapping_add(xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
    }
    format!("{sum:016x}")
}

/// Copies `from` (SQLite) into `to` (an empty PostgreSQL store), then checks the copy.
pub fn copy_to_postgres(from: &Store, to: &mut Store) -> Result<CopyReport, StoreError> {
    if from.engine() != Engine::Sqlite || to.engine() != Engine::Postgres {
        return Err(StoreError::Refused(
            "store copy goes from a SQLite store to a PostgreSQL database".to_string(),
        ));
    }
    let site = to.site().to_string();
    {
        let target = to.db();
        let n_held: i64 = target.query_value(
            "SELECT (SELECT count(*) FROM deals) + (SELECT count(*) FROM sync_runs) + (SELECT count(*) FROM outbox) + (SELECT count(*) FROM mirror_files)",
            &[],
        )?;
        if n_held > 0 {
            return Err(StoreError::Refused(format!(
                "{} already holds a store ({n_held} deals, runs, messages and files); copy into an empty database",
                to.location().display()
            )));
        }
    }
    let source = from.db();
    let transaction = to.transaction()?;
    for (table, columns) in TABLES {
        let columns: Vec<&str> = columns.split(", ").collect();
        let rows = rows_of(&source, table, &columns, Some(&site))?;
        // PostgreSQL takes at most 65,535 parameters a statement.
        let per_statement = (60_000 / columns.len()).clamp(1, 500);
        for chunk in rows.chunks(per_statement) {
            let values: Vec<Value> = chunk.iter().flatten().cloned().collect();
            transaction.execute(
                &format!(
                    "INSERT INTO {table} ({}) VALUES {}",
                    columns.join(", "),
                    value_groups(chunk.len(), columns.len())
                ),
                &values,
            )?;
        }
        if columns.first() == Some(&"id") {
            // New rows take ids after the copied ones.
            transaction.query_value::<Value>(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 0) + 1, false) FROM {table}"
                ),
                &[],
            )?;
        }
    }
    let version: i64 = source.query_value("SELECT version FROM store_meta WHERE id = 1", &[])?;
    transaction.execute(
        "UPDATE store_meta SET version = ?1 WHERE id = 1",
        &sql_params![version],
    )?;
    transaction.commit()?;

    // The check reads both sides again, as stored.
    let target = to.db();
    let mut report = CopyReport::default();
    for (table, columns) in TABLES {
        let columns: Vec<&str> = columns.split(", ").collect();
        let expected = rows_of(&source, table, &columns, Some(&site))?;
        let copied = rows_of(&target, table, &columns, None)?;
        let (expected_sum, copied_sum) = (checksum(&expected), checksum(&copied));
        if expected.len() != copied.len() || expected_sum != copied_sum {
            return Err(StoreError::Corrupt(format!(
                "the copy of {table} differs: {} rows (checksum {expected_sum}) in the SQLite store, {} rows (checksum {copied_sum}) in PostgreSQL",
                expected.len(),
                copied.len()
            )));
        }
        report
            .tables
            .push((table.to_string(), copied.len() as u64, copied_sum));
    }
    let copied_version: i64 =
        target.query_value("SELECT version FROM store_meta WHERE id = 1", &[])?;
    if copied_version != version {
        return Err(StoreError::Corrupt(format!(
            "the change counter is {copied_version} in PostgreSQL, {version} in the SQLite store"
        )));
    }
    Ok(report)
}
