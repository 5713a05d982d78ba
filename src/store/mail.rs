//! The mail tables: the outbox (`outbox`: every message, pending until the server took it), the
//! reminders each message carries (`reminders`) and the reminder runs (`remind_runs`).
//!
//! Storage only: what to send, to whom and when is `mail` and `remind`'s decision.

use chrono::{DateTime, NaiveDate, Utc};

use super::sql::sql_params;
use super::sql::Db;
use super::{parse_timestamp, timestamp, StoreError};
use crate::deal::DealId;

/// A message to record as pending.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// `rep`, `escalation`, `weekly` or `alert`.
    pub kind: &'a str,
    pub recipient: &'a str,
    pub subject: &'a str,
    pub text: &'a str,
    pub html: &'a str,
    pub attachment: Option<(&'a str, &'a [u8])>,
    pub now: DateTime<Utc>,
    pub give_up_at: DateTime<Utc>,
}

/// A pending message as loaded for delivery.
#[derive(Debug, Clone)]
pub struct PendingMessage {
    pub id: i64,
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub attempts: i64,
    pub give_up_at: String,
    pub attachment: Option<(String, Vec<u8>)>,
}

/// Records one message as pending; returns its id.
pub fn enqueue(db: &Db<'_>, message: &NewMessage<'_>) -> Result<i64, StoreError> {
    db.insert_returning_id(
        "INSERT INTO outbox (recipient, kind, subject, text_body, html_body, created_at, status, attempts, give_up_at, attachment_name, attachment) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?8, ?9)",
        &sql_params![
            message.recipient,
            message.kind,
            message.subject,
            message.text,
            message.html,
            timestamp(message.now),
            timestamp(message.give_up_at),
            message.attachment.map(|(name, _)| name),
            message.attachment.map(|(_, bytes)| bytes)
        ],
    )
}

/// How many messages wait for delivery.
pub fn n_pending(db: &Db<'_>) -> Result<i64, StoreError> {
    db.query_value("SELECT count(*) FROM outbox WHERE status = 'pending'", &[])
}

/// The pending messages due at `now` (all of them with `all`), oldest first.
pub fn pending_messages(
    db: &Db<'_>,
    now: DateTime<Utc>,
    all: bool,
) -> Result<Vec<PendingMessage>, StoreError> {
    db.query(
        "SELECT id, recipient, subject, text_body, html_body, attempts, give_up_at, attachment_name, attachment, kind FROM outbox \
         WHERE status = 'pending' AND (?1 OR next_attempt_at IS NULL OR next_attempt_at <= ?2) ORDER BY id",
        &sql_params![all, timestamp(now)],
        |row| {
            let attachment_name: Option<String> = row.get(7)?;
            let attachment: Option<Vec<u8>> = row.get(8)?;
            Ok(PendingMessage {
                id: row.get(0)?,
                recipient: row.get(1)?,
                subject: row.get(2)?,
                text: row.get(3)?,
                html: row.get(4)?,
                attempts: row.get(5)?,
                give_up_at: row.get(6)?,
                attachment: attachment_name.zip(attachment),
                kind: row.get(9)?,
            })
        },
    )
}

pub fn mark_sent(db: &Db<'_>, id: i64, at: DateTime<Utc>) -> Result<(), StoreError> {
    db.execute(
        "UPDATE outbox SET status = 'sent', sent_at = ?1, attempts = attempts + 1, last_error = NULL WHERE id = ?2",
        &sql_params![timestamp(at), id],
    )?;
    Ok(())
}

pub fn mark_failed(db: &Db<'_>, id: i64, attempts: u32, message: &str) -> Result<(), StoreError> {
    db.execute(
        "UPDATE outbox SET status = 'failed', attempts = ?1, last_error = ?2 WHERE id = ?3",
        &sql_params![attempts, message, id],
    )?;
    Ok(())
}

pub fn schedule_retry(
    db: &Db<'_>,
    id: i64,
    attempts: u32,
    message: &str,
    next: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE outbox SET attempts = ?1, last_error = ?2, next_attempt_at = ?3 WHERE id = ?4",
        &sql_params![attempts, message, timestamp(next), id],
    )?;
    Ok(())
}

/// Records that a message reminds `recipient` of a stall (`kind` as the message's).
pub fn record_reminder(
    db: &Db<'_>,
    message_id: i64,
    (deal_id, stall_key): (DealId, &str),
    recipient: &str,
    kind: &str,
    day: NaiveDate,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO reminders (message_id, deal_id, stall_key, recipient, kind, day, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &sql_params![message_id, deal_id, stall_key, recipient, kind, day.to_string(), timestamp(now)],
    )?;
    Ok(())
}

/// How often, and on which day last, reps were reminded of a stall (pending and sent messages
/// count).
pub fn reminders_of(db: &Db<'_>, stall_key: &str) -> Result<(i64, Option<NaiveDate>), StoreError> {
    let (n_reminders, last_day) = db
        .query_row(
            "SELECT count(*), max(reminders.day) FROM reminders JOIN outbox ON outbox.id = reminders.message_id \
             WHERE reminders.stall_key = ?1 AND reminders.kind = 'rep' AND outbox.status IN ('pending', 'sent')",
            &sql_params![stall_key],
            |row| Ok((row.get::<i64>(0)?, row.get::<Option<String>>(1)?)),
        )?
        .unwrap_or((0, None));
    Ok((
        n_reminders,
        last_day.and_then(|day| NaiveDate::parse_from_str(&day, "%Y-%m-%d").ok()),
    ))
}

pub fn record_remind_run(
    db: &Db<'_>,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
    n_messages: usize,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO remind_runs (due_at, ran_at, n_messages) VALUES (?1, ?2, ?3)",
        &sql_params![timestamp(due_at), timestamp(now), n_messages as i64],
    )?;
    Ok(())
}

/// The due time of the latest reminder run, for catching up after downtime.
pub fn last_remind_run_due(db: &Db<'_>) -> Result<Option<DateTime<Utc>>, StoreError> {
    let due: Option<String> = db.query_value("SELECT max(due_at) FROM remind_runs", &[])?;
    due.as_deref().map(parse_timestamp).transpose()
}
