//! `funnelsync run`: the long-running daemon. Every source of events — the file-system watcher,
//! the timers, the signals, the sync, mail and report workers and the store thread — sends one
//! closed [`Event`] through a bounded channel to a single loop, so every trigger is handled in one
//! place.
//!
//! The loop owns every file's state ([`tracked::Tracked`], whose transitions are pure and
//! unit-tested): a file is read only once it has been unchanged for `settle`; at most one sync per
//! file runs at a time (changes during a sync cause exactly one more sync afterwards); failed reads
//! are retried with backoff and then left alone until the file changes; a file gone from the
//! folder archives nothing. The loop never waits for SQLite: syncs, mail and the report run on
//! worker threads with their own connections, and the loop's own reads and writes go to the store
//! thread ([`store_thread`]). Two classes of error: fatal ones (the store cannot be opened) stop
//! the daemon; per-file and per-row ones are logged, recorded and the daemon goes on. This module
//! must not know how a file is parsed or diffed (that is `sync`).

mod store_thread;
mod tracked;
mod workers;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::alerts::AlertError;
use crate::config::{Config, StoreLocation, View};
use crate::mail::outbox::OutboxError;
use crate::remind::outbox::RemindError;
use crate::report::ReportError;
use crate::store::files::{FileState, FileStatusRecord};
use crate::store::{BlockingScope, CrmStore, Store, StoreError};
use crate::sync::{self, FileReport, FileStatus};
use crate::systemd;
use crate::watch::{self, Fingerprint};
use store_thread::{StoreJob, StoreThread};
use tracked::{Look, Outcome, Tracked, Verdict};
use workers::Workers;

/// How many events may wait for the loop; a worker with more to say waits for room.
const EVENT_QUEUE: usize = 1024;
/// How often the store's change counter is checked.
const STORE_POLL: Duration = Duration::from_millis(500);
/// How often it is checked while a PostgreSQL store's notifications arrive: the poll is then only
/// a safety net.
const STORE_POLL_LISTENING: Duration = Duration::from_secs(10);
/// How often pending mail is looked at for retries.
const MAIL_RETRY: Duration = Duration::from_secs(20);
/// How long a shutdown waits for syncs, mail, the report and alerts in progress to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the store thread: {0}")]
    StoreThread(#[source] std::io::Error),
    #[error("another daemon runs as site \"{0}\" on this store; give each daemon sharing a store its own [store] site")]
    SiteTaken(String),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
}

/// Why a job on a worker thread failed.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remind(#[from] RemindError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Alert(#[from] AlertError),
    #[error("source \"{0}\" is no longer in the config")]
    SourceGone(String),
    #[error("the worker stopped before it finished: {0}")]
    Panicked(#[source] tokio::task::JoinError),
}

/// Everything that can make the loop act.
#[derive(Debug)]
enum Event {
    /// The watcher saw something happen to this path.
    FileChanged(PathBuf),
    /// The watcher failed; the periodic rescan still covers every file.
    WatcherFailed(notify::Error),
    /// Time to stat every source file (poll mode, and the safety net in auto mode).
    Rescan,
    /// Time to look at timers.
    Tick,
    /// A sync worker finished.
    SyncFinished {
        path: PathBuf,
        fingerprint: Option<Fingerprint>,
        outcome: Box<Result<FileReport, JobError>>,
    },
    /// SIGHUP: re-read the config.
    Reload,
    /// SIGTERM or SIGINT.
    Shutdown,
    /// The daily reminder run is due (the due time it is for).
    RemindDue(chrono::DateTime<Utc>),
    /// A reminder run, a digest or a delivery of pending mail finished: what it did, and whether
    /// mail is in trouble.
    MailFinished(Result<(String, bool), JobError>),
    /// The weekly digest to the manager is due.
    WeeklyDigestDue(chrono::DateTime<Utc>),
    /// The funnel report file was written (or could not be).
    ReportWritten(Result<(), JobError>),
    /// An alert worker finished.
    AlertDone,
    /// The store's change counter, as the store thread read it.
    StoreVersion(Result<i64, StoreError>),
    /// A PostgreSQL store said a transaction committed this change counter.
    StoreNotified(i64),
    /// The connection that listens for the store's notifications is up (or down: polling).
    Listening(bool),
    /// The files that show a deal changed since the counter the loop last knew (`except` shows
    /// them already).
    FilesBehind {
        behind: Result<HashSet<String>, StoreError>,
        except: Option<PathBuf>,
    },
    /// How many messages wait for delivery.
    MailPending(i64),
    /// An admin asked (through HTTP) to apply this held file (by its key) despite the guard.
    ForceSync(String),
    /// The store thread's connection was lost, and another daemon of this site took the site
    /// claim before it could connect again: this daemon must stop.
    SiteLost,
}

struct Daemon {
    config: Arc<Config>,
    sender: mpsc::Sender<Event>,
    files: HashMap<PathBuf, Tracked>,
    store: StoreThread,
    workers: Workers,
    n_in_flight: usize,
    ready_sent: bool,
    shutting_down: bool,
    last_sync_summary: Option<String>,
    watchdog: Option<(Duration, Instant)>,
    /// The store's change counter when last looked at, and when that was.
    store_version: Option<i64>,
    store_checked_at: Instant,
    /// A read of the change counter was asked for and not answered yet.
    store_version_asked: bool,
    /// The store's notifications arrive (PostgreSQL): the counter is polled only as a safety net.
    listening: bool,
    /// A reminder run or mail delivery is in progress.
    mail_busy: bool,
    /// When pending mail was last looked at.
    mail_checked_at: Instant,
    /// The report file needs writing (after a sync that changed the store).
    report_dirty: bool,
    report_busy: bool,
    /// Not before this (the file was open, or the next interval).
    report_next_at: Instant,
    /// Alert workers not finished yet; a shutdown waits for them.
    n_alerts_in_flight: usize,
    /// Symbolic links in watched folders that are not sources, by path: (source, reason). Each
    /// is logged once, when first seen.
    links_not_synced: HashMap<PathBuf, (String, String)>,
    /// The HTTP server of `[http]`, on a runtime of its own, and the loop's heartbeat it shows.
    http: Option<crate::http::Server>,
    heartbeat: Arc<crate::http::Heartbeat>,
    /// Why the daemon must stop with an error once its work in progress is done.
    fatal: Option<DaemonError>,
}

/// Runs the daemon until SIGTERM/SIGINT. Returns an error only for fatal problems.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(run_async(config))
}

/// What the daemon reads from the store before its loop starts.
struct Opening {
    store: Store,
    version: Option<i64>,
    last_reminder_run: Result<Option<chrono::DateTime<Utc>>, StoreError>,
}

fn open_store(config: &Config) -> Result<Opening, DaemonError> {
    let store = Store::open(&config.store)?;
    // Held for the daemon's life on the store thread's connection, let go when it closes.
    if !store.claim_site()? {
        return Err(DaemonError::SiteTaken(config.store.site.clone()));
    }
    let version = match store.crm().version() {
        Ok(version) => Some(version),
        Err(error) => {
            warn!("cannot read the store's change counter: {error}");
            None
        }
    };
    let last_reminder_run = crate::remind::outbox::last_run_due(&store);
    Ok(Opening {
        store,
        version,
        last_reminder_run,
    })
}

async fn run_async(config: Config) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let opening = {
        let config = Arc::clone(&config);
        match tokio::task::spawn_blocking(move || {
            let _scope = BlockingScope::enter();
            open_store(&config)
        })
        .await
        {
            Ok(opening) => opening?,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    };
    let (sender, mut receiver) = mpsc::channel(EVENT_QUEUE);
    let store = StoreThread::start(opening.store, config.store.clone(), sender.clone())
        .map_err(DaemonError::StoreThread)?;
    workers::spawn_signal_workers(&sender);
    workers::spawn_tick_worker(&sender);
    let workers = workers::start_workers(&config, &sender);
    let mut daemon = Daemon {
        config,
        sender,
        files: HashMap::new(),
        store,
        workers,
        n_in_flight: 0,
        ready_sent: false,
        shutting_down: false,
        last_sync_summary: None,
        watchdog: systemd::watchdog_interval().map(|interval| (interval, Instant::now())),
        store_version: opening.version,
        store_checked_at: Instant::now(),
        store_version_asked: false,
        mail_busy: false,
        mail_checked_at: Instant::now(),
        listening: false,
        report_dirty: true,
        report_busy: false,
        report_next_at: Instant::now(),
        n_alerts_in_flight: 0,
        links_not_synced: HashMap::new(),
        http: None,
        heartbeat: Arc::new(crate::http::Heartbeat::default()),
        fatal: None,
    };
    daemon.heartbeat.beat();
    let watcher = daemon.workers.watcher_health(daemon.config.watch.mode);
    daemon.heartbeat.set_watcher(watcher);
    if daemon.config.http.is_some() {
        let events = daemon.sender.clone();
        let link = crate::http::DaemonLink {
            heartbeat: Arc::clone(&daemon.heartbeat),
            // Called from the HTTP server: never waits for room in the loop's queue.
            force_sync: Box::new(move |file| events.try_send(Event::ForceSync(file)).is_ok()),
        };
        daemon.http = Some(crate::http::Server::start(
            Arc::clone(&daemon.config),
            Some(link),
        )?);
    }
    info!(
        n_sources = daemon.config.sources.len(),
        mode = ?daemon.config.watch.mode,
        store = %daemon.config.store.describe(),
        site = %daemon.config.store.site,
        "funnelsync daemon starting"
    );
    for source in &daemon.config.sources {
        let n_removed = watch::remove_stale_temp_files(source);
        if n_removed > 0 {
            info!(source = %source.name, n_removed, "removed temp files left by an interrupted write");
        }
    }
    if matches!(daemon.config.store.location, StoreLocation::Postgres(_)) {
        listen_for_changes(daemon.config.store.clone(), daemon.sender.clone());
    }
    daemon.rescan(true);
    daemon.start_due_syncs();
    daemon.check_ready();
    daemon.catch_up_reminders(opening.last_reminder_run);

    let mut shutdown_deadline: Option<Instant> = None;
    while let Some(event) = receiver.recv().await {
        daemon.handle(event, &mut shutdown_deadline);
        if daemon.shutting_down {
            if daemon.is_idle() {
                break;
            }
            if shutdown_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                warn!(
                    n_in_flight = daemon.n_in_flight,
                    n_alerts = daemon.n_alerts_in_flight,
                    "work still running at shutdown; syncs in progress will be rolled back"
                );
                break;
            }
            continue;
        }
        daemon.start_due_syncs();
        daemon.check_ready();
    }
    // Nothing is received any more: a worker still waiting for room in the queue (the store
    // thread, the watcher) is let go rather than left waiting for ever.
    drop(receiver);
    if let Some(http) = daemon.http.take() {
        http.stop();
    }
    let Daemon { store, fatal, .. } = daemon;
    store.finish().await;
    if let Some(fatal) = fatal {
        return Err(fatal);
    }
    info!("funnelsync daemon stopped");
    Ok(())
}

impl Daemon {
    fn handle(&mut self, event: Event, shutdown_deadline: &mut Option<Instant>) {
        match event {
            Event::FileChanged(path) => self.on_file_changed(path),
            Event::WatcherFailed(error) => {
                warn!("file watcher error (the periodic rescan still covers every file): {error}");
                self.heartbeat
                    .set_watcher(crate::http::WatcherHealth::Failed(error.to_string()));
            }
            Event::Rescan => self.rescan(false),
            Event::Tick => self.on_tick(),
            Event::SyncFinished {
                path,
                fingerprint,
                outcome,
            } => self.on_sync_finished(path, fingerprint, *outcome),
            Event::Reload => self.reload(),
            Event::RemindDue(due) => self.start_reminders(due),
            Event::WeeklyDigestDue(due) => self.start_weekly_digest(due),
            Event::ReportWritten(result) => self.on_report_written(result),
            Event::MailFinished(result) => self.on_mail_finished(result),
            Event::AlertDone => self.n_alerts_in_flight = self.n_alerts_in_flight.saturating_sub(1),
            Event::StoreNotified(version) => self.store_moved_to(version, None),
            Event::Listening(listening) => {
                if listening {
                    info!("listening for the store's changes");
                } else {
                    warn!("the store's notifications stopped; polling the change counter until they are back");
                }
                self.listening = listening;
            }
            Event::StoreVersion(version) => {
                self.store_version_asked = false;
                match version {
                    Ok(version) => self.store_moved_to(version, None),
                    Err(error) => warn!("cannot read the store's change counter: {error}"),
                }
            }
            Event::FilesBehind { behind, except } => {
                let behind = match behind {
                    Ok(files) => Some(files),
                    Err(error) => {
                        warn!("cannot tell which files show the store's changes; syncing every file that writes back: {error}");
                        None
                    }
                };
                self.resync_files_behind(behind.as_ref(), except.as_deref());
            }
            Event::ForceSync(file) => self.force_sync(&file),
            Event::SiteLost => {
                let site = self.config.store.site.clone();
                error!(site = %site, "lost the connection to the store, and another daemon claimed this site meanwhile; stopping");
                self.fatal = Some(DaemonError::SiteTaken(site));
                self.handle(Event::Shutdown, shutdown_deadline);
            }
            Event::MailPending(n_pending) => {
                if n_pending > 0 {
                    self.retry_mail();
                }
            }
            Event::Shutdown => {
                if !self.shutting_down {
                    info!(
                        n_in_flight = self.n_in_flight,
                        "shutting down: no new syncs; waiting for syncs in progress"
                    );
                    systemd::stopping();
                    self.shutting_down = true;
                    *shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                }
            }
        }
    }

    /// Whether nothing runs that a shutdown must wait for.
    fn is_idle(&self) -> bool {
        self.n_in_flight == 0
            && !self.mail_busy
            && !self.report_busy
            && self.n_alerts_in_flight == 0
    }

    /// Stats every source file: new and changed files start settling, vanished ones are removed.
    fn rescan(&mut self, initial: bool) {
        let mut present: HashSet<PathBuf> = HashSet::new();
        let mut links_not_synced: HashMap<PathBuf, (String, String)> = HashMap::new();
        let config = Arc::clone(&self.config);
        let settle = config.watch.settle;
        for source in &config.sources {
            let files = match crate::watch::discover(&config, source) {
                Ok(discovery) => {
                    links_not_synced.extend(
                        discovery
                            .not_sources
                            .into_iter()
                            .map(|(path, reason)| (path, (source.name.clone(), reason))),
                    );
                    discovery.files
                }
                Err(error) => {
                    warn!(source = %source.name, "{error}");
                    links_not_synced.extend(
                        self.links_not_synced
                            .iter()
                            .filter(|(_, (name, _))| *name == source.name)
                            .map(|(path, noted)| (path.clone(), noted.clone())),
                    );
                    // A folder we cannot list (share not mounted) says nothing about its files.
                    present.extend(
                        self.files
                            .iter()
                            .filter(|(_, tracked)| tracked.source == source.name)
                            .map(|(path, _)| path.clone()),
                    );
                    continue;
                }
            };
            for path in files {
                if !present.insert(path.clone()) {
                    continue;
                }
                let fingerprint = watch::fingerprint(&path);
                let tracked = self.files.entry(path.clone()).or_insert_with(|| {
                    if !initial {
                        info!(file = %path.display(), source = %source.name, "new file");
                    }
                    Tracked::new(&source.name, sync::file_key(&path), true)
                });
                tracked.source = source.name.clone();
                // A file untouched for longer than `settle` (by its own time stamp) needs no
                // further wait.
                let settled_already =
                    fingerprint.is_some_and(|fingerprint| fingerprint.age() >= settle);
                tracked.rescanned(fingerprint, settled_already, Instant::now(), settle);
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !present.contains(*path))
            .cloned()
            .collect();
        for path in gone {
            self.on_file_gone(&path);
        }
        self.note_links_not_synced(links_not_synced);
        debug!(n_files = self.files.len(), "rescanned the sources");
    }

    /// Logs each symbolic link that is not a source once, and keeps `status` showing the links
    /// that are there now.
    fn note_links_not_synced(&mut self, links: HashMap<PathBuf, (String, String)>) {
        if links == self.links_not_synced {
            return;
        }
        for (path, (source, reason)) in &links {
            if !self.links_not_synced.contains_key(path) {
                warn!(file = %path.display(), source = %source, "{reason}");
            }
        }
        let mut by_source: HashMap<String, Vec<(String, String)>> = self
            .config
            .sources
            .iter()
            .map(|source| (source.name.clone(), Vec::new()))
            .collect();
        for (path, (source, reason)) in &links {
            by_source.entry(source.clone()).or_default().push((
                sync::file_key(path),
                format!("{}: {reason}", path.display()),
            ));
        }
        self.store
            .send(StoreJob::ReplaceIgnored(by_source.into_iter().collect()));
        self.links_not_synced = links;
    }

    fn source_of(&self, path: &Path) -> Option<String> {
        if self.config.is_report(path) {
            return None;
        }
        self.config
            .sources
            .iter()
            .find(|source| watch::source_matches(source, path))
            .map(|source| source.name.clone())
    }

    fn on_file_changed(&mut self, path: PathBuf) {
        if !self.files.contains_key(&path) {
            let Some(source) = self.source_of(&path) else {
                return;
            };
            // A link that is not a source is noted by the next rescan, never synced.
            let admitted = self.config.source(&source).is_some_and(|config| {
                matches!(
                    watch::admit(config, &path),
                    watch::Admission::File | watch::Admission::Link(_)
                )
            });
            if !admitted || watch::fingerprint(&path).is_none() {
                return;
            }
            info!(file = %path.display(), source = %source, "new file");
            let tracked = Tracked::new(&source, sync::file_key(&path), false);
            self.files.insert(path.clone(), tracked);
        }
        let max_attempts = self.config.watch.max_attempts;
        let fingerprint = watch::fingerprint(&path);
        if let Some(tracked) = self.files.get_mut(&path) {
            tracked.saw_change(fingerprint, Instant::now(), max_attempts);
        }
    }

    fn on_file_gone(&mut self, path: &Path) {
        let Some(tracked) = self.files.remove(path) else {
            return;
        };
        if tracked.is_syncing() {
            // Keep tracking until the sync finishes; the next rescan decides again.
            self.files.insert(path.to_path_buf(), tracked);
            return;
        }
        info!(file = %path.display(), source = %tracked.source, "file removed from the folder; its deals stay as they are");
        self.record_status(
            path,
            &tracked.source,
            FileState::Removed,
            0,
            None,
            Some("the file was removed from the folder".to_string()),
        );
    }

    fn on_tick(&mut self) {
        // `/healthz` tells a stuck loop by this.
        self.heartbeat.beat();
        if let Some((interval, last)) = self.watchdog {
            if last.elapsed() >= interval / 2 {
                systemd::watchdog();
                self.watchdog = Some((interval, Instant::now()));
            }
        }
        if !self.ready_sent {
            systemd::extend_start_timeout(Duration::from_secs(30));
        }
        // A write-back waiting for Excel or LibreOffice to close the file goes ahead once the
        // lock file is gone.
        let settle = self.config.watch.settle;
        let now = Instant::now();
        for (path, tracked) in self
            .files
            .iter_mut()
            .filter(|(_, tracked)| tracked.waits_for_close())
        {
            if crate::watch::open_by(path).is_none() {
                debug!(file = %path.display(), "closed; writing back");
                tracked.closed(now, settle);
            }
        }
        self.maybe_write_report();
        if self.mail_checked_at.elapsed() >= MAIL_RETRY {
            self.mail_checked_at = Instant::now();
            if !self.mail_busy && !self.shutting_down && self.config.smtp.is_some() {
                self.store.send(StoreJob::CountPendingMail);
            }
        }
        // Deals changed by another process (the CLI) or by another file's sync must reach the
        // files that show them.
        let poll = if self.listening {
            STORE_POLL_LISTENING
        } else {
            STORE_POLL
        };
        if self.store_checked_at.elapsed() >= poll && !self.store_version_asked {
            self.store_checked_at = Instant::now();
            self.store_version_asked = true;
            self.store.send(StoreJob::ReadVersion);
        }
    }

    /// The store's change counter is now `version`: when it moved on, the files that show a deal
    /// changed since the counter last looked at (but `except`, which shows it already) are synced
    /// again.
    fn store_moved_to(&mut self, version: i64, except: Option<&Path>) {
        let since = self.store_version;
        if since.is_some_and(|since| version <= since) {
            return;
        }
        self.store_version = Some(version);
        match since {
            // Unknown before: every file that writes back may be behind.
            None => self.resync_files_behind(None, except),
            Some(since) => self.store.send(StoreJob::FilesBehind {
                since,
                except: except.map(Path::to_path_buf),
            }),
        }
    }

    /// Schedules a sync of every file that writes back and shows a changed deal (`behind`, by
    /// file key; every such file when it is unknown): files that show every deal (or a
    /// filter's), and files holding a changed deal. A file that shows only its own rows is not
    /// touched by changes to other deals, so a new deal does not rewrite every file.
    fn resync_files_behind(&mut self, behind: Option<&HashSet<String>>, except: Option<&Path>) {
        let settle = self.config.watch.settle;
        let views: HashMap<String, View> = self
            .config
            .sources
            .iter()
            .filter(|source| source.write_back)
            .map(|source| (source.name.clone(), source.view))
            .collect();
        let now = Instant::now();
        for (path, tracked) in self.files.iter_mut() {
            let shows_change = match (views.get(&tracked.source), behind) {
                (None, _) => false,
                (Some(_), None) | (Some(View::All), _) => true,
                (Some(View::Rows), Some(behind)) => behind.contains(&tracked.key),
            };
            if shows_change && Some(path.as_path()) != except {
                if tracked.waiting == tracked::Waiting::NewVersion {
                    debug!(file = %path.display(), "refused until the file changes; the store's change does not make it readable");
                }
                tracked.store_changed(now, settle);
            }
        }
    }

    /// If the daemon was down when a run was due, run once now (not once per missed day).
    fn catch_up_reminders(&mut self, last: Result<Option<chrono::DateTime<Utc>>, StoreError>) {
        let Some(remind) = self.config.remind.clone() else {
            return;
        };
        let Some(due) = crate::remind::previous_due(&remind, Utc::now()) else {
            return;
        };
        match last {
            Ok(Some(last)) if last >= due => {
                debug!(due = %due, "the reminder run last due has run; nothing to catch up")
            }
            // A store that never ran reminders starts with the next due time: installing
            // funnelsync does not send a burst of mail.
            Ok(None) => {}
            Ok(Some(_)) => {
                info!(due = %due, "the reminder run was missed while funnelsync was down; running it now");
                self.start_reminders(due);
            }
            Err(error) => warn!("cannot read the reminder history: {error}"),
        }
    }

    /// Runs the reminders due at `due` on a worker thread.
    fn start_reminders(&mut self, due: chrono::DateTime<Utc>) {
        if self.mail_busy || self.shutting_down {
            // The run in progress covers it; a run about the same stalls would be deduplicated anyway.
            return;
        }
        self.spawn_mail_job(move |store, config, runtime| {
            let report = crate::remind::outbox::run(
                store,
                config,
                Utc::now(),
                due,
                false,
                false,
                runtime,
            )?;
            let summary = format!(
                "reminder run: {} stalled deal(s), {} message(s): {} sent, {} to retry, {} refused, {} given up; {}",
                report.n_stalled,
                report.messages.len(),
                report.delivery.sent,
                report.delivery.retrying,
                report.delivery.refused,
                report.delivery.failed,
                report.delivery.errors.join("; ")
            );
            Ok((summary, report.delivery.retrying + report.delivery.failed > 0))
        });
    }

    /// Runs a mail job (reminders, digest, retries) on a worker thread, one at a time; the loop
    /// hears how it went through [`Event::MailFinished`]. The mail itself goes out on the
    /// daemon's runtime.
    fn spawn_mail_job(
        &mut self,
        job: impl FnOnce(&mut Store, &Config, &tokio::runtime::Handle) -> Result<(String, bool), JobError>
            + Send
            + 'static,
    ) {
        self.mail_busy = true;
        let config = Arc::clone(&self.config);
        let runtime = tokio::runtime::Handle::current();
        self.spawn_job(Event::MailFinished, move || {
            with_store(&config, |store| job(store, &config, &runtime))
        });
    }

    /// Runs `job` on a worker thread and tells the loop its result as `event(result)`, even when
    /// the job panics.
    fn spawn_job<T: Send + 'static>(
        &self,
        event: fn(Result<T, JobError>) -> Event,
        job: impl FnOnce() -> Result<T, JobError> + Send + 'static,
    ) {
        let sender = self.sender.clone();
        tokio::spawn(async move {
            let result = match tokio::task::spawn_blocking(move || {
                let _scope = BlockingScope::enter();
                job()
            })
            .await
            {
                Ok(result) => result,
                Err(error) => Err(JobError::Panicked(error)),
            };
            let _ = sender.send(event(result)).await;
        });
    }

    fn on_mail_finished(&mut self, result: Result<(String, bool), JobError>) {
        self.mail_busy = false;
        match result {
            Ok((summary, trouble)) => {
                info!("{summary}");
                if trouble {
                    self.alert(
                        "mail".to_string(),
                        "mail cannot be delivered".to_string(),
                        summary,
                    );
                }
            }
            Err(error) => {
                error!("reminders: {error}");
                self.alert(
                    "mail".to_string(),
                    "reminders failed".to_string(),
                    error.to_string(),
                );
            }
        }
    }

    /// Rewrites the funnel report when it is due: after syncs changed the store (once they are
    /// done), or every interval.
    fn maybe_write_report(&mut self) {
        let Some(report) = self.config.report.clone() else {
            return;
        };
        if self.report_busy
            || self.shutting_down
            || self.n_in_flight > 0
            || !self.ready_sent
            || Instant::now() < self.report_next_at
        {
            return;
        }
        let due = match report.refresh {
            crate::config::ReportRefresh::AfterSync => self.report_dirty,
            crate::config::ReportRefresh::Every(_) => true,
        };
        if !due {
            return;
        }
        self.report_busy = true;
        self.report_dirty = false;
        if let crate::config::ReportRefresh::Every(every) = report.refresh {
            self.report_next_at = later(every);
        }
        let config = Arc::clone(&self.config);
        self.spawn_job(Event::ReportWritten, move || {
            let now = Utc::now();
            // Daemons sharing a store write the report one at a time, and an interval's report
            // once: the one that finds its interval done leaves it.
            let slot = match report.refresh {
                crate::config::ReportRefresh::Every(every) => {
                    let seconds = every.as_secs().max(1) as i64;
                    chrono::DateTime::from_timestamp(now.timestamp() / seconds * seconds, 0)
                }
                crate::config::ReportRefresh::AfterSync => None,
            };
            with_store(&config, |store| {
                store.exclusively("report", |store| -> Result<(), JobError> {
                    if let Some(slot) = slot {
                        if crate::store::jobs::done(&store.db(), "report", slot)? {
                            debug!(
                                "the funnel report of this interval was written by another daemon"
                            );
                            return Ok(());
                        }
                    }
                    crate::report::write_configured(store, &config, &report, now)?;
                    if let Some(slot) = slot {
                        crate::store::jobs::claim_due(&store.db(), "report", slot, now)?;
                    }
                    Ok(())
                })
            })
        });
    }

    fn on_report_written(&mut self, result: Result<(), JobError>) {
        self.report_busy = false;
        match result {
            Ok(()) => debug!("funnel report written"),
            Err(error) => {
                // Open in Excel, or the share is away: try again in a while.
                info!("funnel report not written yet: {error}");
                self.report_dirty = true;
                self.report_next_at = Instant::now() + Duration::from_secs(30);
            }
        }
    }

    fn start_weekly_digest(&mut self, due: chrono::DateTime<Utc>) {
        if self.mail_busy || self.shutting_down {
            return;
        }
        self.spawn_mail_job(move |store, config, runtime| {
            let Some(delivery) =
                crate::report::send_weekly_digest(store, config, Utc::now(), Some(due), runtime)?
            else {
                return Ok((
                    "weekly digest: sent by another daemon sharing the store".to_string(),
                    false,
                ));
            };
            let summary = format!(
                "weekly digest: {} sent, {} to retry",
                delivery.sent, delivery.retrying
            );
            Ok((summary, delivery.retrying + delivery.failed > 0))
        });
    }

    /// Emails the admin (rate-limited per key) on a worker thread; never blocks the loop, and a
    /// shutdown waits for it.
    fn alert(&mut self, key: String, subject: String, body: String) {
        if self.config.alerts.is_none() {
            return;
        }
        self.n_alerts_in_flight += 1;
        let config = Arc::clone(&self.config);
        let runtime = tokio::runtime::Handle::current();
        self.spawn_job(
            |result: Result<bool, JobError>| {
                if let Err(error) = result {
                    warn!("cannot send an alert: {error}");
                }
                Event::AlertDone
            },
            move || {
                let sent = with_store(&config, |store| {
                    Ok(crate::alerts::raise(
                        store,
                        &config,
                        &key,
                        &subject,
                        &body,
                        Utc::now(),
                        &runtime,
                    )?)
                })?;
                if !sent {
                    debug!(key = %key, "an alert like this went out within [alerts] every; not sent again");
                }
                Ok(sent)
            },
        );
    }

    /// Sends pending mail whose retry time has come, on a worker thread.
    fn retry_mail(&mut self) {
        if self.mail_busy || self.shutting_down || self.config.smtp.is_none() {
            return;
        }
        self.spawn_mail_job(|store, config, runtime| {
            let now = Utc::now();
            let report = crate::mail::outbox::deliver(store, config, now, false, runtime)?;
            crate::alerts::mail_refused(store, config, &report.refusals, now, runtime);
            let summary = format!(
                "mail retry: {} sent, {} to retry, {} refused, {} given up; {}",
                report.sent,
                report.retrying,
                report.refused,
                report.failed,
                report.errors.join("; ")
            );
            Ok((summary, report.retrying + report.failed > 0))
        });
    }

    /// Starts syncs for files that have settled, up to the parallel bound.
    fn start_due_syncs(&mut self) {
        let now = Instant::now();
        let settle = self.config.watch.settle;
        let mut due: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, tracked)| tracked.is_due(now, settle))
            .map(|(path, _)| path.clone())
            .collect();
        due.sort();
        for path in due {
            if self.n_in_flight >= self.config.watch.parallel {
                break;
            }
            let fingerprint = watch::fingerprint(&path);
            let Some(tracked) = self.files.get_mut(&path) else {
                continue;
            };
            match tracked.look(fingerprint, now) {
                Look::Gone => self.on_file_gone(&path),
                Look::Changed => {
                    debug!(file = %path.display(), "changed again while settling; settling again")
                }
                // An event without new content (a touch of metadata, our own write).
                Look::NothingNew => {
                    debug!(file = %path.display(), "unchanged since its last sync; nothing to do")
                }
                Look::Sync => {
                    let source_name = tracked.source.clone();
                    let force = std::mem::take(&mut tracked.force);
                    self.n_in_flight += 1;
                    self.spawn_sync(path, source_name, fingerprint, force);
                }
            }
        }
    }

    /// Schedules a sync of a held file that applies it despite the mass-delete guard.
    fn force_sync(&mut self, file: &str) {
        let settle = self.config.watch.settle;
        let now = Instant::now();
        match self
            .files
            .iter_mut()
            .find(|(_, tracked)| tracked.key == file)
        {
            Some((path, tracked)) => {
                info!(file = %path.display(), "applying the file as asked, even where the guard would hold it");
                tracked.forced(now, settle);
            }
            None => warn!(file, "asked to apply a file the daemon does not watch"),
        }
    }

    fn spawn_sync(
        &self,
        path: PathBuf,
        source_name: String,
        fingerprint: Option<Fingerprint>,
        force: bool,
    ) {
        let config = Arc::clone(&self.config);
        let sender = self.sender.clone();
        tokio::spawn(async move {
            let worker_path = path.clone();
            let worker = tokio::task::spawn_blocking(move || {
                let _scope = BlockingScope::enter();
                let path = worker_path;
                let outcome = match config.source(&source_name) {
                    None => Err(JobError::SourceGone(source_name)),
                    Some(source) => with_store(&config, |store| {
                        Ok(sync::sync_file_with(
                            store,
                            &config,
                            source,
                            &path,
                            Utc::now(),
                            force,
                        )?)
                    }),
                };
                // After writing the file back, its new fingerprint is what "already synced"
                // means, so the daemon's own write does not trigger another sync.
                let written = match &outcome {
                    Ok(report) if report.write_back == sync::WriteBack::Written => {
                        Some(watch::fingerprint(&path))
                    }
                    _ => None,
                };
                (outcome, written)
            });
            let (outcome, fingerprint) = match worker.await {
                Ok((outcome, written)) => (outcome, written.unwrap_or(fingerprint)),
                Err(error) => (Err(JobError::Panicked(error)), fingerprint),
            };
            let _ = sender
                .send(Event::SyncFinished {
                    path,
                    fingerprint,
                    outcome: Box::new(outcome),
                })
                .await;
        });
    }

    fn on_sync_finished(
        &mut self,
        path: PathBuf,
        fingerprint: Option<Fingerprint>,
        outcome: Result<FileReport, JobError>,
    ) {
        self.n_in_flight = self.n_in_flight.saturating_sub(1);
        let settle = self.config.watch.settle;
        let max_attempts = self.config.watch.max_attempts;
        let Some(tracked) = self.files.get_mut(&path) else {
            return;
        };
        let error_text = outcome.as_ref().err().map(ToString::to_string);
        if let Ok(FileReport {
            status: crate::sync::FileStatus::Unchanged,
            ..
        }) = &outcome
        {
            self.heartbeat.count_unchanged_sync();
        }
        let applied = tracked.apply_outcome(
            &path,
            match (&outcome, &error_text) {
                (Ok(report), _) => Outcome::Report(report),
                (Err(_), Some(message)) => Outcome::Error(message),
                (Err(_), None) => Outcome::Error(""),
            },
            fingerprint,
            max_attempts,
            settle,
            Instant::now(),
        );
        let source = tracked.source.clone();
        let attempts = tracked.attempts;
        let retry_at = tracked
            .retry_at()
            .map(|retry_at| Utc::now() + (retry_at.saturating_duration_since(Instant::now())));
        log_outcome(&path, &outcome, &applied.verdict);
        // The file now shows the store as of its sync; the other files that write back need a
        // look if the store moved on.
        if let Ok(FileReport {
            store_version: Some(version),
            ..
        }) = &outcome
        {
            self.store_moved_to(*version, Some(&path));
        }
        if let Ok(report) = &outcome {
            if report.status == FileStatus::Synced {
                self.report_dirty = true;
            }
            self.last_sync_summary = Some(format!(
                "last sync {} {} ({})",
                Utc::now().format("%H:%M:%S"),
                path.file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                match report.status {
                    FileStatus::Synced => "synced",
                    FileStatus::Unchanged => "unchanged",
                    FileStatus::Failed => "failed",
                    FileStatus::Held => "held",
                }
            ));
        }
        self.record_status(
            &path,
            &source,
            applied.state,
            attempts,
            retry_at,
            applied.error,
        );
        self.publish_status();
        for alert in applied.alerts {
            self.alert(alert.key, alert.subject, alert.body);
        }
    }

    fn record_status(
        &mut self,
        path: &Path,
        source: &str,
        state: FileState,
        attempts: u32,
        next_retry_at: Option<chrono::DateTime<Utc>>,
        last_error: Option<String>,
    ) {
        self.store.send(StoreJob::RecordStatus(FileStatusRecord {
            file: sync::file_key(path),
            source: source.to_string(),
            state,
            attempts,
            next_retry_at,
            last_error,
            updated_at: Utc::now(),
        }));
    }

    fn publish_status(&self) {
        let n_failing = self
            .files
            .values()
            .filter(|tracked| tracked.attempts > 0)
            .count();
        let mut status = format!("watching {} file(s)", self.files.len());
        if let Some(summary) = &self.last_sync_summary {
            status.push_str("; ");
            status.push_str(summary);
        }
        if n_failing > 0 {
            status.push_str(&format!("; {n_failing} file(s) failing"));
        }
        systemd::status(&status);
    }

    /// READY=1 once every file found at start has had its first sync attempt.
    fn check_ready(&mut self) {
        if self.ready_sent {
            return;
        }
        let waiting = self.files.values().any(Tracked::holds_up_start);
        if !waiting {
            self.ready_sent = true;
            info!(n_files = self.files.len(), "initial scan done; ready");
            systemd::ready();
            self.publish_status();
        }
    }

    fn reload(&mut self) {
        info!(config = %self.config.path.display(), "reloading the config");
        systemd::reloading();
        match Config::load(&self.config.path) {
            Err(error) => {
                error!("the new config is not valid; still running on the old one: {error}");
            }
            Ok(new_config) => {
                let old_names: HashSet<String> = self
                    .config
                    .sources
                    .iter()
                    .map(|source| source.name.clone())
                    .collect();
                let new_names: HashSet<String> = new_config
                    .sources
                    .iter()
                    .map(|source| source.name.clone())
                    .collect();
                for added in new_names.difference(&old_names) {
                    info!(source = %added, "source added");
                }
                for removed in old_names.difference(&new_names) {
                    info!(source = %removed, "source removed; its files are no longer synced and their deals stay");
                }
                if new_config.store != self.config.store {
                    warn!("a new [store] takes effect only after a restart");
                }
                let mut new_config = new_config;
                new_config.store = self.config.store.clone();
                self.config = Arc::new(new_config);
                if let Some(http) = &self.http {
                    if let Err(error) = http.reload(Arc::clone(&self.config)) {
                        error!("the HTTP users could not be reloaded; still serving the old ones: {error}");
                    }
                }
                // Forget files of removed sources without treating them as removed files.
                self.files.retain(|_, tracked| {
                    new_names.contains(&tracked.source) || tracked.is_syncing()
                });
                self.workers = workers::start_workers(&self.config, &self.sender);
                let watcher = self.workers.watcher_health(self.config.watch.mode);
                self.heartbeat.set_watcher(watcher);
                self.rescan(false);
                info!("config reloaded");
            }
        }
        systemd::ready();
        self.publish_status();
    }
}

/// Logs how a sync ended, as the transition judged it.
fn log_outcome(path: &Path, outcome: &Result<FileReport, JobError>, verdict: &Verdict) {
    let file_name = path.display().to_string();
    if let Ok(report) = outcome {
        if !matches!(report.status, FileStatus::Failed | FileStatus::Held) {
            let counts = &report.counts;
            let n_errors = report.n_row_errors();
            if report.status == FileStatus::Synced || n_errors > 0 {
                info!(
                    file = %file_name,
                    created = counts.created,
                    updated = counts.updated,
                    archived = counts.archived + counts.deleted,
                    unchanged = counts.unchanged,
                    row_errors = n_errors,
                    "synced"
                );
            } else {
                debug!(file = %file_name, unchanged = counts.unchanged, "no changes");
            }
            for issue in report
                .issues
                .iter()
                .filter(|issue| issue.severity == crate::mapping::Severity::Error)
            {
                warn!(file = %file_name, sheet = report.sheet.as_deref().unwrap_or(""), "{issue}");
            }
        }
    }
    match verdict {
        Verdict::Synced => {
            if let Ok(FileReport {
                write_back: sync::WriteBack::Written,
                ..
            }) = outcome
            {
                info!(file = %file_name, "wrote the store's changes back into the file");
            }
        }
        Verdict::WriteDeferred => {
            if let Ok(FileReport {
                write_back: sync::WriteBack::Deferred(message),
                ..
            }) = outcome
            {
                info!(file = %file_name, "{message}");
            }
        }
        Verdict::WriteBackFailed(message) => {
            warn!(file = %file_name, "cannot write back: {message}")
        }
        Verdict::Held(message) => error!(file = %file_name, "{message}"),
        Verdict::Retry {
            attempt: 1,
            message,
        } => {
            warn!(file = %file_name, "cannot read the file yet, will retry (nothing applied): {message}")
        }
        Verdict::Retry { attempt, message } => {
            debug!(file = %file_name, attempts = attempt, "still cannot read the file: {message}")
        }
        Verdict::GaveUp { attempts, message } => {
            error!(file = %file_name, attempts = attempts, "cannot read the file; giving up until it changes: {message}")
        }
        Verdict::Refused(message) => {
            error!(file = %file_name, "cannot sync the file until it changes (nothing applied): {message}")
        }
        Verdict::StoreFailed(message) => {
            error!(file = %file_name, "sync failed, will retry: {message}")
        }
    }
}

/// Opens a connection to the store for one job on a worker thread.
fn with_store<T>(
    config: &Config,
    job: impl FnOnce(&mut Store) -> Result<T, JobError>,
) -> Result<T, JobError> {
    crate::store::with_store(&config.store, false, job)
}

/// Listens, on a thread and a connection of its own, for the commits a PostgreSQL store
/// announces, and tells the loop the new change counter at once. When the connection drops the
/// loop polls the counter (every half second) until it is back; it is opened again with backoff.
/// The thread ends when the loop is gone.
fn listen_for_changes(config: crate::config::StoreConfig, events: mpsc::Sender<Event>) {
    let StoreLocation::Postgres(postgres) = config.location else {
        return;
    };
    let started = std::thread::Builder::new()
        .name("funnelsync-listen".to_string())
        .spawn(move || {
            let _scope = BlockingScope::enter();
            let mut backoff = Duration::from_secs(1);
            while !events.is_closed() {
                match crate::store::Listener::start(&postgres) {
                    Ok(mut listener) => {
                        backoff = Duration::from_secs(1);
                        if events.blocking_send(Event::Listening(true)).is_err() {
                            return;
                        }
                        loop {
                            if events.is_closed() {
                                return;
                            }
                            match listener.wait(Duration::from_secs(1)) {
                                Ok(Some(version)) => {
                                    if events.blocking_send(Event::StoreNotified(version)).is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {}
                                Err(error) => {
                                    warn!("lost the connection that listens for the store's changes: {error}");
                                    break;
                                }
                            }
                        }
                        if events.blocking_send(Event::Listening(false)).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        debug!("cannot listen for the store's changes yet: {error}");
                    }
                }
                let deadline = Instant::now() + backoff;
                while Instant::now() < deadline && !events.is_closed() {
                    std::thread::sleep(Duration::from_millis(200));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    if let Err(error) = started {
        warn!("cannot start listening for the store's changes; polling instead: {error}");
    }
}

/// Farther than any configured duration may reach (the config caps them far below).
const FAR_AWAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The instant `wait` from now, never overflowing: no value in the config can panic the daemon.
fn later(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR_AWAY))
        .unwrap_or(now)
}
