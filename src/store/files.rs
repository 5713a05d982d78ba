//! The file states (`file_status`): where the daemon of each site stands with each of its files
//! ([`FileState`]: ok, retrying, failed, held, removed, or ignored for a symbolic link that is
//! not a source) as it records them ([`record`], [`replace_ignored`]), and the overview of every
//! file the store knows, of every site ([`file_overview`]: its latest run, its mirror's rows and
//! write-back, its row errors, its state, and its site when the store holds several), for
//! `funnelsync status` and the files page.
//!
//! Storage only: the daemon (and `sync`, for links that are not sources) decides a file's state.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::sql::sql_params;
use super::sql::Db;
use super::{parse_timestamp, timestamp, StoreError};

/// Where the daemon stands with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// The last sync read the file.
    Ok,
    /// The last read failed in a way that may pass (half-saved, locked); another try is due.
    Retrying,
    /// Reading failed for good (or too often); left alone until the file changes.
    Failed,
    /// The file is gone from the folder; its deals stay.
    Removed,
    /// A sync would have removed too many rows (or the sheet is gone): nothing applied until
    /// `sync --force` or the file changes.
    Held,
    /// Not a source: a symbolic link that is not followed (the reason is the state's message).
    Ignored,
}

impl FileState {
    pub fn name(self) -> &'static str {
        match self {
            FileState::Ok => "ok",
            FileState::Retrying => "retrying",
            FileState::Failed => "failed",
            FileState::Removed => "removed",
            FileState::Held => "held",
            FileState::Ignored => "ignored",
        }
    }

    fn from_name(name: &str) -> FileState {
        match name {
            "retrying" => FileState::Retrying,
            "failed" => FileState::Failed,
            "removed" => FileState::Removed,
            "held" => FileState::Held,
            "ignored" => FileState::Ignored,
            _ => FileState::Ok,
        }
    }
}

/// The daemon's view of one file, as recorded for `funnelsync status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileStatusRecord {
    pub file: String,
    pub source: String,
    pub state: FileState,
    pub attempts: u32,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// Records the daemon's state of one file, replacing the one before.
pub fn record(db: &Db<'_>, record: &FileStatusRecord) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO file_status (site, file, source, state, attempts, next_retry_at, last_error, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (site, file) DO UPDATE SET source = excluded.source, \
         state = excluded.state, attempts = excluded.attempts, next_retry_at = excluded.next_retry_at, \
         last_error = excluded.last_error, updated_at = excluded.updated_at",
        &sql_params![
            db.site(),
            record.file.as_str(),
            record.source.as_str(),
            record.state.name(),
            record.attempts,
            record.next_retry_at.map(timestamp),
            record.last_error.clone(),
            timestamp(record.updated_at)
        ],
    )?;
    Ok(())
}

/// How a file's last write-back went, for `funnelsync status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriteBackState {
    /// `off`, `up_to_date`, `written`, `deferred` or `failed`.
    pub status: String,
    /// Why it was deferred or failed.
    pub message: Option<String>,
}

/// Records the files of `source` that are not sources (`(file key, reason)`, state `ignored`)
/// and forgets the ones recorded before that are no longer there or no longer ignored.
pub fn replace_ignored(
    db: &Db<'_>,
    source: &str,
    ignored: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let keep: std::collections::HashSet<&str> =
        ignored.iter().map(|(file, _)| file.as_str()).collect();
    let recorded: Vec<String> = db.query(
        "SELECT file FROM file_status WHERE site = ?1 AND source = ?2 AND state = 'ignored'",
        &sql_params![db.site(), source],
        |row| row.get::<String>(0),
    )?;
    for file in recorded.iter().filter(|file| !keep.contains(file.as_str())) {
        db.execute(
            "DELETE FROM file_status WHERE site = ?1 AND file = ?2 AND state = 'ignored'",
            &sql_params![db.site(), file.as_str()],
        )?;
    }
    for (file, reason) in ignored {
        record(
            db,
            &FileStatusRecord {
                file: file.clone(),
                source: source.to_string(),
                state: FileState::Ignored,
                attempts: 0,
                next_retry_at: None,
                last_error: Some(reason.clone()),
                updated_at: now,
            },
        )?;
    }
    Ok(())
}

/// One line of `funnelsync status`: a file with its latest run, daemon state and error count.
#[derive(Debug, Clone, Serialize)]
pub struct FileOverview {
    /// The site of the daemon that syncs the file (`[store] site`); left out while the store
    /// has files of one site only, as every store of one daemon has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub file: String,
    pub source: String,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_status: Option<String>,
    pub last_message: Option<String>,
    pub last_synced_at: Option<DateTime<Utc>>,
    /// When the file was last looked at, whether or not anything changed.
    pub last_checked_at: Option<DateTime<Utc>>,
    /// How its last write-back went; null before the file's first sync.
    pub write_back: Option<WriteBackState>,
    pub n_rows: u64,
    pub n_row_errors: u64,
    pub n_warnings: u64,
    pub state: Option<FileState>,
    pub attempts: u32,
    pub next_retry_at: Option<DateTime<Utc>>,
}

/// The sites whose daemons have tracked or synced a file in this store, sorted: more than one
/// means the store is shared, and the admin's views say whose each file is.
pub fn sites(db: &Db<'_>) -> Result<Vec<String>, StoreError> {
    db.query(
        "SELECT site FROM mirror_files UNION SELECT site FROM file_status ORDER BY 1",
        &[],
        |row| row.get::<String>(0),
    )
}

/// Every file the store knows of (synced, attempted, or tracked by a daemon), of every site:
/// the admin's views (`status`, the HTTP pages) show the whole store, whichever daemon's config
/// they run with. A daemon's own sync logic never reads this.
pub fn file_overview(db: &Db<'_>) -> Result<Vec<FileOverview>, StoreError> {
    let several_sites = sites(db)?.len() > 1;
    db.query(
        // Command-line edits and undos are runs, not files: files are the absolute paths.
        "WITH files AS (
             SELECT site, file, min(source) AS source FROM (
                 SELECT site, file, source FROM mirror_files
                 UNION SELECT site, file, source FROM sync_runs WHERE file LIKE '/%'
                 UNION SELECT site, file, source FROM file_status
             ) AS known GROUP BY site, file
         ),
         last_runs AS (
             SELECT site, file, max(id) AS id FROM sync_runs WHERE file LIKE '/%' GROUP BY site, file
         )
         SELECT files.file, files.source, runs.finished_at, runs.status,
                CASE WHEN file_status.state = 'ignored' THEN file_status.last_error ELSE runs.message END,
                mirror_files.synced_at, mirror_files.checked_at, mirror_files.write_back,
                mirror_files.write_back_message,
                (SELECT count(*) FROM mirror_rows WHERE mirror_rows.site = files.site AND mirror_rows.file = files.file),
                (SELECT count(*) FROM row_errors WHERE row_errors.site = files.site AND row_errors.file = files.file AND severity = 'error'),
                (SELECT count(*) FROM row_errors WHERE row_errors.site = files.site AND row_errors.file = files.file AND severity = 'warning'),
                file_status.state, file_status.attempts, file_status.next_retry_at, files.site
         FROM files
         LEFT JOIN last_runs ON last_runs.site = files.site AND last_runs.file = files.file
         LEFT JOIN sync_runs AS runs ON runs.id = last_runs.id
         LEFT JOIN mirror_files ON mirror_files.site = files.site AND mirror_files.file = files.file
         LEFT JOIN file_status ON file_status.site = files.site AND file_status.file = files.file
         ORDER BY files.site, files.source, files.file",
        &[],
        |row| {
            let synced_at: Option<String> = row.get(5)?;
            let checked_at: Option<String> = row.get(6)?;
            let write_back: Option<String> = row.get(7)?;
            let write_back_message: Option<String> = row.get(8)?;
            let state: Option<String> = row.get(12)?;
            let retry_at: Option<String> = row.get(14)?;
            let last_run_at: Option<String> = row.get(2)?;
            Ok(FileOverview {
                site: if several_sites {
                    Some(row.get(15)?)
                } else {
                    None
                },
                file: row.get(0)?,
                source: row.get(1)?,
                last_run_at: last_run_at.as_deref().map(parse_timestamp).transpose()?,
                last_status: row.get(3)?,
                last_message: row.get(4)?,
                last_synced_at: synced_at.as_deref().map(parse_timestamp).transpose()?,
                last_checked_at: checked_at
                    .or(synced_at)
                    .as_deref()
                    .map(parse_timestamp)
                    .transpose()?,
                write_back: write_back.map(|status| WriteBackState {
                    status,
                    message: write_back_message,
                }),
                n_rows: row.get::<i64>(9)?.max(0) as u64,
                n_row_errors: row.get::<i64>(10)?.max(0) as u64,
                n_warnings: row.get::<i64>(11)?.max(0) as u64,
                state: state.as_deref().map(FileState::from_name),
                attempts: row.get::<Option<i64>>(13)?.unwrap_or(0).max(0) as u32,
                next_retry_at: retry_at.as_deref().map(parse_timestamp).transpose()?,
            })
        },
    )
}
