//! Recording and delivering reminders. A run finds the stalls, decides per stall (pure, in
//! [`super::decide`]), builds the digests, and records every message as `pending` together with
//! its reminders in one transaction before anything is sent; delivery marks each message `sent`
//! once the server took it, or schedules a retry (backoff within the day) and keeps it pending, so
//! a restart neither loses nor repeats a reminder. Mail being down never stops the daemon.
//!
//! This module owns the `outbox`, `reminders` and `remind_runs` tables.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::digest::{escalation_digest, rep_digest, Digest, DigestLine};
use super::{decide, stalls, Calendar, Decision, ReminderHistory};
use crate::config::{Config, RemindConfig};
use crate::deal::{Deal, DealId, Field};
use crate::mail::Mailer;
use crate::store::{parse_timestamp, timestamp, CrmStore, DealFilter, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RemindError {
    #[error("reminders are not configured: add a [remind] section")]
    NotConfigured,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mail(#[from] crate::mail::MailError),
    #[error("cannot start the mail runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<rusqlite::Error> for RemindError {
    fn from(error: rusqlite::Error) -> RemindError {
        RemindError::Store(StoreError::Sqlite(error))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    Rep,
    Escalation,
}

impl MessageKind {
    fn name(self) -> &'static str {
        match self {
            MessageKind::Rep => "rep",
            MessageKind::Escalation => "escalation",
        }
    }
}

/// A message a run wants to send, with the stalls it reminds about.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedMessage {
    pub kind: MessageKind,
    pub recipient: String,
    pub subject: String,
    pub text: String,
    #[serde(skip)]
    pub html: String,
    /// (deal, stall key) pairs.
    pub reminders: Vec<(DealId, String)>,
}

/// What a run found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub n_stalled: usize,
    pub messages: Vec<PlannedMessage>,
    /// Stalled deals whose owner has no address and no fallback is configured.
    pub unaddressed: Vec<DealId>,
    pub delivery: DeliveryReport,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryReport {
    pub sent: usize,
    /// Not delivered yet (no answer, or a temporary 4xx refusal); tried again with backoff.
    pub retrying: usize,
    /// Given up at the end of the day after failed attempts.
    pub failed: usize,
    /// Refused for good by the server (a 5xx reply): failed at once for that recipient, and
    /// `[alerts] to` is told.
    pub refused: usize,
    pub errors: Vec<String>,
}

/// Finds stalls and builds the messages due today. Reads the store; writes nothing.
pub fn plan(
    store: &Store,
    config: &Config,
    now: DateTime<Utc>,
    force: bool,
) -> Result<RunReport, RemindError> {
    let remind = config.remind.as_ref().ok_or(RemindError::NotConfigured)?;
    let calendar = Calendar::of(config);
    let today = calendar.day_of(now);
    let deals = store.crm().list_deals(&DealFilter::default())?;
    let by_id: HashMap<DealId, &Deal> = deals.iter().map(|deal| (deal.id, deal)).collect();
    let found = stalls(&deals, &config.stages, &calendar, today);
    let files = deal_files(store)?;
    let mut report = RunReport {
        n_stalled: found.len(),
        ..RunReport::default()
    };

    // Per recipient, the rep's lines; per owner, the escalated lines.
    let mut for_rep: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    let mut escalated: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (stall_idx, stall) in found.iter().enumerate() {
        let history = history_of(store, &stall.key())?;
        let decision = decide(history, remind, today, force);
        if decision == Decision::Skip {
            continue;
        }
        let deal = by_id[&stall.deal_id];
        let owner = deal.text(Field::Owner).unwrap_or("").trim().to_string();
        let address = config
            .rep_address(&owner)
            .map(str::to_string)
            .or_else(|| remind.fallback_to.clone());
        let Some(address) = address else {
            report.unaddressed.push(deal.id);
            continue;
        };
        for_rep
            .entry(address)
            .or_insert_with(|| (owner.clone(), Vec::new()))
            .1
            .push(stall_idx);
        if decision == Decision::RemindAndEscalate && remind.manager.is_some() {
            escalated.entry(owner).or_default().push(stall_idx);
        }
    }
    let line = |stall_idx: usize| DigestLine {
        deal: by_id[&found[stall_idx].deal_id],
        stall: &found[stall_idx],
        file: files.get(&found[stall_idx].deal_id).cloned(),
    };
    for (address, (owner, stall_indexes)) in &for_rep {
        let lines: Vec<DigestLine<'_>> = stall_indexes
            .iter()
            .map(|stall_idx| line(*stall_idx))
            .collect();
        let greeting_name = if config.rep_address(owner).is_some() {
            owner.as_str()
        } else {
            ""
        };
        let digest = rep_digest(
            remind.language,
            address,
            if greeting_name.is_empty() {
                address
            } else {
                greeting_name
            },
            &lines,
        );
        report.messages.push(planned(
            MessageKind::Rep,
            digest,
            stall_indexes.iter().map(|stall_idx| &found[*stall_idx]),
        ));
    }
    if let (Some(manager), false) = (&remind.manager, escalated.is_empty()) {
        let groups: Vec<(String, Vec<DigestLine<'_>>)> = escalated
            .iter()
            .map(|(owner, stall_indexes)| {
                (
                    owner.clone(),
                    stall_indexes
                        .iter()
                        .map(|stall_idx| line(*stall_idx))
                        .collect(),
                )
            })
            .collect();
        let digest = escalation_digest(remind.language, manager, &groups);
        report.messages.push(planned(
            MessageKind::Escalation,
            digest,
            escalated
                .values()
                .flatten()
                .map(|stall_idx| &found[*stall_idx]),
        ));
    }
    Ok(report)
}

fn planned<'a>(
    kind: MessageKind,
    digest: Digest,
    stalls: impl Iterator<Item = &'a super::Stall>,
) -> PlannedMessage {
    PlannedMessage {
        kind,
        recipient: digest.recipient,
        subject: digest.subject,
        text: digest.text,
        html: digest.html,
        reminders: stalls.map(|stall| (stall.deal_id, stall.key())).collect(),
    }
}

/// The file each deal is shown in (the first, by name), for the digest.
fn deal_files(store: &Store) -> Result<HashMap<DealId, String>, StoreError> {
    let mut statement = store
        .connection()
        .prepare("SELECT deal_id, min(file) FROM mirror_rows GROUP BY deal_id")?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, DealId>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut files = HashMap::new();
    for row in rows {
        let (deal_id, file) = row?;
        files.insert(deal_id, file);
    }
    Ok(files)
}

/// How often, and when last, reps were reminded about a stall (pending and sent messages count).
fn history_of(store: &Store, stall_key: &str) -> Result<ReminderHistory, StoreError> {
    let (n_reminders, last_day): (i64, Option<String>) = store.connection().query_row(
        "SELECT count(*), max(reminders.day) FROM reminders JOIN outbox ON outbox.id = reminders.message_id \
         WHERE reminders.stall_key = ?1 AND reminders.kind = 'rep' AND outbox.status IN ('pending', 'sent')",
        [stall_key],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok(ReminderHistory {
        n_reminders: u32::try_from(n_reminders).unwrap_or(u32::MAX),
        last_day: last_day.and_then(|day| NaiveDate::parse_from_str(&day, "%Y-%m-%d").ok()),
    })
}

/// Records the planned messages as pending, with their reminders, and the run, in one
/// transaction. Messages are given up at the end of the local day if they cannot be delivered.
pub fn record(
    store: &mut Store,
    remind: &RemindConfig,
    report: &RunReport,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), RemindError> {
    let calendar = Calendar::from_config(Some(remind));
    let today = calendar.day_of(now);
    let give_up_at = today
        .succ_opt()
        .and_then(|tomorrow| {
            crate::clock::moment(remind.timezone, tomorrow, chrono::NaiveTime::MIN)
        })
        .unwrap_or(now + chrono::Duration::hours(24));
    let transaction = store.transaction()?;
    for message in &report.messages {
        transaction.execute(
            "INSERT INTO outbox (recipient, kind, subject, text_body, html_body, created_at, status, attempts, give_up_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7)",
            params![message.recipient, message.kind.name(), message.subject, message.text, message.html, timestamp(now), timestamp(give_up_at)],
        )?;
        let message_id = transaction.last_insert_rowid();
        for (deal_id, stall_key) in &message.reminders {
            transaction.execute(
                "INSERT INTO reminders (message_id, deal_id, stall_key, recipient, kind, day, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![message_id, deal_id, stall_key, message.recipient, message.kind.name(), today.to_string(), timestamp(now)],
            )?;
        }
    }
    transaction.execute(
        "INSERT INTO remind_runs (due_at, ran_at, n_messages) VALUES (?1, ?2, ?3)",
        params![
            timestamp(due_at),
            timestamp(now),
            report.messages.len() as i64
        ],
    )?;
    transaction.commit().map_err(StoreError::from)?;
    Ok(())
}

/// Records one message (the weekly digest) as pending, with an attachment, to be given up at the
/// end of the day like the reminders.
pub fn record_message(
    store: &mut Store,
    config: &Config,
    kind: &str,
    digest: &Digest,
    attachment: Option<(&str, &[u8])>,
    now: DateTime<Utc>,
) -> Result<(), RemindError> {
    let calendar = Calendar::of(config);
    let timezone = config
        .remind
        .as_ref()
        .map(|remind| remind.timezone)
        .unwrap_or(chrono_tz::UTC);
    let give_up_at = calendar
        .day_of(now)
        .succ_opt()
        .and_then(|tomorrow| crate::clock::moment(timezone, tomorrow, chrono::NaiveTime::MIN))
        .unwrap_or(now + chrono::Duration::hours(24));
    store.connection().execute(
        "INSERT INTO outbox (recipient, kind, subject, text_body, html_body, created_at, status, attempts, give_up_at, attachment_name, attachment) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?8, ?9)",
        params![
            digest.recipient,
            kind,
            digest.subject,
            digest.text,
            digest.html,
            timestamp(now),
            timestamp(give_up_at),
            attachment.map(|(name, _)| name),
            attachment.map(|(_, bytes)| bytes)
        ],
    )?;
    Ok(())
}

/// The due time of the latest run, for catching up after downtime.
pub fn last_run_due(store: &Store) -> Result<Option<DateTime<Utc>>, StoreError> {
    let due: Option<String> = store
        .connection()
        .query_row("SELECT max(due_at) FROM remind_runs", [], |row| row.get(0))
        .optional()?
        .flatten();
    due.as_deref().map(parse_timestamp).transpose()
}

/// How many messages wait for delivery.
pub fn n_pending(store: &Store) -> Result<i64, StoreError> {
    Ok(store.connection().query_row(
        "SELECT count(*) FROM outbox WHERE status = 'pending'",
        [],
        |row| row.get(0),
    )?)
}

fn retry_backoff(attempts: u32) -> Duration {
    Duration::from_secs(60)
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(6))
        .min(Duration::from_secs(3600))
}

/// Sends pending messages: those whose retry time has come, or all of them with `all` (an explicit
/// `funnelsync remind`). Each message is marked sent right after the server accepted it.
pub fn deliver(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    all: bool,
) -> Result<DeliveryReport, RemindError> {
    let mut report = DeliveryReport::default();
    type Pending = (
        i64,
        String,
        String,
        String,
        String,
        i64,
        String,
        Option<String>,
        Option<Vec<u8>>,
        String,
    );
    let pending: Vec<Pending> = {
        let mut statement = store.connection().prepare(
            "SELECT id, recipient, subject, text_body, html_body, attempts, give_up_at, attachment_name, attachment, kind FROM outbox \
             WHERE status = 'pending' AND (?1 OR next_attempt_at IS NULL OR next_attempt_at <= ?2) ORDER BY id",
        )?;
        let rows = statement.query_map(params![all, timestamp(now)], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    if pending.is_empty() {
        return Ok(report);
    }
    let smtp = config.smtp.as_ref().ok_or(RemindError::NotConfigured)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RemindError::Runtime)?;
    // The transport's connection pool lives in the runtime: build and drop it inside.
    let _runtime_guard = runtime.enter();
    let mailer = match Mailer::new(smtp) {
        Ok(mailer) => Some(mailer),
        Err(error) => {
            // A missing password or a bad host fails every message the same way; they stay
            // pending and are retried.
            report.errors.push(error.to_string());
            None
        }
    };
    // Refusals for good of messages other than alerts, to tell the admin about once delivery is done.
    let mut refusals: Vec<(String, String, String)> = Vec::new();
    for (
        id,
        recipient,
        subject,
        text,
        html,
        attempts,
        give_up_at,
        attachment_name,
        attachment,
        kind,
    ) in pending
    {
        let attachment = attachment_name.as_deref().zip(attachment.as_deref());
        let result = match &mailer {
            Some(mailer) => runtime
                .block_on(mailer.send(&recipient, &subject, &text, &html, attachment))
                .map_err(|error| (error.is_permanent(), error.to_string())),
            None => Err((false, report.errors.last().cloned().unwrap_or_default())),
        };
        match result {
            Ok(()) => {
                store.connection().execute(
                    "UPDATE outbox SET status = 'sent', sent_at = ?1, attempts = attempts + 1, last_error = NULL WHERE id = ?2",
                    params![timestamp(now.max(Utc::now())), id],
                )?;
                tracing::info!(recipient = %recipient, subject = %subject, "reminder sent");
                report.sent += 1;
            }
            Err((true, message)) => {
                // A 5xx reply: the server will not take this message, now or later.
                let attempts = u32::try_from(attempts + 1).unwrap_or(u32::MAX);
                store.connection().execute(
                    "UPDATE outbox SET status = 'failed', attempts = ?1, last_error = ?2 WHERE id = ?3",
                    params![attempts, message, id],
                )?;
                tracing::error!(recipient = %recipient, "the mail server refused a message for good: {message}");
                report.refused += 1;
                if kind != "alert" {
                    refusals.push((recipient.clone(), subject.clone(), message.clone()));
                }
                if !report.errors.contains(&message) {
                    report.errors.push(message);
                }
            }
            Err((false, message)) => {
                let attempts = u32::try_from(attempts + 1).unwrap_or(u32::MAX);
                let give_up = parse_timestamp(&give_up_at)
                    .map(|give_up| now >= give_up)
                    .unwrap_or(true);
                if give_up {
                    store.connection().execute(
                        "UPDATE outbox SET status = 'failed', attempts = ?1, last_error = ?2 WHERE id = ?3",
                        params![attempts, message, id],
                    )?;
                    tracing::error!(recipient = %recipient, "giving up on a reminder after {attempts} attempts: {message}");
                    report.failed += 1;
                } else {
                    let next = now
                        + chrono::Duration::from_std(retry_backoff(attempts))
                            .unwrap_or(chrono::Duration::minutes(1));
                    store.connection().execute(
                        "UPDATE outbox SET attempts = ?1, last_error = ?2, next_attempt_at = ?3 WHERE id = ?4",
                        params![attempts, message, timestamp(next), id],
                    )?;
                    tracing::warn!(recipient = %recipient, "reminder not sent, will retry: {message}");
                    report.retrying += 1;
                }
                if !report.errors.contains(&message) {
                    report.errors.push(message);
                }
            }
        }
    }
    drop(mailer);
    drop(_runtime_guard);
    for (recipient, subject, message) in refusals {
        // An alert's own refusal is not alerted about again (it would loop).
        let body = format!(
            "The mail server refused the message \"{subject}\" to {recipient} for good, so it will not be sent again:\n\n{message}\n\nCheck the address (in [reps], [remind] or [alerts])."
        );
        if let Err(error) = crate::alerts::raise(
            store,
            config,
            &format!("mail-refused:{recipient}"),
            &format!("mail to {recipient} was refused"),
            &body,
            now,
        ) {
            tracing::warn!("cannot raise an alert about the refused message: {error}");
        }
    }
    Ok(report)
}

/// A whole run: plan, record, deliver. With `dry_run`, only plan.
pub fn run(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    due_at: DateTime<Utc>,
    force: bool,
    dry_run: bool,
) -> Result<RunReport, RemindError> {
    let remind = config.remind.as_ref().ok_or(RemindError::NotConfigured)?;
    let mut report = plan(store, config, now, force)?;
    if dry_run {
        return Ok(report);
    }
    record(store, remind, &report, due_at, now)?;
    report.delivery = deliver(store, config, now, true)?;
    Ok(report)
}
