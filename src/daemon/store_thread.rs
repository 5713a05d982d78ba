//! The daemon's own store connection, on a thread of its own: the loop hands it [`StoreJob`]s
//! and never waits for SQLite; the jobs run in the order given (so a file's recorded state is
//! always its latest), and the answers come back to the loop as events.
//!
//! The connection also holds the daemon's claim on its site (see [`Store::claim_site`]). When
//! PostgreSQL closes it (a restart, a terminated backend, a network cut), the thread connects
//! again with backoff, takes the site claim again and runs the job that found the connection
//! gone once more (every job may run twice); if another daemon took the site meanwhile, the loop
//! is told ([`Event::SiteLost`]) and the daemon stops, since two daemons would otherwise sync
//! the same site's files.

use std::path::PathBuf;

use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Event;
use crate::config::StoreConfig;
use crate::store::files::{self as status, FileStatusRecord};
use crate::store::{BlockingScope, CrmStore, Store, StoreError};

/// The first wait before connecting again, doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Work for the daemon's store connection.
#[derive(Debug, Clone)]
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
    pub fn start(
        store: Store,
        config: StoreConfig,
        events: mpsc::Sender<Event>,
    ) -> std::io::Result<StoreThread> {
        let (jobs, queue) = std::sync::mpsc::channel::<StoreJob>();
        let thread = std::thread::Builder::new()
            .name("funnelsync-store".to_string())
            .spawn(move || {
                let _scope = BlockingScope::enter();
                let mut store = store;
                for job in queue {
                    let mut answer = attempt(&store, &job);
                    if store.connection_lost()
                        || answer.as_ref().is_err_and(StoreError::is_connection_lost)
                    {
                        let error = match &answer {
                            Err(error) => error.to_string(),
                            Ok(_) => "the server closed it".to_string(),
                        };
                        warn!("lost the daemon's connection to the store ({error}); connecting again");
                        match reconnect(&config, &events) {
                            Reconnected::Yes(new_store) => {
                                store = new_store;
                                info!(site = %config.site, "connected to the store again; the site is claimed again");
                                answer = attempt(&store, &job);
                            }
                            Reconnected::SiteTaken => {
                                let _ = events.blocking_send(Event::SiteLost);
                                return;
                            }
                            Reconnected::LoopGone => return,
                        }
                    }
                    if let Some(event) = answer_event(job, answer) {
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

/// What a job came to: the event to tell the loop, if any.
type Answer = Result<Option<Event>, StoreError>;

/// Runs a job once. A failure is returned, not logged: it may be the connection's, and then the
/// job runs again on a new one.
fn attempt(store: &Store, job: &StoreJob) -> Answer {
    match job {
        StoreJob::RecordStatus(record) => {
            status::record(&store.db(), record)?;
            Ok(None)
        }
        StoreJob::ReplaceIgnored(by_source) => {
            let now = Utc::now();
            by_source.iter().try_for_each(|(source, noted)| {
                status::replace_ignored(&store.db(), source, noted, now)
            })?;
            Ok(None)
        }
        StoreJob::ReadVersion => Ok(Some(Event::StoreVersion(Ok(store.crm().version()?)))),
        StoreJob::FilesBehind { since, except } => Ok(Some(Event::FilesBehind {
            behind: Ok(crate::sync::files_with_changes_since(store, *since)?),
            except: except.clone(),
        })),
        StoreJob::CountPendingMail => Ok(Some(Event::MailPending(crate::mail::outbox::n_pending(
            store,
        )?))),
    }
}

/// The event a job's answer gives the loop; a failure the loop does not wait for is logged.
fn answer_event(job: StoreJob, answer: Answer) -> Option<Event> {
    match (job, answer) {
        (_, Ok(event)) => event,
        (StoreJob::RecordStatus(record), Err(error)) => {
            warn!(file = %record.file, "cannot record the file's status: {error}");
            None
        }
        (StoreJob::ReplaceIgnored(_), Err(error)) => {
            warn!("cannot record the links that are not sources: {error}");
            None
        }
        (StoreJob::ReadVersion, Err(error)) => Some(Event::StoreVersion(Err(error))),
        (StoreJob::FilesBehind { except, .. }, Err(error)) => Some(Event::FilesBehind {
            behind: Err(error),
            except,
        }),
        (StoreJob::CountPendingMail, Err(error)) => {
            debug!("cannot count the messages waiting for delivery: {error}");
            Some(Event::MailPending(0))
        }
    }
}

/// How connecting again ended.
enum Reconnected {
    Yes(Store),
    /// Another daemon of the same site holds the claim now.
    SiteTaken,
    /// The loop has ended: nobody is left to serve.
    LoopGone,
}

/// Connects to the store again, with backoff, until it works and the site is claimed again.
fn reconnect(config: &StoreConfig, events: &mpsc::Sender<Event>) -> Reconnected {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let deadline = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < deadline {
            if events.is_closed() {
                return Reconnected::LoopGone;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match Store::open(config).and_then(|store| Ok((store.claim_site()?, store))) {
            Ok((true, store)) => return Reconnected::Yes(store),
            Ok((false, _)) => return Reconnected::SiteTaken,
            Err(error) => debug!("cannot connect to the store yet: {error}"),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
