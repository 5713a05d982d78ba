//! One sync of one file: read, map, diff against the mirror, apply to the store — all of the
//! writing in one transaction — and report what happened.
//!
//! This module owns the order of the steps and the rule that nothing is applied from a file that
//! could not be read whole. It must not know how files are found or watched (that is
//! [`crate::watch`]) nor how reports are printed (that is [`crate::cli`]).

pub mod diff;
pub mod merge;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, SourceConfig};
use crate::deal::{Deal, DealId, Field, FieldMap, FieldValue};
use crate::mapping::{self, RowIssue, Severity};
use crate::mirror::{self, MirrorFile, MirrorRow};
use crate::store::{
    ChangeKind, ChangeRecord, ConflictRecord, CrmStore, DealFilter, RunCounts, SqliteCrm, Store,
    StoreError, SyncRun,
};
use crate::workbook;
use crate::writeback::RowOutcome;
use diff::{DiffInput, Removal, RowAction};

/// How a file's sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// Changes were applied (some rows may still have errors).
    Synced,
    /// Nothing in the store needed to change.
    Unchanged,
    /// The file could not be read or understood; nothing was applied.
    Failed,
    /// The sync would remove too many rows, or the sheet is gone, empty or without its header:
    /// nothing was applied until someone looks.
    Held,
}

/// The outcome of syncing one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub source: String,
    pub file: String,
    pub sheet: Option<String>,
    pub status: FileStatus,
    pub counts: RunCounts,
    pub issues: Vec<RowIssue>,
    /// Why the file failed, when it did.
    pub error: Option<String>,
    /// Whether reading the file again later may succeed (it may be half-saved or locked).
    pub retryable: bool,
    pub run_id: Option<i64>,
    /// Fields both the sheet and the store changed since the last sync.
    pub conflicts: u64,
    pub write_back: WriteBack,
    /// The store's change counter as this sync left it (the file shows the store as of then).
    #[serde(skip)]
    pub store_version: Option<i64>,
}

/// What happened to writing the store's view back into the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WriteBack {
    /// The source does not write back (or the format is read-only).
    #[default]
    Off,
    /// The file already shows the store's view.
    UpToDate,
    Written,
    /// The file is open in Excel or LibreOffice, or changed meanwhile: tried again later.
    Deferred(String),
    Failed(String),
}

impl WriteBack {
    /// The status's name and message as `status` stores and prints them.
    pub fn parts(&self) -> (&'static str, Option<&str>) {
        match self {
            WriteBack::Off => ("off", None),
            WriteBack::UpToDate => ("up_to_date", None),
            WriteBack::Written => ("written", None),
            WriteBack::Deferred(message) => ("deferred", Some(message)),
            WriteBack::Failed(message) => ("failed", Some(message)),
        }
    }
}

/// `{"status": …, "message": …}`, the message null unless deferred or failed: the same keys
/// every time.
impl Serialize for WriteBack {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let (status, message) = self.parts();
        let mut object = serializer.serialize_struct("WriteBack", 2)?;
        object.serialize_field("status", status)?;
        object.serialize_field("message", &message)?;
        object.end()
    }
}

impl FileReport {
    pub fn n_row_errors(&self) -> usize {
        self.issues
            .iter()
            .filter(|issue| issue.severity == Severity::Error)
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key a file goes by in the mirror and the run history: its absolute path, with its folder
/// resolved but its own name kept, so a symbolic link is known by its own name, never by what it
/// points to.
pub fn file_key(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let key = match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name),
        _ => absolute,
    };
    key.to_string_lossy().into_owned()
}

/// Syncs one file of a source. Errors reading or understanding the file are part of the report
/// (status `Failed`, nothing applied); only a failing store is an `Err`.
pub fn sync_file(
    store: &mut Store,
    config: &Config,
    source: &SourceConfig,
    path: &Path,
    now: DateTime<Utc>,
) -> Result<FileReport, SyncError> {
    sync_file_with(store, config, source, path, now, false)
}

/// [`sync_file`], with `force` to apply a sync the mass-delete guard would hold.
pub fn sync_file_with(
    store: &mut Store,
    config: &Config,
    source: &SourceConfig,
    path: &Path,
    now: DateTime<Utc>,
    force: bool,
) -> Result<FileReport, SyncError> {
    let file = file_key(path);
    // Failed until it gets further.
    let mut report = FileReport::failed(&source.name, &file, None);

    // A file synced before whose sheet or header is now gone is held, not just failed: that is
    // how "all rows deleted" would look, and someone should look.
    let summary = mirror::summary(store.connection(), &file)?;
    let synced_before = summary.as_ref().is_some_and(|summary| summary.n_rows > 0);
    // A symbolic link is read only when the source follows links and it leads inside the
    // source's folder; it is read through the file it points to, and never written back.
    let (read_path, is_link) = match crate::watch::admit(source, path) {
        crate::watch::Admission::File => (path.to_path_buf(), false),
        crate::watch::Admission::Link(target) => (target, true),
        crate::watch::Admission::NotASource(reason) => {
            return fail(store, report, format!("{}: {reason}", path.display()), now);
        }
        crate::watch::Admission::Missing => {
            report.retryable = true;
            return fail(
                store,
                report,
                format!("{}: the file is gone", path.display()),
                now,
            );
        }
    };
    let may_write_back = source.write_back && !is_link;
    let opened = match workbook::open_file(&read_path, &config.limits) {
        Ok(opened) => opened,
        Err(error) => {
            report.retryable = error.is_retryable();
            return fail(store, report, error.to_string(), now);
        }
    };
    // The same bytes, the same settings and (for a file that writes back) the same store as at
    // the last sync: nothing can have changed, and nothing is parsed.
    let config_hash = source_fingerprint(config, source);
    let content_hash = opened.content_hash().to_string();
    if let Some(summary) = &summary {
        let same_bytes_and_settings = summary.content_hash == content_hash
            && summary.config_hash.as_deref() == Some(config_hash.as_str());
        if !force
            && same_bytes_and_settings
            && (!may_write_back || shows_the_store_still(store, source, &file, summary)?)
        {
            if may_write_back && crate::writeback::is_writable_path(path) {
                report.write_back = WriteBack::UpToDate;
            }
            return unchanged(store, report, summary, now);
        }
    }
    let sheet = match workbook::parse_file(
        opened,
        source.sheet.as_deref(),
        source.encoding,
        &config.limits,
    ) {
        // Messages name the file as the team knows it (a followed link by its own name).
        Ok(sheet) => workbook::SheetData {
            path: path.to_path_buf(),
            ..sheet
        },
        Err(
            error @ (workbook::WorkbookError::SheetNotFound { .. }
            | workbook::WorkbookError::NoVisibleSheet { .. }),
        ) if synced_before => {
            return hold(
                store,
                report,
                format!("held: {error}; nothing was applied"),
                now,
            );
        }
        Err(error) => {
            report.retryable = error.is_retryable();
            return fail(store, report, error.to_string(), now);
        }
    };
    report.sheet = Some(sheet.sheet_name.clone());
    let header = match mapping::locate_header(&sheet.rows, source) {
        Ok(header) => header,
        Err(error) => {
            let message = format!(
                "{}: sheet \"{}\": {error}",
                sheet.path.display(),
                sheet.sheet_name
            );
            if synced_before {
                return hold(
                    store,
                    report,
                    format!("held: {message}; nothing was applied"),
                    now,
                );
            }
            return fail(store, report, message, now);
        }
    };
    let (rows, mut issues) = mapping::map_rows(&sheet.rows, &header, source, &config.stages);
    let sheet_fields: Vec<crate::deal::Field> = crate::deal::Field::ALL
        .into_iter()
        .filter(|field| header.column_of(*field).is_some())
        .collect();

    let transaction = store.transaction()?;
    let previous = mirror::load(&transaction, &file)?;
    let mirror_rows: &[MirrorRow] = previous
        .as_ref()
        .map(|previous| previous.rows.as_slice())
        .unwrap_or(&[]);
    let crm = SqliteCrm::new(&transaction);

    // Load every deal the diff may need, in as few queries as the data allows.
    let mut natural_matches = HashMap::new();
    let mut wanted_ids: Vec<DealId> = rows.iter().filter_map(|row| row.id).collect();
    wanted_ids.extend(mirror_rows.iter().map(|row| row.deal_id));
    // Natural-key lookups in batches, one query per 500 values rather than one per row.
    let mut by_field: HashMap<crate::deal::Field, Vec<FieldValue>> = HashMap::new();
    for key in diff::lookups_needed(&rows, mirror_rows, &source.match_on) {
        let value = match key.0.kind() {
            crate::deal::FieldKind::Amount => key
                .1
                .parse::<f64>()
                .map(FieldValue::Amount)
                .unwrap_or(FieldValue::Text(key.1.clone())),
            _ => FieldValue::Text(key.1.clone()),
        };
        by_field.entry(key.0).or_default().push(value);
    }
    for (field, values) in by_field {
        for (text, deal_id) in crm.find_ids_by_values(field, &values)? {
            wanted_ids.push(deal_id);
            natural_matches.insert((field, text), deal_id);
        }
    }
    wanted_ids.sort_unstable();
    wanted_ids.dedup();

    // Quiet rows: a mirror row the sheet still holds unchanged, whose deal has not changed since
    // that sync. For those the merge can only conclude "unchanged", so their deals need not be
    // loaded: the mirror stands in for them. (Not when the last write-back is still owed.)
    let row_hashes: HashSet<&str> = rows.iter().map(|row| row.hash.as_str()).collect();
    let mut quiet: HashMap<DealId, Deal> = HashMap::new();
    if let Some(previous) = previous
        .as_ref()
        .filter(|previous| !may_write_back || previous.store_version.is_some())
    {
        let live = crm.live_ids_unchanged_since(previous.store_version.unwrap_or(i64::MIN))?;
        let forced_by_rows: HashSet<DealId> = rows.iter().filter_map(|row| row.id).collect();
        for mirror_row in mirror_rows {
            if row_hashes.contains(mirror_row.row_hash.as_str())
                && live.contains(&mirror_row.deal_id)
                && !forced_by_rows.contains(&mirror_row.deal_id)
            {
                quiet.insert(
                    mirror_row.deal_id,
                    Deal {
                        id: mirror_row.deal_id,
                        fields: mirror_row.fields.clone(),
                        extra: mirror_row.extras.clone(),
                        created_at: previous.synced_at,
                        updated_at: previous.synced_at,
                        stage_entered_at: None,
                        archived_at: None,
                    },
                );
            }
        }
    }
    wanted_ids.retain(|deal_id| !quiet.contains_key(deal_id));
    let mut deals = crm.deals_by_ids(&wanted_ids)?;
    deals.extend(quiet);
    // Only mirror rows the sheet no longer holds as they were can be removals.
    let removal_candidates: Vec<DealId> = mirror_rows
        .iter()
        .filter(|mirror_row| !row_hashes.contains(mirror_row.row_hash.as_str()))
        .map(|row| row.deal_id)
        .collect();
    let deals_in_other_files = deals_in_other_files(&transaction, &file, &removal_candidates)?;

    // Where a mapped cell holds a formula, the sheet keeps it: the write-back never replaces a
    // formula with a constant.
    let writes_back = may_write_back && crate::writeback::is_writable(&sheet);
    let mut formula_fields: HashMap<u32, Vec<crate::deal::Field>> = HashMap::new();
    if writes_back {
        for (row_number, column_idx) in &sheet.formula_cells {
            if let Some(Some(mapping::ColumnRole::Field(field))) =
                header.roles.get(*column_idx as usize)
            {
                formula_fields.entry(*row_number).or_default().push(*field);
            }
        }
    }
    let calendar = crate::remind::Calendar::of(config);
    let today = calendar.day_of(now);
    let (changeset, diff_issues) = diff::diff(&DiffInput {
        rows: &rows,
        mirror: mirror_rows,
        deals: &deals,
        natural_matches: &natural_matches,
        deals_in_other_files: &deals_in_other_files,
        match_on: &source.match_on,
        on_row_removed: source.on_row_removed,
        sheet_fields: &sheet_fields,
        conflict_policy: source.conflict,
        file_modified: sheet.modified,
        formula_fields: &formula_fields,
        known_error_rows: &previous
            .as_ref()
            .map(|previous| previous.known_error_rows.iter().cloned().collect())
            .unwrap_or_default(),
        today,
    });
    issues.extend(diff_issues);

    // The mass-delete guard: a sync that would archive or delete too many of the file's rows is
    // held — nothing of it is applied — until someone looks (`sync --force FILE`).
    let n_removing = changeset
        .removals
        .iter()
        .filter(|removal| matches!(removal, Removal::Archive(_) | Removal::Delete(_)))
        .count();
    if !force && source.max_delete.exceeded(n_removing, mirror_rows.len()) {
        drop(transaction);
        let message = format!(
            "{}: held: this sync would remove {n_removing} of the {} rows the file had ({}); nothing was applied. \
             If that is right, run `funnelsync sync --force {}`",
            path.display(),
            mirror_rows.len(),
            match source.max_delete {
                crate::config::MaxDelete::Share(share) => format!("max_delete = {:.0}%", share * 100.0),
                crate::config::MaxDelete::Count(count) => format!("max_delete = {count}"),
            },
            path.display()
        );
        report.issues = issues;
        return hold(store, report, message, now);
    }
    issues.sort_by_key(|issue| issue.row_number.unwrap_or(0));

    // Apply to the store; remember, per row, which deal it is and what it should show, and every
    // change for the history.
    let mut applied: Vec<ChangeRecord> = Vec::new();
    let previous_mirror: HashMap<DealId, &MirrorRow> =
        mirror_rows.iter().map(|row| (row.deal_id, row)).collect();
    let mut row_deals: Vec<Option<DealId>> = vec![None; rows.len()];
    let mut row_merged: Vec<Option<FieldMap>> = vec![None; rows.len()];
    let counts = &mut report.counts;
    for action in &changeset.actions {
        match action {
            RowAction::Create { row_idx } => {
                let row = &rows[*row_idx];
                let mut fields = row.fields.clone();
                // A new row in a filtered file belongs to that file's view: it takes the filter's
                // values for the fields it leaves empty.
                for (field, accepted) in &source.filter {
                    if let (false, Some(first)) = (fields.contains_key(field), accepted.first()) {
                        fields.insert(*field, FieldValue::Text(first.clone()));
                    }
                }
                // A new deal without a stage starts at the top of the funnel.
                fields
                    .entry(Field::Stage)
                    .or_insert_with(|| FieldValue::Text(config.stages.first().name.clone()));
                // The day the deal entered its stage is known only when the sheet says so.
                let entered = row
                    .fields
                    .get(&Field::StageSince)
                    .and_then(FieldValue::as_text)
                    .and_then(|text| chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
                    .map(|day| calendar.start_of(day));
                let deal_id = crm.create_deal(&fields, &row.extras, &source.name, now, entered)?;
                counts.created += 1;
                applied.push(ChangeRecord {
                    id: 0,
                    run_id: 0,
                    deal_id,
                    kind: ChangeKind::Create,
                    field: None,
                    old_value: None,
                    new_value: serde_json::to_string(&fields).ok(),
                });
                row_deals[*row_idx] = Some(deal_id);
                fields.retain(|field, _| sheet_fields.contains(field));
                row_merged[*row_idx] = Some(fields);
            }
            RowAction::Update {
                row_idx,
                deal_id,
                changes,
                extra_changes,
                unarchive,
            } => {
                if *unarchive {
                    crm.set_archived(*deal_id, false, now)?;
                    applied.push(change_record(
                        *deal_id,
                        ChangeKind::Unarchive,
                        None,
                        None,
                        None,
                    ));
                }
                crm.update_deal(*deal_id, changes, extra_changes, &source.name, now)?;
                let before = deals.get(deal_id);
                for (field, value) in changes {
                    let old = before
                        .and_then(|deal| deal.fields.get(field))
                        .map(FieldValue::to_string);
                    applied.push(change_record(
                        *deal_id,
                        ChangeKind::Update,
                        Some(field.name().to_string()),
                        old,
                        value.as_ref().map(FieldValue::to_string),
                    ));
                }
                for (key, value) in extra_changes {
                    let old = before.and_then(|deal| deal.extra.get(key)).cloned();
                    applied.push(change_record(
                        *deal_id,
                        ChangeKind::Update,
                        Some(format!("extra.{key}")),
                        old,
                        value.clone(),
                    ));
                }
                counts.updated += 1;
                row_deals[*row_idx] = Some(*deal_id);
                row_merged[*row_idx] = changeset.sheet_values.get(row_idx).cloned();
            }
            RowAction::Unchanged { row_idx, deal_id } => {
                counts.unchanged += 1;
                row_deals[*row_idx] = Some(*deal_id);
                row_merged[*row_idx] = changeset.sheet_values.get(row_idx).cloned();
            }
            RowAction::Skipped { row_idx, deal_id } => {
                counts.errors += 1;
                row_deals[*row_idx] = *deal_id;
            }
        }
    }
    for (row_idx, deal_id, conflict) in &changeset.conflicts {
        let text = |value: &Option<FieldValue>| value.as_ref().map(FieldValue::to_string);
        crm.record_conflict(&ConflictRecord {
            id: 0,
            deal_id: *deal_id,
            field: conflict.field.name().to_string(),
            base_value: text(&conflict.base),
            sheet_value: text(&conflict.sheet),
            store_value: text(&conflict.store),
            winner: conflict.winner.name().to_string(),
            policy: if conflict.formula {
                "formula".to_string()
            } else {
                source.conflict.name().to_string()
            },
            source: source.name.clone(),
            file: file.clone(),
            at: now,
        })?;
        let message = if conflict.formula {
            format!(
                "conflict on {}: the store says {} (was {}), but the cell holds a formula; the formula stays and its value {} was kept",
                conflict.field,
                quoted(&conflict.store),
                quoted(&conflict.base),
                quoted(&conflict.sheet),
            )
        } else {
            format!(
                "conflict on {}: the sheet says {}, the store says {} (was {}); the {} value was kept",
                conflict.field,
                quoted(&conflict.sheet),
                quoted(&conflict.store),
                quoted(&conflict.base),
                conflict.winner.name()
            )
        };
        issues.push(RowIssue::warning(Some(rows[*row_idx].row_number), message));
    }
    report.conflicts = changeset.conflicts.len() as u64;
    let mut archived_or_deleted: HashSet<DealId> = HashSet::new();
    for removal in &changeset.removals {
        match removal {
            Removal::Archive(deal_id) => {
                if crm.set_archived(*deal_id, true, now)? {
                    report.counts.archived += 1;
                    applied.push(change_record(
                        *deal_id,
                        ChangeKind::Archive,
                        None,
                        None,
                        None,
                    ));
                }
                archived_or_deleted.insert(*deal_id);
            }
            Removal::Delete(deal_id) => {
                let snapshot = deals
                    .get(deal_id)
                    .and_then(|deal| serde_json::to_string(deal).ok());
                if crm.delete_deal(*deal_id)? {
                    report.counts.deleted += 1;
                    applied.push(change_record(
                        *deal_id,
                        ChangeKind::Delete,
                        None,
                        snapshot,
                        None,
                    ));
                }
                archived_or_deleted.insert(*deal_id);
            }
            Removal::Forget(_) | Removal::MovedAway(_) | Removal::Deferred(_) => {}
        }
    }
    issues.sort_by_key(|issue| issue.row_number.unwrap_or(0));
    report.counts.warnings = issues
        .iter()
        .filter(|issue| issue.severity == Severity::Warning)
        .count() as u64;

    // The mirror as the file holds it now, unless the write-back below rewrites the file.
    let mut new_rows: Vec<MirrorRow> = Vec::with_capacity(rows.len());
    for (row_idx, row) in rows.iter().enumerate() {
        match (row_deals[row_idx], row.has_error) {
            (Some(deal_id), false) => new_rows.push(MirrorRow {
                deal_id,
                row_number: row.row_number,
                row_hash: row.hash.clone(),
                fields: row.fields.clone(),
                extras: row.extras.clone(),
            }),
            // A row with errors keeps its previous mirror row: its deal keeps its state.
            (Some(deal_id), true) => {
                new_rows.extend(previous_mirror.get(&deal_id).map(|old| (*old).clone()))
            }
            (None, _) => {}
        }
    }
    for removal in &changeset.removals {
        if let Removal::Deferred(deal_id) = removal {
            new_rows.extend(previous_mirror.get(deal_id).map(|old| (*old).clone()));
        }
    }
    // Plan the write-back while the store is locked, so the plan shows the store as committed.
    let plan = if writes_back {
        let outcomes: Vec<RowOutcome> = rows
            .iter()
            .enumerate()
            .map(|(row_idx, row)| RowOutcome {
                row_number: row.row_number,
                deal_id: row_deals[row_idx],
                read: row.fields.clone(),
                merged: if row.has_error {
                    None
                } else {
                    row_merged[row_idx].clone()
                },
                extras: row.extras.clone(),
                key_cell: row.id,
            })
            .collect();
        let view: Vec<Deal> = match source.view {
            crate::config::View::All => crm
                .list_deals(&DealFilter::default())?
                .into_iter()
                .filter(|deal| source.filter_matches(&deal.fields))
                .collect(),
            // The deals of the rows the file holds now (new rows' deals included): archived,
            // deleted or filtered-out ones leave, and no other deal comes in.
            crate::config::View::Rows => {
                let mut ids: Vec<DealId> = row_deals.iter().flatten().copied().collect();
                ids.sort_unstable();
                ids.dedup();
                let mut held: Vec<Deal> = crm
                    .deals_by_ids(&ids)?
                    .into_values()
                    .filter(|deal| deal.archived_at.is_none())
                    .filter(|deal| source.filter_matches(&deal.fields))
                    .collect();
                held.sort_by_key(|deal| deal.id);
                held
            }
        };
        let n_columns = sheet.rows.iter().map(|row| row.width()).max().unwrap_or(0);
        Some(crate::writeback::plan(&header, n_columns, &outcomes, &view))
    } else {
        None
    };
    let _ = &archived_or_deleted;

    // First the store and the mirror of the file as it was read commit together; only then is
    // the file written. New deals' ids are thus committed before any file shows them, and a crash
    // at any point leaves a mirror that matches what the file holds (or held).
    let read_mirror = MirrorFile {
        file: file.clone(),
        source: source.name.clone(),
        sheet: sheet.sheet_name.clone(),
        content_hash: sheet.content_hash.clone(),
        header_row: header.row_number,
        headers: header.headers.clone(),
        synced_at: now,
        config_hash,
        store_version: None,
        known_error_rows: changeset.known_error_rows.clone(),
        rows: new_rows,
    };
    let counts = &report.counts;
    let changed = counts.created + counts.updated + counts.archived + counts.deleted > 0;
    report.status = if changed {
        FileStatus::Synced
    } else {
        FileStatus::Unchanged
    };
    // Only a sync that changed something is a run worth a line in the history; one that found
    // nothing to change is recorded as "checked" on the file.
    let mut run_id = if changed {
        let run_id = crm.record_run(&SyncRun {
            id: 0,
            source: source.name.clone(),
            file: file.clone(),
            started_at: now,
            finished_at: Utc::now().max(now),
            status: status_name(report.status).to_string(),
            counts: report.counts.clone(),
            message: None,
        })?;
        crm.record_changes(run_id, &applied)?;
        Some(run_id)
    } else {
        None
    };
    mirror::replace_issues(
        &transaction,
        &source.name,
        &file,
        Some(&sheet.sheet_name),
        run_id,
        &issues,
        now,
    )?;
    // Read under the write lock, so no other writer's change can hide between it and the commit.
    let store_version = crm.version()?;
    report.store_version = Some(store_version);
    // The mirror claims "shows the store as of this version" only once nothing is left to write:
    // a crash before the write-back below must not let the next sync skip the file.
    let write_pending = plan.as_ref().is_some_and(|plan| plan.changed);
    let read_mirror = MirrorFile {
        store_version: (!write_pending).then_some(store_version),
        ..read_mirror
    };
    mirror::save(&transaction, &read_mirror, previous.as_ref())?;
    transaction.commit().map_err(StoreError::from)?;

    if let Some(plan) = plan {
        if !plan.changed {
            report.write_back = WriteBack::UpToDate;
        } else {
            let stage_names: Vec<String> = config
                .stages
                .stages
                .iter()
                .map(|stage| stage.name.clone())
                .collect();
            match crate::writeback::write(&sheet, &plan, &stage_names, source.backups) {
                Ok(written) => {
                    report.write_back = WriteBack::Written;
                    let skipped_rows: HashSet<u32> = rows
                        .iter()
                        .enumerate()
                        .filter(|(row_idx, row)| row.has_error && row_deals[*row_idx].is_some())
                        .map(|(_, row)| row.row_number)
                        .collect();
                    let mut written_rows = Vec::with_capacity(plan.rows.len());
                    for (planned, row_number) in plan.rows.iter().zip(written.row_numbers) {
                        let Some(deal_id) = planned.deal_id else {
                            continue;
                        };
                        let was_skipped = planned
                            .origin
                            .is_some_and(|origin| skipped_rows.contains(&origin));
                        if was_skipped {
                            written_rows.extend(previous_mirror.get(&deal_id).map(|old| {
                                MirrorRow {
                                    row_number,
                                    ..(*old).clone()
                                }
                            }));
                        } else {
                            written_rows.push(mirror_row(
                                deal_id,
                                row_number,
                                &planned.fields,
                                &planned.extras,
                            ));
                        }
                    }
                    for removal in &changeset.removals {
                        if let Removal::Deferred(deal_id) = removal {
                            written_rows
                                .extend(previous_mirror.get(deal_id).map(|old| (*old).clone()));
                        }
                    }
                    let written_mirror = MirrorFile {
                        content_hash: written.content_hash,
                        rows: written_rows,
                        store_version: Some(store_version),
                        ..read_mirror.clone()
                    };
                    let transaction = store.transaction()?;
                    mirror::save(&transaction, &written_mirror, Some(&read_mirror))?;
                    transaction.commit().map_err(StoreError::from)?;
                }
                Err(error) => {
                    let message = error.to_string();
                    if error.is_deferred() {
                        report.write_back = WriteBack::Deferred(message.clone());
                        if let Some(run_id) = run_id {
                            note_on_run(store, run_id, None, &message)?;
                        }
                    } else {
                        // The file does not show the store's changes: that is a failure to see in
                        // `history`, `status` and `errors`, not a sync that went well. A sync that
                        // changed nothing in the store gets a failed run of its own for it.
                        report.write_back = WriteBack::Failed(message.clone());
                        let failure = if run_id.is_some() {
                            format!("the store was updated, but the file could not be written back: {message}")
                        } else {
                            format!("the file could not be written back: {message}")
                        };
                        let failed_run = match run_id {
                            Some(run_id) => {
                                note_on_run(store, run_id, Some(FileStatus::Failed), &failure)?;
                                run_id
                            }
                            None => {
                                record_lone_run(
                                    store,
                                    &report,
                                    FileStatus::Failed,
                                    failure.clone(),
                                    now,
                                )?
                                .0
                            }
                        };
                        run_id = Some(failed_run);
                        mirror::add_issue(
                            store.connection(),
                            &source.name,
                            &file,
                            Some(&sheet.sheet_name),
                            Some(failed_run),
                            &RowIssue {
                                severity: Severity::Error,
                                row_number: None,
                                column: None,
                                value: None,
                                message: failure,
                            },
                            now,
                        )?;
                    }
                    // The file does not show the store yet: the next sync must not skip it.
                    store
                        .connection()
                        .execute(
                            "UPDATE mirror_files SET store_version = NULL WHERE file = ?1",
                            [&file],
                        )
                        .map_err(StoreError::from)?;
                }
            }
        }
    }
    let (write_back, message) = report.write_back.parts();
    mirror::record_check(store.connection(), &file, now, Some((write_back, message)))?;
    report.run_id = run_id;
    report.issues = issues;
    Ok(report)
}

/// Sets a recorded run's message (what happened to the write-back after it), and its status when
/// given.
fn note_on_run(
    store: &Store,
    run_id: i64,
    status: Option<FileStatus>,
    message: &str,
) -> Result<(), StoreError> {
    store.connection().execute(
        "UPDATE sync_runs SET status = coalesce(?1, status), message = ?2 WHERE id = ?3",
        rusqlite::params![status.map(status_name), message, run_id],
    )?;
    Ok(())
}

/// Whether a file that writes back still shows the store as its last sync left it: for a file
/// that shows its own rows, none of its deals changed since; for a view of every deal (or of a
/// filter), no deal changed at all. A file that does not write back shows nothing of the store.
fn shows_the_store_still(
    store: &Store,
    source: &SourceConfig,
    file: &str,
    summary: &mirror::MirrorSummary,
) -> Result<bool, StoreError> {
    if !source.write_back {
        return Ok(true);
    }
    let Some(version) = summary.store_version else {
        return Ok(false);
    };
    let crm = store.crm();
    match source.view {
        crate::config::View::All => Ok(crm.version()? == version),
        crate::config::View::Rows => {
            let held = mirror::deal_ids(store.connection(), file)?;
            Ok(!crm.any_changed_since(&held, version)?)
        }
    }
}

/// The files (by [`file_key`]) that hold a deal changed after the store's change counter was
/// `version`: those that show their own rows and need a new sync to show the change.
pub fn files_with_changes_since(
    store: &Store,
    version: i64,
) -> Result<HashSet<String>, StoreError> {
    let changed: Vec<DealId> = store
        .crm()
        .ids_changed_since(version)?
        .into_iter()
        .collect();
    mirror::files_holding(store.connection(), &changed)
}

/// A hash of everything in the config that decides how a file is read and merged.
fn source_fingerprint(config: &Config, source: &SourceConfig) -> String {
    workbook::hash_bytes(format!("{source:?}{:?}", config.stages.stages).as_bytes())
}

/// Reports a file found exactly as last synced, without reading its rows. It is no run: the file
/// is only marked as checked.
fn unchanged(
    store: &mut Store,
    mut report: FileReport,
    summary: &mirror::MirrorSummary,
    now: DateTime<Utc>,
) -> Result<FileReport, SyncError> {
    tracing::debug!(file = %report.file, "content, settings and store unchanged since the last sync; not parsed");
    report.counts.unchanged = summary.n_rows;
    report.sheet = Some(summary.sheet.clone());
    report.status = FileStatus::Unchanged;
    report.store_version = Some(store.crm().version()?);
    mirror::record_check(store.connection(), &report.file, now, None)?;
    Ok(report)
}

/// Records, in a transaction of its own, a run that applied nothing to deals. Returns the run's
/// id and the store's change counter.
fn record_lone_run(
    store: &mut Store,
    report: &FileReport,
    status: FileStatus,
    message: String,
    now: DateTime<Utc>,
) -> Result<(i64, i64), SyncError> {
    let transaction = store.transaction()?;
    let crm = SqliteCrm::new(&transaction);
    let run_id = crm.record_run(&SyncRun {
        id: 0,
        source: report.source.clone(),
        file: report.file.clone(),
        started_at: now,
        finished_at: Utc::now().max(now),
        status: status_name(status).to_string(),
        counts: report.counts.clone(),
        message: Some(message),
    })?;
    let version = crm.version()?;
    transaction.commit().map_err(StoreError::from)?;
    Ok((run_id, version))
}

fn change_record(
    deal_id: DealId,
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

/// Records a held run (nothing applied) and returns the held report.
fn hold(
    store: &mut Store,
    report: FileReport,
    message: String,
    now: DateTime<Utc>,
) -> Result<FileReport, SyncError> {
    end_without_applying(store, report, FileStatus::Held, message, now)
}

fn quoted(value: &Option<FieldValue>) -> String {
    match value {
        Some(value) => format!("\"{value}\""),
        None => "nothing".to_string(),
    }
}

fn mirror_row(
    deal_id: DealId,
    row_number: u32,
    fields: &FieldMap,
    extras: &crate::deal::ExtraMap,
) -> MirrorRow {
    MirrorRow {
        deal_id,
        row_number,
        row_hash: mirror::row_hash(fields, extras),
        fields: fields.clone(),
        extras: extras.clone(),
    }
}

fn status_name(status: FileStatus) -> &'static str {
    match status {
        FileStatus::Synced => "synced",
        FileStatus::Unchanged => "unchanged",
        FileStatus::Failed => "failed",
        FileStatus::Held => "held",
    }
}

/// Records a run that applied nothing, with the reason, and returns the failed report.
fn fail(
    store: &mut Store,
    report: FileReport,
    message: String,
    now: DateTime<Utc>,
) -> Result<FileReport, SyncError> {
    end_without_applying(store, report, FileStatus::Failed, message, now)
}

/// Records a run that applied nothing (failed or held), with the reason.
fn end_without_applying(
    store: &mut Store,
    mut report: FileReport,
    status: FileStatus,
    message: String,
    now: DateTime<Utc>,
) -> Result<FileReport, SyncError> {
    let (run_id, _) = record_lone_run(store, &report, status, message.clone(), now)?;
    report.status = status;
    report.error = Some(message);
    report.run_id = Some(run_id);
    Ok(report)
}

fn deals_in_other_files(
    connection: &rusqlite::Connection,
    file: &str,
    deal_ids: &[DealId],
) -> Result<HashSet<DealId>, StoreError> {
    let mut found = HashSet::new();
    for chunk in deal_ids.chunks(500) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let sql = format!("SELECT DISTINCT deal_id FROM mirror_rows WHERE file != ? AND deal_id IN ({placeholders})");
        let mut statement = connection.prepare(&sql)?;
        let mut parameters: Vec<&dyn rusqlite::ToSql> = vec![&file];
        parameters.extend(chunk.iter().map(|id| id as &dyn rusqlite::ToSql));
        let rows = statement.query_map(parameters.as_slice(), |row| row.get::<_, DealId>(0))?;
        for row in rows {
            found.insert(row?);
        }
    }
    Ok(found)
}

/// One pass over every file of every source. A file claimed by two sources is synced by the
/// first only; the second reports it. When the pass changed the store and some source writes
/// back, the files of those sources are synced once more, so that a change read from one file
/// reaches the others in the same command.
pub fn sync_all(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<Vec<FileReport>, SyncError> {
    sync_all_forcing(store, config, now, &[])
}

/// [`sync_all`], applying the files in `forced` (by [`file_key`]) even where the mass-delete
/// guard would hold them.
pub fn sync_all_forcing(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    forced: &[String],
) -> Result<Vec<FileReport>, SyncError> {
    let version_before = store.crm().version()?;
    let (mut reports, files) = sync_pass(store, config, now, None, forced)?;
    let writing: Vec<&SourceConfig> = config
        .sources
        .iter()
        .filter(|source| source.write_back)
        .collect();
    let version_after = store.crm().version()?;
    if !writing.is_empty() && version_after != version_before {
        // Only files synced before the store last changed can be behind it.
        let behind: Vec<(String, PathBuf)> = files
            .into_iter()
            .filter(|(source_name, path)| {
                let key = file_key(path);
                // A file refused for a reason only a new version can fix is not read again.
                reports
                    .iter()
                    .find(|report| &report.source == source_name && report.file == key)
                    .is_none_or(|report| {
                        let refused = report.status == FileStatus::Failed && !report.retryable;
                        report.store_version != Some(version_after) && !refused
                    })
            })
            .collect();
        let (second, _) = sync_pass(store, config, now, Some(&behind), forced)?;
        for later in second {
            let Some(first) = reports
                .iter_mut()
                .find(|report| report.file == later.file && report.source == later.source)
            else {
                continue;
            };
            first.counts.created += later.counts.created;
            first.counts.updated += later.counts.updated;
            first.counts.archived += later.counts.archived;
            first.counts.deleted += later.counts.deleted;
            first.conflicts += later.conflicts;
            if matches!(
                later.write_back,
                WriteBack::Written | WriteBack::Deferred(_) | WriteBack::Failed(_)
            ) {
                first.write_back = later.write_back;
            }
            if first.status == FileStatus::Unchanged && later.status == FileStatus::Synced {
                first.status = FileStatus::Synced;
            }
        }
    }
    Ok(reports)
}

/// Logs the symbolic links of a source that are not sources and records them for `status`
/// (state `ignored`, with the reason); forgets those that are gone.
pub fn note_links_not_synced(
    store: &mut Store,
    source: &SourceConfig,
    not_sources: &[(PathBuf, String)],
    now: DateTime<Utc>,
) -> Result<(), SyncError> {
    let noted: Vec<(String, String)> = not_sources
        .iter()
        .map(|(path, reason)| {
            tracing::warn!(source = %source.name, "{}: {reason}", path.display());
            (file_key(path), format!("{}: {reason}", path.display()))
        })
        .collect();
    mirror::replace_ignored(store.connection(), &source.name, &noted, now)?;
    Ok(())
}

/// Files by the name of the source they belong to.
type SourceFiles = Vec<(String, PathBuf)>;

/// Syncs every file of every source (or, with `only`, the write-back sources' files among those
/// given). Returns the reports and the files synced, by source name.
fn sync_pass(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    only: Option<&[(String, PathBuf)]>,
    forced: &[String],
) -> Result<(Vec<FileReport>, SourceFiles), SyncError> {
    let mut reports = Vec::new();
    let mut synced = Vec::new();
    if let Some(files) = only {
        for (source_name, path) in files {
            let Some(source) = config
                .source(source_name)
                .filter(|source| source.write_back)
            else {
                continue;
            };
            let force = forced.contains(&file_key(path));
            reports.push(sync_file_with(store, config, source, path, now, force)?);
        }
        return Ok((reports, synced));
    }
    let mut claimed: HashMap<PathBuf, String> = HashMap::new();
    for source in &config.sources {
        let files = match config.discover(source) {
            Ok(discovery) => {
                note_links_not_synced(store, source, &discovery.not_sources, now)?;
                discovery.files
            }
            Err(error) => {
                let mut report = FileReport::failed(
                    &source.name,
                    &error.path.display().to_string(),
                    Some(error.to_string()),
                );
                report.retryable = true;
                reports.push(report);
                continue;
            }
        };
        for path in files {
            let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if let Some(owner) = claimed.get(&canonical) {
                reports.push(FileReport::failed(
                    &source.name,
                    &canonical.display().to_string(),
                    Some(format!("{} is already synced by source \"{owner}\"; a file can belong to one source only", canonical.display())),
                ));
                continue;
            }
            claimed.insert(canonical, source.name.clone());
            let force = forced.contains(&file_key(&path));
            reports.push(sync_file_with(store, config, source, &path, now, force)?);
            synced.push((source.name.clone(), path));
        }
    }
    Ok((reports, synced))
}

impl FileReport {
    fn failed(source: &str, file: &str, message: Option<String>) -> FileReport {
        FileReport {
            source: source.to_string(),
            file: file.to_string(),
            sheet: None,
            status: FileStatus::Failed,
            counts: RunCounts::default(),
            issues: Vec::new(),
            error: message,
            retryable: false,
            run_id: None,
            conflicts: 0,
            write_back: WriteBack::Off,
            store_version: None,
        }
    }
}

/// Whether a run-level problem is worth an error exit: any failed or held file, failed
/// write-back or row error.
pub fn has_problems(reports: &[FileReport]) -> bool {
    reports.iter().any(|report| {
        matches!(report.status, FileStatus::Failed | FileStatus::Held)
            || matches!(report.write_back, WriteBack::Failed(_))
            || report.n_row_errors() > 0
    })
}
