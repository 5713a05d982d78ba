//! The CRM store: deals, their stage history and the record of sync runs, together with the
//! state of the sync (the mirror of each file, row errors, file states), the mail outbox and what
//! the daemon does once per due time — in one SQLite file (WAL mode, foreign keys on, versioned
//! migrations) or in a PostgreSQL database that several daemons share.
//!
//! Every statement funnelsync runs is in this module: the interfaces the rest of the code uses
//! are [`CrmStore`] (deals, history, runs, changes, conflicts), [`mirror`], [`files`], [`mail`],
//! [`jobs`] (report snapshots, alerts, claimed runs) and [`stats`], each written once in SQL both
//! engines understand ([`sql::Db`]), with the engines' differences (bulk inserts, ids, locks,
//! notifications) asked of [`sql::Db::engine`]. This module must not know about spreadsheets,
//! column headers or mail servers.

mod checkpoint;
mod crm;
pub mod files;
pub mod jobs;
pub mod mail;
pub mod mirror;
mod postgres_link;
mod schema;
pub mod sql;
pub mod stats;
mod transfer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::{StoreConfig, StoreLocation};
use crate::deal::{Deal, DealId, ExtraMap, Field, FieldMap, FieldValue};

pub use crm::CHANGES_CHANNEL;
pub use postgres_link::{ConnectError, Listener};
pub use sql::{BlockingScope, Db, Engine, Value};

use sql::sql_params;
pub use transfer::copy_to_postgres;

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
    #[error("cannot connect to the store {url}: {source}")]
    Connect {
        url: String,
        /// Boxed: the TLS errors it may hold would make every `StoreError` large.
        #[source]
        source: Box<ConnectError>,
    },
    #[error("cannot read the store's password from {}: {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
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
    #[error("store query failed: {}", postgres_link::describe(.0))]
    Postgres(#[from] postgres::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// A stored value that does not read back as what was written (JSON, a timestamp).
    #[error("stored data is damaged: {what}: {source}")]
    Damaged {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot write {what} to the store: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("another daemon has held the claim on {job} for over {} s; try again later", waited.as_secs())]
    ClaimHeld { job: String, waited: Duration },
}

impl StoreError {
    /// A stored value that does not read back: `what` names it, `source` says why.
    pub(crate) fn damaged(
        what: String,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::Damaged {
            what,
            source: Box::new(source),
        }
    }

    /// Whether running the same work again may succeed: PostgreSQL gave up on a transaction to
    /// keep concurrent ones apart (a serialization failure or a deadlock).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Postgres(error) => error.code().is_some_and(|code| {
                *code == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            }),
            _ => false,
        }
    }

    /// Whether the connection this came from is gone (a server restart, a terminated backend, a
    /// network cut): nothing more can be done on it, and a new one may well work.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            StoreError::Postgres(error) => {
                error.is_closed()
                    || error.code().is_some_and(|code| {
                        *code == postgres::error::SqlState::ADMIN_SHUTDOWN
                            || *code == postgres::error::SqlState::CRASH_SHUTDOWN
                            || *code == postgres::error::SqlState::CANNOT_CONNECT_NOW
                    })
                    || std::error::Error::source(error)
                        .is_some_and(|source| source.is::<std::io::Error>())
            }
            _ => false,
        }
    }
}

/// Runs `work` again (up to five times in all) while the store says concurrent writers got in
/// each other's way: such a failure is not the work's.
pub fn retrying<T>(mut work: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut attempt = 1;
    loop {
        match work() {
            Err(error) if error.is_retryable() && attempt < 5 => {
                tracing::debug!("the store asked to try again ({error}); attempt {attempt}");
                std::thread::sleep(Duration::from_millis(20 * attempt));
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|source| StoreError::damaged(format!("timestamp \"{text}\""), source))
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

/// The connection a store holds.
enum Connection {
    Sqlite(rusqlite::Connection),
    Postgres(Box<sql::PgConnection>),
}

/// An open store: one connection, its schema brought up to date, and the site this process
/// syncs files for.
pub struct Store {
    /// The SQLite file, or the PostgreSQL URL without its password.
    location: PathBuf,
    site: String,
    connection: Connection,
    /// The thread that checkpoints an SQLite store's log (declared after the connection, so that
    /// it stops after the connection closed). Held for what it does, never read.
    #[allow(dead_code)]
    checkpointer: Option<checkpoint::Checkpointer>,
}

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from: i64,
    pub to: i64,
}

impl Store {
    /// Opens (creating if needed) the store the config names and brings its schema up to date.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        Ok(Store::open_migrating(config)?.0)
    }

    /// [`Store::open`], saying what the migration did.
    pub fn open_migrating(config: &StoreConfig) -> Result<(Store, Migrated), StoreError> {
        sql::assert_may_block();
        match &config.location {
            StoreLocation::Sqlite(path) => Store::open_sqlite(path, &config.site),
            StoreLocation::Postgres(postgres) => {
                let client = postgres_link::connect(postgres)?;
                let mut store = Store {
                    location: PathBuf::from(postgres.shown_url()),
                    site: config.site.clone(),
                    connection: Connection::Postgres(Box::new(sql::PgConnection::new(client))),
                    checkpointer: None,
                };
                let migrated = store.migrate_postgres()?;
                Ok((store, migrated))
            }
        }
    }

    /// Opens an existing store; a missing SQLite file is [`StoreError::Missing`], not a new empty
    /// store. For the commands that only read: a mistyped path must not leave an empty store
    /// behind.
    pub fn open_existing(config: &StoreConfig) -> Result<Store, StoreError> {
        Ok(Store::open_existing_migrating(config)?.0)
    }

    /// [`Store::open_existing`], saying what the migration did: `store migrate` brings a store up
    /// to date and never creates one.
    pub fn open_existing_migrating(config: &StoreConfig) -> Result<(Store, Migrated), StoreError> {
        if let StoreLocation::Sqlite(path) = &config.location {
            if !path.exists() {
                return Err(StoreError::Missing { path: path.clone() });
            }
        }
        Store::open_migrating(config)
    }

    /// Opens (creating if needed) a SQLite store file.
    pub fn open_sqlite(path: &Path, site: &str) -> Result<(Store, Migrated), StoreError> {
        sql::assert_may_block();
        create_private(path)?;
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut connection = rusqlite::Connection::open(path).map_err(open_error)?;
        connection
            .busy_timeout(Duration::from_secs(10))
            .map_err(open_error)?;
        // A new store takes 16 KB pages (SQLite's default is 4 KB): a first import of 100,000
        // rows writes, balances and checkpoints a quarter as many pages and took 15 % less time,
        // while a one-cell sync was no slower. The size only takes on a file that holds nothing
        // yet; an existing store keeps the size it was made with.
        connection
            .pragma_update(None, "page_size", STORE_PAGE_SIZE)
            .map_err(open_error)?;
        // Switching a new file to WAL takes an exclusive lock without waiting on the busy
        // handler: another process creating the same store at the same moment makes it fail at
        // once with "database is locked". Wait for that process instead.
        let journal_mode = retry_while_busy(|| {
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
        // The log is checkpointed on a thread of its own rather than by the commit that grew it
        // (see `store::checkpoint`); without that thread, SQLite's own way stays.
        let checkpointer = if journal_mode.eq_ignore_ascii_case("wal") {
            match checkpoint::Checkpointer::start(path.to_path_buf()) {
                Ok(checkpointer) => {
                    connection
                        .wal_hook(Some(checkpointer.hook()))
                        .map_err(open_error)?;
                    Some(checkpointer)
                }
                Err(error) => {
                    tracing::warn!(store = %path.display(), %error, "cannot start the thread that checkpoints the store's log; commits checkpoint it themselves");
                    None
                }
            }
        } else {
            None
        };
        let mut store = Store {
            location: path.to_path_buf(),
            site: site.to_string(),
            connection: Connection::Sqlite(connection),
            checkpointer,
        };
        let migrated = store.migrate_sqlite()?;
        Ok((store, migrated))
    }

    fn migrate_sqlite(&mut self) -> Result<Migrated, StoreError> {
        let Connection::Sqlite(connection) = &self.connection else {
            return Err(StoreError::Corrupt("not a SQLite store".to_string()));
        };
        let supported = schema::SQLITE_MIGRATIONS.len() as i64;
        let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version == supported {
            return Ok(Migrated {
                from: version,
                to: version,
            });
        }
        // The version is read again under the write lock: another process may have migrated the
        // store while this one waited for the lock, and must not be migrated twice.
        let transaction = retry_while_busy(|| {
            rusqlite::Transaction::new_unchecked(
                connection,
                rusqlite::TransactionBehavior::Immediate,
            )
        })?;
        let version: i64 =
            transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > supported {
            return Err(StoreError::TooNew {
                path: self.location.clone(),
                found: version,
                supported,
            });
        }
        for migration in schema::SQLITE_MIGRATIONS
            .iter()
            .skip(version.max(0) as usize)
        {
            transaction.execute_batch(migration)?;
        }
        transaction.pragma_update(None, "user_version", supported)?;
        transaction.commit()?;
        Ok(Migrated {
            from: version,
            to: supported,
        })
    }

    fn migrate_postgres(&mut self) -> Result<Migrated, StoreError> {
        let supported = schema::POSTGRES_MIGRATIONS.len() as i64;
        let db = self.db();
        // Daemons starting together on a new database: one migrates, the others wait for it and
        // find the work done.
        db.execute_batch(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}); \
             CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);",
            claim_key("schema migration")
        ))?;
        let result = (|| {
            let version: Option<i64> =
                db.query_value("SELECT max(version) FROM schema_version", &[])?;
            let version = version.unwrap_or(0);
            if version > supported {
                return Err(StoreError::TooNew {
                    path: self.location.clone(),
                    found: version,
                    supported,
                });
            }
            for migration in schema::POSTGRES_MIGRATIONS
                .iter()
                .skip(version.max(0) as usize)
            {
                db.execute_batch(migration)?;
            }
            if version < supported {
                db.execute("DELETE FROM schema_version", &[])?;
                db.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    &sql_params![supported],
                )?;
            }
            Ok(Migrated {
                from: version,
                to: supported,
            })
        })();
        match result {
            Ok(migrated) => {
                db.execute_batch("COMMIT")?;
                Ok(migrated)
            }
            Err(error) => {
                let _ = db.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// The SQLite file, or the PostgreSQL URL without its password: for messages.
    pub fn location(&self) -> &Path {
        &self.location
    }

    pub fn engine(&self) -> Engine {
        match self.connection {
            Connection::Sqlite(_) => Engine::Sqlite,
            Connection::Postgres(_) => Engine::Postgres,
        }
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// Whether the connection is known to be gone: PostgreSQL closed it (or the network did) and
    /// no statement on it can succeed any more. A SQLite connection is never lost.
    pub fn connection_lost(&self) -> bool {
        match &self.connection {
            Connection::Sqlite(_) => false,
            Connection::Postgres(connection) => connection.client.borrow().is_closed(),
        }
    }

    /// Whether a connection that sat idle still answers: a backend terminated meanwhile is only
    /// found out on the next statement, which the work it was lent to should not be the one to
    /// fail.
    fn still_answers(&self) -> bool {
        sql::assert_may_block();
        match &self.connection {
            Connection::Sqlite(_) => true,
            Connection::Postgres(connection) => connection
                .client
                .borrow_mut()
                .is_valid(Duration::from_secs(5))
                .is_ok(),
        }
    }

    /// The connection, for a [`Db`]: checked not to block an async thread.
    #[track_caller]
    fn link(&self) -> sql::Link<'_> {
        sql::assert_may_block();
        match &self.connection {
            Connection::Sqlite(connection) => sql::Link::Sqlite(connection),
            Connection::Postgres(connection) => sql::Link::Postgres(connection),
        }
    }

    /// The store outside a transaction: each statement commits by itself.
    pub fn db(&self) -> Db<'_> {
        Db::new(self.link(), &self.site, false)
    }

    /// The CRM data ([`CrmStore`]) outside a transaction.
    pub fn crm(&self) -> Db<'_> {
        self.db()
    }

    /// Starts a write transaction. Writers take the store's write lock up front — SQLite's
    /// (`BEGIN IMMEDIATE`), or on PostgreSQL the row of the change counter (`SELECT … FOR
    /// UPDATE`), which every change to a deal updates — so two writers never interleave: what a
    /// sync or an edit reads of a deal is what it overwrites, and the change counter moves in
    /// the order transactions commit.
    pub fn transaction(&mut self) -> Result<Transaction<'_>, StoreError> {
        let db = Db::new(self.link(), &self.site, true);
        match db.engine() {
            Engine::Sqlite => {
                retry_while_busy(|| match db.link() {
                    sql::Link::Sqlite(connection) => connection.execute_batch("BEGIN IMMEDIATE"),
                    sql::Link::Postgres(_) => Ok(()),
                })?;
            }
            Engine::Postgres => {
                db.execute_batch("BEGIN")?;
                if let Err(error) = db.query_value::<i64>(
                    "SELECT version FROM store_meta WHERE id = 1 FOR UPDATE",
                    &[],
                ) {
                    let _ = db.execute_batch("ROLLBACK");
                    return Err(error);
                }
            }
        }
        Ok(Transaction {
            db,
            finished: false,
        })
    }

    /// Runs `work` while this process holds the store-wide claim on `job`: on PostgreSQL an
    /// advisory lock, let go when the work ends or the connection does (a daemon that dies holds
    /// nothing; one whose host vanished holds it until the server finds the connection dead,
    /// which the client's TCP keepalives bring down to about a minute). A daemon doing the same
    /// job is waited for, [`CLAIM_WAIT`] at most, so this is for short work on the store only:
    /// work that talks to another server (mail) uses [`Store::try_exclusively`]. On SQLite there
    /// is no other daemon to wait for.
    pub fn exclusively<T, E: From<StoreError>>(
        &mut self,
        job: &str,
        work: impl FnOnce(&mut Store) -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        let mut work = Some(work);
        loop {
            let attempt = self.try_exclusively(job, |store| match work.take() {
                Some(work) => work(store),
                None => Err(StoreError::Corrupt("a claimed job ran twice".to_string()).into()),
            })?;
            if let Some(done) = attempt {
                return Ok(done);
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::ClaimHeld {
                    job: job.to_string(),
                    waited: CLAIM_WAIT,
                }
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `work` if no other process holds the store-wide claim on `job` (see
    /// [`Store::exclusively`]); `None`, without waiting, when one does: that daemon is doing the
    /// job.
    pub fn try_exclusively<T, E: From<StoreError>>(
        &mut self,
        job: &str,
        work: impl FnOnce(&mut Store) -> Result<T, E>,
    ) -> Result<Option<T>, E> {
        if self.engine() == Engine::Sqlite {
            return work(self).map(Some);
        }
        let key = claim_key(job);
        let claimed = self
            .db()
            .query_value::<bool>("SELECT pg_try_advisory_lock(?1)", &sql_params![key])
            .map_err(E::from)?;
        if !claimed {
            return Ok(None);
        }
        let result = work(self);
        if let Err(error) = self
            .db()
            .query_value::<bool>("SELECT pg_advisory_unlock(?1)", &sql_params![key])
        {
            tracing::warn!("cannot let go of the claim on {job}: {error}");
        }
        result.map(Some)
    }

    /// Claims this store's site for this process for as long as the connection lives: on
    /// PostgreSQL, a second daemon with the same `[store] site` would take the other's files for
    /// its own. False when another process holds it.
    pub fn claim_site(&self) -> Result<bool, StoreError> {
        if self.engine() == Engine::Sqlite {
            return Ok(true);
        }
        self.db().query_value::<bool>(
            "SELECT pg_try_advisory_lock(?1)",
            &sql_params![claim_key(&format!("site:{}", self.site))],
        )
    }
}

/// How long [`Store::exclusively`] waits for another daemon doing the same job.
pub const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// How many idle PostgreSQL connections a process keeps per store.
const POOL_IDLE: usize = 4;

/// The page size of a new SQLite store, in bytes.
pub const STORE_PAGE_SIZE: i64 = 16384;

/// Idle PostgreSQL connections, by the config they were opened with: a connection costs a
/// handshake (and TLS), and the daemon's jobs and the HTTP requests each want one.
static POOL: std::sync::Mutex<Vec<(StoreConfig, Store, std::time::Instant)>> =
    std::sync::Mutex::new(Vec::new());

/// How long a pooled connection may sit idle before it is checked (one round trip) before use.
const POOL_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Runs `work` with a connection to the store the config names: a pooled one for PostgreSQL,
/// a fresh one for SQLite (whose connections cost nothing). `existing` refuses to create a
/// SQLite store that is not there (see [`Store::open_existing`]).
pub fn with_store<T, E: From<StoreError>>(
    config: &StoreConfig,
    existing: bool,
    work: impl FnOnce(&mut Store) -> Result<T, E>,
) -> Result<T, E> {
    let pooled = if matches!(config.location, StoreLocation::Postgres(_)) {
        let taken = {
            let mut idle = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            idle.iter()
                .position(|(opened_with, _, _)| opened_with == config)
                .map(|position| idle.swap_remove(position))
        };
        // Checked outside the pool's lock: the check is a round trip to the server.
        taken.and_then(|(_, store, returned_at)| {
            (returned_at.elapsed() < POOL_CHECK_AFTER || store.still_answers()).then_some(store)
        })
    } else {
        None
    };
    let mut store = match pooled {
        Some(store) => store,
        None if existing => Store::open_existing(config)?,
        None => Store::open(config)?,
    };
    let result = work(&mut store);
    if let Connection::Postgres(connection) = &store.connection {
        let healthy = !connection.client.borrow().is_closed();
        let mut idle = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n_same = idle
            .iter()
            .filter(|(opened_with, _, _)| opened_with == config)
            .count();
        if healthy && n_same < POOL_IDLE {
            idle.push((config.clone(), store, std::time::Instant::now()));
        }
    }
    result
}

/// The advisory-lock key of a claim: a hash of its name.
fn claim_key(job: &str) -> i64 {
    let digest = xxhash_rust::xxh3::xxh3_64(format!("funnelsync:{job}").as_bytes());
    i64::from_ne_bytes(digest.to_ne_bytes())
}

/// A write transaction: rolled back when dropped without [`Transaction::commit`].
pub struct Transaction<'s> {
    db: Db<'s>,
    finished: bool,
}

impl<'s> std::ops::Deref for Transaction<'s> {
    type Target = Db<'s>;

    fn deref(&self) -> &Db<'s> {
        &self.db
    }
}

impl Transaction<'_> {
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.finished = true;
        self.db.execute_batch("COMMIT")
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(error) = self.db.execute_batch("ROLLBACK") {
                tracing::warn!("cannot roll back a transaction: {error}");
            }
        }
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

impl ChangeRecord {
    /// A change not yet recorded: the store gives it its id and its run's.
    pub fn new(
        deal_id: DealId,
        kind: ChangeKind,
        field: Option<String>,
        old_value: Option<String>,
        new_value: Option<String>,
    ) -> ChangeRecord {
        ChangeRecord {
            id: 0,
            run_id: 0,
            deal_id,
            kind,
            field,
            old_value,
            new_value,
        }
    }
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

    /// The owners of live deals (and of archived ones with `include_archived`) as written (the
    /// first spelling of each; case and spaces ignored), sorted: for messages and lists.
    fn owners(&self, include_archived: bool) -> Result<Vec<String>, StoreError> {
        let mut owners: Vec<String> = Vec::new();
        let filter = DealFilter {
            include_archived,
            ..DealFilter::default()
        };
        for deal in self.list_deals(&filter)? {
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
    /// `extra` as JSON, when the caller has encoded it already (as `serde_json` does).
    pub extra_json: Option<&'a str>,
    pub origin: &'a str,
    pub now: DateTime<Utc>,
    pub stage_entered_at: Option<DateTime<Utc>>,
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
        let (store, _) =
            Store::open_sqlite(&folder.path().join("nested/crm.db"), "local").expect("open");
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

    /// The message of a panic caught by `catch_unwind`, if `work` panicked.
    fn panic_message(work: impl FnOnce()) -> Option<String> {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).err()?;
        Some(match caught.downcast::<String>() {
            Ok(message) => *message,
            Err(caught) => caught
                .downcast::<&str>()
                .map(|message| message.to_string())
                .unwrap_or_default(),
        })
    }

    #[test]
    #[cfg(debug_assertions)]
    fn store_work_on_an_async_thread_panics_and_runs_inside_a_blocking_scope() {
        let folder = tempfile::tempdir().expect("temp dir");
        let path = folder.path().join("crm.db");
        let (store, _) = Store::open_sqlite(&path, "local").expect("open outside a runtime");
        let select_one = |store: &Store| {
            assert_eq!(
                store
                    .db()
                    .query_value::<i64>("SELECT 1", &[])
                    .expect("query"),
                1
            );
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let refused = panic_message(|| select_one(&store))
                .expect("a statement on an async thread panics");
            assert!(refused.contains("async thread"), "{refused}");
            assert!(
                panic_message(|| drop(Store::open_sqlite(&path, "local"))).is_some(),
                "opening panics too"
            );
            let scope = BlockingScope::enter();
            select_one(&store);
            drop(scope);
            assert!(
                panic_message(|| select_one(&store)).is_some(),
                "the scope ended"
            );
        });
        // A blocking thread looks like a runtime's thread: it needs the scope too.
        let (store, unmarked) = runtime
            .block_on(runtime.spawn_blocking(move || {
                let refused = panic_message(|| select_one(&store));
                (store, refused)
            }))
            .expect("blocking task");
        assert!(unmarked.is_some(), "a blocking thread without the scope");
        // Outside a runtime the thread may block, and entering one only to build something in it
        // (after `unless_async`) leaves it so.
        select_one(&store);
        let _scope = BlockingScope::unless_async();
        let _entered = runtime.enter();
        select_one(&store);
    }

    #[test]
    fn a_scan_reads_through_a_small_page_cache_and_gives_the_cache_its_size_back() {
        let folder = tempfile::tempdir().expect("temp dir");
        let (store, _) = Store::open_sqlite(&folder.path().join("crm.db"), "local").expect("open");
        let db = store.db();
        let cache_size = || -> i64 { db.query_value("PRAGMA cache_size", &[]).expect("size") };
        let before = cache_size();
        let during = db.with_scan_cache(|| Ok(cache_size())).expect("scan");
        assert_eq!(during, -sql::SCAN_CACHE_KIB);
        assert_eq!(cache_size(), before);
        // A failed pass gives the size back too.
        let failed: Result<(), StoreError> =
            db.with_scan_cache(|| db.execute("SELECT * FROM no_such_table", &[]).map(|_| ()));
        assert!(failed.is_err());
        assert_eq!(cache_size(), before);
    }

    #[test]
    fn a_new_store_takes_large_pages_and_an_existing_one_keeps_its_own() {
        let folder = tempfile::tempdir().expect("temp dir");
        let page_size = |path: &Path| -> i64 {
            let (store, _) = Store::open_sqlite(path, "local").expect("open");
            store
                .db()
                .query_value("PRAGMA page_size", &[])
                .expect("page size")
        };
        let new = folder.path().join("new.db");
        assert_eq!(page_size(&new), STORE_PAGE_SIZE);
        assert_eq!(page_size(&new), STORE_PAGE_SIZE, "reopened");
        // A store made by an earlier version, with SQLite's 4 KB pages and a table in it.
        let old = folder.path().join("old.db");
        {
            let connection = rusqlite::Connection::open(&old).expect("create");
            connection
                .execute_batch("PRAGMA page_size = 4096; CREATE TABLE before (id INTEGER);")
                .expect("old store");
        }
        assert_eq!(page_size(&old), 4096);
        let (store, _) = Store::open_sqlite(&old, "local").expect("reopen");
        let n_deals: i64 = store
            .db()
            .query_value("SELECT COUNT(*) FROM deals", &[])
            .expect("migrated");
        assert_eq!(n_deals, 0);
    }

    #[test]
    fn a_commit_leaves_the_log_to_a_thread_of_its_own_and_closing_leaves_no_log() {
        let folder = tempfile::tempdir().expect("temp dir");
        let path = folder.path().join("crm.db");
        let (store, _) = Store::open_sqlite(&path, "local").expect("open");
        let file_size = || std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
        let size_before = file_size();
        // One commit of ≈ 1,200 pages of 16 KB: past the 1,000 pages that ask for a checkpoint.
        store
            .db()
            .execute_batch(
                "CREATE TABLE bulk (payload BLOB); \
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1200) \
                 INSERT INTO bulk SELECT randomblob(16000) FROM n;",
            )
            .expect("bulk commit");
        // SQLite's own way copies the log into the file before the commit returns. Here the
        // commit only asks: the thread has still to wake, open its connection and copy 19 MB,
        // so the file cannot have grown by half of that yet.
        let payload = 1200 * 16000;
        assert!(
            file_size() < size_before + payload / 2,
            "the commit checkpointed the log itself: {} bytes",
            file_size()
        );
        // The thread does it while the store stays open.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while file_size() < size_before + payload && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            file_size() >= size_before + payload,
            "no checkpoint while the store was open: {} bytes",
            file_size()
        );
        let n_rows: i64 = store
            .db()
            .query_value("SELECT COUNT(*) FROM bulk", &[])
            .expect("count");
        assert_eq!(n_rows, 1200);
        drop(store);
        assert!(
            !folder.path().join("crm.db-wal").exists(),
            "the last connection to close checkpoints and removes the log"
        );
        let (store, _) = Store::open_sqlite(&path, "local").expect("reopen");
        let n_rows: i64 = store
            .db()
            .query_value("SELECT COUNT(*) FROM bulk", &[])
            .expect("count");
        assert_eq!(n_rows, 1200);
    }

    #[test]
    fn reopening_keeps_schema_version() {
        let folder = tempfile::tempdir().expect("temp dir");
        let path = folder.path().join("crm.db");
        drop(Store::open_sqlite(&path, "local").expect("first open"));
        let (store, migrated) = Store::open_sqlite(&path, "local").expect("second open");
        assert_eq!(migrated.from, migrated.to, "nothing left to migrate");
        let Connection::Sqlite(connection) = &store.connection else {
            panic!("a SQLite store");
        };
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, schema::SQLITE_MIGRATIONS.len() as i64);
        connection
            .pragma_update(None, "user_version", 99)
            .expect("set");
        drop(store);
        assert!(matches!(
            Store::open_sqlite(&path, "local"),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
