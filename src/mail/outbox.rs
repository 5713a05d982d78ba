//! The outbox: every message is recorded as `pending` before it is sent ([`enqueue`], [`record`]),
//! and [`deliver`] sends what is due. A message the server took is marked `sent`; one that got no
//! answer or a temporary (4xx) refusal stays pending and is tried again with backoff
//! ([`retry_backoff`]) until the end of its local day, then `failed`; one refused for good (a 5xx
//! reply) is `failed` at once and listed in [`DeliveryReport::refusals`], for the caller to tell
//! the admin. Mail being down never stops anything else.
//!
//! The outbox's table is kept by `store::mail`. This module must not decide what to send or to
//! whom.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Mailer, Message};
use crate::config::Config;
use crate::store::mail::{self as stored, NewMessage};
use crate::store::{parse_timestamp, Db, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("mail is not configured: add an [smtp] section")]
    NoSmtp,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a message is, as recorded in the outbox (the reminder dedupe counts `rep` messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// A rep's digest of their stalled deals.
    Rep,
    /// The manager's digest of deals still stalled after reminders.
    Escalation,
    /// The manager's weekly funnel digest.
    Weekly,
    /// An alert to the admin.
    Alert,
}

impl MessageKind {
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Rep => "rep",
            MessageKind::Escalation => "escalation",
            MessageKind::Weekly => "weekly",
            MessageKind::Alert => "alert",
        }
    }
}

/// A message the server refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The message's kind as recorded (`rep`, `escalation`, `weekly`, `alert`).
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    /// The server's reply, with the credentials taken out.
    pub reason: String,
}

/// What a delivery did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryReport {
    pub sent: usize,
    /// Not delivered yet (no answer, or a temporary 4xx refusal); tried again with backoff.
    pub retrying: usize,
    /// Given up at the end of the day after failed attempts.
    pub failed: usize,
    /// Refused for good by the server (a 5xx reply): failed at once for that recipient.
    pub refused: usize,
    /// Each distinct error, once.
    pub errors: Vec<String>,
    /// The messages refused for good, for the caller to tell the admin about.
    pub refusals: Vec<Refusal>,
}

/// Records one message as pending, to be given up at `give_up_at`, on a connection or inside the
/// caller's transaction. Returns the message's id.
pub fn enqueue(
    db: &Db<'_>,
    kind: MessageKind,
    message: &Message,
    attachment: Option<(&str, &[u8])>,
    now: DateTime<Utc>,
    give_up_at: DateTime<Utc>,
) -> Result<i64, StoreError> {
    stored::enqueue(
        db,
        &NewMessage {
            kind: kind.name(),
            recipient: &message.recipient,
            subject: &message.subject,
            text: &message.text,
            html: &message.html,
            attachment,
            now,
            give_up_at,
        },
    )
}

/// When a message recorded at `now` is given up if it cannot be delivered: the end of the local
/// day (in `[remind]`'s time zone, else UTC).
pub fn give_up_at(config: &Config, now: DateTime<Utc>) -> DateTime<Utc> {
    crate::clock::end_of_day(config.timezone(), now)
}

/// Records one message as pending, given up at the end of the day like the reminders.
pub fn record(
    store: &Store,
    config: &Config,
    kind: MessageKind,
    message: &Message,
    attachment: Option<(&str, &[u8])>,
    now: DateTime<Utc>,
) -> Result<(), OutboxError> {
    enqueue(
        &store.db(),
        kind,
        message,
        attachment,
        now,
        give_up_at(config, now),
    )?;
    Ok(())
}

/// How many messages wait for delivery.
pub fn n_pending(store: &Store) -> Result<i64, StoreError> {
    stored::n_pending(&store.db())
}

/// The wait before the next try of a message that failed `attempts` times (1-based): a minute,
/// doubling, at most an hour.
pub fn retry_backoff(attempts: u32) -> Duration {
    Duration::from_secs(60)
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(6))
        .min(Duration::from_secs(3600))
}

/// Sends pending messages: those whose retry time has come, or all of them with `all` (an explicit
/// `funnelsync remind`). Each message is marked sent right after the server accepted it. The SMTP
/// exchange runs on `runtime` (the daemon's, or the one a command made for its mail); this
/// function blocks on it, so it must be called off the runtime's own threads.
pub fn deliver(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    all: bool,
    runtime: &tokio::runtime::Handle,
) -> Result<DeliveryReport, OutboxError> {
    // Two daemons sharing a store never deliver at once, so that no message is sent twice. The
    // claim is held through the SMTP exchange, so it is not waited for: a daemon whose mail
    // server hangs must not hang the others, and the one holding it delivers what is due.
    let delivered = store.try_exclusively("mail", |store| {
        deliver_claimed(store, config, now, all, runtime)
    })?;
    Ok(delivered.unwrap_or_else(|| {
        tracing::info!("mail delivery is being done by another daemon");
        DeliveryReport::default()
    }))
}

fn deliver_claimed(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    all: bool,
    runtime: &tokio::runtime::Handle,
) -> Result<DeliveryReport, OutboxError> {
    let mut report = DeliveryReport::default();
    let pending = stored::pending_messages(&store.db(), now, all)?;
    if pending.is_empty() {
        return Ok(report);
    }
    let smtp = config.smtp.as_ref().ok_or(OutboxError::NoSmtp)?;
    // Entering the runtime makes this thread look async to the store's check; it is not (a
    // command's main thread, or a daemon job's blocking thread), and it stays as it was.
    let _scope = crate::store::BlockingScope::unless_async();
    // The transport's connection pool lives in the runtime: build and drop it inside.
    let runtime_guard = runtime.enter();
    let mailer = match Mailer::new(smtp) {
        Ok(mailer) => Some(mailer),
        Err(error) => {
            // A missing password or a bad host fails every message the same way; they stay
            // pending and are retried.
            report.errors.push(error.to_string());
            None
        }
    };
    for pending in pending {
        let attachment = pending
            .attachment
            .as_ref()
            .map(|(name, bytes)| (name.as_str(), bytes.as_slice()));
        let message = Message {
            recipient: pending.recipient.clone(),
            subject: pending.subject.clone(),
            text: pending.text.clone(),
            html: pending.html.clone(),
        };
        let result = match &mailer {
            Some(mailer) => runtime
                .block_on(mailer.send(&message, attachment))
                .map_err(|error| (error.is_permanent(), error.to_string())),
            None => Err((false, report.errors.last().cloned().unwrap_or_default())),
        };
        let recipient = &pending.recipient;
        let attempts = u32::try_from(pending.attempts + 1).unwrap_or(u32::MAX);
        match result {
            Ok(()) => {
                stored::mark_sent(&store.db(), pending.id, now.max(Utc::now()))?;
                tracing::info!(recipient = %recipient, subject = %pending.subject, "mail sent");
                report.sent += 1;
            }
            Err((true, message)) => {
                // A 5xx reply: the server will not take this message, now or later.
                stored::mark_failed(&store.db(), pending.id, attempts, &message)?;
                tracing::error!(recipient = %recipient, "the mail server refused a message for good: {message}");
                report.refused += 1;
                report.refusals.push(Refusal {
                    kind: pending.kind.clone(),
                    recipient: recipient.clone(),
                    subject: pending.subject.clone(),
                    reason: message.clone(),
                });
                note_error(&mut report, message);
            }
            Err((false, message)) => {
                let give_up = parse_timestamp(&pending.give_up_at)
                    .map(|give_up| now >= give_up)
                    .unwrap_or(true);
                if give_up {
                    stored::mark_failed(&store.db(), pending.id, attempts, &message)?;
                    tracing::error!(recipient = %recipient, "giving up on a message after {attempts} attempts: {message}");
                    report.failed += 1;
                } else {
                    let next = now
                        + chrono::Duration::from_std(retry_backoff(attempts))
                            .unwrap_or(chrono::Duration::minutes(1));
                    stored::schedule_retry(&store.db(), pending.id, attempts, &message, next)?;
                    tracing::warn!(recipient = %recipient, "mail not sent, will retry: {message}");
                    report.retrying += 1;
                }
                note_error(&mut report, message);
            }
        }
    }
    drop(mailer);
    drop(runtime_guard);
    Ok(report)
}

fn note_error(report: &mut DeliveryReport, message: String) {
    if !report.errors.contains(&message) {
        report.errors.push(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_a_minute_to_an_hour() {
        let minutes = |n: u64| Duration::from_secs(60 * n);
        let cases = [
            (0, minutes(1)),
            (1, minutes(1)),
            (2, minutes(2)),
            (3, minutes(4)),
            (6, minutes(32)),
            (7, minutes(60)),
            (8, minutes(60)),
            (u32::MAX, minutes(60)),
        ];
        for (attempts, expected) in cases {
            assert_eq!(
                retry_backoff(attempts),
                expected,
                "after {attempts} attempt(s)"
            );
        }
    }
}
