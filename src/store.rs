//! The CRM store: deals, their stage history and the record of sync runs, in one SQLite file
//! (WAL mode, foreign keys on, versioned migrations through `PRAGMA user_version`).
//!
//! The sync code talks to deals only through the [`CrmStore`] trait, so that a shared PostgreSQL
//! store can stand in later; [`SqliteCrm`] implements it over a connection or a transaction. The
//! same SQLite file also holds the local state of [`crate::mirror`], which is not part of the trait.
//! This module must not know about spreadsheets, column headers or the config file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::deal::{Deal, DealId, ExtraMap, Field, FieldMap, FieldValue};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the folder for the store {path}: {source}")]
    CreateFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the store {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the store {path} has schema version {found}, newer than this funnelsync understands ({supported}); upgrade funnelsync")]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("no store at {} (has funnelsync synced yet?)", path.display())]
    Missing { path: PathBuf },
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// Migrations, in order; `PRAGMA user_version` says how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deals (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    company          TEXT,
    contact          TEXT,
    email            TEXT,
    phone            TEXT,
    stage            TEXT,
    amount           REAL,
    currency         TEXT,
    owner            TEXT,
    next_step        TEXT,
    last_contact     TEXT,
    expected_close   TEXT,
    extra            TEXT NOT NULL DEFAULT '{}',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    stage_entered_at TEXT,
    archived_at      TEXT
);
CREATE INDEX deals_email ON deals(email);
CREATE INDEX deals_owner ON deals(owner);
CREATE INDEX deals_stage ON deals(stage);

CREATE TABLE stage_history (
    id         INTEGER PRIMARY KEY,
    deal_id    INTEGER NOT NULL REFERENCES deals(id) ON DELETE CASCADE,
    from_stage TEXT,
    to_stage   TEXT NOT NULL,
    at         TEXT NOT NULL,
    source     TEXT NOT NULL
);
CREATE INDEX stage_history_deal ON stage_history(deal_id, at);

CREATE TABLE sync_runs (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    status      TEXT NOT NULL,
    n_created   INTEGER NOT NULL DEFAULT 0,
    n_updated   INTEGER NOT NULL DEFAULT 0,
    n_archived  INTEGER NOT NULL DEFAULT 0,
    n_deleted   INTEGER NOT NULL DEFAULT 0,
    n_unchanged INTEGER NOT NULL DEFAULT 0,
    n_errors    INTEGER NOT NULL DEFAULT 0,
    n_warnings  INTEGER NOT NULL DEFAULT 0,
    message     TEXT
);
CREATE INDEX sync_runs_file ON sync_runs(file, id);

CREATE TABLE mirror_files (
    file         TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    sheet        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    header_row   INTEGER NOT NULL,
    headers      TEXT NOT NULL,
    synced_at    TEXT NOT NULL
);

CREATE TABLE mirror_rows (
    file       TEXT NOT NULL REFERENCES mirror_files(file) ON DELETE CASCADE,
    deal_id    INTEGER NOT NULL,
    row_number INTEGER NOT NULL,
    row_hash   TEXT NOT NULL,
    fields     TEXT NOT NULL,
    extras     TEXT NOT NULL,
    PRIMARY KEY (file, deal_id)
);

CREATE TABLE row_errors (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    sheet       TEXT,
    row_number  INTEGER,
    column_name TEXT,
    value       TEXT,
    severity    TEXT NOT NULL,
    message     TEXT NOT NULL,
    run_id      INTEGER NOT NULL REFERENCES sync_runs(id) ON DELETE CASCADE,
    seen_at     TEXT NOT NULL
);
CREATE INDEX row_errors_file ON row_errors(file);
"#,
    r#"
CREATE TABLE file_status (
    file          TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_retry_at TEXT,
    last_error    TEXT,
    updated_at    TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE conflicts (
    id          INTEGER PRIMARY KEY,
    deal_id     INTEGER NOT NULL,
    field       TEXT NOT NULL,
    base_value  TEXT,
    sheet_value TEXT,
    store_value TEXT,
    winner      TEXT NOT NULL,
    policy      TEXT NOT NULL,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX conflicts_deal ON conflicts(deal_id);

-- A counter that every change to a deal moves on, whoever makes it (the daemon, the CLI, another
-- process): the daemon polls it to learn that files need writing back.
CREATE TABLE store_meta (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO store_meta (id, version) VALUES (1, 0);
CREATE TRIGGER deals_inserted AFTER INSERT ON deals BEGIN UPDATE store_meta SET version = version + 1; END;
CREATE TRIGGER deals_updated AFTER UPDATE ON deals BEGIN UPDATE store_meta SET version = version + 1; END;
CREATE TRIGGER deals_deleted AFTER DELETE ON deals BEGIN UPDATE store_meta SET version = version + 1; END;
"#,
    r#"
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    recipient       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    text_body       TEXT NOT NULL,
    html_body       TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    give_up_at      TEXT NOT NULL,
    sent_at         TEXT,
    last_error      TEXT
);
CREATE INDEX outbox_status ON outbox(status);

CREATE TABLE reminders (
    id         INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
    deal_id    INTEGER NOT NULL,
    stall_key  TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    day        TEXT NOT NULL,
    at         TEXT NOT NULL
);
CREATE INDEX reminders_stall ON reminders(stall_key, kind);

CREATE TABLE remind_runs (
    id         INTEGER PRIMARY KEY,
    due_at     TEXT NOT NULL,
    ran_at     TEXT NOT NULL,
    n_messages INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE outbox ADD COLUMN attachment_name TEXT;
ALTER TABLE outbox ADD COLUMN attachment BLOB;
CREATE TABLE report_snapshots (
    id     INTEGER PRIMARY KEY,
    at     TEXT NOT NULL,
    stages TEXT NOT NULL
);
"#,
    r#"
-- Every change a run applied, so it can be listed and undone.
CREATE TABLE changes (
    id        INTEGER PRIMARY KEY,
    run_id    INTEGER NOT NULL REFERENCES sync_runs(id) ON DELETE CASCADE,
    deal_id   INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    field     TEXT,
    old_value TEXT,
    new_value TEXT
);
CREATE INDEX changes_run ON changes(run_id);
CREATE INDEX changes_deal ON changes(deal_id, field);
CREATE TABLE alerts (
    id      INTEGER PRIMARY KEY,
    subject TEXT NOT NULL,
    key     TEXT NOT NULL,
    at      TEXT NOT NULL
);
CREATE INDEX alerts_key ON alerts(key, at);
"#,
    r#"
-- What a file's last sync depended on besides its content: the source's settings and, for files
-- that write back, the store's change counter. Equal content and equal both: nothing to do.
ALTER TABLE mirror_files ADD COLUMN config_hash TEXT;
ALTER TABLE mirror_files ADD COLUMN store_version INTEGER;
"#,
    r#"
-- Rows with errors that the last sync could not recognise and that cannot be the row of a deal
-- whose row went missing (they were there beside it): a JSON array of their hashes.
ALTER TABLE mirror_files ADD COLUMN known_error_rows TEXT;

-- The day a deal entered its stage as a sheet says it (or as funnelsync saw it happen), and the
-- day it was created as a sheet says it.
ALTER TABLE deals ADD COLUMN stage_since TEXT;
ALTER TABLE deals ADD COLUMN created_on TEXT;
-- Whether a stage change's time is when it happened (1) or only when funnelsync first saw the
-- deal there (0: a deal imported without a stage-since date).
ALTER TABLE stage_history ADD COLUMN start_known INTEGER NOT NULL DEFAULT 1;

-- The store's change counter as each deal's last change left it: a file shows a changed deal when
-- one of its deals changed after the counter its last sync saw.
ALTER TABLE deals ADD COLUMN changed_version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deals_changed_version ON deals(changed_version);
CREATE INDEX mirror_rows_deal ON mirror_rows(deal_id);

-- When each file was last looked at (a pass that found it unchanged is not a run), and how its
-- last write-back went.
ALTER TABLE mirror_files ADD COLUMN checked_at TEXT;
ALTER TABLE mirror_files ADD COLUMN write_back TEXT;
ALTER TABLE mirror_files ADD COLUMN write_back_message TEXT;

-- Row errors of a sync that changed nothing belong to no run.
CREATE TABLE row_errors_new (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    sheet       TEXT,
    row_number  INTEGER,
    column_name TEXT,
    value       TEXT,
    severity    TEXT NOT NULL,
    message     TEXT NOT NULL,
    run_id      INTEGER REFERENCES sync_runs(id) ON DELETE CASCADE,
    seen_at     TEXT NOT NULL
);
INSERT INTO row_errors_new SELECT id, source, file, sheet, row_number, column_name, value, severity, message, run_id, seen_at FROM row_errors;
DROP TABLE row_errors;
ALTER TABLE row_errors_new RENAME TO row_errors;
CREATE INDEX row_errors_file ON row_errors(file);
"#,
    r#"
-- The change counter moves once per transaction that changes deals (the code stamps the deals it
-- changes with the new value), not once per row through triggers: a trigger on every insert made
-- a bulk import open a statement journal per row.
DROP TRIGGER IF EXISTS deals_inserted;
DROP TRIGGER IF EXISTS deals_updated;
DROP TRIGGER IF EXISTS deals_deleted;
"#,
    r#"
-- A hash of each mirror row's cells as written (the key column left out): a row that hashes as it
-- did at the last sync is not cleaned again. Unknown (NULL) for rows from before, and for rows
-- whose cells the write-back changed: those are cleaned once more.
ALTER TABLE mirror_rows ADD COLUMN raw_hash INTEGER;
-- The store's change counter when the file was last synced, and the counter the file shows the
-- store as of (kept while a write-back is owed): deals changed after it are looked at again.
ALTER TABLE mirror_files ADD COLUMN synced_version INTEGER;
ALTER TABLE mirror_files ADD COLUMN shown_version INTEGER;
-- Deleted deals with the change counter of their deletion, so that a sync can tell a row whose
-- deal is gone without looking every deal up.
CREATE TABLE deal_tombstones (deal_id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
"#,
];

pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|error| StoreError::Corrupt(format!("timestamp \"{text}\": {error}")))
}

/// Runs `step` again while SQLite says the database is busy or locked, for up to ten seconds:
/// for the few steps (switching to WAL, starting the first migration) where SQLite does not wait
/// on the busy handler by itself.
fn retry_while_busy<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if matches!(
                    failure.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Creates the store's folder (0700) and an empty database file (0600) when they do not exist
/// yet, whatever the process umask: the store holds personal data and the mail outbox. SQLite
/// gives the `-wal` and `-shm` files the database file's mode. A folder or file the admin
/// created beforehand keeps the mode they gave it.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| StoreError::CreateFolder {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The SQLite file: owns the connection and the schema.
pub struct Store {
    path: PathBuf,
    connection: Connection,
}

impl Store {
    /// Opens (creating if needed) the store file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        create_private(path)?;
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(open_error)?;
        connection
            .busy_timeout(Duration::from_secs(10))
            .map_err(open_error)?;
        // Switching a new file to WAL takes an exclusive lock without waiting on the busy
        // handler: another process creating the same store at the same moment makes it fail at
        // once with "database is locked". Wait for that process instead.
        retry_while_busy(|| {
            connection
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
        })
        .map_err(open_error)?;
        connection
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(open_error)?;
        connection
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_error)?;
        // Statement journals and sorts stay in memory instead of spilling to a temp file.
        connection
            .pragma_update(None, "temp_store", "MEMORY")
            .map_err(open_error)?;
        let mut store = Store {
            path: path.to_path_buf(),
            connection,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing store; a missing file is [`StoreError::Missing`], not a new empty store.
    /// For the commands that only read: a mistyped path must not leave an empty store behind.
    pub fn open_existing(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        Store::open(path)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let supported = MIGRATIONS.len() as i64;
        let version: i64 = self
            .connection
            .pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version == supported {
            return Ok(());
        }
        // The version is read again under the write lock: another process may have migrated the
        // store while this one waited for the lock, and must not be migrated twice.
        let connection = &self.connection;
        let transaction = retry_while_busy(|| {
            rusqlite::Transaction::new_unchecked(connection, TransactionBehavior::Immediate)
        })?;
        let version: i64 =
            transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > supported {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                supported,
            });
        }
        for migration in MIGRATIONS.iter().skip(version.max(0) as usize) {
            transaction.execute_batch(migration)?;
        }
        transaction.pragma_update(None, "user_version", supported)?;
        transaction.commit()?;
        Ok(())
    }

    /// Starts a write transaction. Writers take the lock up front so two processes never
    /// deadlock upgrading a read lock.
    pub fn transaction(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    pub fn crm(&self) -> SqliteCrm<'_> {
        SqliteCrm::new(&self.connection)
    }
}

/// Which deals to list.
#[derive(Debug, Clone, Default)]
pub struct DealFilter {
    pub stage: Option<String>,
    pub owner: Option<String>,
    pub include_archived: bool,
}

/// What a sync run did, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunCounts {
    pub created: u64,
    pub updated: u64,
    pub archived: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub errors: u64,
    pub warnings: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncRun {
    pub id: i64,
    pub source: String,
    pub file: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub status: String,
    pub counts: RunCounts,
    pub message: Option<String>,
}

/// One stage change of a deal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageChange {
    pub deal_id: DealId,
    pub from_stage: Option<String>,
    pub to_stage: String,
    pub at: DateTime<Utc>,
    pub source: String,
    /// Whether `at` is when the deal entered `to_stage`; false when it is only when funnelsync
    /// first saw the deal there (imported without a stage-since date).
    pub start_known: bool,
}

/// What a change did to a deal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Create,
    Update,
    Archive,
    Unarchive,
    Delete,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Update => "update",
            ChangeKind::Archive => "archive",
            ChangeKind::Unarchive => "unarchive",
            ChangeKind::Delete => "delete",
        }
    }

    pub fn from_name(name: &str) -> Option<ChangeKind> {
        [
            ChangeKind::Create,
            ChangeKind::Update,
            ChangeKind::Archive,
            ChangeKind::Unarchive,
            ChangeKind::Delete,
        ]
        .into_iter()
        .find(|kind| kind.name() == name)
    }
}

/// One applied change. For `update`, a field's old and new value (as text, or JSON for extra
/// fields under `extra.NAME`); for `create` and `delete`, the whole deal as JSON in `new_value` or
/// `old_value`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeRecord {
    pub id: i64,
    pub run_id: i64,
    pub deal_id: DealId,
    pub kind: ChangeKind,
    pub field: Option<String>,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
}

/// A field changed on both sides since the last sync, and how it was decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConflictRecord {
    pub id: i64,
    pub deal_id: DealId,
    pub field: String,
    pub base_value: Option<String>,
    pub sheet_value: Option<String>,
    pub store_value: Option<String>,
    /// "sheet" or "store".
    pub winner: String,
    pub policy: String,
    pub source: String,
    pub file: String,
    pub at: DateTime<Utc>,
}

/// The CRM store as the sync code sees it. `origin` names what made a change (a source name, or
/// "cli"); it goes into the stage history.
pub trait CrmStore {
    /// The deals with these ids that exist (archived ones included).
    fn deals_by_ids(&self, ids: &[DealId]) -> Result<HashMap<DealId, Deal>, StoreError>;
    /// Whether any of these deals changed (or is gone) after the change counter was `version`.
    fn any_changed_since(&self, ids: &[DealId], version: i64) -> Result<bool, StoreError>;
    /// The deals (archived ones included) changed after the change counter was `version`.
    fn ids_changed_since(
        &self,
        version: i64,
    ) -> Result<std::collections::HashSet<DealId>, StoreError>;
    /// Every live deal's id with the values of a few fields (those a view's filter looks at).
    fn live_deal_fields(&self, fields: &[Field]) -> Result<Vec<(DealId, FieldMap)>, StoreError>;
    /// Each deal's version: the change counter as the deal's last change left it (deals that do
    /// not exist are left out).
    fn deal_versions(&self, ids: &[DealId]) -> Result<HashMap<DealId, i64>, StoreError>;
    /// For many values of one field at once: the deal holding each (live before archived, older
    /// before newer), keyed by the value's text.
    fn find_ids_by_values(
        &self,
        field: Field,
        values: &[FieldValue],
    ) -> Result<HashMap<String, DealId>, StoreError>;
    /// Creates many deals at once (an import), as [`CrmStore::create_deal`] would one by one;
    /// returns their ids in order.
    fn create_deals(&self, deals: &[NewDeal<'_>]) -> Result<Vec<DealId>, StoreError>;
    /// Creates a deal. `stage_entered_at` is when it entered its stage, `None` when unknown (a
    /// deal imported from a sheet that does not say): then its time in stage is not counted.
    fn create_deal(
        &self,
        fields: &FieldMap,
        extra: &ExtraMap,
        origin: &str,
        now: DateTime<Utc>,
        stage_entered_at: Option<DateTime<Utc>>,
    ) -> Result<DealId, StoreError>;
    /// Sets the given fields (`None` clears one) and extra keys (`None` removes one).
    fn update_deal(
        &self,
        id: DealId,
        changes: &[(Field, Option<FieldValue>)],
        extra_changes: &[(String, Option<String>)],
        origin: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    fn set_archived(
        &self,
        id: DealId,
        archived: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    fn delete_deal(&self, id: DealId) -> Result<bool, StoreError>;
    fn list_deals(&self, filter: &DealFilter) -> Result<Vec<Deal>, StoreError>;
    fn stage_history(&self, id: DealId) -> Result<Vec<StageChange>, StoreError>;
    /// Every stage change of every deal, oldest first.
    fn all_stage_history(&self) -> Result<Vec<StageChange>, StoreError>;
    fn record_run(&self, run: &SyncRun) -> Result<i64, StoreError>;
    /// Brings a recorded run up to date (a run recorded early, while its changes were still being
    /// applied, gets its final counts and status).
    fn finish_run(&self, run_id: i64, run: &SyncRun) -> Result<(), StoreError>;
    /// Sets a recorded run's message (what happened after it, such as its write-back), and its
    /// status when given.
    fn note_on_run(
        &self,
        run_id: i64,
        status: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError>;
    fn record_changes(&self, run_id: i64, changes: &[ChangeRecord]) -> Result<(), StoreError>;
    fn changes_of_run(&self, run_id: i64) -> Result<Vec<ChangeRecord>, StoreError>;
    /// Changes to this deal's field (or of any kind when `field` is None) made by runs after `run_id`.
    fn later_changes(
        &self,
        run_id: i64,
        deal_id: DealId,
        field: Option<&str>,
    ) -> Result<Vec<ChangeRecord>, StoreError>;
    fn run(&self, run_id: i64) -> Result<Option<SyncRun>, StoreError>;
    /// Creates a deal again under its old id (undoing a delete).
    fn restore_deal(&self, deal: &Deal) -> Result<(), StoreError>;
    fn last_runs(&self, limit: usize) -> Result<Vec<SyncRun>, StoreError>;
    fn record_conflict(&self, conflict: &ConflictRecord) -> Result<(), StoreError>;
    fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRecord>, StoreError>;
    /// A number that changes whenever any deal changes.
    fn version(&self) -> Result<i64, StoreError>;

    /// The owners of live deals as written (the first spelling of each; case and spaces
    /// ignored), sorted: for messages and lists.
    fn owners(&self) -> Result<Vec<String>, StoreError> {
        let mut owners: Vec<String> = Vec::new();
        for deal in self.list_deals(&DealFilter::default())? {
            if let Some(owner) = deal.text(Field::Owner).map(str::trim) {
                let folded = crate::deal::normalize_label(owner);
                if !owners
                    .iter()
                    .any(|known| crate::deal::normalize_label(known) == folded)
                {
                    owners.push(owner.to_string());
                }
            }
        }
        owners.sort();
        Ok(owners)
    }
}

/// A deal to create: its fields, extra fields, where it came from, when, and when it entered its
/// stage (`None` when unknown).
#[derive(Debug, Clone)]
pub struct NewDeal<'a> {
    pub fields: &'a FieldMap,
    pub extra: &'a ExtraMap,
    pub origin: &'a str,
    pub now: DateTime<Utc>,
    pub stage_entered_at: Option<DateTime<Utc>>,
}

/// How many rows one multi-row INSERT takes: well under SQLite's limit on bound values, large
/// enough that the cost of a statement is spread thin.
const ROWS_PER_INSERT: usize = 64;

/// `(?,?,…),(?,?,…)…`: `n_rows` groups of `n_columns` placeholders.
fn value_groups(n_rows: usize, n_columns: usize) -> String {
    let group = format!("({})", vec!["?"; n_columns].join(","));
    vec![group; n_rows].join(",")
}

/// [`CrmStore`] over a SQLite connection (or transaction, which derefs to one).
pub struct SqliteCrm<'c> {
    connection: &'c Connection,
    /// The change counter this transaction moved the store to, once it changed a deal.
    stamped: std::cell::Cell<Option<i64>>,
}

/// The columns a deal is read from, in this order: the id, every field (in `Field::ALL` order,
/// names from the closed enum), then the deal's own columns.
fn deal_columns() -> String {
    let fields: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
    format!(
        "id, {}, extra, created_at, updated_at, stage_entered_at, archived_at",
        fields.join(", ")
    )
}

/// Where the deal's own columns start in [`deal_columns`].
const AFTER_FIELDS: usize = Field::ALL.len() + 1;

impl<'c> SqliteCrm<'c> {
    /// The stage changes the `filter` (a `WHERE` clause over `stage_history`, or nothing) picks,
    /// oldest first.
    fn stage_changes(
        &self,
        filter: &str,
        parameters: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<StageChange>, StoreError> {
        let mut statement = self.connection.prepare_cached(&format!(
            "SELECT deal_id, from_stage, to_stage, at, source, start_known FROM stage_history {filter} ORDER BY at, id"
        ))?;
        let rows = statement.query_map(parameters, |row| {
            Ok((
                row.get::<_, DealId>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, bool>(5)?,
            ))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (deal_id, from_stage, to_stage, at, source, start_known) = row?;
            changes.push(StageChange {
                deal_id,
                from_stage,
                to_stage,
                at: parse_timestamp(&at)?,
                source,
                start_known,
            });
        }
        Ok(changes)
    }

    pub fn new(connection: &'c Connection) -> SqliteCrm<'c> {
        SqliteCrm {
            connection,
            stamped: std::cell::Cell::new(None),
        }
    }

    /// Moves the store's change counter on for a change to deals and returns its new value, which
    /// the changed deals record. Within a transaction the counter moves once, however many deals
    /// change; outside one, once per change.
    fn stamp(&self) -> Result<i64, StoreError> {
        if let Some(version) = self.stamped.get() {
            return Ok(version);
        }
        let version: i64 = self
            .connection
            .prepare_cached(
                "UPDATE store_meta SET version = version + 1 WHERE id = 1 RETURNING version",
            )?
            .query_row([], |row| row.get(0))?;
        if !self.connection.is_autocommit() {
            self.stamped.set(Some(version));
        }
        Ok(version)
    }

    fn deal_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Deal, StoreError>> {
        let mut fields = FieldMap::new();
        for (offset, field) in Field::ALL.iter().enumerate() {
            let value: rusqlite::types::Value = row.get(offset + 1)?;
            let value = match value {
                rusqlite::types::Value::Text(text) => Some(FieldValue::Text(text)),
                rusqlite::types::Value::Real(number) => Some(FieldValue::Amount(number)),
                rusqlite::types::Value::Integer(number) => Some(FieldValue::Amount(number as f64)),
                _ => None,
            };
            if let Some(value) = value {
                fields.insert(*field, value);
            }
        }
        let extra_text: String = row.get(AFTER_FIELDS)?;
        let created_at: String = row.get(AFTER_FIELDS + 1)?;
        let updated_at: String = row.get(AFTER_FIELDS + 2)?;
        let stage_entered_at: Option<String> = row.get(AFTER_FIELDS + 3)?;
        let archived_at: Option<String> = row.get(AFTER_FIELDS + 4)?;
        let id: DealId = row.get(0)?;
        Ok((|| {
            Ok(Deal {
                id,
                fields,
                extra: serde_json::from_str(&extra_text).map_err(|error| {
                    StoreError::Corrupt(format!("extra fields of deal {id}: {error}"))
                })?,
                created_at: parse_timestamp(&created_at)?,
                updated_at: parse_timestamp(&updated_at)?,
                stage_entered_at: stage_entered_at
                    .as_deref()
                    .map(parse_timestamp)
                    .transpose()?,
                archived_at: archived_at.as_deref().map(parse_timestamp).transpose()?,
            })
        })())
    }

    fn query_deals(
        &self,
        sql: &str,
        parameters: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Deal>, StoreError> {
        let mut statement = self.connection.prepare_cached(sql)?;
        let rows = statement.query_map(parameters, Self::deal_from_row)?;
        let mut deals = Vec::new();
        for row in rows {
            deals.push(row??);
        }
        Ok(deals)
    }

    fn query_changes(
        &self,
        sql: &str,
        parameters: impl rusqlite::Params,
    ) -> Result<Vec<ChangeRecord>, StoreError> {
        let mut statement = self.connection.prepare_cached(sql)?;
        let rows = statement.query_map(parameters, |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, DealId>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, Option<String>>(6)?,
            ))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (id, run_id, deal_id, kind, field, old_value, new_value) = row?;
            let kind = ChangeKind::from_name(&kind)
                .ok_or_else(|| StoreError::Corrupt(format!("change kind \"{kind}\"")))?;
            changes.push(ChangeRecord {
                id,
                run_id,
                deal_id,
                kind,
                field,
                old_value,
                new_value,
            });
        }
        Ok(changes)
    }

    fn record_stage_change(
        &self,
        id: DealId,
        from: Option<&str>,
        to: &str,
        origin: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.connection
            .prepare_cached("INSERT INTO stage_history (deal_id, from_stage, to_stage, at, source) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![id, from, to, timestamp(now), origin])?;
        Ok(())
    }
}

fn to_sql(value: Option<&FieldValue>) -> rusqlite::types::Value {
    match value {
        Some(FieldValue::Text(text)) => rusqlite::types::Value::Text(text.clone()),
        Some(FieldValue::Amount(amount)) => rusqlite::types::Value::Real(*amount),
        None => rusqlite::types::Value::Null,
    }
}

impl CrmStore for SqliteCrm<'_> {
    fn deals_by_ids(&self, ids: &[DealId]) -> Result<HashMap<DealId, Deal>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        // Chunks keep each statement under SQLite's parameter limit.
        for chunk in ids.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT {} FROM deals WHERE id IN ({placeholders})",
                deal_columns()
            );
            let parameters: Vec<&dyn rusqlite::ToSql> =
                chunk.iter().map(|id| id as &dyn rusqlite::ToSql).collect();
            for deal in self.query_deals(&sql, &parameters)? {
                found.insert(deal.id, deal);
            }
        }
        Ok(found)
    }

    fn any_changed_since(&self, ids: &[DealId], version: i64) -> Result<bool, StoreError> {
        let mut unique = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        for chunk in unique.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT count(*) FROM deals WHERE id IN ({placeholders}) AND changed_version <= ?"
            );
            let mut parameters: Vec<&dyn rusqlite::ToSql> =
                chunk.iter().map(|id| id as &dyn rusqlite::ToSql).collect();
            parameters.push(&version);
            let n_unchanged: i64 = self
                .connection
                .prepare_cached(&sql)?
                .query_row(parameters.as_slice(), |row| row.get(0))?;
            // A deal missing here was deleted: that is a change too.
            if n_unchanged != chunk.len() as i64 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn live_deal_fields(&self, fields: &[Field]) -> Result<Vec<(DealId, FieldMap)>, StoreError> {
        // Column names come from the closed Field enum, never from input.
        let columns: Vec<&str> = fields.iter().map(|field| field.name()).collect();
        let sql = if columns.is_empty() {
            "SELECT id FROM deals WHERE archived_at IS NULL".to_string()
        } else {
            format!(
                "SELECT id, {} FROM deals WHERE archived_at IS NULL",
                columns.join(", ")
            )
        };
        let mut statement = self.connection.prepare(&sql)?;
        let rows = statement.query_map([], |row| {
            let id: DealId = row.get(0)?;
            let mut values = FieldMap::new();
            for (offset, field) in fields.iter().enumerate() {
                let value: rusqlite::types::Value = row.get(offset + 1)?;
                match value {
                    rusqlite::types::Value::Text(text) => {
                        values.insert(*field, FieldValue::Text(text));
                    }
                    rusqlite::types::Value::Real(number) => {
                        values.insert(*field, FieldValue::Amount(number));
                    }
                    rusqlite::types::Value::Integer(number) => {
                        values.insert(*field, FieldValue::Amount(number as f64));
                    }
                    _ => {}
                }
            }
            Ok((id, values))
        })?;
        let mut deals = Vec::new();
        for row in rows {
            deals.push(row?);
        }
        Ok(deals)
    }

    fn ids_changed_since(
        &self,
        version: i64,
    ) -> Result<std::collections::HashSet<DealId>, StoreError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT id FROM deals WHERE changed_version > ?1 UNION ALL SELECT deal_id FROM deal_tombstones WHERE version > ?1")?;
        let rows = statement.query_map([version], |row| row.get::<_, DealId>(0))?;
        let mut ids = std::collections::HashSet::new();
        for row in rows {
            ids.insert(row?);
        }
        Ok(ids)
    }

    fn deal_versions(&self, ids: &[DealId]) -> Result<HashMap<DealId, i64>, StoreError> {
        let mut versions = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(",");
            let sql = format!("SELECT id, changed_version FROM deals WHERE id IN ({placeholders})");
            let mut statement = self.connection.prepare_cached(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(chunk.iter()), |row| {
                Ok((row.get::<_, DealId>(0)?, row.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (id, version) = row?;
                versions.insert(id, version);
            }
        }
        Ok(versions)
    }

    fn find_ids_by_values(
        &self,
        field: Field,
        values: &[FieldValue],
    ) -> Result<HashMap<String, DealId>, StoreError> {
        let mut found = HashMap::new();
        for chunk in values.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(",");
            // Column names come from the closed Field enum, never from input.
            let sql = format!(
                "SELECT id, {column} FROM deals WHERE {column} IN ({placeholders}) ORDER BY archived_at IS NOT NULL, id",
                column = field.name()
            );
            let parameters: Vec<rusqlite::types::Value> =
                chunk.iter().map(|value| to_sql(Some(value))).collect();
            let mut statement = self.connection.prepare(&sql)?;
            let rows =
                statement.query_map(rusqlite::params_from_iter(parameters.iter()), |row| {
                    Ok((
                        row.get::<_, DealId>(0)?,
                        row.get::<_, rusqlite::types::Value>(1)?,
                    ))
                })?;
            for row in rows {
                let (id, value) = row?;
                let text = match value {
                    rusqlite::types::Value::Text(text) => text,
                    rusqlite::types::Value::Real(number) => FieldValue::Amount(number).to_string(),
                    rusqlite::types::Value::Integer(number) => {
                        FieldValue::Amount(number as f64).to_string()
                    }
                    _ => continue,
                };
                found.entry(text).or_insert(id);
            }
        }
        Ok(found)
    }

    fn create_deals(&self, deals: &[NewDeal<'_>]) -> Result<Vec<DealId>, StoreError> {
        use rusqlite::types::Value;
        let mut ids = Vec::with_capacity(deals.len());
        if deals.is_empty() {
            return Ok(ids);
        }
        let version = self.stamp()?;
        let field_names: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
        let n_columns = field_names.len() + 5;
        for chunk in deals.chunks(ROWS_PER_INSERT) {
            let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * n_columns);
            let mut history: Vec<Value> = Vec::new();
            for deal in chunk {
                let now_text = timestamp(deal.now);
                values.extend(
                    Field::ALL
                        .iter()
                        .map(|field| to_sql(deal.fields.get(field))),
                );
                values.push(Value::Text(
                    serde_json::to_string(deal.extra)
                        .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                ));
                values.push(Value::Text(now_text.clone()));
                values.push(Value::Text(now_text));
                let has_stage = deal
                    .fields
                    .get(&Field::Stage)
                    .and_then(FieldValue::as_text)
                    .is_some();
                let entered = deal.stage_entered_at.filter(|_| has_stage);
                values.push(entered.map_or(Value::Null, |at| Value::Text(timestamp(at))));
                values.push(Value::Integer(version));
            }
            // Column names come from the closed Field enum, never from input.
            let sql = format!(
                "INSERT INTO deals ({}, extra, created_at, updated_at, stage_entered_at, changed_version) VALUES {}",
                field_names.join(", "),
                value_groups(chunk.len(), n_columns)
            );
            self.connection
                .prepare_cached(&sql)?
                .execute(rusqlite::params_from_iter(values.iter()))?;
            // One statement inserts its rows one after the other, each taking the next id.
            let last = self.connection.last_insert_rowid();
            let first = last - chunk.len() as i64 + 1;
            for (offset, deal) in chunk.iter().enumerate() {
                let id = first + offset as i64;
                ids.push(id);
                if let Some(stage) = deal.fields.get(&Field::Stage).and_then(FieldValue::as_text) {
                    // Without a known entry time the history still says where the deal was first
                    // seen, marked so that time in stage does not count from there.
                    history.extend([
                        Value::Integer(id),
                        Value::Null,
                        Value::Text(stage.to_string()),
                        Value::Text(timestamp(deal.stage_entered_at.unwrap_or(deal.now))),
                        Value::Text(deal.origin.to_string()),
                        Value::Integer(i64::from(deal.stage_entered_at.is_some())),
                    ]);
                }
            }
            if !history.is_empty() {
                let sql = format!(
                    "INSERT INTO stage_history (deal_id, from_stage, to_stage, at, source, start_known) VALUES {}",
                    value_groups(history.len() / 6, 6)
                );
                self.connection
                    .prepare_cached(&sql)?
                    .execute(rusqlite::params_from_iter(history.iter()))?;
            }
        }
        Ok(ids)
    }

    fn create_deal(
        &self,
        fields: &FieldMap,
        extra: &ExtraMap,
        origin: &str,
        now: DateTime<Utc>,
        stage_entered_at: Option<DateTime<Utc>>,
    ) -> Result<DealId, StoreError> {
        let now_text = timestamp(now);
        let extra_text =
            serde_json::to_string(extra).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let mut values: Vec<rusqlite::types::Value> = Field::ALL
            .iter()
            .map(|field| to_sql(fields.get(field)))
            .collect();
        let stage = fields
            .get(&Field::Stage)
            .and_then(FieldValue::as_text)
            .map(str::to_string);
        let entered = stage.as_ref().and(stage_entered_at);
        values.push(rusqlite::types::Value::Text(extra_text));
        values.push(rusqlite::types::Value::Text(now_text.clone()));
        values.push(rusqlite::types::Value::Text(now_text));
        values.push(match entered {
            Some(at) => rusqlite::types::Value::Text(timestamp(at)),
            None => rusqlite::types::Value::Null,
        });
        values.push(rusqlite::types::Value::Integer(self.stamp()?));
        let field_names: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
        let placeholders: Vec<String> = (1..=values.len()).map(|n| format!("?{n}")).collect();
        // Column names come from the closed Field enum, never from input.
        let sql = format!(
            "INSERT INTO deals ({}, extra, created_at, updated_at, stage_entered_at, changed_version) \
             VALUES ({})",
            field_names.join(", "),
            placeholders.join(", ")
        );
        self.connection
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(values.iter()))?;
        let id = self.connection.last_insert_rowid();
        if let Some(stage) = stage {
            // Without a known entry time the history still says where the deal was first seen,
            // marked so that time in stage does not count from there.
            self.connection
                .prepare_cached("INSERT INTO stage_history (deal_id, from_stage, to_stage, at, source, start_known) VALUES (?1, NULL, ?2, ?3, ?4, ?5)")?
                .execute(params![id, stage, timestamp(entered.unwrap_or(now)), origin, entered.is_some()])?;
        }
        Ok(id)
    }

    fn update_deal(
        &self,
        id: DealId,
        changes: &[(Field, Option<FieldValue>)],
        extra_changes: &[(String, Option<String>)],
        origin: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if changes.is_empty() && extra_changes.is_empty() {
            return Ok(());
        }
        let now_text = timestamp(now);
        let old_stage: Option<String> = self
            .connection
            .prepare_cached("SELECT stage FROM deals WHERE id = ?1")?
            .query_row([id], |row| row.get(0))
            .optional()?
            .flatten();
        for (field, value) in changes {
            // Column names come from the closed Field enum, never from input.
            let sql = format!("UPDATE deals SET {} = ?1 WHERE id = ?2", field.name());
            self.connection
                .prepare_cached(&sql)?
                .execute(params![to_sql(value.as_ref()), id])?;
            if *field == Field::Stage {
                let new_stage = value.as_ref().and_then(FieldValue::as_text);
                if let Some(new_stage) =
                    new_stage.filter(|new_stage| old_stage.as_deref() != Some(*new_stage))
                {
                    self.record_stage_change(id, old_stage.as_deref(), new_stage, origin, now)?;
                    self.connection
                        .prepare_cached("UPDATE deals SET stage_entered_at = ?1 WHERE id = ?2")?
                        .execute(params![now_text, id])?;
                }
            }
        }
        if !extra_changes.is_empty() {
            let extra_text: String = self
                .connection
                .prepare_cached("SELECT extra FROM deals WHERE id = ?1")?
                .query_row([id], |row| row.get(0))?;
            let mut extra: ExtraMap = serde_json::from_str(&extra_text).map_err(|error| {
                StoreError::Corrupt(format!("extra fields of deal {id}: {error}"))
            })?;
            for (key, value) in extra_changes {
                match value {
                    Some(value) => extra.insert(key.clone(), value.clone()),
                    None => extra.remove(key),
                };
            }
            let extra_text = serde_json::to_string(&extra)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            self.connection
                .prepare_cached("UPDATE deals SET extra = ?1 WHERE id = ?2")?
                .execute(params![extra_text, id])?;
        }
        self.connection
            .prepare_cached("UPDATE deals SET updated_at = ?1, changed_version = ?3 WHERE id = ?2")?
            .execute(params![now_text, id, self.stamp()?])?;
        Ok(())
    }

    fn set_archived(
        &self,
        id: DealId,
        archived: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let now_text = timestamp(now);
        let is_archived: Option<bool> = self
            .connection
            .prepare_cached("SELECT archived_at IS NOT NULL FROM deals WHERE id = ?1")?
            .query_row([id], |row| row.get(0))
            .optional()?;
        if is_archived != Some(!archived) {
            return Ok(false);
        }
        let version = self.stamp()?;
        let changed = if archived {
            self.connection
                .prepare_cached("UPDATE deals SET archived_at = ?1, updated_at = ?1, changed_version = ?3 WHERE id = ?2 AND archived_at IS NULL")?
                .execute(params![now_text, id, version])?
        } else {
            self.connection
                .prepare_cached("UPDATE deals SET archived_at = NULL, updated_at = ?1, changed_version = ?3 WHERE id = ?2 AND archived_at IS NOT NULL")?
                .execute(params![now_text, id, version])?
        };
        Ok(changed > 0)
    }

    fn delete_deal(&self, id: DealId) -> Result<bool, StoreError> {
        let deleted = self
            .connection
            .prepare_cached("DELETE FROM deals WHERE id = ?1")?
            .execute([id])?
            > 0;
        if deleted {
            // The files that showed it must hear of it.
            let version = self.stamp()?;
            self.connection
                .prepare_cached(
                    "INSERT OR REPLACE INTO deal_tombstones (deal_id, version) VALUES (?1, ?2)",
                )?
                .execute(params![id, version])?;
        }
        Ok(deleted)
    }

    fn list_deals(&self, filter: &DealFilter) -> Result<Vec<Deal>, StoreError> {
        let mut sql = format!("SELECT {} FROM deals WHERE 1 = 1", deal_columns());
        let mut parameters: Vec<String> = Vec::new();
        if !filter.include_archived {
            sql.push_str(" AND archived_at IS NULL");
        }
        if let Some(stage) = &filter.stage {
            parameters.push(stage.clone());
            sql.push_str(&format!(
                " AND stage = ?{} COLLATE NOCASE",
                parameters.len()
            ));
        }
        if let Some(owner) = &filter.owner {
            parameters.push(owner.trim().to_string());
            sql.push_str(&format!(
                " AND trim(owner) = ?{} COLLATE NOCASE",
                parameters.len()
            ));
        }
        sql.push_str(" ORDER BY id");
        let parameters: Vec<&dyn rusqlite::ToSql> = parameters
            .iter()
            .map(|value| value as &dyn rusqlite::ToSql)
            .collect();
        self.query_deals(&sql, &parameters)
    }

    fn record_changes(&self, run_id: i64, changes: &[ChangeRecord]) -> Result<(), StoreError> {
        use rusqlite::types::Value;
        let text = |value: &Option<String>| value.clone().map_or(Value::Null, Value::Text);
        for chunk in changes.chunks(ROWS_PER_INSERT) {
            let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 6);
            for change in chunk {
                values.extend([
                    Value::Integer(run_id),
                    Value::Integer(change.deal_id),
                    Value::Text(change.kind.name().to_string()),
                    text(&change.field),
                    text(&change.old_value),
                    text(&change.new_value),
                ]);
            }
            let sql = format!(
                "INSERT INTO changes (run_id, deal_id, kind, field, old_value, new_value) VALUES {}",
                value_groups(chunk.len(), 6)
            );
            self.connection
                .prepare_cached(&sql)?
                .execute(rusqlite::params_from_iter(values.iter()))?;
        }
        Ok(())
    }

    fn changes_of_run(&self, run_id: i64) -> Result<Vec<ChangeRecord>, StoreError> {
        self.query_changes("SELECT id, run_id, deal_id, kind, field, old_value, new_value FROM changes WHERE run_id = ?1 ORDER BY id", params![run_id])
    }

    fn later_changes(
        &self,
        run_id: i64,
        deal_id: DealId,
        field: Option<&str>,
    ) -> Result<Vec<ChangeRecord>, StoreError> {
        self.query_changes(
            "SELECT id, run_id, deal_id, kind, field, old_value, new_value FROM changes \
             WHERE run_id > ?1 AND deal_id = ?2 AND (?3 IS NULL OR field = ?3 OR field IS NULL) ORDER BY id",
            params![run_id, deal_id, field],
        )
    }

    fn run(&self, run_id: i64) -> Result<Option<SyncRun>, StoreError> {
        Ok(self
            .last_runs(usize::MAX >> 1)?
            .into_iter()
            .find(|run| run.id == run_id))
    }

    fn restore_deal(&self, deal: &Deal) -> Result<(), StoreError> {
        use rusqlite::types::Value;
        let extra = serde_json::to_string(&deal.extra)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let optional_time = |at: Option<DateTime<Utc>>| match at {
            Some(at) => Value::Text(timestamp(at)),
            None => Value::Null,
        };
        let mut values: Vec<Value> = vec![Value::Integer(deal.id)];
        values.extend(
            Field::ALL
                .iter()
                .map(|field| to_sql(deal.fields.get(field))),
        );
        values.extend([
            Value::Text(extra),
            Value::Text(timestamp(deal.created_at)),
            Value::Text(timestamp(deal.updated_at)),
            optional_time(deal.stage_entered_at),
            optional_time(deal.archived_at),
        ]);
        values.push(Value::Integer(self.stamp()?));
        let placeholders: Vec<String> = (1..=values.len()).map(|n| format!("?{n}")).collect();
        self.connection.execute(
            &format!(
                "INSERT INTO deals ({}, changed_version) VALUES ({})",
                deal_columns(),
                placeholders.join(", ")
            ),
            rusqlite::params_from_iter(values.iter()),
        )?;
        Ok(())
    }

    fn stage_history(&self, id: DealId) -> Result<Vec<StageChange>, StoreError> {
        self.stage_changes("WHERE deal_id = ?1", &[&id])
    }

    fn all_stage_history(&self) -> Result<Vec<StageChange>, StoreError> {
        self.stage_changes("", &[])
    }

    fn note_on_run(
        &self,
        run_id: i64,
        status: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError> {
        self.connection
            .prepare_cached(
                "UPDATE sync_runs SET status = coalesce(?1, status), message = ?2 WHERE id = ?3",
            )?
            .execute(params![status, message, run_id])?;
        Ok(())
    }

    fn finish_run(&self, run_id: i64, run: &SyncRun) -> Result<(), StoreError> {
        let counts = &run.counts;
        self.connection
            .prepare_cached(
                "UPDATE sync_runs SET finished_at = ?1, status = ?2, n_created = ?3, n_updated = ?4, n_archived = ?5, \
                 n_deleted = ?6, n_unchanged = ?7, n_errors = ?8, n_warnings = ?9, message = ?10 WHERE id = ?11",
            )?
            .execute(params![
                timestamp(run.finished_at),
                run.status,
                counts.created as i64,
                counts.updated as i64,
                counts.archived as i64,
                counts.deleted as i64,
                counts.unchanged as i64,
                counts.errors as i64,
                counts.warnings as i64,
                run.message,
                run_id
            ])?;
        Ok(())
    }

    fn record_run(&self, run: &SyncRun) -> Result<i64, StoreError> {
        let counts = &run.counts;
        self.connection
            .prepare_cached(
                "INSERT INTO sync_runs (source, file, started_at, finished_at, status, n_created, n_updated, n_archived, \
                 n_deleted, n_unchanged, n_errors, n_warnings, message) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                run.source,
                run.file,
                timestamp(run.started_at),
                timestamp(run.finished_at),
                run.status,
                counts.created as i64,
                counts.updated as i64,
                counts.archived as i64,
                counts.deleted as i64,
                counts.unchanged as i64,
                counts.errors as i64,
                counts.warnings as i64,
                run.message,
            ])?;
        Ok(self.connection.last_insert_rowid())
    }

    fn record_conflict(&self, conflict: &ConflictRecord) -> Result<(), StoreError> {
        self.connection
            .prepare_cached(
                "INSERT INTO conflicts (deal_id, field, base_value, sheet_value, store_value, winner, policy, source, file, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                conflict.deal_id,
                conflict.field,
                conflict.base_value,
                conflict.sheet_value,
                conflict.store_value,
                conflict.winner,
                conflict.policy,
                conflict.source,
                conflict.file,
                timestamp(conflict.at)
            ])?;
        Ok(())
    }

    fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRecord>, StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT id, deal_id, field, base_value, sheet_value, store_value, winner, policy, source, file, at \
             FROM conflicts ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map([limit as i64], |row| {
            Ok((
                ConflictRecord {
                    id: row.get(0)?,
                    deal_id: row.get(1)?,
                    field: row.get(2)?,
                    base_value: row.get(3)?,
                    sheet_value: row.get(4)?,
                    store_value: row.get(5)?,
                    winner: row.get(6)?,
                    policy: row.get(7)?,
                    source: row.get(8)?,
                    file: row.get(9)?,
                    at: Utc::now(),
                },
                row.get::<_, String>(10)?,
            ))
        })?;
        let mut conflicts = Vec::new();
        for row in rows {
            let (mut conflict, at) = row?;
            conflict.at = parse_timestamp(&at)?;
            conflicts.push(conflict);
        }
        Ok(conflicts)
    }

    fn version(&self) -> Result<i64, StoreError> {
        Ok(self
            .connection
            .prepare_cached("SELECT version FROM store_meta WHERE id = 1")?
            .query_row([], |row| row.get(0))?)
    }

    fn last_runs(&self, limit: usize) -> Result<Vec<SyncRun>, StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT id, source, file, started_at, finished_at, status, n_created, n_updated, n_archived, n_deleted, \
             n_unchanged, n_errors, n_warnings, message FROM sync_runs ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map([limit as i64], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, String>(5)?,
                [
                    row.get::<_, i64>(6)?,
                    row.get(7)?,
                    row.get(8)?,
                    row.get(9)?,
                    row.get(10)?,
                    row.get(11)?,
                    row.get(12)?,
                ],
                row.get::<_, Option<String>>(13)?,
            ))
        })?;
        let mut runs = Vec::new();
        for row in rows {
            let (id, source, file, started_at, finished_at, status, numbers, message) = row?;
            let count = |index: usize| numbers[index].max(0) as u64;
            runs.push(SyncRun {
                id,
                source,
                file,
                started_at: parse_timestamp(&started_at)?,
                finished_at: parse_timestamp(&finished_at)?,
                status,
                counts: RunCounts {
                    created: count(0),
                    updated: count(1),
                    archived: count(2),
                    deleted: count(3),
                    unchanged: count(4),
                    errors: count(5),
                    warnings: count(6),
                },
                message,
            });
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, hour, 0, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn deals_round_trip_and_stage_changes_are_recorded() {
        let folder = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&folder.path().join("nested/crm.db")).expect("open");
        let crm = store.crm();
        let mut fields = FieldMap::new();
        fields.insert(Field::Company, FieldValue::Text("Acme".to_string()));
        fields.insert(Field::Stage, FieldValue::Text("Lead".to_string()));
        fields.insert(Field::Amount, FieldValue::Amount(1200.5));
        let extra = ExtraMap::from([("Notes".to_string(), "VIP".to_string())]);
        let id = crm
            .create_deal(&fields, &extra, "test", at(9), Some(at(9)))
            .expect("create");
        crm.update_deal(
            id,
            &[(Field::Stage, Some(FieldValue::Text("Prospect".to_string())))],
            &[
                ("Notes".to_string(), None),
                ("Region".to_string(), Some("East".to_string())),
            ],
            "test",
            at(10),
        )
        .expect("update");
        let deal = crm
            .deals_by_ids(&[id])
            .expect("read")
            .remove(&id)
            .expect("exists");
        assert_eq!(deal.text(Field::Stage), Some("Prospect"));
        assert_eq!(deal.fields[&Field::Amount], FieldValue::Amount(1200.5));
        assert_eq!(
            deal.extra,
            ExtraMap::from([("Region".to_string(), "East".to_string())])
        );
        assert_eq!(deal.stage_entered_at, Some(at(10)));
        let history = crm.stage_history(id).expect("history");
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].from_stage.as_deref(), Some("Lead"));
        assert_eq!(history[1].to_stage, "Prospect");
    }

    #[test]
    fn reopening_keeps_schema_version() {
        let folder = tempfile::tempdir().expect("temp dir");
        let path = folder.path().join("crm.db");
        drop(Store::open(&path).expect("first open"));
        let store = Store::open(&path).expect("second open");
        let version: i64 = store
            .connection()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        store
            .connection()
            .pragma_update(None, "user_version", 99)
            .expect("set");
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
