//! Checkpointing an SQLite store's write-ahead log on a thread of its own, so that a commit
//! never waits for it.
//!
//! By default SQLite checkpoints in the committing thread: once a commit leaves the log at 1,000
//! pages or more, that commit copies the log into the database file and syncs it before it
//! returns. After a first import of 100,000 rows that is the whole 88 MB store, ≈ 0.2–0.4 s in
//! which nothing else of the sync can happen. Here a commit only says the log has grown (a
//! write-ahead-log hook, [`Checkpointer::hook`]); a thread with a connection of its own runs a
//! passive checkpoint, which never blocks a reader or a writer, beside whatever comes next.
//!
//! Durability is unchanged: with `synchronous = NORMAL` a commit is written to the log and the log
//! is synced at a checkpoint, so a power cut may lose the commits since the last one, as before,
//! and never corrupts the store. When the store is closed, the thread finishes the checkpoint it
//! is running and stops; the last connection to close checkpoints what is left, as SQLite always
//! does.
//!
//! It knows SQLite's log and nothing of what the store holds.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

/// How many pages in the log ask for a checkpoint (SQLite's own default).
pub const CHECKPOINT_PAGES: i32 = 1000;

enum Wanted {
    Checkpoint,
    Stop,
}

/// The checkpointing thread of one store connection.
pub struct Checkpointer {
    wanted: SyncSender<Wanted>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread for the store file at `path` (made absolute, so that a later change of
    /// the working directory cannot point it elsewhere). Its connection is opened at the first
    /// checkpoint: a store that never grows its log by 1,000 pages never opens a second one.
    pub fn start(path: PathBuf) -> std::io::Result<Checkpointer> {
        let path = std::path::absolute(&path)?;
        let (wanted, asked) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("funnelsync-checkpoint".to_string())
            .spawn(move || run(&path, &asked))?;
        Ok(Checkpointer {
            wanted,
            thread: Some(thread),
        })
    }

    /// The write-ahead-log hook for the store's connection: after a commit that leaves the log
    /// at [`CHECKPOINT_PAGES`] or more, it asks for a checkpoint and returns at once (a request
    /// already waiting is enough).
    pub fn hook(
        &self,
    ) -> impl FnMut(&mut rusqlite::hooks::Wal, std::ffi::c_int) -> rusqlite::Result<()> + Send + 'static
    {
        let wanted = self.wanted.clone();
        move |_log, n_pages| {
            if n_pages >= CHECKPOINT_PAGES {
                // Full: a checkpoint is asked for already; disconnected: the store is closing.
                let _ = wanted.try_send(Wanted::Checkpoint);
            }
            Ok(())
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // A checkpoint already running is finished first: the thread never leaves one half done
        // behind a process that goes on (SQLite would finish it later, but the log would stay
        // large until then).
        let _ = self.wanted.send(Wanted::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(path: &std::path::Path, asked: &Receiver<Wanted>) {
    let mut connection: Option<rusqlite::Connection> = None;
    while let Ok(Wanted::Checkpoint) = asked.recv() {
        if connection.is_none() {
            match open(path) {
                Ok(opened) => connection = Some(opened),
                Err(error) => {
                    tracing::warn!(store = %path.display(), %error, "cannot open the store to checkpoint its log; the next commit asks again");
                    continue;
                }
            }
        }
        let Some(opened) = &connection else {
            continue;
        };
        // PASSIVE: copies what no reader still needs, without waiting for anyone.
        let checkpointed = opened.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match checkpointed {
            Ok((n_log_pages, n_copied)) => {
                tracing::debug!(store = %path.display(), n_log_pages, n_copied, "checkpointed the store's log");
            }
            Err(error) => {
                tracing::warn!(store = %path.display(), %error, "checkpointing the store's log failed; the next commit asks again");
            }
        }
    }
}

fn open(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    // Never creates the file: the store's own connection made it.
    let connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_secs(10))?;
    Ok(connection)
}
