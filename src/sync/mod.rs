//! One sync of one file: read, map, diff against the mirror, apply to the store — all of the
//! writing in one transaction — and report what happened.
//!
//! This module owns the order of the steps and the rule that nothing is applied from a file that
//! could not be read whole. It must not know how files are found or watched (that is
//! [`crate::watch`]) nor how reports are printed (that is [`crate::cli`]).

pub mod diff;
mod file;
pub mod merge;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, SourceConfig};
use crate::deal::{DealId, FieldValue};
use crate::mapping::{RowIssue, Severity};
use crate::store::mirror;
use crate::store::{CrmStore, RunCounts, Store, StoreError, SyncRun};
use crate::workbook;

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
) -> Result<FileReport, StoreError> {
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
) -> Result<FileReport, StoreError> {
    // The phases of a sync are logged (at debug) as they begin, so that a log shows where a sync
    // was when the process stopped: read, transaction, write-back, done.
    tracing::debug!(file = %path.display(), phase = "read", "sync phase");
    // Concurrent writers to a PostgreSQL store may make it ask for a transaction again: the
    // whole sync is run again, not reported as failed.
    let report = crate::store::retrying(|| file::sync(store, config, source, path, now, force));
    tracing::debug!(file = %path.display(), phase = "done", "sync phase");
    report
}

/// Sets a recorded run's message (what happened to the write-back after it), and its status when
/// given.
fn note_on_run(
    store: &Store,
    run_id: i64,
    status: Option<FileStatus>,
    message: &str,
) -> Result<(), StoreError> {
    store
        .crm()
        .note_on_run(run_id, status.map(status_name), message)
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
            let held = mirror::deal_ids(&crm, file)?;
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
    mirror::files_holding(&store.db(), &changed)
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
) -> Result<FileReport, StoreError> {
    tracing::debug!(file = %report.file, "content, settings and store unchanged since the last sync; not parsed");
    report.counts.unchanged = mirror::count_rows(&store.db(), &report.file)?;
    report.sheet = Some(summary.sheet.clone());
    report.status = FileStatus::Unchanged;
    report.store_version = Some(store.crm().version()?);
    mirror::record_check(&store.db(), &report.file, now, None)?;
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
) -> Result<(i64, i64), StoreError> {
    let transaction = store.transaction()?;
    let crm = &*transaction;
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
    transaction.commit()?;
    Ok((run_id, version))
}

/// Records a held run (nothing applied) and returns the held report.
fn hold(
    store: &mut Store,
    report: FileReport,
    message: String,
    now: DateTime<Utc>,
) -> Result<FileReport, StoreError> {
    end_without_applying(store, report, FileStatus::Held, message, now)
}

fn quoted(value: &Option<FieldValue>) -> String {
    match value {
        Some(value) => format!("\"{value}\""),
        None => "nothing".to_string(),
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
) -> Result<FileReport, StoreError> {
    end_without_applying(store, report, FileStatus::Failed, message, now)
}

/// Records a run that applied nothing (failed or held), with the reason.
fn end_without_applying(
    store: &mut Store,
    mut report: FileReport,
    status: FileStatus,
    message: String,
    now: DateTime<Utc>,
) -> Result<FileReport, StoreError> {
    let (run_id, _) = record_lone_run(store, &report, status, message.clone(), now)?;
    report.status = status;
    report.error = Some(message);
    report.run_id = Some(run_id);
    Ok(report)
}

/// One pass over every file of every source. A file claimed by two sources is synced by the
/// first only; the second reports it. When the pass changed the store and some source writes
/// back, the files of those sources are synced once more, so that a change read from one file
/// reaches the others in the same command. The files in `forced` (by [`file_key`]) are applied
/// even where the mass-delete guard would hold them.
pub fn sync_all_forcing(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    forced: &[String],
) -> Result<Vec<FileReport>, StoreError> {
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
) -> Result<(), StoreError> {
    let noted: Vec<(String, String)> = not_sources
        .iter()
        .map(|(path, reason)| {
            tracing::warn!(source = %source.name, "{}: {reason}", path.display());
            (file_key(path), format!("{}: {reason}", path.display()))
        })
        .collect();
    crate::store::files::replace_ignored(&store.db(), &source.name, &noted, now)?;
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
) -> Result<(Vec<FileReport>, SourceFiles), StoreError> {
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
        let files = match crate::watch::discover(config, source) {
            Ok(discovery) => {
                note_links_not_synced(store, source, &discovery.not_sources, now)?;
                discovery.files
            }
            Err(error) => {
                let mut report = FileReport::failed(
                    &source.name,
                    &error.path().display().to_string(),
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
