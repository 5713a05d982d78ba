//! Changes to deals made outside a sheet — `deals set`/`deals move` on the command line and
//! `PATCH`/`POST` through the HTTP API — go through this one module: values written by a person
//! are cleaned exactly as sheet cells are ([`clean_value`]), and the change is applied in one
//! transaction that records it as a run of its own (so `history` lists it and `undo` reverts it).
//! The daemon writes it into every file that shows the deal because the store's change counter
//! moves, as for any other change.
//!
//! This module owns the meaning of an edit. It must not know who may make one (that is
//! `http::auth`) nor how its outcome is printed or sent.

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::deal::{Deal, DealId, Field, FieldKind, FieldMap, FieldValue};
use crate::store::{ChangeKind, ChangeRecord, CrmStore, Db, RunCounts, Store, StoreError};

/// Field changes as they are applied: `None` clears a field.
pub type Changes = Vec<(Field, Option<FieldValue>)>;

/// Changes to a deal's extra values (the sheets' unmapped columns, by header): `None` removes one.
/// They are kept with the deal and, like fields, written back into the files that have a column
/// by that header (never as a new column).
pub type ExtraChanges = Vec<(String, Option<String>)>;

/// One value that cannot be taken, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("there is no deal {0}")]
    NoSuchDeal(DealId),
    /// The deal changed since the version the caller saw (HTTP `If-Match`).
    #[error("deal {id} changed since version {expected}; it is at version {current} now")]
    Stale {
        id: DealId,
        expected: i64,
        current: i64,
    },
    /// The caller may not make this edit (see `http::auth::authorize`).
    #[error("{0}")]
    Refused(String),
    #[error("{}", .0.iter().map(|problem| problem.message.clone()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldProblem>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who makes an edit: the run's source (`cli`, `api`) and, for the API, the user, which the run's
/// message names.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub source: &'a str,
    pub user: Option<&'a str>,
}

impl Origin<'_> {
    pub const CLI: Origin<'static> = Origin {
        source: "cli",
        user: None,
    };

    fn message(&self) -> Option<String> {
        self.user.map(|user| format!("by {user}"))
    }
}

/// What an edit asks for: field changes, extra values, and the version of the deal the caller
/// saw (the edit is refused when the deal changed since).
#[derive(Debug, Clone, Default)]
pub struct EditRequest {
    pub changes: Changes,
    pub extra_changes: ExtraChanges,
    pub expected_version: Option<i64>,
}

impl From<Changes> for EditRequest {
    fn from(changes: Changes) -> EditRequest {
        EditRequest {
            changes,
            ..EditRequest::default()
        }
    }
}

/// What an edit did.
#[derive(Debug, Clone)]
pub struct EditOutcome {
    /// The run that records it; `None` when the deal already had these values.
    pub run_id: Option<i64>,
    /// The changes applied (a stage move also dates the stage).
    pub applied: Changes,
    /// The deal after the edit, and its version.
    pub deal: Deal,
    pub version: i64,
}

/// Records an edit's run (of no file) and returns its id.
fn record_run(
    crm: &Db<'_>,
    origin: Origin<'_>,
    counts: RunCounts,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    crm.record_run(&crate::store::SyncRun {
        id: 0,
        source: origin.source.to_string(),
        file: String::new(),
        started_at: now,
        finished_at: now,
        status: "synced".to_string(),
        counts,
        message: origin.message(),
    })
}

/// Cleans a value written by a person exactly as a sheet cell would be cleaned. An empty value
/// clears the field; an amount with a currency sign also sets the currency.
pub fn clean_value(config: &Config, field: Field, written: &str) -> Result<Changes, String> {
    use crate::mapping::clean;
    let cell = crate::workbook::Cell::Text(written.into());
    if cell.is_empty() {
        return Ok(vec![(field, None)]);
    }
    let date_order = config
        .sources
        .first()
        .map(|source| source.date_order)
        .unwrap_or(crate::config::DateOrder::YearMonthDay);
    let cleaned = match field.kind() {
        FieldKind::Text => clean::text(&cell),
        FieldKind::Email => clean::email(&cell),
        FieldKind::Phone => clean::phone(&cell),
        FieldKind::Stage => clean::stage(&cell, &config.stages),
        FieldKind::Currency => clean::currency(&cell),
        FieldKind::Date => clean::date(&cell, date_order).map(FieldValue::date),
        FieldKind::Amount => {
            return clean::amount(&cell)
                .map(|(amount, currency)| {
                    let mut changes = vec![(Field::Amount, Some(FieldValue::Amount(amount)))];
                    if let Some(currency) = currency {
                        changes.push((
                            Field::Currency,
                            Some(FieldValue::Text(currency.to_string())),
                        ));
                    }
                    changes
                })
                .map_err(|why| format!("{field}: \"{written}\" {why}"));
        }
    };
    cleaned
        .map(|value| vec![(field, Some(value))])
        .map_err(|why| format!("{field}: \"{written}\" {why}"))
}

/// Cleans `FIELD = value` pairs (field names as in JSON), collecting every problem.
pub fn clean_assignments<'a>(
    config: &Config,
    assignments: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Changes, Vec<FieldProblem>> {
    let mut changes = Vec::new();
    let mut problems = Vec::new();
    for (name, written) in assignments {
        let Some(field) = Field::from_name(name.trim()) else {
            let fields: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
            problems.push(FieldProblem {
                field: Some(name.trim().to_string()),
                message: format!("\"{}\" is not a field ({})", name.trim(), fields.join(", ")),
            });
            continue;
        };
        match clean_value(config, field, written) {
            Ok(cleaned) => changes.extend(cleaned),
            Err(message) => problems.push(FieldProblem {
                field: Some(field.name().to_string()),
                message,
            }),
        }
    }
    if problems.is_empty() {
        Ok(changes)
    } else {
        Err(problems)
    }
}

/// Cleans a stage move: a stage name or alias, never empty.
pub fn clean_stage(config: &Config, written: &str) -> Result<Changes, FieldProblem> {
    let problem = |message: String| FieldProblem {
        field: Some(Field::Stage.name().to_string()),
        message,
    };
    match clean_value(config, Field::Stage, written) {
        Ok(changes) if changes.iter().all(|(_, value)| value.is_some()) => Ok(changes),
        Ok(_) => Err(problem("a stage is needed".to_string())),
        Err(message) => Err(problem(message)),
    }
}

/// Applies an edit to a deal in one transaction, recorded as a run of `origin`. With an expected
/// version, the edit is refused when the deal changed since (a stale form or a lost update).
/// `allowed` sees the deal before the change and may refuse it (an owner check, say); its refusal
/// is returned as is.
pub fn apply_changes(
    store: &mut Store,
    config: &Config,
    id: DealId,
    request: EditRequest,
    origin: Origin<'_>,
    allowed: impl FnOnce(&Deal) -> Result<(), EditError>,
    now: DateTime<Utc>,
) -> Result<EditOutcome, EditError> {
    let EditRequest {
        changes,
        extra_changes,
        expected_version,
    } = request;
    let transaction = store.transaction()?;
    let crm = &*transaction;
    let Some(deal) = crm.deals_by_ids(&[id])?.remove(&id) else {
        return Err(EditError::NoSuchDeal(id));
    };
    allowed(&deal)?;
    let current = crm.deal_versions(&[id])?.remove(&id).unwrap_or(0);
    if let Some(expected) = expected_version {
        if expected != current {
            return Err(EditError::Stale {
                id,
                expected,
                current,
            });
        }
    }
    let mut changes: Changes = changes
        .into_iter()
        .filter(|(field, value)| deal.fields.get(field) != value.as_ref())
        .collect();
    let extra_changes: ExtraChanges = extra_changes
        .into_iter()
        .filter(|(key, value)| deal.extra.get(key) != value.as_ref())
        .collect();
    if changes.is_empty() && extra_changes.is_empty() {
        return Ok(EditOutcome {
            run_id: None,
            applied: changes,
            deal,
            version: current,
        });
    }
    // A move to another stage is dated today, unless the edit says since when.
    let today = crate::remind::Calendar::of(config).day_of(now);
    crate::sync::diff::date_stage_change(&mut changes, &deal, today);
    crm.update_deal(id, &changes, &extra_changes, origin.source, now)?;
    // The change is a run of its own in the history, so it can be undone like a sheet's.
    let run_id = record_run(
        crm,
        origin,
        RunCounts {
            updated: 1,
            ..RunCounts::default()
        },
        now,
    )?;
    let records: Vec<ChangeRecord> = changes
        .iter()
        .map(|(field, value)| ChangeRecord {
            id: 0,
            run_id,
            deal_id: id,
            kind: ChangeKind::Update,
            field: Some(field.name().to_string()),
            old_value: deal.fields.get(field).map(|old| old.to_string()),
            new_value: value.as_ref().map(|new| new.to_string()),
        })
        .chain(extra_changes.iter().map(|(key, value)| ChangeRecord {
            id: 0,
            run_id,
            deal_id: id,
            kind: ChangeKind::Update,
            field: Some(format!("extra.{key}")),
            old_value: deal.extra.get(key).cloned(),
            new_value: value.clone(),
        }))
        .collect();
    crm.record_changes(run_id, &records)?;
    let updated = crm
        .deals_by_ids(&[id])?
        .remove(&id)
        .ok_or(EditError::NoSuchDeal(id))?;
    let version = crm.deal_versions(&[id])?.remove(&id).unwrap_or(current);
    transaction.commit()?;
    Ok(EditOutcome {
        run_id: Some(run_id),
        applied: changes,
        deal: updated,
        version,
    })
}

/// Creates a deal from cleaned fields, recorded as a run of `origin` (undoing it archives the
/// deal, as for a row added to a sheet). A deal with no stage starts in the first stage; one with
/// no company, contact or email is refused, as such a row would be.
pub fn create_deal(
    store: &mut Store,
    config: &Config,
    changes: Changes,
    origin: Origin<'_>,
    now: DateTime<Utc>,
) -> Result<EditOutcome, EditError> {
    let mut fields: FieldMap = changes
        .into_iter()
        .filter_map(|(field, value)| value.map(|value| (field, value)))
        .collect();
    if ![Field::Company, Field::Contact, Field::Email]
        .iter()
        .any(|field| fields.contains_key(field))
    {
        return Err(EditError::Invalid(vec![FieldProblem {
            field: Some(Field::Company.name().to_string()),
            message: "a deal needs a company, a contact or an email".to_string(),
        }]));
    }
    fields
        .entry(Field::Stage)
        .or_insert_with(|| FieldValue::Text(config.stages.first().name.clone()));
    let transaction = store.transaction()?;
    let crm = &*transaction;
    let id = crm.create_deal(&fields, &Default::default(), origin.source, now, Some(now))?;
    let run_id = record_run(
        crm,
        origin,
        RunCounts {
            created: 1,
            ..RunCounts::default()
        },
        now,
    )?;
    crm.record_changes(
        run_id,
        &[ChangeRecord {
            id: 0,
            run_id,
            deal_id: id,
            kind: ChangeKind::Create,
            field: None,
            old_value: None,
            new_value: serde_json::to_string(&fields).ok(),
        }],
    )?;
    let deal = crm
        .deals_by_ids(&[id])?
        .remove(&id)
        .ok_or(EditError::NoSuchDeal(id))?;
    let version = crm.deal_versions(&[id])?.remove(&id).unwrap_or(0);
    transaction.commit()?;
    Ok(EditOutcome {
        run_id: Some(run_id),
        applied: fields
            .into_iter()
            .map(|(field, value)| (field, Some(value)))
            .collect(),
        deal,
        version,
    })
}
