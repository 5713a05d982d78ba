//! Where each file stands, for `funnelsync status`: the daemon's state of a file ([`FileState`]:
//! ok, retrying, failed, held, removed, or ignored for a symbolic link that is not a source) as it
//! records it ([`record`], [`replace_ignored`]), and the overview of every file the store knows
//! ([`file_overview`]: its latest run, its mirror's rows and write-back, its row errors, its state).
//!
//! This module owns the `file_status` table and reads the others only for the overview. It must
//! not decide a file's state: the daemon (and `sync`, for links that are not sources) says it.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::store::{parse_timestamp, timestamp, StoreError};

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
pub fn record(connection: &Connection, record: &FileStatusRecord) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO file_status (file, source, state, attempts, next_retry_at, last_error, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(file) DO UPDATE SET source = ?2, state = ?3, \
             attempts = ?4, next_retry_at = ?5, last_error = ?6, updated_at = ?7",
        )?
        .execute(params![
            record.file,
            record.source,
            record.state.name(),
            record.attempts,
            record.next_retry_at.map(timestamp),
            record.last_error,
            timestamp(record.updated_at)
        ])?;
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
    connection: &Connection,
    source: &str,
    ignored: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let keep: std::collections::HashSet<&str> =
        ignored.iter().map(|(file, _)| file.as_str()).collect();
    let recorded: Vec<String> = connection
        .prepare_cached("SELECT file FROM file_status WHERE source = ?1 AND state = 'ignored'")?
        .query_map([source], |row| row.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    for file in recorded.iter().filter(|file| !keep.contains(file.as_str())) {
        connection.execute(
            "DELETE FROM file_status WHERE file = ?1 AND state = 'ignored'",
            [file],
        )?;
    }
    for (file, reason) in ignored {
        record(
            connection,
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

/// Every file the store knows of (synced, attempted, or tracked by the daemon).
pub fn file_overview(connection: &Connection) -> Result<Vec<FileOverview>, StoreError> {
    let mut statement = connection.prepare(
        // Command-line edits and undos are runs, not files: files are the absolute paths.
        "WITH files AS (
             SELECT file, source FROM mirror_files
             UNION SELECT file, source FROM sync_runs WHERE file LIKE '/%'
             UNION SELECT file, source FROM file_status
         ),
         last_runs AS (
             SELECT file, max(id) AS id FROM sync_runs WHERE file LIKE '/%' GROUP BY file
         )
         SELECT files.file, files.source, runs.finished_at, runs.status,
                CASE WHEN file_status.state = 'ignored' THEN file_status.last_error ELSE runs.message END,
                mirror_files.synced_at, mirror_files.checked_at, mirror_files.write_back,
                mirror_files.write_back_message,
                (SELECT count(*) FROM mirror_rows WHERE mirror_rows.file = files.file),
                (SELECT count(*) FROM row_errors WHERE row_errors.file = files.file AND severity = 'error'),
                (SELECT count(*) FROM row_errors WHERE row_errors.file = files.file AND severity = 'warning'),
                file_status.state, file_status.attempts, file_status.next_retry_at
         FROM files
         LEFT JOIN last_runs ON last_runs.file = files.file
         LEFT JOIN sync_runs AS runs ON runs.id = last_runs.id
         LEFT JOIN mirror_files ON mirror_files.file = files.file
         LEFT JOIN file_status ON file_status.file = files.file
         GROUP BY files.file
         ORDER BY files.source, files.file",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, Option<String>>(2)?,
            row.get::<_, Option<String>>(3)?,
            row.get::<_, Option<String>>(4)?,
            row.get::<_, Option<String>>(5)?,
            [
                row.get::<_, Option<String>>(6)?,
                row.get::<_, Option<String>>(7)?,
                row.get::<_, Option<String>>(8)?,
            ],
            row.get::<_, i64>(9)?,
            row.get::<_, i64>(10)?,
            row.get::<_, i64>(11)?,
            row.get::<_, Option<String>>(12)?,
            row.get::<_, Option<i64>>(13)?,
            row.get::<_, Option<String>>(14)?,
        ))
    })?;
    let mut overview = Vec::new();
    for row in rows {
        let (
            file,
            source,
            last_run_at,
            last_status,
            last_message,
            synced_at,
            [checked_at, write_back, write_back_message],
            n_rows,
            n_errors,
            n_warnings,
            state,
            attempts,
            retry_at,
        ) = row?;
        overview.push(FileOverview {
            file,
            source,
            last_run_at: last_run_at.as_deref().map(parse_timestamp).transpose()?,
            last_status,
            last_message,
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
            n_rows: n_rows.max(0) as u64,
            n_row_errors: n_errors.max(0) as u64,
            n_warnings: n_warnings.max(0) as u64,
            state: state.as_deref().map(FileState::from_name),
            attempts: attempts.unwrap_or(0).max(0) as u32,
            next_retry_at: retry_at.as_deref().map(parse_timestamp).transpose()?,
        });
    }
    Ok(overview)
}
