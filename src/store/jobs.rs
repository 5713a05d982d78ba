//! What the daemons do once for the whole store: the weekly digest's snapshots
//! (`report_snapshots`), the alerts sent (`alerts`), and the runs claimed per due time
//! (`job_runs`: a job due at a time is done by the one daemon that records it first).
//!
//! Storage only; see [`super::Store::exclusively`] for the claim that keeps two daemons from
//! doing the same job at once.

use chrono::{DateTime, Utc};

use super::sql::sql_params;
use super::sql::Db;
use super::{parse_timestamp, timestamp, StoreError};

/// The stages of the latest weekly digest's snapshot (JSON), if there is one.
pub fn last_snapshot(db: &Db<'_>) -> Result<Option<String>, StoreError> {
    db.query_row(
        "SELECT stages FROM report_snapshots ORDER BY id DESC LIMIT 1",
        &[],
        |row| row.get::<String>(0),
    )
}

/// Keeps a weekly digest's snapshot; `due_at` is the due time it was sent for, if it was due.
pub fn record_snapshot(
    db: &Db<'_>,
    at: DateTime<Utc>,
    stages: &str,
    due_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO report_snapshots (at, stages, due_at) VALUES (?1, ?2, ?3)",
        &sql_params![timestamp(at), stages, due_at.map(timestamp)],
    )?;
    Ok(())
}

/// When an alert with this key last went out.
pub fn last_alert(db: &Db<'_>, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let last: Option<String> = db.query_value(
        "SELECT max(at) FROM alerts WHERE key = ?1",
        &sql_params![key],
    )?;
    Ok(last.as_deref().and_then(|last| parse_timestamp(last).ok()))
}

pub fn record_alert(
    db: &Db<'_>,
    subject: &str,
    key: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO alerts (subject, key, at) VALUES (?1, ?2, ?3)",
        &sql_params![subject, key, timestamp(at)],
    )?;
    Ok(())
}

/// Whether `job` ran for the time it was due at (by any daemon).
pub fn done(db: &Db<'_>, job: &str, due_at: DateTime<Utc>) -> Result<bool, StoreError> {
    let n: i64 = db.query_value(
        "SELECT count(*) FROM job_runs WHERE job = ?1 AND due_at = ?2",
        &sql_params![job, timestamp(due_at)],
    )?;
    Ok(n > 0)
}

/// Records that `job` ran for the time it was due at. False when it had been recorded already
/// (another daemon did it).
pub fn claim_due(
    db: &Db<'_>,
    job: &str,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let inserted = db.execute(
        "INSERT INTO job_runs (job, due_at, ran_at) VALUES (?1, ?2, ?3) ON CONFLICT (job, due_at) DO NOTHING",
        &sql_params![job, timestamp(due_at), timestamp(now)],
    )?;
    Ok(inserted > 0)
}
