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
use crate::deal::{DealId, FieldValue};
use crate::mapping::{self, RowIssue, Severity};
use crate::mirror::{self, MirrorFile, MirrorRow};
use crate::store::{CrmStore, RunCounts, SqliteCrm, Store, StoreError, SyncRun};
use crate::workbook;
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
}

impl FileReport {
    pub fn n_row_errors(&self) -> usize {
        self.issues.iter().filter(|issue| issue.severity == Severity::Error).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key a file goes by in the mirror and the run history: its absolute path.
pub fn file_key(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())).to_string_lossy().into_owned()
}

/// Syncs one file of a source. Errors reading or understanding the file are part of the report
/// (status `Failed`, nothing applied); only a failing store is an `Err`.
pub fn sync_file(store: &mut Store, config: &Config, source: &SourceConfig, path: &Path, now: DateTime<Utc>) -> Result<FileReport, SyncError> {
    let file = file_key(path);
    let mut report = FileReport {
        source: source.name.clone(),
        file: file.clone(),
        sheet: None,
        status: FileStatus::Failed,
        counts: RunCounts::default(),
        issues: Vec::new(),
        error: None,
        retryable: false,
        run_id: None,
    };

    let sheet = match workbook::read_sheet(path, source.sheet.as_deref(), source.encoding) {
        Ok(sheet) => sheet,
        Err(error) => {
            report.retryable = error.is_retryable();
            return fail(store, report, error.to_string(), now);
        }
    };
    report.sheet = Some(sheet.sheet_name.clone());
    let header = match mapping::locate_header(&sheet.rows, source) {
        Ok(header) => header,
        Err(error) => {
            let message = format!("{}: sheet \"{}\": {error}", sheet.path.display(), sheet.sheet_name);
            return fail(store, report, message, now);
        }
    };
    let (rows, mut issues) = mapping::map_rows(&sheet.rows, &header, source, &config.stages);
    let sheet_fields: Vec<crate::deal::Field> =
        crate::deal::Field::ALL.into_iter().filter(|field| header.column_of(*field).is_some()).collect();

    let transaction = store.transaction()?;
    let previous = mirror::load(&transaction, &file)?;
    let mirror_rows: &[MirrorRow] = previous.as_ref().map(|previous| previous.rows.as_slice()).unwrap_or(&[]);
    let crm = SqliteCrm::new(&transaction);

    // Load every deal the diff may need, in as few queries as the data allows.
    let mut natural_matches = HashMap::new();
    let mut wanted_ids: Vec<DealId> = rows.iter().filter_map(|row| row.id).collect();
    wanted_ids.extend(mirror_rows.iter().map(|row| row.deal_id));
    for key in diff::lookups_needed(&rows, mirror_rows, &source.match_on) {
        let value = match key.0.kind() {
            crate::deal::FieldKind::Amount => key.1.parse::<f64>().map(FieldValue::Amount).unwrap_or(FieldValue::Text(key.1.clone())),
            _ => FieldValue::Text(key.1.clone()),
        };
        if let Some(deal) = crm.find_by_field(key.0, &value)? {
            wanted_ids.push(deal.id);
            natural_matches.insert(key, deal.id);
        }
    }
    wanted_ids.sort_unstable();
    wanted_ids.dedup();
    let deals = crm.deals_by_ids(&wanted_ids)?;
    let mirror_ids: Vec<DealId> = mirror_rows.iter().map(|row| row.deal_id).collect();
    let deals_in_other_files = deals_in_other_files(&transaction, &file, &mirror_ids)?;

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
    });
    issues.extend(diff_issues);
    issues.sort_by_key(|issue| issue.row_number.unwrap_or(0));

    // Apply, and build the mirror as the file now is.
    let previous_mirror: HashMap<DealId, &MirrorRow> = mirror_rows.iter().map(|row| (row.deal_id, row)).collect();
    let mut new_rows = Vec::with_capacity(rows.len());
    let counts = &mut report.counts;
    for action in &changeset.actions {
        let mirror_deal = match action {
            RowAction::Create { row_idx } => {
                let row = &rows[*row_idx];
                let mut fields = row.fields.clone();
                // A new deal without a stage starts at the top of the funnel.
                fields
                    .entry(crate::deal::Field::Stage)
                    .or_insert_with(|| FieldValue::Text(config.stages.first().name.clone()));
                let deal_id = crm.create_deal(&fields, &row.extras, &source.name, now)?;
                counts.created += 1;
                Some((*row_idx, deal_id))
            }
            RowAction::Update { row_idx, deal_id, changes, extra_changes, unarchive } => {
                if *unarchive {
                    crm.set_archived(*deal_id, false, now)?;
                }
                crm.update_deal(*deal_id, changes, extra_changes, &source.name, now)?;
                counts.updated += 1;
                Some((*row_idx, *deal_id))
            }
            RowAction::Unchanged { row_idx, deal_id } => {
                counts.unchanged += 1;
                Some((*row_idx, *deal_id))
            }
            RowAction::Skipped { deal_id, .. } => {
                counts.errors += 1;
                // The deal keeps its previous state, and so does its mirror row.
                if let Some(old) = deal_id.and_then(|deal_id| previous_mirror.get(&deal_id)) {
                    new_rows.push((*old).clone());
                }
                None
            }
        };
        if let Some((row_idx, deal_id)) = mirror_deal {
            let row = &rows[row_idx];
            new_rows.push(MirrorRow {
                deal_id,
                row_number: row.row_number,
                row_hash: mirror::row_hash(&row.fields, &row.extras),
                fields: row.fields.clone(),
                extras: row.extras.clone(),
            });
        }
    }
    for removal in &changeset.removals {
        match removal {
            Removal::Archive(deal_id) => {
                if crm.set_archived(*deal_id, true, now)? {
                    counts.archived += 1;
                }
            }
            Removal::Delete(deal_id) => {
                if crm.delete_deal(*deal_id)? {
                    counts.deleted += 1;
                }
            }
            Removal::Forget(_) | Removal::MovedAway(_) => {}
            Removal::Deferred(deal_id) => {
                if let Some(old) = previous_mirror.get(deal_id) {
                    new_rows.push((*old).clone());
                }
            }
        }
    }
    counts.warnings = issues.iter().filter(|issue| issue.severity == Severity::Warning).count() as u64;

    let new_mirror = MirrorFile {
        file: file.clone(),
        source: source.name.clone(),
        sheet: sheet.sheet_name.clone(),
        content_hash: sheet.content_hash.clone(),
        header_row: header.row_number,
        headers: header.headers.clone(),
        synced_at: now,
        rows: new_rows,
    };
    mirror::save(&transaction, &new_mirror, previous.as_ref())?;
    let changed = counts.created + counts.updated + counts.archived + counts.deleted > 0;
    report.status = if changed { FileStatus::Synced } else { FileStatus::Unchanged };
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
    mirror::replace_issues(&transaction, &source.name, &file, Some(&sheet.sheet_name), run_id, &issues, now)?;
    transaction.commit().map_err(StoreError::from)?;
    report.run_id = Some(run_id);
    report.issues = issues;
    Ok(report)
}

fn status_name(status: FileStatus) -> &'static str {
    match status {
        FileStatus::Synced => "synced",
        FileStatus::Unchanged => "unchanged",
        FileStatus::Failed => "failed",
    }
}

/// Records a run that applied nothing, with the reason, and returns the failed report.
fn fail(store: &mut Store, mut report: FileReport, message: String, now: DateTime<Utc>) -> Result<FileReport, SyncError> {
    let transaction = store.transaction()?;
    let crm = SqliteCrm::new(&transaction);
    let run_id = crm.record_run(&SyncRun {
        id: 0,
        source: report.source.clone(),
        file: report.file.clone(),
        started_at: now,
        finished_at: Utc::now().max(now),
        status: status_name(FileStatus::Failed).to_string(),
        counts: RunCounts::default(),
        message: Some(message.clone()),
    })?;
    transaction.commit().map_err(StoreError::from)?;
    report.status = FileStatus::Failed;
    report.error = Some(message);
    report.run_id = Some(run_id);
    Ok(report)
}

fn deals_in_other_files(connection: &rusqlite::Connection, file: &str, deal_ids: &[DealId]) -> Result<HashSet<DealId>, StoreError> {
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
/// first only; the second reports it.
pub fn sync_all(store: &mut Store, config: &Config, now: DateTime<Utc>) -> Result<Vec<FileReport>, SyncError> {
    let mut reports = Vec::new();
    let mut claimed: HashMap<PathBuf, String> = HashMap::new();
    for source in &config.sources {
        let files = match crate::watch::source_files(source) {
            Ok(files) => files,
            Err(error) => {
                reports.push(FileReport {
                    source: source.name.clone(),
                    file: error.path.display().to_string(),
                    sheet: None,
                    status: FileStatus::Failed,
                    counts: RunCounts::default(),
                    issues: Vec::new(),
                    error: Some(error.to_string()),
                    retryable: true,
                    run_id: None,
                });
                continue;
            }
        };
        for path in files {
            let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if let Some(owner) = claimed.get(&canonical) {
                reports.push(FileReport {
                    source: source.name.clone(),
                    file: canonical.display().to_string(),
                    sheet: None,
                    status: FileStatus::Failed,
                    counts: RunCounts::default(),
                    issues: Vec::new(),
                    error: Some(format!("{} is already synced by source \"{owner}\"; a file can belong to one source only", canonical.display())),
                    retryable: false,
                    run_id: None,
                });
                continue;
            }
            claimed.insert(canonical, source.name.clone());
            reports.push(sync_file(store, config, source, &path, now)?);
        }
    }
    Ok(reports)
}

/// Whether a run-level problem is worth an error exit: any failed file or row error.
pub fn has_problems(reports: &[FileReport]) -> bool {
    reports.iter().any(|report| report.status == FileStatus::Failed || report.n_row_errors() > 0)
}
