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
//! does. While the thread cannot checkpoint (it cannot open the store, or its checkpoint fails),
//! commits checkpoint the log themselves, as SQLite would, so that the log never grows without
//! bound.
//!
//! It knows SQLite's log and nothing of what the store holds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
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
    /// The thread's last attempt failed: commits checkpoint themselves until one succeeds.
    failing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread for the store file at `path` (made absolute, so that a later change of
    /// the working directory cannot point it elsewhere). Its connection is opened at the first
    /// checkpoint: a store that never grows its log by 1,000 pages never opens a second one.
    pub fn start(path: PathBuf) -> std::io::Result<Checkpointer> {
        let path = std::path::absolute(&path)?;
        let (wanted, asked) = std::sync::mpsc::sync_channel(1);
        let failing = Arc::new(AtomicBool::new(false));
        let thread_failing = Arc::clone(&failing);
        let thread = std::thread::Builder::new()
            .name("funnelsync-checkpoint".to_string())
            .spawn(move || run(&path, &asked, &thread_failing))?;
        Ok(Checkpointer {
            wanted,
            failing,
            thread: Some(thread),
        })
    }

    /// The write-ahead-log hook for the store's connection: after a commit that leaves the log
    /// at [`CHECKPOINT_PAGES`] or more, it asks for a checkpoint and returns at once (a request
    /// already waiting is enough). When the thread is failing or gone, the commit checkpoints
    /// the log itself (passively, as SQLite's own hook does).
    pub fn hook(
        &self,
    ) -> impl FnMut(&mut rusqlite::hooks::Wal, std::ffi::c_int) -> rusqlite::Result<()> + Send + 'static
    {
        let wanted = self.wanted.clone();
        let failing = Arc::clone(&self.failing);
        move |log, n_pages| {
            if n_pages < CHECKPOINT_PAGES {
                return Ok(());
            }
            let asked = if failing.load(Ordering::Acquire) {
                false
            } else {
                // Full: a checkpoint is asked for already.
                !matches!(
                    wanted.try_send(Wanted::Checkpoint),
                    Err(TrySendError::Disconnected(_))
                )
            };
            if !asked {
                log.checkpoint()?;
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

fn run(path: &std::path::Path, asked: &Receiver<Wanted>, failing: &AtomicBool) {
    let mut connection: Option<rusqlite::Connection> = None;
    while let Ok(Wanted::Checkpoint) = asked.recv() {
        if connection.is_none() {
            match open(path) {
                Ok(opened) => connection = Some(opened),
                Err(error) => {
                    tracing::warn!(store = %path.display(), %error, "cannot open the store to checkpoint its log; commits checkpoint it themselves until the next try");
                    failing.store(true, Ordering::Release);
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
                failing.store(false, Ordering::Release);
            }
            Err(error) => {
                tracing::warn!(store = %path.display(), %error, "checkpointing the store's log failed; commits checkpoint it themselves until the next try");
                failing.store(true, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn while_the_thread_cannot_checkpoint_the_commits_do() {
        let folder = tempfile::tempdir().expect("temp dir");
        let path = folder.path().join("crm.db");
        let mut connection = rusqlite::Connection::open(&path).expect("open");
        connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .expect("wal");
        // The thread is pointed at a store that is not there: it cannot open it.
        let checkpointer =
            Checkpointer::start(folder.path().join("gone").join("crm.db")).expect("start");
        connection
            .wal_hook(Some(checkpointer.hook()))
            .expect("hook");
        let file_size = || std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
        let bulk_commit = || {
            connection
                .execute_batch(
                    "CREATE TABLE IF NOT EXISTS bulk (payload BLOB); \
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1200) \
                     INSERT INTO bulk SELECT randomblob(4000) FROM n;",
                )
                .expect("bulk commit");
        };
        bulk_commit();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !checkpointer.failing.load(Ordering::Acquire) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            checkpointer.failing.load(Ordering::Acquire),
            "the thread failed"
        );
        let size_before = file_size();
        bulk_commit();
        // Both commits' pages are in the file as soon as the second commit returns.
        assert!(
            file_size() >= size_before + 2 * 1200 * 4000,
            "the commit left the log as it was: {} bytes",
            file_size()
        );
        drop(connection);
        drop(checkpointer);
    }
}
