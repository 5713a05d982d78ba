//! The daemon's worker tasks that only tell the loop something happened: the signal listeners,
//! the tick, the rescan timer, the file watcher, and the one wall-clock timer behind the reminder
//! run and the weekly digest. Each sends one [`Event`] and knows nothing of what the loop makes
//! of it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::{later, Event, FAR_AWAY};
use crate::config::{Config, WatchMode};
use crate::watch;

/// How often the loop looks at its timers (settling, retries, the watchdog).
pub(super) const TICK: Duration = Duration::from_millis(100);
/// How often a wall-clock timer looks at the clock again while it waits.
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// The worker tasks that depend on the config; replaced on reload.
pub(super) struct Workers {
    /// Held only to keep it alive: dropping the watcher stops its events.
    _watcher: Option<watch::Watcher>,
    rescan: Option<JoinHandle<()>>,
    remind: Option<JoinHandle<()>>,
    weekly: Option<JoinHandle<()>>,
}

impl Workers {
    /// How the file watcher is, for `/healthz` and `/metrics`.
    pub(super) fn watcher_health(&self, mode: WatchMode) -> crate::http::WatcherHealth {
        use crate::http::WatcherHealth;
        match &self._watcher {
            None if mode == WatchMode::Poll => WatcherHealth::Polling,
            None => WatcherHealth::Failed("the file watcher could not start".to_string()),
            Some(watcher) if !watcher.unwatched().is_empty() => {
                WatcherHealth::Failed(watcher.unwatched().join("; "))
            }
            Some(_) => WatcherHealth::Alive,
        }
    }
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

pub(super) fn spawn_signal_workers(sender: &mpsc::Sender<Event>) {
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
                        if sender.send(make_event()).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(error) => warn!("cannot listen for signal {kind:?}: {error}"),
        }
    }
}

pub(super) fn spawn_tick_worker(sender: &mpsc::Sender<Event>) {
    let sender = sender.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            // A tick the loop has no room for is one it does not need: the next comes soon.
            if let Err(mpsc::error::TrySendError::Closed(_)) = sender.try_send(Event::Tick) {
                break;
            }
        }
    });
}

/// Starts the watcher (unless polling), the rescan timer (unless events only) and the wall-clock
/// timers of the reminders and the weekly digest.
pub(super) fn start_workers(config: &Config, sender: &mpsc::Sender<Event>) -> Workers {
    let mode = config.watch.mode;
    let watcher = if mode == WatchMode::Poll {
        None
    } else {
        let sender = sender.clone();
        watch::Watcher::start(config, move |event| {
            // On the watcher's own thread: wait for room rather than lose an event, which no
            // rescan may cover in events-only mode.
            let _ = sender.blocking_send(match event {
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
                if sender.send(Event::Rescan).await.is_err() {
                    break;
                }
            }
        }))
    };
    let remind = config.remind.clone().map(|remind| {
        spawn_wall_clock_timer(
            sender.clone(),
            move |after| crate::remind::next_due(&remind, after),
            Event::RemindDue,
        )
    });
    let timezone = config.timezone();
    let weekly = config
        .report
        .as_ref()
        .and_then(|report| report.weekly_digest)
        .map(|(weekday, at)| {
            spawn_wall_clock_timer(
                sender.clone(),
                move |after| crate::clock::next_weekly(timezone, weekday, at, after),
                Event::WeeklyDigestDue,
            )
        });
    Workers {
        _watcher: watcher,
        rescan,
        remind,
        weekly,
    }
}

/// Sends `event(due)` at every due time `next` gives (the first strictly after the time it is
/// given), by the wall clock: while it waits it wakes at least every minute and looks at the clock
/// again, so a clock change or a suspended machine does not push a run off.
fn spawn_wall_clock_timer(
    sender: mpsc::Sender<Event>,
    next: impl Fn(DateTime<Utc>) -> Option<DateTime<Utc>> + Send + 'static,
    event: fn(DateTime<Utc>) -> Event,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut after = Utc::now();
        while let Some(due) = next(after) {
            loop {
                let left = (due - Utc::now()).to_std().unwrap_or_default();
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(CLOCK_CHECK)).await;
            }
            if sender.send(event(due)).await.is_err() {
                break;
            }
            after = due;
        }
    })
}
