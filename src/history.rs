//! Undoing a run: every change a run applied (recorded in the `changes` table) is reversed —
//! fields set back, archivals and creations reversed, deletions restored — and the undo is
//! recorded as a run of its own, so it can be undone too. A field that a later run changed again
//! is not silently overwritten: it is listed and skipped unless forced.
//!
//! This module must not know about spreadsheets; the daemon writes the restored values back into
//! the files because the store's change counter moves.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::deal::{Deal, Field, FieldKind, FieldValue};
use crate::store::{
    ChangeKind, ChangeRecord, CrmStore, RunCounts, SqliteCrm, Store, StoreError, SyncRun,
};

#[derive(Debug, Clone, Serialize)]
pub struct SkippedChange {
    pub change: ChangeRecord,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct UndoReport {
    pub undone_run: i64,
    /// The run that records the undo.
    pub run_id: Option<i64>,
    pub n_reverted: usize,
    pub skipped: Vec<SkippedChange>,
}

#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("there is no run {0}")]
    NoSuchRun(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for UndoError {
    fn from(error: rusqlite::Error) -> UndoError {
        UndoError::Store(StoreError::Sqlite(error))
    }
}

/// A stored text value back as a field value.
fn field_value(field: Field, text: Option<&str>) -> Option<FieldValue> {
    let text = text?;
    Some(match field.kind() {
        FieldKind::Amount => text
            .parse::<f64>()
            .map(FieldValue::Amount)
            .unwrap_or_else(|_| FieldValue::Text(text.to_string())),
        _ => FieldValue::Text(text.to_string()),
    })
}

fn record(
    deal_id: i64,
    kind: ChangeKind,
    field: Option<String>,
    old_value: Option<String>,
    new_value: Option<String>,
) -> ChangeRecord {
    ChangeRecord {
        id: 0,
        run_id: 0,
        deal_id,
        kind,
        field,
        old_value,
        new_value,
    }
}

/// Reverses run `run_id`. With `force`, fields changed again by later runs are reverted too.
pub fn undo(
    store: &mut Store,
    run_id: i64,
    force: bool,
    now: DateTime<Utc>,
) -> Result<UndoReport, UndoError> {
    let transaction = store.transaction()?;
    let crm = SqliteCrm::new(&transaction);
    crm.run(run_id)?.ok_or(UndoError::NoSuchRun(run_id))?;
    let changes = crm.changes_of_run(run_id)?;
    let mut report = UndoReport {
        undone_run: run_id,
        run_id: None,
        n_reverted: 0,
        skipped: Vec::new(),
    };
    let mut inverse: Vec<ChangeRecord> = Vec::new();
    let mut counts = RunCounts::default();
    for change in changes.iter().rev() {
        let later = crm.later_changes(run_id, change.deal_id, change.field.as_deref())?;
        if !later.is_empty() && !force {
            let runs: Vec<String> = later.iter().map(|later| later.run_id.to_string()).collect();
            report.skipped.push(SkippedChange {
                change: change.clone(),
                reason: format!(
                    "changed again by run {}; use --force to revert it anyway",
                    runs.join(", ")
                ),
            });
            continue;
        }
        let exists = crm.deals_by_ids(&[change.deal_id])?.remove(&change.deal_id);
        match (change.kind, exists) {
            (ChangeKind::Update, Some(deal)) => {
                let field_name = change.field.clone().unwrap_or_default();
                if let Some(key) = field_name.strip_prefix("extra.") {
                    crm.update_deal(
                        deal.id,
                        &[],
                        &[(key.to_string(), change.old_value.clone())],
                        "undo",
                        now,
                    )?;
                    inverse.push(record(
                        deal.id,
                        ChangeKind::Update,
                        Some(field_name.clone()),
                        deal.extra.get(key).cloned(),
                        change.old_value.clone(),
                    ));
                } else if let Some(field) = Field::from_name(&field_name) {
                    let old = field_value(field, change.old_value.as_deref());
                    crm.update_deal(deal.id, &[(field, old.clone())], &[], "undo", now)?;
                    inverse.push(record(
                        deal.id,
                        ChangeKind::Update,
                        Some(field_name.clone()),
                        deal.fields.get(&field).map(FieldValue::to_string),
                        old.map(|value| value.to_string()),
                    ));
                }
                counts.updated += 1;
            }
            (ChangeKind::Create, Some(deal)) => {
                if crm.set_archived(deal.id, true, now)? {
                    inverse.push(record(deal.id, ChangeKind::Archive, None, None, None));
                    counts.archived += 1;
                }
            }
            (ChangeKind::Archive, Some(deal)) => {
                if crm.set_archived(deal.id, false, now)? {
                    inverse.push(record(deal.id, ChangeKind::Unarchive, None, None, None));
                    counts.updated += 1;
                }
            }
            (ChangeKind::Unarchive, Some(deal)) => {
                if crm.set_archived(deal.id, true, now)? {
                    inverse.push(record(deal.id, ChangeKind::Archive, None, None, None));
                    counts.archived += 1;
                }
            }
            (ChangeKind::Delete, None) => {
                let snapshot: Option<Deal> = change
                    .old_value
                    .as_deref()
                    .and_then(|text| serde_json::from_str(text).ok());
                match snapshot {
                    Some(deal) => {
                        crm.restore_deal(&deal)?;
                        inverse.push(record(
                            deal.id,
                            ChangeKind::Create,
                            None,
                            None,
                            serde_json::to_string(&deal.fields).ok(),
                        ));
                        counts.created += 1;
                    }
                    None => {
                        report.skipped.push(SkippedChange {
                            change: change.clone(),
                            reason: "no copy of the deleted deal was kept".to_string(),
                        });
                        continue;
                    }
                }
            }
            (_, _) => {
                report.skipped.push(SkippedChange {
                    change: change.clone(),
                    reason: "the deal is no longer in the store".to_string(),
                });
                continue;
            }
        }
        report.n_reverted += 1;
    }
    let undo_run = crm.record_run(&SyncRun {
        id: 0,
        source: "undo".to_string(),
        file: format!("run {run_id}"),
        started_at: now,
        finished_at: Utc::now().max(now),
        status: "synced".to_string(),
        counts,
        message: Some(format!(
            "undo of run {run_id}: {} change(s) reverted, {} skipped",
            report.n_reverted,
            report.skipped.len()
        )),
    })?;
    crm.record_changes(undo_run, &inverse)?;
    transaction.commit().map_err(StoreError::from)?;
    report.run_id = Some(undo_run);
    Ok(report)
}
