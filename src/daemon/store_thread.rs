//! The daemon's own store connection, on a thread of its own: the loop hands it [`StoreJob`]s
//! and never waits for SQLite; the jobs run in the order given (so a file's recorded state is
//! always its latest), and the answers come back to the loop as events.

use std::path::PathBuf;

use chrono::Utc;
use tokio::sync::mpsc;
use tracing::warn;

use super::Event;
use crate::store::files::{self as status, FileStatusRecord};
use crate::store::{CrmStore, Store};

/// Work for the daemon's store connection.
#[derive(Debug)]
pub(super) enum StoreJob {
    /// Record a file's state for `status`.
    RecordStatus(FileStatusRecord),
    /// Record, per source, the links that are not sources (`(file key, reason)`).
    ReplaceIgnored(Vec<(String, Vec<(String, String)>)>),
    /// Read the store's change counter; answered with [`Event::StoreVersion`].
    ReadVersion,
    /// Which files show a deal changed after the counter was `since`; answered with
    /// [`Event::FilesBehind`].
    FilesBehind { since: i64, except: Option<PathBuf> },
    /// Count the messages waiting for delivery; answered with [`Event::MailPending`].
    CountPendingMail,
}

/// The handle the loop keeps: dropping the sender lets the thread finish the jobs it has and end.
pub(super) struct StoreThread {
    jobs: std::sync::mpsc::Sender<StoreJob>,
    thread: std::thread::JoinHandle<()>,
}

impl StoreThread {
    pub fn start(store: Store, events: mpsc::Sender<Event>) -> std::io::Result<StoreThread> {
        let (jobs, queue) = std::sync::mpsc::channel::<StoreJob>();
        let thread = std::thread::Builder::new()
            .name("funnelsync-store".to_string())
            .spawn(move || {
                for job in queue {
                    if let Some(event) = run(&store, job) {
                        if events.blocking_send(event).is_err() {
                            break;
                        }
                    }
                }
            })?;
        Ok(StoreThread { jobs, thread })
    }

    pub fn send(&self, job: StoreJob) {
        if self.jobs.send(job).is_err() {
            warn!("the store thread has stopped; a status update is lost");
        }
    }

    /// Lets the thread finish the jobs given so far, and waits for it (off the loop).
    pub async fn finish(self) {
        let StoreThread { jobs, thread } = self;
        drop(jobs);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

fn run(store: &Store, job: StoreJob) -> Option<Event> {
    match job {
        StoreJob::RecordStatus(record) => {
            if let Err(error) = status::record(&store.db(), &record) {
                warn!(file = %record.file, "cannot record the file's status: {error}");
            }
            None
        }
        StoreJob::ReplaceIgnored(by_source) => {
            let now = Utc::now();
            let result = by_source.iter().try_for_each(|(source, noted)| {
                status::replace_ignored(&store.db(), source, noted, now)
            });
            if let Err(error) = result {
                warn!("cannot record the links that are not sources: {error}");
            }
            None
        }
        StoreJob::ReadVersion => Some(Event::StoreVersion(store.crm().version())),
        StoreJob::FilesBehind { since, except } => Some(Event::FilesBehind {
            behind: crate::sync::files_with_changes_since(store, since),
            except,
        }),
        StoreJob::CountPendingMail => Some(Event::MailPending(
            crate::mail::outbox::n_pending(store).unwrap_or(0),
        )),
    }
}
