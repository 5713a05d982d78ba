//! `funnelsync run`: the long-running daemon. Every source of events — the file-system watcher,
//! the timers, the signals and the sync workers — is a worker task that sends one closed [`Event`]
//! to a single loop, so every trigger is handled in one place.
//!
//! The loop owns the per-file state machine: a file is read only once it has been unchanged for
//! `settle`; at most one sync per file runs at a time (changes during a sync cause exactly one more
//! sync afterwards); failed reads are retried with backoff and then left alone until the file
//! changes; a file gone from the folder archives nothing. Two classes of error: fatal ones (the
//! store cannot be opened) stop the daemon; per-file and per-row ones are logged, recorded and the
//! daemon goes on. This module must not know how a file is parsed or diffed (that is `sync`).

pub(crate) mod systemd;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::config::{Config, WatchMode};
use crate::status::{self, FileState, FileStatusRecord};
use crate::store::Store;
use crate::sync::{self, FileReport, FileStatus};
use crate::watch::{self, Fingerprint};

/// How often the loop looks at its timers (settling, retries, the watchdog).
const TICK: Duration = Duration::from_millis(100);
/// The longest wait between retries of a failing file.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the store's change counter is checked.
const STORE_POLL: Duration = Duration::from_millis(500);
/// How often pending mail is looked at for retries.
const MAIL_RETRY: Duration = Duration::from_secs(20);
/// How long a shutdown waits for syncs in progress to commit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
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
        outcome: Box<Result<FileReport, String>>,
    },
    /// SIGHUP: re-read the config.
    Reload,
    /// SIGTERM or SIGINT.
    Shutdown,
    /// The daily reminder run is due (the due time it is for).
    RemindDue(chrono::DateTime<Utc>),
    /// A reminder run or a delivery of pending mail finished.
    MailFinished(Result<(String, bool), String>),
    /// The weekly digest to the manager is due.
    WeeklyDigestDue,
    /// The funnel report file was written (or could not be).
    ReportWritten(Result<(), String>),
    /// An admin asked (through HTTP) to apply this held file (by its key) despite the guard.
    ForceSync(String),
}

/// The loop's knowledge of one file.
#[derive(Debug, Clone)]
struct Tracked {
    source: String,
    /// The file's key in the store ([`sync::file_key`]), worked out once.
    key: String,
    /// The fingerprint last seen by a stat.
    seen: Option<Fingerprint>,
    /// The fingerprint of the content last read successfully (or given up on).
    done: Option<Fingerprint>,
    /// When a change was last observed; the file is read once `settle` has passed since.
    changed_at: Option<Instant>,
    in_flight: bool,
    /// A change came in while a sync was running.
    dirty_again: bool,
    attempts: u32,
    retry_at: Option<Instant>,
    /// Whether the first attempt after start (or after being added by a reload) is still to come.
    initial: bool,
    /// The write-back waits for the file to be closed in Excel or LibreOffice.
    write_deferred: bool,
    /// The last read refused the file for a reason only a new version can fix (malformed, over a
    /// limit, given up on): a change in the store does not make it worth reading again, only a
    /// change of the file does.
    refused: bool,
    /// The next sync applies the file even where the mass-delete guard would hold it (asked for
    /// by an admin).
    force: bool,
}

impl Tracked {
    fn new(source: &str, path: &Path) -> Tracked {
        Tracked {
            source: source.to_string(),
            key: sync::file_key(path),
            seen: None,
            done: None,
            changed_at: None,
            in_flight: false,
            dirty_again: false,
            attempts: 0,
            retry_at: None,
            initial: true,
            write_deferred: false,
            refused: false,
            force: false,
        }
    }
}

/// The worker tasks that depend on the config; replaced on reload.
struct Workers {
    /// Held only to keep it alive: dropping the watcher stops its events.
    _watcher: Option<watch::Watcher>,
    rescan: Option<JoinHandle<()>>,
    remind: Option<JoinHandle<()>>,
    weekly: Option<JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in [self.rescan.take(), self.remind.take(), self.weekly.take()]
            .into_iter()
            .flatten()
        {
            worker.abort();
        }
    }
}

struct Daemon {
    config: Arc<Config>,
    sender: mpsc::UnboundedSender<Event>,
    files: HashMap<PathBuf, Tracked>,
    store: Store,
    workers: Workers,
    n_in_flight: usize,
    ready_sent: bool,
    shutting_down: bool,
    last_sync_summary: Option<String>,
    watchdog: Option<(Duration, Instant)>,
    /// The store's change counter when last looked at, and when that was.
    store_version: Option<i64>,
    store_checked_at: Instant,
    /// A reminder run or mail delivery is in progress.
    mail_busy: bool,
    /// When pending mail was last looked at.
    mail_checked_at: Instant,
    /// The report file needs writing (after a sync that changed the store).
    report_dirty: bool,
    report_busy: bool,
    /// Not before this (the file was open, or the next interval).
    report_next_at: Instant,
    /// Symbolic links in watched folders that are not sources, by path: (source, reason). Each
    /// is logged once, when first seen.
    links_not_synced: HashMap<PathBuf, (String, String)>,
    /// The HTTP server of `[http]`, on a runtime of its own, and the loop's heartbeat it shows.
    http: Option<crate::http::Server>,
    heartbeat: Arc<crate::http::Heartbeat>,
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

async fn run_async(config: Config) -> Result<(), DaemonError> {
    let store = Store::open(&config.store.path)?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    spawn_signal_workers(&sender);
    spawn_tick_worker(&sender);
    let config = Arc::new(config);
    let workers = start_workers(&config, &sender);
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
        store_version: None,
        store_checked_at: Instant::now(),
        mail_busy: false,
        mail_checked_at: Instant::now(),
        report_dirty: true,
        report_busy: false,
        report_next_at: Instant::now(),
        links_not_synced: HashMap::new(),
        http: None,
        heartbeat: Arc::new(crate::http::Heartbeat::default()),
    };
    daemon.heartbeat.beat();
    if daemon.config.http.is_some() {
        let events = daemon.sender.clone();
        let link = crate::http::DaemonLink {
            heartbeat: Arc::clone(&daemon.heartbeat),
            force_sync: Box::new(move |file| events.send(Event::ForceSync(file)).is_ok()),
        };
        daemon.http = Some(crate::http::Server::start(
            Arc::clone(&daemon.config),
            Some(link),
        )?);
    }
    daemon.store_version = daemon.current_store_version();
    info!(
        n_sources = daemon.config.sources.len(),
        mode = ?daemon.config.watch.mode,
        store = %daemon.config.store.path.display(),
        "funnelsync daemon starting"
    );
    for source in &daemon.config.sources {
        let n_removed = watch::remove_stale_temp_files(source);
        if n_removed > 0 {
            info!(source = %source.name, n_removed, "removed temp files left by an interrupted write");
        }
    }
    daemon.rescan(true);
    daemon.start_due_syncs();
    daemon.check_ready();
    daemon.catch_up_reminders();

    let mut shutdown_deadline: Option<Instant> = None;
    while let Some(event) = receiver.recv().await {
        match event {
            Event::FileChanged(path) => daemon.on_file_changed(path),
            Event::WatcherFailed(error) => {
                warn!("file watcher error (the periodic rescan still covers every file): {error}")
            }
            Event::Rescan => daemon.rescan(false),
            Event::Tick => daemon.on_tick(),
            Event::SyncFinished {
                path,
                fingerprint,
                outcome,
            } => daemon.on_sync_finished(path, fingerprint, *outcome),
            Event::Reload => daemon.reload(),
            Event::RemindDue(due) => daemon.start_reminders(due),
            Event::WeeklyDigestDue => daemon.start_weekly_digest(),
            Event::ReportWritten(result) => daemon.on_report_written(result),
            Event::ForceSync(file) => daemon.force_sync(&file),
            Event::MailFinished(result) => {
                daemon.mail_busy = false;
                match result {
                    Ok((summary, trouble)) => {
                        info!("{summary}");
                        if trouble {
                            daemon.alert(
                                "mail".to_string(),
                                "mail cannot be delivered".to_string(),
                                summary,
                            );
                        }
                    }
                    Err(message) => {
                        error!("reminders: {message}");
                        daemon.alert("mail".to_string(), "reminders failed".to_string(), message);
                    }
                }
            }
            Event::Shutdown => {
                if !daemon.shutting_down {
                    info!(
                        n_in_flight = daemon.n_in_flight,
                        "shutting down: no new syncs; waiting for syncs in progress"
                    );
                    systemd::stopping();
                    daemon.shutting_down = true;
                    shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                }
            }
        }
        if daemon.shutting_down {
            if daemon.n_in_flight == 0 && !daemon.mail_busy && !daemon.report_busy {
                break;
            }
            if shutdown_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                warn!(
                    n_in_flight = daemon.n_in_flight,
                    "syncs still running at shutdown; they will be rolled back"
                );
                break;
            }
            continue;
        }
        daemon.start_due_syncs();
        daemon.check_ready();
    }
    if let Some(http) = daemon.http.take() {
        http.stop();
    }
    info!("funnelsync daemon stopped");
    Ok(())
}

fn spawn_signal_workers(sender: &mpsc::UnboundedSender<Event>) {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, make_event) in [
        (SignalKind::hangup(), (|| Event::Reload) as fn() -> Event),
        (SignalKind::terminate(), || Event::Shutdown),
        (SignalKind::interrupt(), || Event::Shutdown),
    ] {
        let sender = sender.clone();
        match signal(kind) {
            Ok(mut stream) => {
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if sender.send(make_event()).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(error) => warn!("cannot listen for signal {kind:?}: {error}"),
        }
    }
}

fn spawn_tick_worker(sender: &mpsc::UnboundedSender<Event>) {
    let sender = sender.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if sender.send(Event::Tick).is_err() {
                break;
            }
        }
    });
}

/// Starts the watcher (unless polling) and the rescan timer (unless events only).
fn start_workers(config: &Config, sender: &mpsc::UnboundedSender<Event>) -> Workers {
    let mode = config.watch.mode;
    let watcher = if mode == WatchMode::Poll {
        None
    } else {
        let sender = sender.clone();
        watch::Watcher::start(config, move |event| {
            let _ = sender.send(match event {
                watch::WatchEvent::Changed(path) => Event::FileChanged(path),
                watch::WatchEvent::Failed(error) => Event::WatcherFailed(error),
            });
        })
    };
    let rescan = if mode == WatchMode::Events && watcher.is_some() {
        None
    } else {
        let sender = sender.clone();
        let period = config.watch.poll_interval;
        Some(tokio::spawn(async move {
            let mut interval = tokio::time::interval_at(later(period).into(), period.min(FAR_AWAY));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if sender.send(Event::Rescan).is_err() {
                    break;
                }
            }
        }))
    };
    let remind = config.remind.clone().map(|remind| {
        let sender = sender.clone();
        tokio::spawn(async move {
            let mut after = Utc::now();
            while let Some(due) = crate::remind::next_due(&remind, after) {
                // Wake at least every minute and look at the wall clock again, so a clock change
                // or a suspended machine does not push the run off.
                loop {
                    let left = (due - Utc::now()).to_std().unwrap_or_default();
                    if left.is_zero() {
                        break;
                    }
                    tokio::time::sleep(left.min(Duration::from_secs(60))).await;
                }
                if sender.send(Event::RemindDue(due)).is_err() {
                    break;
                }
                after = due;
            }
        })
    });
    let timezone = config
        .remind
        .as_ref()
        .map(|remind| remind.timezone)
        .unwrap_or(chrono_tz::UTC);
    let weekly = config
        .report
        .as_ref()
        .and_then(|report| report.weekly_digest)
        .map(|(weekday, at)| {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut after = Utc::now();
                while let Some(due) = crate::clock::next_weekly(timezone, weekday, at, after) {
                    loop {
                        let left = (due - Utc::now()).to_std().unwrap_or_default();
                        if left.is_zero() {
                            break;
                        }
                        tokio::time::sleep(left.min(Duration::from_secs(60))).await;
                    }
                    if sender.send(Event::WeeklyDigestDue).is_err() {
                        break;
                    }
                    after = due;
                }
            })
        });
    Workers {
        _watcher: watcher,
        rescan,
        remind,
        weekly,
    }
}

impl Daemon {
    /// Stats every source file: new and changed files start settling, vanished ones are removed.
    fn rescan(&mut self, initial: bool) {
        let mut present: HashSet<PathBuf> = HashSet::new();
        let mut links_not_synced: HashMap<PathBuf, (String, String)> = HashMap::new();
        let config = Arc::clone(&self.config);
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
                    Tracked::new(&source.name, &path)
                });
                tracked.source = source.name.clone();
                if fingerprint != tracked.seen {
                    tracked.seen = fingerprint;
                    // A file untouched for longer than `settle` (by its own time stamp) needs no
                    // further wait; otherwise settling starts now.
                    let settled_already = fingerprint
                        .is_some_and(|fingerprint| fingerprint.age() >= config.watch.settle);
                    let now = Instant::now();
                    tracked.changed_at = Some(if settled_already {
                        now.checked_sub(config.watch.settle).unwrap_or(now)
                    } else {
                        now
                    });
                }
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
        let mut by_source: HashMap<&str, Vec<(String, String)>> = self
            .config
            .sources
            .iter()
            .map(|source| (source.name.as_str(), Vec::new()))
            .collect();
        for (path, (source, reason)) in &links {
            by_source.entry(source.as_str()).or_default().push((
                sync::file_key(path),
                format!("{}: {reason}", path.display()),
            ));
        }
        let store = &self.store;
        let now = Utc::now();
        let result = tokio::task::block_in_place(|| {
            by_source.iter().try_for_each(|(source, noted)| {
                status::replace_ignored(store.connection(), source, noted, now)
            })
        });
        if let Err(error) = result {
            warn!("cannot record the links that are not sources: {error}");
        }
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
            let mut tracked = Tracked::new(&source, &path);
            tracked.initial = false;
            self.files.insert(path.clone(), tracked);
        }
        let max_attempts = self.config.watch.max_attempts;
        // What the file looks like at this event: when it still looks so once `settle` has passed,
        // it has settled (one settle, not a second one started by the first look).
        let fingerprint = watch::fingerprint(&path);
        if let Some(tracked) = self.files.get_mut(&path) {
            tracked.seen = fingerprint;
            tracked.changed_at = Some(Instant::now());
            // New content is read after `settle`, not after the retry backoff; a file that was
            // given up on gets a fresh set of attempts.
            tracked.retry_at = None;
            if tracked.attempts >= max_attempts {
                tracked.attempts = 0;
            }
            if tracked.in_flight {
                tracked.dirty_again = true;
            }
        }
    }

    fn on_file_gone(&mut self, path: &Path) {
        let Some(tracked) = self.files.remove(path) else {
            return;
        };
        if tracked.in_flight {
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
        for (path, tracked) in self
            .files
            .iter_mut()
            .filter(|(_, tracked)| tracked.write_deferred && !tracked.in_flight)
        {
            if crate::watch::open_by(path).is_none() {
                debug!(file = %path.display(), "closed; writing back");
                tracked.write_deferred = false;
                tracked.changed_at = Some(
                    Instant::now()
                        .checked_sub(settle)
                        .unwrap_or_else(Instant::now),
                );
                // The content on disk is what was last synced; the sync is owed to the store's
                // changes, so it must not be dropped as "nothing new".
                tracked.done = None;
            }
        }
        self.maybe_write_report();
        if self.mail_checked_at.elapsed() >= MAIL_RETRY {
            self.mail_checked_at = Instant::now();
            self.retry_mail();
        }
        // Deals changed by another process (the CLI) or by another file's sync must reach the
        // files that show them.
        if self.store_checked_at.elapsed() >= STORE_POLL {
            self.store_checked_at = Instant::now();
            if let Some(version) = self.current_store_version() {
                self.store_moved_to(version, None);
            }
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
        self.resync_files_behind(since, except);
    }

    /// Schedules a sync of every file that writes back and shows a deal changed after the
    /// counter was `since` (every such file when `since` is unknown): files that show every deal
    /// (or a filter's), and files holding a changed deal. A file that shows only its own rows
    /// is not touched by changes to other deals, so a new deal does not rewrite every file.
    fn resync_files_behind(&mut self, since: Option<i64>, except: Option<&Path>) {
        let settle = self.config.watch.settle;
        let views: HashMap<String, crate::config::View> = self
            .config
            .sources
            .iter()
            .filter(|source| source.write_back)
            .map(|source| (source.name.clone(), source.view))
            .collect();
        let behind = match since {
            None => None,
            Some(since) => {
                let store = &self.store;
                match tokio::task::block_in_place(|| sync::files_with_changes_since(store, since)) {
                    Ok(files) => Some(files),
                    Err(error) => {
                        warn!("cannot tell which files show the store's changes; syncing every file that writes back: {error}");
                        None
                    }
                }
            }
        };
        let now = Instant::now();
        for (path, tracked) in self.files.iter_mut() {
            let shows_change = match (views.get(&tracked.source), &behind) {
                (None, _) => false,
                (Some(_), None) | (Some(crate::config::View::All), _) => true,
                (Some(crate::config::View::Rows), Some(behind)) => behind.contains(&tracked.key),
            };
            if !shows_change || Some(path.as_path()) == except || tracked.refused {
                continue;
            }
            if tracked.in_flight {
                tracked.dirty_again = true;
            } else if tracked.retry_at.is_none() {
                tracked.changed_at = Some(now.checked_sub(settle).unwrap_or(now));
                // Same content on disk, new content in the store: sync even so.
                tracked.done = None;
            }
        }
    }

    /// If the daemon was down when a run was due, run once now (not once per missed day).
    fn catch_up_reminders(&mut self) {
        let Some(remind) = self.config.remind.clone() else {
            return;
        };
        let Some(due) = crate::remind::previous_due(&remind, Utc::now()) else {
            return;
        };
        let last = tokio::task::block_in_place(|| crate::remind::outbox::last_run_due(&self.store));
        match last {
            Ok(Some(last)) if last >= due => {}
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
            )
                .map_err(|error| error.to_string())?;
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
        job: impl FnOnce(&mut Store, &Config, &tokio::runtime::Handle) -> Result<(String, bool), String>
            + Send
            + 'static,
    ) {
        self.mail_busy = true;
        let config = Arc::clone(&self.config);
        let sender = self.sender.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let result = with_store(&config, |store| job(store, &config, &runtime));
            let _ = sender.send(Event::MailFinished(result));
        });
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
        let sender = self.sender.clone();
        tokio::task::spawn_blocking(move || {
            let now = Utc::now();
            let period = crate::funnel::Period {
                since: now - chrono::Duration::days(i64::from(report.period_days)),
                until: now,
            };
            let result = with_store(&config, |store| {
                let funnel = crate::report::load(store, &config, period, now, None)
                    .map_err(|error| error.to_string())?;
                crate::report::write_file(&report.path, &funnel).map_err(|error| error.to_string())
            });
            let _ = sender.send(Event::ReportWritten(result));
        });
    }

    fn on_report_written(&mut self, result: Result<(), String>) {
        self.report_busy = false;
        match result {
            Ok(()) => debug!("funnel report written"),
            Err(message) => {
                // Open in Excel, or the share is away: try again in a while.
                info!("funnel report not written yet: {message}");
                self.report_dirty = true;
                self.report_next_at = Instant::now() + Duration::from_secs(30);
            }
        }
    }

    fn start_weekly_digest(&mut self) {
        if self.mail_busy || self.shutting_down {
            return;
        }
        self.spawn_mail_job(|store, config, runtime| {
            let delivery = crate::report::send_weekly_digest(store, config, Utc::now(), runtime)
                .map_err(|error| error.to_string())?;
            let summary = format!(
                "weekly digest: {} sent, {} to retry",
                delivery.sent, delivery.retrying
            );
            Ok((summary, delivery.retrying + delivery.failed > 0))
        });
    }

    /// Emails the admin (rate-limited per key) on a worker thread; never blocks the loop.
    fn alert(&self, key: String, subject: String, body: String) {
        if self.config.alerts.is_none() {
            return;
        }
        let config = Arc::clone(&self.config);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let result = with_store(&config, |store| {
                crate::alerts::raise(store, &config, &key, &subject, &body, Utc::now(), &runtime)
                    .map_err(|error| error.to_string())
            });
            if let Err(message) = result {
                warn!("cannot send an alert: {message}");
            }
        });
    }

    /// Sends pending mail whose retry time has come, on a worker thread.
    fn retry_mail(&mut self) {
        if self.mail_busy || self.shutting_down || self.config.smtp.is_none() {
            return;
        }
        let pending = tokio::task::block_in_place(|| crate::mail::outbox::n_pending(&self.store))
            .unwrap_or(0);
        if pending == 0 {
            return;
        }
        self.spawn_mail_job(|store, config, runtime| {
            let now = Utc::now();
            let report = crate::mail::outbox::deliver(store, config, now, false, runtime)
                .map_err(|error| error.to_string())?;
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

    fn current_store_version(&self) -> Option<i64> {
        use crate::store::CrmStore;
        match tokio::task::block_in_place(|| self.store.crm().version()) {
            Ok(version) => Some(version),
            Err(error) => {
                warn!("cannot read the store's change counter: {error}");
                None
            }
        }
    }

    /// Starts syncs for files that have settled, up to the parallel bound.
    fn start_due_syncs(&mut self) {
        let now = Instant::now();
        let settle = self.config.watch.settle;
        let mut due: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, tracked)| !tracked.in_flight)
            .filter(
                |(_, tracked)| match (tracked.retry_at, tracked.changed_at) {
                    (Some(retry_at), _) => now >= retry_at,
                    (None, Some(changed_at)) => now.duration_since(changed_at) >= settle,
                    (None, None) => false,
                },
            )
            .map(|(path, _)| path.clone())
            .collect();
        due.sort();
        for path in due {
            if self.n_in_flight >= self.config.watch.parallel {
                break;
            }
            // Settled means: still the same as when the change was last seen.
            let fingerprint = watch::fingerprint(&path);
            let Some(tracked) = self.files.get_mut(&path) else {
                continue;
            };
            if fingerprint.is_none() {
                tracked.changed_at = None;
                tracked.retry_at = None;
                self.on_file_gone(&path);
                continue;
            }
            if fingerprint != tracked.seen {
                debug!(file = %path.display(), "changed again while settling; settling again");
                tracked.seen = fingerprint;
                tracked.changed_at = Some(now);
                continue;
            }
            if tracked.retry_at.is_none() && fingerprint == tracked.done {
                // An event without new content (a touch of metadata, our own access).
                tracked.changed_at = None;
                if tracked.initial {
                    tracked.initial = false;
                }
                continue;
            }
            tracked.changed_at = None;
            tracked.retry_at = None;
            tracked.in_flight = true;
            tracked.dirty_again = false;
            let source_name = tracked.source.clone();
            let force = std::mem::take(&mut tracked.force);
            self.n_in_flight += 1;
            self.spawn_sync(path, source_name, fingerprint, force);
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
                tracked.force = true;
                tracked.done = None;
                tracked.retry_at = None;
                if tracked.in_flight {
                    tracked.dirty_again = true;
                } else {
                    tracked.changed_at = Some(now.checked_sub(settle).unwrap_or(now));
                }
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
        tokio::task::spawn_blocking(move || {
            let outcome = match config.source(&source_name) {
                None => Err(format!(
                    "source \"{source_name}\" is no longer in the config"
                )),
                Some(source) => with_store(&config, |store| {
                    sync::sync_file_with(store, &config, source, &path, Utc::now(), force)
                        .map_err(|error| error.to_string())
                }),
            };
            // After writing the file back, its new fingerprint is what "already synced" means,
            // so the daemon's own write does not trigger another sync.
            let fingerprint = match &outcome {
                Ok(report) if report.write_back == sync::WriteBack::Written => {
                    watch::fingerprint(&path)
                }
                _ => fingerprint,
            };
            let _ = sender.send(Event::SyncFinished {
                path,
                fingerprint,
                outcome: Box::new(outcome),
            });
        });
    }

    fn on_sync_finished(
        &mut self,
        path: PathBuf,
        fingerprint: Option<Fingerprint>,
        outcome: Result<FileReport, String>,
    ) {
        self.n_in_flight = self.n_in_flight.saturating_sub(1);
        let settle = self.config.watch.settle;
        let max_attempts = self.config.watch.max_attempts;
        let mut alerts: Vec<(String, String, String)> = Vec::new();
        let Some(tracked) = self.files.get_mut(&path) else {
            return;
        };
        tracked.in_flight = false;
        tracked.refused = false;
        tracked.initial = false;
        let source = tracked.source.clone();
        let file_name = path.display().to_string();
        let (state, error_text) = match &outcome {
            Ok(report) if report.status == FileStatus::Held => {
                let message = report.error.clone().unwrap_or_default();
                error!(file = %file_name, "{message}");
                alerts.push((
                    format!("held:{file_name}"),
                    format!("{} is held", short_name(&path)),
                    message.clone(),
                ));
                tracked.done = fingerprint;
                tracked.attempts = 0;
                (FileState::Held, Some(message))
            }
            Ok(report) if report.status != FileStatus::Failed => {
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
                tracked.done = fingerprint;
                tracked.seen = fingerprint;
                tracked.attempts = 0;
                match &report.write_back {
                    sync::WriteBack::Written => {
                        info!(file = %file_name, "wrote the store's changes back into the file");
                        (FileState::Ok, None)
                    }
                    sync::WriteBack::Deferred(message) => {
                        info!(file = %file_name, "{message}");
                        tracked.write_deferred = true;
                        (FileState::Ok, None)
                    }
                    sync::WriteBack::Failed(message) => {
                        warn!(file = %file_name, "cannot write back: {message}");
                        alerts.push((
                            format!("write-back:{file_name}"),
                            format!("{} cannot be written back", short_name(&path)),
                            message.clone(),
                        ));
                        (
                            FileState::Failed,
                            Some(format!("write-back failed: {message}")),
                        )
                    }
                    sync::WriteBack::Off | sync::WriteBack::UpToDate => (FileState::Ok, None),
                }
            }
            Ok(report) if report.retryable => {
                tracked.attempts += 1;
                let message = report.error.clone().unwrap_or_default();
                if tracked.attempts >= max_attempts {
                    error!(file = %file_name, attempts = tracked.attempts, "cannot read the file; giving up until it changes: {message}");
                    alerts.push((
                        format!("unreadable:{file_name}"),
                        format!("{} cannot be read", short_name(&path)),
                        message.clone(),
                    ));
                    tracked.done = fingerprint;
                    tracked.refused = true;
                    (FileState::Failed, Some(message))
                } else {
                    let backoff = backoff(settle, tracked.attempts);
                    if tracked.attempts == 1 {
                        warn!(file = %file_name, "cannot read the file yet, will retry (nothing applied): {message}");
                    } else {
                        debug!(file = %file_name, attempts = tracked.attempts, "still cannot read the file: {message}");
                    }
                    tracked.retry_at = Some(Instant::now() + backoff);
                    (FileState::Retrying, Some(message))
                }
            }
            Ok(report) => {
                let message = report.error.clone().unwrap_or_default();
                error!(file = %file_name, "cannot sync the file until it changes (nothing applied): {message}");
                alerts.push((
                    format!("unreadable:{file_name}"),
                    format!("{} cannot be synced", short_name(&path)),
                    message.clone(),
                ));
                tracked.done = fingerprint;
                tracked.attempts = 0;
                tracked.refused = true;
                (FileState::Failed, Some(message))
            }
            Err(message) => {
                // The store failed (disk full, locked for too long): try the file again later.
                tracked.attempts += 1;
                error!(file = %file_name, "sync failed, will retry: {message}");
                tracked.retry_at = Some(Instant::now() + backoff(settle, tracked.attempts));
                (FileState::Retrying, Some(message.clone()))
            }
        };
        if tracked.dirty_again {
            tracked.dirty_again = false;
            tracked.retry_at = None;
            tracked.changed_at = Some(Instant::now());
        }
        let attempts = tracked.attempts;
        let retry_at = tracked
            .retry_at
            .map(|retry_at| Utc::now() + (retry_at.saturating_duration_since(Instant::now())));
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
        self.record_status(&path, &source, state, attempts, retry_at, error_text);
        self.publish_status();
        for (key, subject, body) in alerts {
            self.alert(key, subject, body);
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
        let record = FileStatusRecord {
            file: sync::file_key(path),
            source: source.to_string(),
            state,
            attempts,
            next_retry_at,
            last_error,
            updated_at: Utc::now(),
        };
        let store = &self.store;
        if let Err(error) =
            tokio::task::block_in_place(|| status::record(store.connection(), &record))
        {
            warn!(file = %path.display(), "cannot record the file's status: {error}");
        }
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
        let waiting = self
            .files
            .values()
            .any(|tracked| tracked.initial && (tracked.in_flight || tracked.changed_at.is_some()));
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
                if new_config.store.path != self.config.store.path {
                    warn!("a new [store] path takes effect only after a restart");
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
                self.files
                    .retain(|_, tracked| new_names.contains(&tracked.source) || tracked.in_flight);
                self.workers = start_workers(&self.config, &self.sender);
                self.rescan(false);
                info!("config reloaded");
            }
        }
        systemd::ready();
        self.publish_status();
    }
}

/// Opens a connection to the store for one job on a worker thread; errors become text for the log.
fn with_store<T>(
    config: &Config,
    job: impl FnOnce(&mut Store) -> Result<T, String>,
) -> Result<T, String> {
    let mut store = Store::open(&config.store.path).map_err(|error| error.to_string())?;
    job(&mut store)
}

fn short_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
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

/// The wait before retry number `attempts` (1-based): settle, 2×, 4×, … capped.
fn backoff(settle: Duration, attempts: u32) -> Duration {
    let base = settle.max(Duration::from_millis(200));
    base.saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let settle = Duration::from_secs(2);
        assert_eq!(backoff(settle, 1), Duration::from_secs(2));
        assert_eq!(backoff(settle, 2), Duration::from_secs(4));
        assert_eq!(backoff(settle, 4), Duration::from_secs(16));
        assert_eq!(backoff(settle, 30), Duration::from_secs(300));
        assert_eq!(backoff(Duration::ZERO, 1), Duration::from_millis(200));
    }
}
