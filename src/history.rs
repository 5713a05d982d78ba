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
use crate::store::{ChangeKind, ChangeRecord, CrmStore, Db, RunCounts, Store, StoreError, SyncRun};

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

/// Which count of the undo's own run a reverted change adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    Created,
    Updated,
    Archived,
    Nothing,
}

/// What reverting one change did.
enum Reverted {
    /// Reverted (or already as it should be): the change that reverses it, for the undo's own
    /// run, and the count it adds to.
    Done {
        inverse: Option<ChangeRecord>,
        count: Count,
    },
    /// Not reverted, and why.
    Skipped(String),
}

impl Reverted {
    fn done(inverse: ChangeRecord, count: Count) -> Reverted {
        Reverted::Done {
            inverse: Some(inverse),
            count,
        }
    }

    /// A change to the archive flag: done when the flag changed, else already so.
    fn archive_flag(changed: bool, inverse: ChangeRecord, count: Count) -> Reverted {
        if changed {
            Reverted::done(inverse, count)
        } else {
            Reverted::Done {
                inverse: None,
                count: Count::Nothing,
            }
        }
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
    let crm = &*transaction;
    crm.run(run_id)?.ok_or(UndoError::NoSuchRun(run_id))?;
    let mut report = UndoReport {
        undone_run: run_id,
        run_id: None,
        n_reverted: 0,
        skipped: Vec::new(),
    };
    let mut inverse: Vec<ChangeRecord> = Vec::new();
    let mut counts = RunCounts::default();
    for change in crm.changes_of_run(run_id)?.iter().rev() {
        let later = crm.later_changes(run_id, change.deal_id, change.field.as_deref())?;
        let reverted = if !later.is_empty() && !force {
            let runs: Vec<String> = later.iter().map(|later| later.run_id.to_string()).collect();
            Reverted::Skipped(format!(
                "changed again by run {}; use --force to revert it anyway",
                runs.join(", ")
            ))
        } else {
            revert(crm, change, now)?
        };
        match reverted {
            Reverted::Skipped(reason) => report.skipped.push(SkippedChange {
                change: change.clone(),
                reason,
            }),
            Reverted::Done {
                inverse: reversing,
                count,
            } => {
                inverse.extend(reversing);
                match count {
                    Count::Created => counts.created += 1,
                    Count::Updated => counts.updated += 1,
                    Count::Archived => counts.archived += 1,
                    Count::Nothing => {}
                }
                report.n_reverted += 1;
            }
        }
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
    transaction.commit()?;
    report.run_id = Some(undo_run);
    Ok(report)
}

/// Reverses one change in the store: a field set back, an archival or creation reversed, a
/// deletion restored from the copy kept of the deal.
fn revert(crm: &Db<'_>, change: &ChangeRecord, now: DateTime<Utc>) -> Result<Reverted, StoreError> {
    let exists = crm.deals_by_ids(&[change.deal_id])?.remove(&change.deal_id);
    Ok(match (change.kind, exists) {
        (ChangeKind::Update, Some(deal)) => revert_field(crm, change, &deal, now)?,
        (ChangeKind::Create, Some(deal)) | (ChangeKind::Unarchive, Some(deal)) => {
            Reverted::archive_flag(
                crm.set_archived(deal.id, true, now)?,
                ChangeRecord::new(deal.id, ChangeKind::Archive, None, None, None),
                Count::Archived,
            )
        }
        (ChangeKind::Archive, Some(deal)) => Reverted::archive_flag(
            crm.set_archived(deal.id, false, now)?,
            ChangeRecord::new(deal.id, ChangeKind::Unarchive, None, None, None),
            Count::Updated,
        ),
        (ChangeKind::Delete, None) => {
            let snapshot: Option<Deal> = change
                .old_value
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok());
            match snapshot {
                Some(deal) => {
                    crm.restore_deal(&deal)?;
                    Reverted::done(
                        ChangeRecord::new(
                            deal.id,
                            ChangeKind::Create,
                            None,
                            None,
                            serde_json::to_string(&deal.fields).ok(),
                        ),
                        Count::Created,
                    )
                }
                None => Reverted::Skipped("no copy of the deleted deal was kept".to_string()),
            }
        }
        (_, _) => Reverted::Skipped("the deal is no longer in the store".to_string()),
    })
}

/// Sets one field (or extra column, `extra.NAME`) of `deal` back to the value before `change`.
fn revert_field(
    crm: &Db<'_>,
    change: &ChangeRecord,
    deal: &Deal,
    now: DateTime<Utc>,
) -> Result<Reverted, StoreError> {
    let field_name = change.field.clone().unwrap_or_default();
    let inverse = if let Some(key) = field_name.strip_prefix("extra.") {
        crm.update_deal(
            deal.id,
            &[],
            &[(key.to_string(), change.old_value.clone())],
            "undo",
            now,
        )?;
        Some(ChangeRecord::new(
            deal.id,
            ChangeKind::Update,
            Some(field_name.clone()),
            deal.extra.get(key).cloned(),
            change.old_value.clone(),
        ))
    } else if let Some(field) = Field::from_name(&field_name) {
        let old = field_value(field, change.old_value.as_deref());
        crm.update_deal(deal.id, &[(field, old.clone())], &[], "undo", now)?;
        Some(ChangeRecord::new(
            deal.id,
            ChangeKind::Update,
            Some(field_name.clone()),
            deal.fields.get(&field).map(FieldValue::to_string),
            old.map(|value| value.to_string()),
        ))
    } else {
        None
    };
    Ok(Reverted::Done {
        inverse,
        count: Count::Updated,
    })
}
