//! Alerts to the admin (`[alerts] to`): one email when a file is held, cannot be read after its
//! retries, cannot be written back, or mail keeps failing — at most one per file and kind every
//! `every` (an hour by default), recorded in the `alerts` table and sent through the outbox.
//!
//! This module must not decide what is alarming; the daemon says so.

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::remind::digest::Digest;
use crate::store::{parse_timestamp, timestamp, Store};

/// Raises an alert unless one with the same key went out within the rate limit. Returns whether
/// it was sent (or queued for retry).
pub fn raise(
    store: &mut Store,
    config: &Config,
    key: &str,
    subject: &str,
    body: &str,
    now: DateTime<Utc>,
) -> Result<bool, crate::remind::outbox::RemindError> {
    let Some(alerts) = &config.alerts else {
        return Ok(false);
    };
    let last: Option<String> = store
        .connection()
        .query_row("SELECT max(at) FROM alerts WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .map_err(crate::store::StoreError::from)?;
    if let Some(last) = last.as_deref().and_then(|last| parse_timestamp(last).ok()) {
        if (now - last).to_std().unwrap_or_default() < alerts.every {
            return Ok(false);
        }
    }
    store
        .connection()
        .execute(
            "INSERT INTO alerts (subject, key, at) VALUES (?1, ?2, ?3)",
            rusqlite::params![subject, key, timestamp(now)],
        )
        .map_err(crate::store::StoreError::from)?;
    let text = format!("{body}\n\nfunnelsync on {}\n", hostname());
    let html = format!(
        "<!DOCTYPE html><html><body><pre>{}</pre></body></html>",
        html_escape::encode_safe(&text)
    );
    let digest = Digest {
        recipient: alerts.to.clone(),
        subject: format!("funnelsync: {subject}"),
        text,
        html,
    };
    crate::remind::outbox::record_message(store, config, "alert", &digest, None, now)?;
    crate::remind::outbox::deliver(store, config, now, false)?;
    Ok(true)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "this host".to_string())
}
