//! Recording reminders. A run finds the stalls, decides per stall (pure, in [`super::decide`]),
//! builds the digests, and records every message as pending in the outbox together with its
//! reminders in one transaction before anything is sent; then the outbox delivers them
//! ([`crate::mail::outbox::deliver`]), so a restart neither loses nor repeats a reminder.
//!
//! This module owns the `reminders` and `remind_runs` tables.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use rusqlite::{params, OptionalExtension};

use super::digest::{escalation_digest, rep_digest, DigestLine};
use super::{decide, stalls, Calendar, Decision, ReminderHistory};
use crate::config::{Config, RemindConfig};
use crate::deal::{Deal, DealId, Field};
use crate::mail::outbox::{self, DeliveryReport, MessageKind, OutboxError};
use crate::mail::Message;
use crate::store::{parse_timestamp, timestamp, CrmStore, DealFilter, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RemindError {
    #[error("reminders are not configured: add a [remind] section")]
    NotConfigured,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

impl From<rusqlite::Error> for RemindError {
    fn from(error: rusqlite::Error) -> RemindError {
        RemindError::Store(StoreError::Sqlite(error))
    }
}

/// A message a run wants to send, with the stalls it reminds about.
#[derive(Debug, Clone)]
pub struct PlannedMessage {
    pub kind: MessageKind,
    pub message: Message,
    /// (deal, stall key) pairs.
    pub reminders: Vec<(DealId, String)>,
}

/// What a run found and did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub n_stalled: usize,
    pub messages: Vec<PlannedMessage>,
    /// Stalled deals whose owner has no address and no fallback is configured.
    pub unaddressed: Vec<DealId>,
    pub delivery: DeliveryReport,
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
    message: Message,
    stalls: impl Iterator<Item = &'a super::Stall>,
) -> PlannedMessage {
    PlannedMessage {
        kind,
        message,
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
    let today = Calendar::from_config(Some(remind)).day_of(now);
    let give_up_at = crate::clock::end_of_day(remind.timezone, now);
    let transaction = store.transaction()?;
    for planned in &report.messages {
        let message_id = outbox::enqueue(
            &transaction,
            planned.kind,
            &planned.message,
            None,
            now,
            give_up_at,
        )?;
        for (deal_id, stall_key) in &planned.reminders {
            transaction.execute(
                "INSERT INTO reminders (message_id, deal_id, stall_key, recipient, kind, day, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![message_id, deal_id, stall_key, planned.message.recipient, planned.kind.name(), today.to_string(), timestamp(now)],
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

/// The due time of the latest run, for catching up after downtime.
pub fn last_run_due(store: &Store) -> Result<Option<DateTime<Utc>>, StoreError> {
    let due: Option<String> = store
        .connection()
        .query_row("SELECT max(due_at) FROM remind_runs", [], |row| row.get(0))
        .optional()?
        .flatten();
    due.as_deref().map(parse_timestamp).transpose()
}

/// A whole run: plan, record, deliver (on `runtime`, see [`outbox::deliver`]), and tell the admin
/// about messages refused for good. With `dry_run`, only plan.
pub fn run(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    due_at: DateTime<Utc>,
    force: bool,
    dry_run: bool,
    runtime: &tokio::runtime::Handle,
) -> Result<RunReport, RemindError> {
    let remind = config.remind.as_ref().ok_or(RemindError::NotConfigured)?;
    let mut report = plan(store, config, now, force)?;
    if dry_run {
        return Ok(report);
    }
    record(store, remind, &report, due_at, now)?;
    report.delivery = outbox::deliver(store, config, now, true, runtime)?;
    crate::alerts::mail_refused(store, config, &report.delivery.refusals, now, runtime);
    Ok(report)
}
