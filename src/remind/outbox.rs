//! Recording reminders. A run finds the stalls, decides per stall (pure, in [`super::decide`]),
//! builds the digests, and records every message as pending in the outbox together with its
//! reminders in one transaction before anything is sent; then the outbox delivers them
//! ([`crate::mail::outbox::deliver`]), so a restart neither loses nor repeats a reminder.
//!
//! The `reminders` and `remind_runs` tables are kept by `store::mail`. Two daemons sharing a
//! store run the reminders due at a time once: the run is claimed ([`Store::exclusively`]) and
//! recorded with its due time in the transaction that records its messages, so the second
//! daemon finds it done.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::digest::{escalation_digest, rep_digest, DigestLine};
use super::{decide, stalls, Calendar, Decision, ReminderHistory};
use crate::config::{Config, RemindConfig};
use crate::deal::{Deal, DealId, Field};
use crate::mail::outbox::{self, DeliveryReport, MessageKind, OutboxError};
use crate::mail::Message;
use crate::store::{self, CrmStore, DealFilter, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RemindError {
    #[error("reminders are not configured: add a [remind] section")]
    NotConfigured,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
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
    let files = store::mirror::deal_files(&store.db())?;
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

/// How often, and when last, reps were reminded about a stall (pending and sent messages count).
fn history_of(store: &Store, stall_key: &str) -> Result<ReminderHistory, StoreError> {
    let (n_reminders, last_day) = store::mail::reminders_of(&store.db(), stall_key)?;
    Ok(ReminderHistory {
        n_reminders: u32::try_from(n_reminders).unwrap_or(u32::MAX),
        last_day,
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
            store::mail::record_reminder(
                &transaction,
                message_id,
                (*deal_id, stall_key),
                &planned.message.recipient,
                planned.kind.name(),
                today,
                now,
            )?;
        }
    }
    store::mail::record_remind_run(&transaction, due_at, now, report.messages.len())?;
    transaction.commit()?;
    Ok(())
}

/// The due time of the latest run, for catching up after downtime.
pub fn last_run_due(store: &Store) -> Result<Option<DateTime<Utc>>, StoreError> {
    store::mail::last_remind_run_due(&store.db())
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
    if dry_run {
        return plan(store, config, now, force);
    }
    // Planned and recorded under the claim: a daemon that finds the run due at this time done
    // by another records nothing. A forced run (the command line) is always run.
    let planned = store.exclusively("remind", |store| -> Result<_, RemindError> {
        if !force && last_run_due(store)?.is_some_and(|last| last >= due_at) {
            return Ok(None);
        }
        let report = plan(store, config, now, force)?;
        record(store, remind, &report, due_at, now)?;
        Ok(Some(report))
    })?;
    let Some(mut report) = planned else {
        tracing::info!(due = %due_at, "the reminder run due then was done by another daemon");
        return Ok(RunReport::default());
    };
    report.delivery = outbox::deliver(store, config, now, true, runtime)?;
    crate::alerts::mail_refused(store, config, &report.delivery.refusals, now, runtime);
    Ok(report)
}
