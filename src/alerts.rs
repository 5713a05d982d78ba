//! Alerts to the admin (`[alerts] to`): one email when a file is held, cannot be read after its
//! retries, cannot be written back, or mail keeps failing or is refused for good — at most one per
//! key (file and kind) every `every` (an hour by default), recorded in the `alerts` table and sent
//! through the outbox.
//!
//! The `alerts` table is kept by `store::jobs`; daemons sharing a store decide and record an
//! alert under one claim, so the rate limit holds for the whole store. This module must not
//! decide what is alarming; its callers (the daemon, `sync` on the command line, the outbox's
//! refusals) say so.

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::mail::outbox::{self, MessageKind, OutboxError, Refusal};
use crate::mail::Message;
use crate::store::{jobs, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Raises an alert unless one with the same key went out within the rate limit, and delivers it
/// on `runtime` (see [`outbox::deliver`]). Returns whether it was sent (or queued for retry).
pub fn raise(
    store: &mut Store,
    config: &Config,
    key: &str,
    subject: &str,
    body: &str,
    now: DateTime<Utc>,
    runtime: &tokio::runtime::Handle,
) -> Result<bool, AlertError> {
    let Some(alerts) = &config.alerts else {
        return Ok(false);
    };
    let every = alerts.every;
    let due = store.exclusively("alerts", |store| -> Result<bool, StoreError> {
        let db = store.db();
        if let Some(last) = jobs::last_alert(&db, key)? {
            if (now - last).to_std().unwrap_or_default() < every {
                return Ok(false);
            }
        }
        jobs::record_alert(&db, subject, key, now)?;
        Ok(true)
    })?;
    if !due {
        return Ok(false);
    }
    let text = format!("{body}\n\nfunnelsync on {}\n", hostname());
    let html = format!(
        "<!DOCTYPE html><html><body><pre>{}</pre></body></html>",
        html_escape::encode_safe(&text)
    );
    let message = Message {
        recipient: alerts.to.clone(),
        subject: format!("funnelsync: {subject}"),
        text,
        html,
    };
    outbox::record(store, config, MessageKind::Alert, &message, None, now)?;
    // The delivery sends whatever else is due too; a message among them refused for good is
    // alerted about like any other (an alert's own refusal is not: that would loop).
    let delivery = outbox::deliver(store, config, now, false, runtime)?;
    mail_refused(store, config, &delivery.refusals, now, runtime);
    Ok(true)
}

/// Tells the admin about each message the mail server refused for good (other than an alert,
/// which would loop). A failure to do so is logged: the delivery it reports on is done.
pub fn mail_refused(
    store: &mut Store,
    config: &Config,
    refusals: &[Refusal],
    now: DateTime<Utc>,
    runtime: &tokio::runtime::Handle,
) {
    for refusal in refusals
        .iter()
        .filter(|refusal| refusal.kind != MessageKind::Alert.name())
    {
        let Refusal {
            recipient,
            subject,
            reason,
            ..
        } = refusal;
        let body = format!(
            "The mail server refused the message \"{subject}\" to {recipient} for good, so it will not be sent again:\n\n{reason}\n\nCheck the address (in [reps], [remind] or [alerts])."
        );
        if let Err(error) = raise(
            store,
            config,
            &format!("mail-refused:{recipient}"),
            &format!("mail to {recipient} was refused"),
            &body,
            now,
            runtime,
        ) {
            tracing::warn!("cannot raise an alert about the refused message: {error}");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "this host".to_string())
}
