//! Talking to systemd through `sd_notify`: READY=1, RELOADING=1, STOPPING=1, STATUS=, WATCHDOG=1
//! and EXTEND_TIMEOUT_USEC=. Every call is a no-op when not run by systemd (no NOTIFY_SOCKET), and
//! a failure to notify is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        debug!("sd_notify failed: {error}");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Asks systemd for more time to finish starting (a first sync of a large share can be slow).
pub fn extend_start_timeout(extra: Duration) {
    let microseconds = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(microseconds)]);
}

/// The watchdog interval systemd expects pings within, when `WatchdogSec=` is set.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
