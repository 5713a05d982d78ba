//! The figures `/metrics` shows, counted in the store at each scrape: whichever process wrote
//! them, every daemon (and `funnelsync serve` on a reporting host) reports the same: every
//! figure is the whole store's, of every site.

use super::sql::Db;
use super::StoreError;

/// Everything the store says about itself, counted.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// File syncs that changed something, by result.
    pub syncs: Vec<(String, i64)>,
    /// Rows applied by file syncs: created, updated, archived, deleted.
    pub rows: [i64; 4],
    pub issues_by_severity: Vec<(String, i64)>,
    pub files_by_state: Vec<(String, i64)>,
    /// Per source, when a file of it was last read whole (RFC 3339).
    pub last_sync_by_source: Vec<(String, Option<String>)>,
    pub outbox_by_status: Vec<(String, i64)>,
    pub reminders_sent: i64,
    pub live_deals_by_stage: Vec<(String, i64)>,
}

fn grouped(db: &Db<'_>, sql: &str) -> Result<Vec<(String, i64)>, StoreError> {
    db.query(sql, &[], |row| {
        Ok((
            row.get::<Option<String>>(0)?.unwrap_or_default(),
            row.get::<i64>(1)?,
        ))
    })
}

pub fn figures(db: &Db<'_>) -> Result<Figures, StoreError> {
    let rows = db
        .query_row(
            "SELECT CAST(coalesce(sum(n_created), 0) AS BIGINT), CAST(coalesce(sum(n_updated), 0) AS BIGINT), \
             CAST(coalesce(sum(n_archived), 0) AS BIGINT), CAST(coalesce(sum(n_deleted), 0) AS BIGINT) \
             FROM sync_runs WHERE file LIKE '/%'",
            &[],
            |row| Ok([row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?]),
        )?
        .unwrap_or_default();
    Ok(Figures {
        // Runs of files (command-line edits, API edits and undos are runs too, but of no file).
        syncs: grouped(
            db,
            "SELECT status, count(*) FROM sync_runs WHERE file LIKE '/%' GROUP BY status",
        )?,
        rows,
        issues_by_severity: grouped(
            db,
            "SELECT severity, count(*) FROM row_errors GROUP BY severity",
        )?,
        files_by_state: grouped(db, "SELECT state, count(*) FROM file_status GROUP BY state")?,
        last_sync_by_source: db.query(
            "SELECT source, max(coalesce(checked_at, synced_at)) FROM mirror_files GROUP BY source",
            &[],
            |row| Ok((row.get::<String>(0)?, row.get::<Option<String>>(1)?)),
        )?,
        outbox_by_status: grouped(db, "SELECT status, count(*) FROM outbox GROUP BY status")?,
        reminders_sent: db.query_value(
            "SELECT count(*) FROM reminders JOIN outbox ON outbox.id = reminders.message_id \
             WHERE outbox.status = 'sent'",
            &[],
        )?,
        live_deals_by_stage: grouped(
            db,
            "SELECT stage, count(*) FROM deals WHERE archived_at IS NULL GROUP BY stage",
        )?,
    })
}
