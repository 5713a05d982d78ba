//! `funnelsync store copy`: a SQLite store copied into an empty PostgreSQL database in one
//! transaction — every table, with its ids, the change counter and the sequences after them —
//! and then checked: each table's row count and a checksum of its rows (independent of their
//! order) must be the same on both sides. The mirror, the row errors and the file states move to
//! the site of the config the copy runs with.
//!
//! Nothing holds a table: each is read, written and checked in batches in key order
//! (`TablePlan`), at most [`BATCH_ROWS`] rows and about [`BATCH_BYTES`] of values at a time, so
//! the copy's memory does not grow with the store. The source is read in one transaction, so
//! every batch and the check see the same store.

use super::schema::TABLES;
use super::sql::sql_params;
use super::sql::{value_groups, Db, Engine, Value};
use super::{Store, StoreError};

/// What was copied: per table, its rows and their checksum.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    pub tables: Vec<(String, u64, String)>,
}

/// The most rows read, written and checked at a time: the copy holds one batch of a table,
/// never the table.
const BATCH_ROWS: usize = 2_000;

/// About how many bytes of values a batch holds at most: a table of large rows (the outbox,
/// whose messages carry digests and the report as an attachment) is read fewer rows at a time.
const BATCH_BYTES: usize = 1 << 20;

/// The rows of a table's first batch, before its rows' size is known.
const FIRST_BATCH_ROWS: usize = 1;

/// The tables whose rows belong to a site: the copy gives them the target's.
fn site_column(columns: &[&str]) -> Option<usize> {
    columns.iter().position(|column| *column == "site")
}

/// How a table is read in batches: by its primary key (as the SQLite schema declares it, the
/// same columns in PostgreSQL's), in key order, each batch after the last key of the one before.
struct TablePlan<'t> {
    table: &'t str,
    columns: Vec<&'t str>,
    key: Vec<String>,
}

impl<'t> TablePlan<'t> {
    fn of(source: &Db<'_>, table: &'t str, columns: &'t str) -> Result<TablePlan<'t>, StoreError> {
        let key = source.query(
            "SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk",
            &sql_params![table],
            |row| row.get::<String>(0),
        )?;
        if key.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "the table {table} has no primary key to copy it by"
            )));
        }
        Ok(TablePlan {
            table,
            columns: columns.split(", ").collect(),
            key,
        })
    }

    /// Calls `each` with every batch of the table's rows (their `columns`; with the target's
    /// `site` in a site column when given), in key order.
    fn for_each_batch(
        &self,
        db: &Db<'_>,
        site: Option<&str>,
        mut each: impl FnMut(&[Vec<Value>]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let (table, n_key) = (self.table, self.key.len());
        let key = self.key.join(", ");
        let select = format!("SELECT {key}, {} FROM {table}", self.columns.join(", "));
        let first = format!("{select} ORDER BY {key} LIMIT ?1");
        let after = if n_key == 1 {
            format!("{key} > ?2")
        } else {
            let placeholders: Vec<String> = (2..n_key + 2).map(|n| format!("?{n}")).collect();
            format!("({key}) > ({})", placeholders.join(", "))
        };
        let next = format!("{select} WHERE {after} ORDER BY {key} LIMIT ?1");
        let site_at = site_column(&self.columns);
        let mut last_key: Option<Vec<Value>> = None;
        let mut batch = FIRST_BATCH_ROWS;
        loop {
            let mut parameters = vec![Value::Integer(batch as i64)];
            parameters.extend(last_key.iter().flatten().cloned());
            let sql = if last_key.is_some() { &next } else { &first };
            let mut keys = Vec::new();
            let mut n_bytes = 0;
            let rows = db.query(sql, &parameters, |row| {
                keys = (0..n_key)
                    .map(|column| row.value(column))
                    .collect::<Result<Vec<Value>, StoreError>>()?;
                let mut values = (0..self.columns.len())
                    .map(|column| row.value(n_key + column))
                    .collect::<Result<Vec<Value>, StoreError>>()?;
                if let (Some(site), Some(at)) = (site, site_at) {
                    if values[at] != Value::Null {
                        values[at] = Value::from(site);
                    }
                }
                n_bytes += values.iter().map(size_of_value).sum::<usize>();
                Ok(values)
            })?;
            if rows.is_empty() {
                return Ok(());
            }
            each(&rows)?;
            if rows.len() < batch {
                return Ok(());
            }
            // As many rows as the budget takes, at the size these had.
            let row_bytes = (n_bytes / rows.len()).max(1);
            batch = (BATCH_BYTES / row_bytes).clamp(1, BATCH_ROWS);
            last_key = Some(keys);
        }
    }
}

/// About how many bytes a value holds.
fn size_of_value(value: &Value) -> usize {
    match value {
        Value::Text(text) => text.len() + 24,
        Value::Blob(bytes) => bytes.len() + 24,
        _ => 16,
    }
}

/// A table's rows as counted and summed batch by batch.
#[derive(Default)]
struct Tally {
    rows: u64,
    sum: u64,
}

impl Tally {
    fn add(&mut self, rows: &[Vec<Value>]) {
        self.rows += rows.len() as u64;
        self.sum = self.sum.wrapping_add(row_hashes(rows));
    }

    fn checksum(&self) -> String {
        format!("{:016x}", self.sum)
    }
}

/// The part of a table's checksum these rows make: the sum of each row's hash, which does not
/// depend on their order (nor on how the table is cut into batches), with numbers written alike
/// whichever engine kept them as integers or reals.
fn row_hashes(rows: &[Vec<Value>]) -> u64 {
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
    sum
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
    // One read transaction on the source: every batch, and the check, see the same store.
    source.execute_batch("BEGIN")?;
    let copied = copy_and_check(&source, to, &site);
    let ended = source.execute_batch(if copied.is_ok() { "COMMIT" } else { "ROLLBACK" });
    let report = copied?;
    ended?;
    Ok(report)
}

fn copy_and_check(source: &Db<'_>, to: &mut Store, site: &str) -> Result<CopyReport, StoreError> {
    let plans = TABLES
        .iter()
        .map(|(table, columns)| TablePlan::of(source, table, columns))
        .collect::<Result<Vec<TablePlan<'_>>, StoreError>>()?;
    let transaction = to.transaction()?;
    for plan in &plans {
        let (table, columns) = (plan.table, &plan.columns);
        // PostgreSQL takes at most 65,535 parameters a statement.
        let per_statement = (60_000 / columns.len()).clamp(1, 500);
        plan.for_each_batch(source, Some(site), |rows| {
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
            Ok(())
        })?;
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

    // The check reads both sides again, as stored, batch by batch.
    let target = to.db();
    let mut report = CopyReport::default();
    for plan in &plans {
        let table = plan.table;
        let (mut expected, mut copied) = (Tally::default(), Tally::default());
        plan.for_each_batch(source, Some(site), |rows| {
            expected.add(rows);
            Ok(())
        })?;
        plan.for_each_batch(&target, None, |rows| {
            copied.add(rows);
            Ok(())
        })?;
        let (expected_sum, copied_sum) = (expected.checksum(), copied.checksum());
        if expected.rows != copied.rows || expected_sum != copied_sum {
            return Err(StoreError::Corrupt(format!(
                "the copy of {table} differs: {} rows (checksum {expected_sum}) in the SQLite store, {} rows (checksum {copied_sum}) in PostgreSQL",
                expected.rows, copied.rows
            )));
        }
        report
            .tables
            .push((table.to_string(), copied.rows, copied_sum));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_is_read_once_in_key_order_in_bounded_batches() {
        let folder = tempfile::tempdir().expect("temp dir");
        let (store, _) = Store::open_sqlite(&folder.path().join("crm.db"), "local").expect("open");
        let db = store.db();
        for (table, columns) in TABLES {
            TablePlan::of(&db, table, columns).expect("each table has a key to be read by");
        }
        // A composite key, over several full batches.
        let n_jobs = 2 * BATCH_ROWS + 7;
        for n in 0..n_jobs {
            db.execute(
                "INSERT INTO job_runs (job, due_at, ran_at) VALUES (?1, ?2, 'then')",
                &sql_params![format!("job {}", n % 3), format!("{n:06}")],
            )
            .expect("insert");
        }
        let plan = TablePlan::of(&db, "job_runs", "job, due_at, ran_at").expect("plan");
        let mut seen = Vec::new();
        let mut batches = Vec::new();
        plan.for_each_batch(&db, None, |rows| {
            batches.push(rows.len());
            seen.extend(rows.iter().map(|row| (row[0].clone(), row[1].clone())));
            Ok(())
        })
        .expect("read");
        assert_eq!(seen.len(), n_jobs);
        let mut sorted = seen.clone();
        sorted.sort_by_key(|(job, due_at)| (format!("{job:?}"), format!("{due_at:?}")));
        assert!(seen == sorted, "in key order");
        sorted.dedup();
        assert_eq!(sorted.len(), n_jobs, "no row twice");
        assert!(batches.iter().all(|&n| n <= BATCH_ROWS), "{batches:?}");
        assert!(batches.len() > 2, "{batches:?}");

        // Large rows come a few at a time.
        let subject = "x".repeat(BATCH_BYTES / 4);
        for n in 0..20 {
            db.execute(
                "INSERT INTO alerts (subject, key, at) VALUES (?1, ?2, 'then')",
                &sql_params![subject.as_str(), format!("key {n}")],
            )
            .expect("insert");
        }
        let plan = TablePlan::of(&db, "alerts", "id, subject, key, at").expect("plan");
        let mut batches = Vec::new();
        let mut site_rows = Tally::default();
        plan.for_each_batch(&db, Some("beijing"), |rows| {
            batches.push(rows.len());
            site_rows.add(rows);
            Ok(())
        })
        .expect("read");
        assert_eq!(site_rows.rows, 20);
        assert!(batches.iter().all(|&n| n <= 4), "{batches:?}");
    }

    #[test]
    fn a_checksum_does_not_depend_on_order_or_batches() {
        let rows: Vec<Vec<Value>> = (0..10)
            .map(|n| vec![Value::Integer(n), Value::Text(format!("row {n}"))])
            .collect();
        let mut whole = Tally::default();
        whole.add(&rows);
        let mut reversed: Vec<Vec<Value>> = rows.clone();
        reversed.reverse();
        let mut in_batches = Tally::default();
        for batch in reversed.chunks(3) {
            in_batches.add(batch);
        }
        assert_eq!(whole.checksum(), in_batches.checksum());
        assert_eq!(whole.rows, in_batches.rows);
        let mut other = Tally::default();
        other.add(&rows[1..]);
        assert_ne!(whole.checksum(), other.checksum());
    }
}
