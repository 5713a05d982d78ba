//! The loop's knowledge of one file and every way it changes: a [`Phase`] (idle, settling,
//! syncing, waiting to retry) with what the file waits for ([`Waiting`]), moved only by the
//! transition methods of [`Tracked`]. Pure: no I/O, the time and what a `stat` saw are
//! parameters, so every transition is unit-tested here; the loop in `super` does the I/O and
//! carries out what a transition returns (start a sync, record a state, raise alerts, log).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::store::files::FileState;
use crate::sync::{FileReport, FileStatus, WriteBack};
use crate::watch::Fingerprint;

/// The longest wait between retries of a failing file.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What the loop is doing about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing is due until something changes.
    Idle,
    /// A change was seen at `since`: the file is read once it has stayed the same for `settle`.
    Settling { since: Instant },
    /// A sync is running; `again` when a change came in meanwhile, so one more sync follows.
    Syncing { again: bool },
    /// The last read failed in a way that may pass (half-saved, locked, the store busy): it is
    /// tried again at `at`.
    Retrying { at: Instant },
}

/// What, besides a change of the file, the file waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiting {
    Nothing,
    /// The write-back waits for Excel or LibreOffice to close the file.
    Close,
    /// The last read refused the file for a reason only a new version can fix (malformed, over a
    /// limit, given up on): a change in the store does not make it worth reading again.
    NewVersion,
}

/// The loop's knowledge of one file.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    pub source: String,
    /// The file's key in the store ([`crate::sync::file_key`]), worked out once.
    pub key: String,
    /// The fingerprint last seen by a stat.
    pub seen: Option<Fingerprint>,
    /// The fingerprint of the content last read successfully (or given up on); `None` when the
    /// store changed since, so the same content is worth a sync again.
    pub done: Option<Fingerprint>,
    pub phase: Phase,
    pub waiting: Waiting,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// Whether the first attempt after start (or after being added by a reload) is still to come.
    pub initial: bool,
    /// The next sync applies the file even where the mass-delete guard would hold it (asked for
    /// by an admin).
    pub force: bool,
    /// The store changed a deal the file shows while a sync of it ran: the sync may have read
    /// the store before the change, so the one that follows must run even on the same content.
    pub store_changed_while_syncing: bool,
}

/// What a due file turned out to be when the loop looked at it again ([`Tracked::look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Look {
    /// Gone (or no longer a file): the loop treats it as removed.
    Gone,
    /// It changed again while settling: it settles again.
    Changed,
    /// The same content as last synced (an event without new content): nothing to do.
    NothingNew,
    /// Settled and new (or due a retry): the loop starts a sync.
    Sync,
}

/// How a sync of the file ended, as the loop received it.
#[derive(Debug)]
pub(super) enum Outcome<'a> {
    /// The sync ran and reported (which may be a failure to read the file).
    Report(&'a FileReport),
    /// The sync could not run at all (the store failed: disk full, locked too long), and why.
    Error(&'a str),
}

/// What the loop makes of an outcome, for its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Read; the write-back (if any) went as the report says.
    Synced,
    /// Read, and the write-back waits for the file to be closed.
    WriteDeferred,
    /// Read, but the write-back failed.
    WriteBackFailed(String),
    /// Held: a sync would remove too many rows, or the sheet is gone.
    Held(String),
    /// Not readable yet (half-saved, locked): tried again after a backoff; `attempt` of them.
    Retry { attempt: u32, message: String },
    /// Not readable after every attempt: left alone until the file changes.
    GaveUp { attempts: u32, message: String },
    /// Refused for a reason only a new version of the file can fix.
    Refused(String),
    /// The store failed; tried again after a backoff.
    StoreFailed(String),
}

/// An alert the transition asks for: its key (file and kind), subject and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Alert {
    pub key: String,
    pub subject: String,
    pub body: String,
}

/// What a transition on a sync's outcome decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Applied {
    /// The state `status` shows, and the error beside it.
    pub state: FileState,
    pub error: Option<String>,
    pub alerts: Vec<Alert>,
    pub verdict: Verdict,
}

/// The wait before retry number `attempts` (1-based): settle, 2×, 4×, … capped.
pub(super) fn backoff(settle: Duration, attempts: u32) -> Duration {
    let base = settle.max(Duration::from_millis(200));
    base.saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// `now - wait`, or `now` when the clock does not reach back that far.
fn before(now: Instant, wait: Duration) -> Instant {
    now.checked_sub(wait).unwrap_or(now)
}

fn short_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

impl Tracked {
    pub fn new(source: &str, key: String, initial: bool) -> Tracked {
        Tracked {
            source: source.to_string(),
            key,
            seen: None,
            done: None,
            phase: Phase::Idle,
            waiting: Waiting::Nothing,
            attempts: 0,
            initial,
            force: false,
            store_changed_while_syncing: false,
        }
    }

    pub fn is_syncing(&self) -> bool {
        matches!(self.phase, Phase::Syncing { .. })
    }

    /// Whether the file's first attempt is still to come (the daemon is not ready before).
    pub fn holds_up_start(&self) -> bool {
        self.initial && matches!(self.phase, Phase::Syncing { .. } | Phase::Settling { .. })
    }

    /// The watcher saw something happen to the file, which now looks like `fingerprint`: it
    /// settles from now (once: when it still looks so after `settle`, it has settled). New
    /// content is read after `settle`, not after a retry's backoff, and a file given up on gets a
    /// fresh set of attempts. During a sync, one more sync follows it.
    pub fn saw_change(
        &mut self,
        fingerprint: Option<Fingerprint>,
        now: Instant,
        max_attempts: u32,
    ) {
        self.seen = fingerprint;
        if self.attempts >= max_attempts {
            self.attempts = 0;
        }
        match &mut self.phase {
            Phase::Syncing { again } => *again = true,
            _ => self.phase = Phase::Settling { since: now },
        }
    }

    /// A rescan's `stat` found the file looking like `fingerprint`. A new look starts settling,
    /// from now, or at once for a file untouched for longer than `settle` by its own time stamp;
    /// a file waiting to retry keeps its retry time; a syncing one is synced once more.
    pub fn rescanned(
        &mut self,
        fingerprint: Option<Fingerprint>,
        settled_already: bool,
        now: Instant,
        settle: Duration,
    ) {
        if fingerprint == self.seen {
            return;
        }
        self.seen = fingerprint;
        let since = if settled_already {
            before(now, settle)
        } else {
            now
        };
        match &mut self.phase {
            Phase::Syncing { again } => *again = true,
            Phase::Retrying { .. } => {}
            Phase::Idle | Phase::Settling { .. } => self.phase = Phase::Settling { since },
        }
    }

    /// The store changed a deal the file shows: same content on disk, new content in the store,
    /// so it is synced even so — but not a file refused until it changes, nor one waiting to
    /// retry (the retry covers it).
    pub fn store_changed(&mut self, now: Instant, settle: Duration) {
        if self.waiting == Waiting::NewVersion {
            return;
        }
        match &mut self.phase {
            Phase::Syncing { again } => {
                *again = true;
                self.store_changed_while_syncing = true;
            }
            Phase::Retrying { .. } => {}
            Phase::Idle | Phase::Settling { .. } => {
                self.phase = Phase::Settling {
                    since: before(now, settle),
                };
                self.done = None;
            }
        }
    }

    /// Whether the file waits for Excel or LibreOffice to close it (and no sync runs).
    pub fn waits_for_close(&self) -> bool {
        self.waiting == Waiting::Close && !self.is_syncing()
    }

    /// The file a deferred write-back waited for is closed: the write-back goes ahead now. The
    /// content on disk is what was last synced; the sync is owed to the store's changes, so it
    /// must not be dropped as "nothing new".
    pub fn closed(&mut self, now: Instant, settle: Duration) {
        if !self.waits_for_close() {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.phase = Phase::Settling {
            since: before(now, settle),
        };
        self.done = None;
    }

    /// An admin asked to apply the file despite the mass-delete guard: it is synced at once (after
    /// the sync running, if one is), whatever it waited for.
    pub fn forced(&mut self, now: Instant, settle: Duration) {
        self.force = true;
        self.done = None;
        match &mut self.phase {
            Phase::Syncing { again } => *again = true,
            _ => {
                self.phase = Phase::Settling {
                    since: before(now, settle),
                }
            }
        }
    }

    /// Whether the loop should look at the file now: it has settled, or its retry is due.
    pub fn is_due(&self, now: Instant, settle: Duration) -> bool {
        match self.phase {
            Phase::Settling { since } => now.saturating_duration_since(since) >= settle,
            Phase::Retrying { at } => now >= at,
            Phase::Idle | Phase::Syncing { .. } => false,
        }
    }

    /// A due file looks like `fingerprint` now. Settled means: still the same as when the change
    /// was last seen; then it is synced, unless it holds what was synced last.
    pub fn look(&mut self, fingerprint: Option<Fingerprint>, now: Instant) -> Look {
        if fingerprint.is_none() {
            self.phase = Phase::Idle;
            return Look::Gone;
        }
        if fingerprint != self.seen {
            self.seen = fingerprint;
            if let Phase::Settling { .. } = self.phase {
                self.phase = Phase::Settling { since: now };
            }
            return Look::Changed;
        }
        let retry = matches!(self.phase, Phase::Retrying { .. });
        if !retry && fingerprint == self.done {
            self.phase = Phase::Idle;
            self.initial = false;
            return Look::NothingNew;
        }
        self.phase = Phase::Syncing { again: false };
        Look::Sync
    }

    /// The sync started from [`Tracked::look`] ended with `outcome`; `fingerprint` is what the
    /// file looks like now it is done (after a write-back, the written file, so the daemon's own
    /// write does not trigger another sync). Decides the file's next phase, what it waits for,
    /// its attempts, the state `status` shows, and the alerts to raise.
    pub fn apply_outcome(
        &mut self,
        path: &Path,
        outcome: Outcome<'_>,
        fingerprint: Option<Fingerprint>,
        max_attempts: u32,
        settle: Duration,
        now: Instant,
    ) -> Applied {
        let again = matches!(self.phase, Phase::Syncing { again: true });
        let store_changed = std::mem::take(&mut self.store_changed_while_syncing);
        self.phase = Phase::Idle;
        self.waiting = Waiting::Nothing;
        self.initial = false;
        let file_name = path.display().to_string();
        let alert = |kind: &str, subject: String, body: &str| Alert {
            key: format!("{kind}:{file_name}"),
            subject,
            body: body.to_string(),
        };
        let mut alerts = Vec::new();
        let (state, error, verdict) = match outcome {
            Outcome::Report(report) if report.status == FileStatus::Held => {
                let message = report.error.clone().unwrap_or_default();
                alerts.push(alert(
                    "held",
                    format!("{} is held", short_name(path)),
                    &message,
                ));
                self.done = fingerprint;
                self.attempts = 0;
                (
                    FileState::Held,
                    Some(message.clone()),
                    Verdict::Held(message),
                )
            }
            Outcome::Report(report) if report.status != FileStatus::Failed => {
                self.done = fingerprint;
                self.seen = fingerprint;
                self.attempts = 0;
                match &report.write_back {
                    WriteBack::Deferred(_) => {
                        self.waiting = Waiting::Close;
                        (FileState::Ok, None, Verdict::WriteDeferred)
                    }
                    WriteBack::Failed(message) => {
                        alerts.push(alert(
                            "write-back",
                            format!("{} cannot be written back", short_name(path)),
                            message,
                        ));
                        (
                            FileState::Failed,
                            Some(format!("write-back failed: {message}")),
                            Verdict::WriteBackFailed(message.clone()),
                        )
                    }
                    WriteBack::Written | WriteBack::Off | WriteBack::UpToDate => {
                        (FileState::Ok, None, Verdict::Synced)
                    }
                }
            }
            Outcome::Report(report) if report.retryable => {
                self.attempts += 1;
                let message = report.error.clone().unwrap_or_default();
                if self.attempts >= max_attempts {
                    alerts.push(alert(
                        "unreadable",
                        format!("{} cannot be read", short_name(path)),
                        &message,
                    ));
                    self.done = fingerprint;
                    self.waiting = Waiting::NewVersion;
                    (
                        FileState::Failed,
                        Some(message.clone()),
                        Verdict::GaveUp {
                            attempts: self.attempts,
                            message,
                        },
                    )
                } else {
                    self.phase = Phase::Retrying {
                        at: now + backoff(settle, self.attempts),
                    };
                    (
                        FileState::Retrying,
                        Some(message.clone()),
                        Verdict::Retry {
                            attempt: self.attempts,
                            message,
                        },
                    )
                }
            }
            Outcome::Report(report) => {
                let message = report.error.clone().unwrap_or_default();
                alerts.push(alert(
                    "unreadable",
                    format!("{} cannot be synced", short_name(path)),
                    &message,
                ));
                self.done = fingerprint;
                self.attempts = 0;
                self.waiting = Waiting::NewVersion;
                (
                    FileState::Failed,
                    Some(message.clone()),
                    Verdict::Refused(message),
                )
            }
            Outcome::Error(message) => {
                self.attempts += 1;
                self.phase = Phase::Retrying {
                    at: now + backoff(settle, self.attempts),
                };
                (
                    FileState::Retrying,
                    Some(message.to_string()),
                    Verdict::StoreFailed(message.to_string()),
                )
            }
        };
        if again {
            // A change came in during the sync: it settles from now, whatever the outcome. A
            // change in the store leaves the file as it is on disk, so the content just synced
            // must not count as done: the sync may have read the store before the change.
            self.phase = Phase::Settling { since: now };
            if store_changed {
                self.done = None;
            }
        }
        Applied {
            state,
            error,
            alerts,
            verdict,
        }
    }

    /// When the next retry is due, if one is.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Retrying { at } => Some(at),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RunCounts;

    const SETTLE: Duration = Duration::from_secs(2);
    const MAX_ATTEMPTS: u32 = 3;

    fn print(size: u64) -> Option<Fingerprint> {
        Some(Fingerprint {
            size,
            modified_seconds: 1_700_000_000,
            modified_nanoseconds: 0,
            inode: 7,
        })
    }

    fn tracked(phase: Phase) -> Tracked {
        let mut tracked = Tracked::new("pipeline", "/share/p.xlsx".to_string(), false);
        tracked.phase = phase;
        tracked.seen = print(1);
        tracked
    }

    fn report(status: FileStatus, write_back: WriteBack, retryable: bool) -> FileReport {
        FileReport {
            source: "pipeline".to_string(),
            file: "/share/p.xlsx".to_string(),
            sheet: None,
            status,
            counts: RunCounts::default(),
            issues: Vec::new(),
            error: (status == FileStatus::Failed || status == FileStatus::Held)
                .then(|| "the reason".to_string()),
            retryable,
            run_id: None,
            conflicts: 0,
            write_back,
            store_version: None,
        }
    }

    /// The file's sync ended with `report` at `now`; the file then looks like `fingerprint`.
    fn finish(
        file: &mut Tracked,
        report: &FileReport,
        fingerprint: Option<Fingerprint>,
        now: Instant,
    ) -> Applied {
        file.apply_outcome(
            Path::new("/share/p.xlsx"),
            Outcome::Report(report),
            fingerprint,
            MAX_ATTEMPTS,
            SETTLE,
            now,
        )
    }

    #[test]
    fn a_change_settles_once_and_a_settled_file_is_synced_unless_nothing_is_new() {
        let start = Instant::now();
        let later = start + SETTLE;
        let mut file = tracked(Phase::Idle);
        assert!(!file.is_due(start, SETTLE));
        file.saw_change(print(2), start, MAX_ATTEMPTS);
        assert_eq!(file.phase, Phase::Settling { since: start });
        assert!(!file.is_due(start + SETTLE / 2, SETTLE));
        assert!(file.is_due(later, SETTLE));
        // Changed again while settling: settles again from the look.
        assert_eq!(file.look(print(3), later), Look::Changed);
        assert_eq!(file.phase, Phase::Settling { since: later });
        assert_eq!(file.seen, print(3));
        // Settled and new: a sync starts.
        assert_eq!(file.look(print(3), later + SETTLE), Look::Sync);
        assert_eq!(file.phase, Phase::Syncing { again: false });
        assert!(file.is_syncing());
        // The same content as the last sync: nothing to do, and the start is over.
        let mut file = tracked(Phase::Settling { since: start });
        file.initial = true;
        file.done = print(1);
        assert_eq!(file.look(print(1), later), Look::NothingNew);
        assert_eq!(file.phase, Phase::Idle);
        assert!(!file.initial);
        // Gone.
        let mut file = tracked(Phase::Settling { since: start });
        assert_eq!(file.look(None, later), Look::Gone);
        assert_eq!(file.phase, Phase::Idle);
    }

    #[test]
    fn a_retry_is_due_at_its_time_and_reads_even_unchanged_content() {
        let start = Instant::now();
        let mut file = tracked(Phase::Retrying {
            at: start + SETTLE * 4,
        });
        file.done = print(1);
        assert!(!file.is_due(start + SETTLE, SETTLE));
        assert!(file.is_due(start + SETTLE * 4, SETTLE));
        assert_eq!(file.retry_at(), Some(start + SETTLE * 4));
        assert_eq!(file.look(print(1), start + SETTLE * 4), Look::Sync);
        // A rescan that sees new content keeps the retry time; the retry reads the new content.
        let mut file = tracked(Phase::Retrying { at: start });
        file.rescanned(print(2), false, start, SETTLE);
        assert_eq!(file.phase, Phase::Retrying { at: start });
        assert_eq!(file.seen, print(2));
        // A saved file cancels the backoff and settles like any change, with fresh attempts once
        // they had run out.
        let mut file = tracked(Phase::Retrying {
            at: start + MAX_BACKOFF,
        });
        file.attempts = MAX_ATTEMPTS;
        file.saw_change(print(2), start, MAX_ATTEMPTS);
        assert_eq!(file.phase, Phase::Settling { since: start });
        assert_eq!(file.attempts, 0);
        file.attempts = 1;
        file.saw_change(print(3), start, MAX_ATTEMPTS);
        assert_eq!(file.attempts, 1, "attempts left are kept");
    }

    #[test]
    fn a_rescan_starts_settling_or_counts_an_old_file_as_settled() {
        let now = Instant::now() + SETTLE * 10;
        let mut file = tracked(Phase::Idle);
        file.rescanned(print(1), false, now, SETTLE);
        assert_eq!(file.phase, Phase::Idle, "the same look is no change");
        file.rescanned(print(2), false, now, SETTLE);
        assert_eq!(file.phase, Phase::Settling { since: now });
        let mut file = tracked(Phase::Idle);
        file.rescanned(print(2), true, now, SETTLE);
        assert_eq!(
            file.phase,
            Phase::Settling {
                since: now - SETTLE
            }
        );
        assert!(file.is_due(now, SETTLE));
        let mut file = tracked(Phase::Syncing { again: false });
        file.rescanned(print(2), false, now, SETTLE);
        assert_eq!(file.phase, Phase::Syncing { again: true });
    }

    #[test]
    fn a_store_change_during_a_sync_is_synced_after_it_on_the_same_content() {
        let now = Instant::now();
        let mut file = tracked(Phase::Syncing { again: false });
        file.store_changed(now, SETTLE);
        assert_eq!(file.phase, Phase::Syncing { again: true });
        // The sync wrote the file back (print 2) from what it read of the store before the
        // change.
        let synced = report(FileStatus::Synced, WriteBack::Written, false);
        let later = now + SETTLE;
        finish(&mut file, &synced, print(2), later);
        assert_eq!(file.phase, Phase::Settling { since: later });
        file.seen = print(2);
        // Settled: the same content on disk, and still a sync, for the store's change.
        assert_eq!(file.look(print(2), later + SETTLE), Look::Sync);
        // Without a store change the written content is done.
        let mut file = tracked(Phase::Syncing { again: false });
        file.saw_change(print(2), now, MAX_ATTEMPTS);
        finish(&mut file, &synced, print(2), later);
        assert_eq!(file.look(print(2), later + SETTLE), Look::NothingNew);
    }

    #[test]
    fn changes_during_a_sync_cause_exactly_one_more() {
        let now = Instant::now();
        let mut file = tracked(Phase::Syncing { again: false });
        file.saw_change(print(2), now, MAX_ATTEMPTS);
        file.saw_change(print(3), now, MAX_ATTEMPTS);
        assert_eq!(file.phase, Phase::Syncing { again: true });
        let synced = report(FileStatus::Synced, WriteBack::Off, false);
        let later = now + SETTLE;
        let applied = finish(&mut file, &synced, print(2), later);
        assert_eq!(applied.verdict, Verdict::Synced);
        assert_eq!(file.phase, Phase::Settling { since: later });
        // Even after a failure, the change is read after settling rather than after a backoff.
        let mut file = tracked(Phase::Syncing { again: true });
        let applied = file.apply_outcome(
            Path::new("/share/p.xlsx"),
            Outcome::Error("database is locked"),
            print(2),
            MAX_ATTEMPTS,
            SETTLE,
            later,
        );
        assert_eq!(applied.state, FileState::Retrying);
        assert_eq!(file.phase, Phase::Settling { since: later });
    }

    #[test]
    fn the_store_moving_resyncs_what_may_need_it_and_nothing_else() {
        let now = Instant::now() + SETTLE * 10;
        let cases = [
            (
                Phase::Idle,
                Waiting::Nothing,
                Phase::Settling {
                    since: now - SETTLE,
                },
                true,
            ),
            (
                Phase::Settling { since: now },
                Waiting::Nothing,
                Phase::Settling {
                    since: now - SETTLE,
                },
                true,
            ),
            (
                Phase::Syncing { again: false },
                Waiting::Nothing,
                Phase::Syncing { again: true },
                false,
            ),
            (
                Phase::Retrying { at: now },
                Waiting::Nothing,
                Phase::Retrying { at: now },
                false,
            ),
            // Refused until the file changes: the store's changes do not make it readable.
            (Phase::Idle, Waiting::NewVersion, Phase::Idle, false),
        ];
        for (phase, waiting, expected, forgets_done) in cases {
            let mut file = tracked(phase);
            file.waiting = waiting;
            file.done = print(1);
            file.store_changed(now, SETTLE);
            assert_eq!(file.phase, expected, "from {phase:?} waiting {waiting:?}");
            assert_eq!(file.done.is_none(), forgets_done, "from {phase:?}");
        }
    }

    #[test]
    fn a_forced_sync_comes_at_once_or_right_after_the_running_one() {
        let now = Instant::now() + SETTLE * 10;
        let cases = [
            (
                Phase::Idle,
                Phase::Settling {
                    since: now - SETTLE,
                },
            ),
            (
                Phase::Retrying {
                    at: now + MAX_BACKOFF,
                },
                Phase::Settling {
                    since: now - SETTLE,
                },
            ),
            (
                Phase::Settling { since: now },
                Phase::Settling {
                    since: now - SETTLE,
                },
            ),
            (
                Phase::Syncing { again: false },
                Phase::Syncing { again: true },
            ),
        ];
        for (phase, expected) in cases {
            let mut file = tracked(phase);
            file.done = print(1);
            file.forced(now, SETTLE);
            assert_eq!(file.phase, expected, "from {phase:?}");
            assert!(file.force);
            assert_eq!(file.done, None, "the same content is applied");
        }
        // Held files wait for a new version; a forced sync reads this one even so.
        let mut held = tracked(Phase::Idle);
        held.done = print(1);
        held.forced(now, SETTLE);
        assert_eq!(held.look(print(1), now), Look::Sync);
    }

    #[test]
    fn a_deferred_write_back_goes_ahead_once_the_file_is_closed() {
        let now = Instant::now() + SETTLE * 10;
        let mut file = tracked(Phase::Syncing { again: false });
        let deferred = report(
            FileStatus::Unchanged,
            WriteBack::Deferred("open in Excel".to_string()),
            false,
        );
        let applied = finish(&mut file, &deferred, print(1), now);
        assert_eq!(applied.verdict, Verdict::WriteDeferred);
        assert_eq!(applied.state, FileState::Ok);
        assert!(file.waits_for_close());
        assert_eq!(file.done, print(1));
        file.closed(now, SETTLE);
        assert!(!file.waits_for_close());
        assert_eq!(
            file.phase,
            Phase::Settling {
                since: now - SETTLE
            }
        );
        assert_eq!(file.done, None, "the same content is synced again");
        assert_eq!(file.look(print(1), now), Look::Sync);
        // Closed while nothing waits: nothing happens.
        let mut idle = tracked(Phase::Idle);
        idle.closed(now, SETTLE);
        assert_eq!(idle.phase, Phase::Idle);
    }

    #[test]
    fn every_outcome_of_a_sync() {
        let path = Path::new("/share/p.xlsx");
        let now = Instant::now();
        struct Case {
            name: &'static str,
            outcome: Result<FileReport, &'static str>,
            attempts_before: u32,
            state: FileState,
            error: Option<&'static str>,
            alert_keys: &'static [&'static str],
            phase: Phase,
            waiting: Waiting,
            attempts: u32,
            done: Option<Fingerprint>,
        }
        let retry_at = |attempts: u32| Phase::Retrying {
            at: now + backoff(SETTLE, attempts),
        };
        let cases = [
            Case {
                name: "synced",
                outcome: Ok(report(FileStatus::Synced, WriteBack::Written, false)),
                attempts_before: 2,
                state: FileState::Ok,
                error: None,
                alert_keys: &[],
                phase: Phase::Idle,
                waiting: Waiting::Nothing,
                attempts: 0,
                done: print(2),
            },
            Case {
                name: "unchanged, write-back off",
                outcome: Ok(report(FileStatus::Unchanged, WriteBack::Off, false)),
                attempts_before: 0,
                state: FileState::Ok,
                error: None,
                alert_keys: &[],
                phase: Phase::Idle,
                waiting: Waiting::Nothing,
                attempts: 0,
                done: print(2),
            },
            Case {
                name: "write-back failed",
                outcome: Ok(report(
                    FileStatus::Synced,
                    WriteBack::Failed("no backup".to_string()),
                    false,
                )),
                attempts_before: 0,
                state: FileState::Failed,
                error: Some("write-back failed: no backup"),
                alert_keys: &["write-back:/share/p.xlsx"],
                phase: Phase::Idle,
                waiting: Waiting::Nothing,
                attempts: 0,
                done: print(2),
            },
            Case {
                name: "held",
                outcome: Ok(report(FileStatus::Held, WriteBack::Off, false)),
                attempts_before: 1,
                state: FileState::Held,
                error: Some("the reason"),
                alert_keys: &["held:/share/p.xlsx"],
                phase: Phase::Idle,
                waiting: Waiting::Nothing,
                attempts: 0,
                done: print(2),
            },
            Case {
                name: "half-saved, first attempt",
                outcome: Ok(report(FileStatus::Failed, WriteBack::Off, true)),
                attempts_before: 0,
                state: FileState::Retrying,
                error: Some("the reason"),
                alert_keys: &[],
                phase: retry_at(1),
                waiting: Waiting::Nothing,
                attempts: 1,
                done: None,
            },
            Case {
                name: "half-saved, last attempt",
                outcome: Ok(report(FileStatus::Failed, WriteBack::Off, true)),
                attempts_before: MAX_ATTEMPTS - 1,
                state: FileState::Failed,
                error: Some("the reason"),
                alert_keys: &["unreadable:/share/p.xlsx"],
                phase: Phase::Idle,
                waiting: Waiting::NewVersion,
                attempts: MAX_ATTEMPTS,
                done: print(2),
            },
            Case {
                name: "malformed",
                outcome: Ok(report(FileStatus::Failed, WriteBack::Off, false)),
                attempts_before: 1,
                state: FileState::Failed,
                error: Some("the reason"),
                alert_keys: &["unreadable:/share/p.xlsx"],
                phase: Phase::Idle,
                waiting: Waiting::NewVersion,
                attempts: 0,
                done: print(2),
            },
            Case {
                name: "store failed",
                outcome: Err("database is locked"),
                attempts_before: 1,
                state: FileState::Retrying,
                error: Some("database is locked"),
                alert_keys: &[],
                phase: retry_at(2),
                waiting: Waiting::Nothing,
                attempts: 2,
                done: None,
            },
        ];
        for case in cases {
            let mut file = tracked(Phase::Syncing { again: false });
            file.initial = true;
            file.attempts = case.attempts_before;
            file.waiting = Waiting::Close;
            let outcome = match &case.outcome {
                Ok(report) => Outcome::Report(report),
                Err(message) => Outcome::Error(message),
            };
            let applied = file.apply_outcome(path, outcome, print(2), MAX_ATTEMPTS, SETTLE, now);
            assert_eq!(applied.state, case.state, "{}", case.name);
            assert_eq!(applied.error.as_deref(), case.error, "{}", case.name);
            let keys: Vec<&str> = applied
                .alerts
                .iter()
                .map(|alert| alert.key.as_str())
                .collect();
            assert_eq!(keys, case.alert_keys, "{}", case.name);
            assert_eq!(file.phase, case.phase, "{}", case.name);
            assert_eq!(file.waiting, case.waiting, "{}", case.name);
            assert_eq!(file.attempts, case.attempts, "{}", case.name);
            assert_eq!(file.done, case.done, "{}", case.name);
            assert!(!file.initial, "{}: the first attempt is over", case.name);
        }
    }

    #[test]
    fn the_start_waits_for_first_attempts_only() {
        let now = Instant::now();
        let cases = [
            (Phase::Idle, true, false),
            (Phase::Settling { since: now }, true, true),
            (Phase::Syncing { again: false }, true, true),
            (Phase::Retrying { at: now }, true, false),
            (Phase::Settling { since: now }, false, false),
        ];
        for (phase, initial, holds_up) in cases {
            let mut file = tracked(phase);
            file.initial = initial;
            assert_eq!(
                file.holds_up_start(),
                holds_up,
                "{phase:?} initial {initial}"
            );
        }
    }

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
