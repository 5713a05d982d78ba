//! The sync of one file as a stream, in phases: the fast path for an unchanged file; reading,
//! where rows come off a reading thread in batches and each row is classed by the hash of its
//! cells — a row that hashes as it did at the last sync, whose deal did not change since, is
//! *quiet* and is not even cleaned —; matching and merging the other rows; the mass-delete guard;
//! applying; the mirror; the write-back plan; the commit; the write.
//!
//! What a sync holds of the sheet is the compact index of the mirror (row hash → deal), the ids
//! of the deals the file holds, and the rows that changed. A first import has no mirror: its rows
//! are matched, applied and forgotten batch by batch, so its memory is bounded by a batch. All of
//! it is one transaction, so a sync stopped anywhere (a read error, a kill) leaves the store as it
//! was.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use chrono::{DateTime, Utc};

use super::diff::{self, DiffInput, Removal, RowAction};
use super::merge::Conflict;
use super::{
    fail, hold, note_on_run, quoted, record_lone_run, shows_the_store_still, source_fingerprint,
    status_name, unchanged, FileReport, FileStatus, WriteBack,
};
use crate::config::{Config, SourceConfig, View};
use crate::deal::{Deal, DealId, ExtraMap, Field, FieldKind, FieldMap, FieldValue};
use crate::mapping::{self, CleanRow, ColumnRole, HeaderMap, RowIssue, Severity};
use crate::store::mirror::{self, MirrorHead, MirrorRow};
use crate::store::{
    ChangeKind, ChangeRecord, ConflictRecord, CrmStore, Db, Store, StoreError, SyncRun,
};
use crate::workbook::{self, SheetRow, SheetStream, WorkbookError};
use crate::writeback::RowOutcome;

/// How many changed rows of a first import are matched and applied at a time.
const IMPORT_BATCH: usize = 2048;

/// What the sync knows of a changed row besides its cleaned values.
#[derive(Debug, Clone)]
pub(super) struct RowMeta {
    /// [`SheetRow::raw_hash`] of the row as read.
    pub raw_hash: i64,
    /// Whether the row cleaned without any issue: only then is its raw hash remembered, so that a
    /// row with a warning is looked at (and warned about) every time.
    pub clean_without_issues: bool,
    /// Mapped fields whose cell holds a formula.
    pub formula_fields: Vec<Field>,
    /// Named extra columns whose cell holds a formula.
    pub formula_extras: Vec<String>,
    /// For each date column, the nearest row above that holds a date there (its style is the
    /// column's date style).
    pub date_rows_above: Vec<u32>,
}

/// Rows that changed since the last sync (or are new): cleaned, and what else the sync needs of
/// each, side by side.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub rows: Vec<CleanRow>,
    pub meta: Vec<RowMeta>,
}

impl Pending {
    fn len(&self) -> usize {
        self.rows.len()
    }
}

/// The compact index of the mirror: rows by the hash of their cells, each taken once.
///
/// A sync looks up every row of the sheet here, in no order the index could follow. A binary
/// search over 100,000 entries missed the processor's caches on most of its 17 steps (about a
/// microsecond a row); raw hashes are spread evenly over all 64 bits, so their top bits say
/// where in the sorted list a hash sits, to within an entry or two, and a lookup reads one
/// bucket start and one short run of entries.
#[derive(Debug, Default)]
pub(super) struct QuietIndex {
    /// (raw hash, deal id), sorted; a deal id is negated once its row is taken (deal ids are
    /// positive), so that taking costs no second list to look at.
    entries: Vec<(i64, DealId)>,
    /// Where each bucket's entries start in `entries`, and one past the last bucket's end.
    bucket_starts: Vec<u32>,
    /// How many top bits of a hash name its bucket.
    bucket_bits: u32,
}

impl QuietIndex {
    /// The entries' deal ids are positive (`mirror::load_keys` keeps any other apart): taking a
    /// row negates its deal.
    pub fn new(mut entries: Vec<(i64, DealId)>) -> QuietIndex {
        debug_assert!(entries.iter().all(|(_, deal_id)| *deal_id > 0));
        entries.sort_unstable();
        // About two entries a bucket: a bucket start costs 4 bytes against an entry's 16.
        let bucket_bits = (entries.len() / 2)
            .max(1)
            .next_power_of_two()
            .trailing_zeros();
        let n_buckets = 1usize << bucket_bits;
        let mut bucket_starts = Vec::with_capacity(n_buckets + 1);
        let mut position = 0usize;
        for bucket in 0..n_buckets {
            while position < entries.len() && bucket_of(entries[position].0, bucket_bits) < bucket {
                position += 1;
            }
            bucket_starts.push(u32::try_from(position).unwrap_or(u32::MAX));
        }
        bucket_starts.push(u32::try_from(entries.len()).unwrap_or(u32::MAX));
        QuietIndex {
            entries,
            bucket_starts,
            bucket_bits,
        }
    }

    /// The deal of an untaken mirror row with this raw hash, without taking it.
    pub fn find(&self, raw_hash: i64) -> Option<(usize, DealId)> {
        let bucket = bucket_of(raw_hash, self.bucket_bits);
        let start = *self.bucket_starts.get(bucket)? as usize;
        let end = *self.bucket_starts.get(bucket + 1)? as usize;
        let in_bucket = self.entries.get(start..end)?;
        let first = start + in_bucket.partition_point(|(hash, _)| *hash < raw_hash);
        self.entries[first..end]
            .iter()
            .take_while(|(hash, _)| *hash == raw_hash)
            .position(|(_, deal_id)| *deal_id > 0)
            .map(|offset| (first + offset, self.entries[first + offset].1))
    }

    pub fn take(&mut self, position: usize) {
        if let Some((_, deal_id)) = self.entries.get_mut(position) {
            *deal_id = -deal_id.abs();
        }
    }

    /// The deal of every entry, taken or not.
    pub fn deal_ids(&self) -> impl Iterator<Item = DealId> + '_ {
        self.entries.iter().map(|(_, deal_id)| deal_id.abs())
    }
}

/// The bucket of a hash: its top `bucket_bits` bits, taken so that buckets follow the hashes'
/// signed order.
fn bucket_of(hash: i64, bucket_bits: u32) -> usize {
    if bucket_bits == 0 {
        return 0;
    }
    (((hash as u64) ^ (1 << 63)) >> (64 - bucket_bits)) as usize
}

/// What classing a row found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowClass {
    /// Unchanged in the sheet and its deal unchanged in the store since: nothing to do.
    Quiet(DealId),
    /// Cleaned and merged; the deal its cells point to, if the mirror knew them.
    Pending(Option<DealId>),
}

/// Classes one row (pure): quiet when its cells hash as a mirror row did, the key cell (if the
/// sheet has one) names that row's deal, and the deal did not change since the file last showed
/// the store.
pub(super) fn class_of(
    index: &QuietIndex,
    raw_hash: i64,
    key_cell: Option<Option<DealId>>,
    changed: &HashSet<DealId>,
) -> (RowClass, Option<usize>) {
    let Some((position, deal_id)) = index.find(raw_hash) else {
        return (RowClass::Pending(None), None);
    };
    let key_agrees = match key_cell {
        None => true,
        Some(key) => key == Some(deal_id),
    };
    if key_agrees && !changed.contains(&deal_id) {
        (RowClass::Quiet(deal_id), Some(position))
    } else {
        (RowClass::Pending(Some(deal_id)), None)
    }
}

/// Runs the sync of one file. Errors reading or understanding the file are part of the report;
/// only a failing store is an `Err`.
pub(super) fn sync(
    store: &mut Store,
    config: &Config,
    source: &SourceConfig,
    path: &Path,
    now: DateTime<Utc>,
    force: bool,
) -> Result<FileReport, StoreError> {
    let file = super::file_key(path);
    // Failed until it gets further.
    let mut report = FileReport::failed(&source.name, &file, None);

    // A file synced before whose sheet or header is now gone is held, not just failed: that is
    // how "all rows deleted" would look, and someone should look.
    let summary = mirror::summary(&store.db(), &file)?;
    let synced_before = summary.as_ref().is_some_and(|summary| summary.has_rows);
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

    // Phase 1, the fast path: the same bytes, the same settings and (for a file that writes
    // back) the same store as at the last sync: nothing can have changed, nothing is parsed.
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

    // Phase 2, reading: the rows come off a thread of their own.
    let mut stream = match SheetStream::start(
        opened,
        source.sheet.as_deref(),
        source.encoding,
        &config.limits,
    ) {
        Ok(stream) => stream,
        Err(
            error @ (WorkbookError::SheetNotFound { .. } | WorkbookError::NoVisibleSheet { .. }),
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
    report.sheet = Some(stream.sheet_name.clone());
    let display_path = path.display().to_string();
    let (header, first_rows) = match read_header(&mut stream, source) {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            let message = format!("{display_path}: sheet \"{}\": {error}", stream.sheet_name);
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
        Err(error) => {
            report.retryable = error.is_retryable();
            return fail(store, report, error.to_string(), now);
        }
    };
    let writes_back = may_write_back
        && matches!(
            workbook::format_of(path),
            Some(workbook::FileFormat::Xlsx | workbook::FileFormat::Csv)
        );

    let context = Context {
        config,
        source,
        file: &file,
        now,
        header: &header,
        writes_back,
        calendar: crate::remind::Calendar::of(config),
        sheet_fields: Field::ALL
            .into_iter()
            .filter(|field| header.column_of(*field).is_some())
            .collect(),
        sheet_extras: header
            .roles
            .iter()
            .filter_map(|role| match role {
                Some(ColumnRole::Extra(name)) => Some(name.clone()),
                _ => None,
            })
            .collect(),
        file_modified: stream.modified,
    };
    let transaction = store.transaction()?;
    let outcome = match sync_rows(&transaction, &context, &mut stream, first_rows, force) {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(stop)) => {
            // Nothing of this sync is applied.
            drop(transaction);
            return match stop {
                Stop::Unreadable(error) => {
                    report.retryable = error.is_retryable();
                    fail(store, report, error.to_string(), now)
                }
                Stop::Held { message, issues } => {
                    report.issues = issues;
                    hold(store, report, message, now)
                }
            };
        }
        Err(error) => return Err(error),
    };
    let Synced {
        mut issues,
        counts,
        conflicts,
        applied,
        run_id: early_run_id,
        plan,
        head,
        known_error_rows,
        removed_from_view,
    } = outcome;
    report.counts = counts;
    report.conflicts = conflicts;
    issues.sort_by_key(|issue| issue.row_number.unwrap_or(0));
    report.counts.warnings = issues
        .iter()
        .filter(|issue| issue.severity == Severity::Warning)
        .count() as u64;

    tracing::debug!(file = %path.display(), phase = "transaction", "sync phase");
    // Phase 7, the commit: the run, the changes, the row errors and the mirror of the file as
    // read commit with the store; only then is the file written. New deals' ids are thus
    // committed before any file shows them, and a crash at any point leaves a mirror that
    // matches what the file holds (or held).
    let crm = &*transaction;
    let changed = {
        let counts = &report.counts;
        counts.created + counts.updated + counts.archived + counts.deleted > 0
    };
    report.status = if changed {
        FileStatus::Synced
    } else {
        FileStatus::Unchanged
    };
    // Only a sync that changed something is a run worth a line in the history; one that found
    // nothing to change is recorded as "checked" on the file.
    let mut run_id = if changed {
        let run = SyncRun {
            id: 0,
            source: source.name.clone(),
            file: file.clone(),
            started_at: now,
            finished_at: Utc::now().max(now),
            status: status_name(report.status).to_string(),
            counts: report.counts.clone(),
            message: None,
        };
        let run_id = match early_run_id {
            Some(run_id) => {
                crm.finish_run(run_id, &run)?;
                run_id
            }
            None => crm.record_run(&run)?,
        };
        crm.record_changes(run_id, &applied)?;
        Some(run_id)
    } else {
        None
    };
    mirror::replace_issues(
        &transaction,
        &source.name,
        &file,
        Some(&stream.sheet_name),
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
    let read_head = MirrorHead {
        file: file.clone(),
        source: source.name.clone(),
        sheet: stream.sheet_name.clone(),
        content_hash: stream.content_hash.clone(),
        header_row: header.row_number,
        headers: header.headers.clone(),
        synced_at: now,
        config_hash,
        store_version: (!write_pending).then_some(store_version),
        synced_version: Some(store_version),
        shown_version: if write_pending {
            head.as_ref().and_then(|head| head.shown_version)
        } else {
            Some(store_version)
        },
        known_error_rows,
    };
    mirror::save_head(&transaction, &read_head)?;
    transaction.commit()?;

    // Phase 8, the write.
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
            let sheet_file = workbook::SheetData {
                path: path.to_path_buf(),
                format: stream.format,
                sheet_name: stream.sheet_name.clone(),
                rows: Vec::new(),
                content_hash: stream.content_hash.clone(),
                modified: stream.modified,
                csv_format: stream.end().and_then(|end| end.csv_format.clone()),
                formula_cells: plan.formula_cells.clone(),
            };
            tracing::debug!(file = %path.display(), phase = "write-back", "sync phase");
            match crate::writeback::write(&sheet_file, &plan, &stage_names, source.backups) {
                Ok(written) => {
                    report.write_back = WriteBack::Written;
                    // What the write changed in the mirror: rows with new values (their cells no
                    // longer hash as read: they are cleaned once more next time), new rows, and
                    // rows taken out of the sheet.
                    let mut written_rows = Vec::new();
                    for (planned, row_number) in plan.rows.iter().zip(&written.row_numbers) {
                        let Some(deal_id) = planned.deal_id else {
                            continue;
                        };
                        let values_changed = planned.origin.is_none()
                            || planned
                                .overrides
                                .keys()
                                .any(|column_idx| Some(*column_idx) != plan_key_column(&plan));
                        if values_changed {
                            written_rows.push(MirrorRow {
                                deal_id,
                                row_number: *row_number,
                                row_hash: crate::deal::row_hash(&planned.fields, &planned.extras),
                                raw_hash: None,
                                fields: planned.fields.clone(),
                                extras: planned.extras.clone(),
                            });
                        }
                    }
                    let transaction = store.transaction()?;
                    mirror::upsert_rows(&transaction, &file, &written_rows)?;
                    mirror::delete_rows(&transaction, &file, &removed_from_view)?;
                    let written_head = MirrorHead {
                        content_hash: written.content_hash,
                        store_version: Some(store_version),
                        shown_version: Some(store_version),
                        ..read_head.clone()
                    };
                    mirror::save_head(&transaction, &written_head)?;
                    transaction.commit()?;
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
                            &store.db(),
                            &source.name,
                            &file,
                            Some(&stream.sheet_name),
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
                }
            }
        }
    }
    let (write_back, message) = report.write_back.parts();
    mirror::record_check(&store.db(), &file, now, Some((write_back, message)))?;
    report.run_id = run_id;
    report.issues = issues;
    Ok(report)
}

fn plan_key_column(plan: &crate::writeback::SheetPlan) -> Option<usize> {
    plan.roles
        .iter()
        .position(|role| role == &Some(ColumnRole::Key))
}

/// What does not change during one file's sync.
struct Context<'a> {
    config: &'a Config,
    source: &'a SourceConfig,
    file: &'a str,
    now: DateTime<Utc>,
    header: &'a HeaderMap,
    writes_back: bool,
    calendar: crate::remind::Calendar,
    sheet_fields: Vec<Field>,
    /// The sheet's named extra columns (see `DiffInput::sheet_extras`).
    sheet_extras: Vec<String>,
    file_modified: Option<DateTime<Utc>>,
}

/// Why a sync stops without applying anything.
enum Stop {
    Unreadable(WorkbookError),
    Held {
        message: String,
        issues: Vec<RowIssue>,
    },
}

/// What the phases before the commit produced.
struct Synced {
    issues: Vec<RowIssue>,
    counts: crate::store::RunCounts,
    conflicts: u64,
    applied: Vec<ChangeRecord>,
    /// The run already recorded for changes written out during the sync.
    run_id: Option<i64>,
    plan: Option<crate::writeback::SheetPlan>,
    head: Option<MirrorHead>,
    /// The rows with errors that no removal waited for (see `MirrorHead::known_error_rows`).
    known_error_rows: Vec<String>,
    /// Deals whose rows the write-back takes out of the sheet (they left its view): their
    /// mirror rows go once the file is written.
    removed_from_view: Vec<DealId>,
}

/// Reads rows until the header is found (it is among the first rows). Returns the header and
/// the rows read so far, the header's among them.
fn read_header(
    stream: &mut SheetStream,
    source: &SourceConfig,
) -> Result<Result<(HeaderMap, Vec<SheetRow>), mapping::HeaderError>, WorkbookError> {
    let mut rows: Vec<SheetRow> = Vec::new();
    let enough = |rows: &[SheetRow]| match source.header_row {
        crate::config::HeaderRow::Fixed(row_number) => {
            rows.last().is_some_and(|row| row.row_number >= row_number)
        }
        crate::config::HeaderRow::Auto => rows.len() > mapping::HEADER_SEARCH_ROWS,
    };
    while !enough(&rows) {
        match stream.next_rows()? {
            Some(batch) => rows.extend(batch),
            None => break,
        }
    }
    Ok(mapping::locate_header(&rows, source).map(|header| (header, rows)))
}

/// Phases 2 to 6 inside the transaction: the rest of the read, classing, matching and merging,
/// the guard, applying, the mirror of the rows as read, and the write-back plan.
fn sync_rows(
    transaction: &Db<'_>,
    context: &Context<'_>,
    stream: &mut SheetStream,
    first_rows: Vec<SheetRow>,
    force: bool,
) -> Result<Result<Synced, Stop>, StoreError> {
    let crm = transaction;
    let header = context.header;
    let head = mirror::load_head(transaction, context.file)?;
    if head.is_none() {
        // The mirror rows written as batches are applied need their file's entry; the whole
        // entry is written at the commit.
        mirror::save_head(
            transaction,
            &MirrorHead {
                file: context.file.to_string(),
                source: context.source.name.clone(),
                sheet: String::new(),
                content_hash: String::new(),
                header_row: header.row_number,
                headers: Vec::new(),
                synced_at: context.now,
                config_hash: String::new(),
                store_version: None,
                synced_version: None,
                shown_version: None,
                known_error_rows: Vec::new(),
            },
        )?;
    }
    let (mirror_index, other_mirror_deal_ids) = mirror::load_keys(transaction, context.file)?;
    let n_mirror_rows = mirror_index.len() + other_mirror_deal_ids.len();
    let import = n_mirror_rows == 0;
    let key_column = header.key_column();
    // The index of quiet rows is trusted only when the rows were read with the same settings and
    // the store changes since are known; a file that writes back but has no key column yet needs
    // every row looked at (each gets its CRM ID).
    let since = head.as_ref().and_then(|head| {
        if context.writes_back {
            head.shown_version
        } else {
            head.synced_version
        }
    });
    let needs_every_row = import || (context.writes_back && key_column.is_none());
    let index_usable = !needs_every_row
        && head.as_ref().is_some_and(|head| {
            head.config_hash == source_fingerprint(context.config, context.source)
        })
        && since.is_some();
    // The index is kept even when it cannot be trusted: it also names the deals the file holds.
    let index = QuietIndex::new(mirror_index);
    let changed = if index_usable {
        crm.ids_changed_since(since.unwrap_or(i64::MAX))?
    } else {
        HashSet::new()
    };
    let date_columns: Vec<u32> = header
        .roles
        .iter()
        .enumerate()
        .filter(|(_, role)| matches!(role, Some(ColumnRole::Field(field)) if field.kind() == FieldKind::Date))
        .filter_map(|(column_idx, _)| u32::try_from(column_idx).ok())
        .collect();

    let mut state = RowsState::default();
    let mut applier = Applier::new(context, crm);
    let mut classifier = Classifier {
        context,
        index,
        index_usable,
        changed,
        key_column,
        date_columns,
        gathered: RowsState::default(),
    };
    // Classing and cleaning the rows (phase 2) runs on a thread of its own, a batch ahead of the
    // matching and applying (phases 3 to 5) here: with the reading thread, a sync keeps both cores
    // busy. A first import is applied batch by batch as the rows come; other syncs gather the
    // changed rows, which are few.
    let mut pending = Pending::default();
    let (classed, applied) = std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Pending>(2);
        let classing = scope.spawn(move || -> Result<Classifier<'_>, WorkbookError> {
            let mut batch = Pending::default();
            classifier.class_rows(&first_rows, &mut batch);
            stream.give_back(first_rows);
            loop {
                if batch.len() >= IMPORT_BATCH && sender.send(std::mem::take(&mut batch)).is_err() {
                    return Ok(classifier);
                }
                match stream.next_rows()? {
                    Some(rows) => {
                        classifier.class_rows(&rows, &mut batch);
                        stream.give_back(rows);
                    }
                    None => break,
                }
            }
            let _ = sender.send(batch);
            Ok(classifier)
        });
        let mut applied: Result<(), StoreError> = Ok(());
        for batch in receiver {
            if import {
                // A first import has no mirror to match against: its rows are applied as they
                // come (after a store error, the rest is only drained).
                if applied.is_ok() {
                    state.n_applied_in_batches += batch.len();
                    applied = applier
                        .apply_batch(batch, &[], &mut state, true)
                        .and_then(|()| applier.flush_changes());
                }
            } else {
                pending.rows.extend(batch.rows);
                pending.meta.extend(batch.meta);
            }
        }
        let classed = classing.join().unwrap_or_else(|_| {
            Err(WorkbookError::Malformed {
                path: std::path::PathBuf::from(context.file),
                expected: "readable workbook",
                detail: "the rows could not be classed".to_string(),
            })
        });
        (classed, applied)
    });
    // A failing store is fatal; a file that could not be read whole applies nothing.
    applied?;
    let index = match classed {
        Ok(classifier) => {
            state.absorb(classifier.gathered);
            classifier.index
        }
        Err(error) => return Ok(Err(Stop::Unreadable(error))),
    };
    tracing::debug!(
        file = %context.file,
        quiet = state.n_quiet,
        cleaned = pending.len() + state.n_applied_in_batches,
        "rows unchanged since the last sync were not cleaned; the others were"
    );
    let batch = pending;
    // The rows the mirror held that no quiet row holds now: the base of the changed rows, and
    // the rows that may be gone.
    let mirror_rows: Vec<MirrorRow> = if import {
        Vec::new()
    } else {
        let mut wanted: Vec<DealId> = index
            .deal_ids()
            .chain(other_mirror_deal_ids.iter().copied())
            .filter(|deal_id| !state.claimed.contains_key(deal_id))
            .collect();
        wanted.extend(state.mirror_wanted.iter().copied());
        wanted.sort_unstable();
        wanted.dedup();
        mirror::load_rows(transaction, context.file, &wanted)?
    };
    let rows = batch;
    if let Err(stop) = applier.check_and_apply(
        rows,
        &mirror_rows,
        &mut state,
        (import, force),
        n_mirror_rows,
        head.as_ref(),
    )? {
        return Ok(Err(stop));
    }
    let plan = if context.writes_back {
        Some(applier.plan(&mut state, &mirror_rows)?)
    } else {
        None
    };
    let removed_from_view = plan
        .as_ref()
        .map(|plan| plan.removed_deals.clone())
        .unwrap_or_default();
    let counts = state.counts.clone();
    Ok(Ok(Synced {
        issues: std::mem::take(&mut state.issues),
        counts,
        conflicts: state.conflicts,
        applied: std::mem::take(&mut applier.applied),
        run_id: applier.run_id,
        plan,
        head,
        known_error_rows: std::mem::take(&mut state.known_error_rows),
        removed_from_view,
    }))
}

/// What the sync gathers as the rows go by.
#[derive(Debug, Default)]
struct RowsState {
    /// Deals held by rows seen so far that need nothing (quiet rows) or were applied already (a
    /// first import's earlier batches), with their row.
    claimed: diff::DealRows,
    /// Deals whose mirror row a changed row needs as its base.
    mirror_wanted: Vec<DealId>,
    counts: crate::store::RunCounts,
    issues: Vec<RowIssue>,
    conflicts: u64,
    n_columns: usize,
    /// The last data row seen.
    last_data_row: Option<u32>,
    formula_cells: Vec<(u32, u32)>,
    last_date_row: HashMap<u32, u32>,
    known_error_rows: Vec<String>,
    /// What the write-back needs of each changed row.
    outcomes: Vec<RowOutcome>,
    /// The deals of changed rows (for the write-back's view).
    deals_of_rows: HashMap<DealId, Deal>,
    style_rows: BTreeSet<u32>,
    /// Rows of a first import applied as they came.
    n_applied_in_batches: usize,
    /// Rows found unchanged since the last sync (not cleaned).
    n_quiet: usize,
}

/// Classes rows as they are read and cleans the changed ones (phase 2).
struct Classifier<'a> {
    context: &'a Context<'a>,
    index: QuietIndex,
    /// Whether the index may say a row is quiet (the rows were read with the same settings and
    /// the store's changes since are known); it names the file's deals either way.
    index_usable: bool,
    changed: HashSet<DealId>,
    key_column: Option<usize>,
    date_columns: Vec<u32>,
    /// What classing learns of the sheet.
    gathered: RowsState,
}

impl Classifier<'_> {
    fn class_rows(&mut self, rows: &[SheetRow], batch: &mut Pending) {
        let header = self.context.header;
        let state = &mut self.gathered;
        for row in rows {
            if row.row_number <= header.row_number || row.is_blank() {
                continue;
            }
            state.n_columns = state.n_columns.max(row.width());
            state.last_data_row = Some(row.row_number);
            for column_idx in &row.formula_columns {
                state.formula_cells.push((row.row_number, *column_idx));
            }
            let raw_hash = row.raw_hash(self.key_column);
            let key_cell = self
                .key_column
                .map(|column_idx| mapping::clean::deal_id(row.cell(column_idx)));
            let (class, position) = if self.index_usable {
                class_of(&self.index, raw_hash, key_cell, &self.changed)
            } else {
                (RowClass::Pending(None), None)
            };
            match class {
                RowClass::Quiet(deal_id) => {
                    if let Some(position) = position {
                        self.index.take(position);
                    }
                    state.claimed.insert(deal_id, row.row_number);
                    state.counts.unchanged += 1;
                    state.n_quiet += 1;
                }
                RowClass::Pending(known) => {
                    if let Some(deal_id) = known {
                        state.mirror_wanted.push(deal_id);
                    }
                    let (clean, row_issues) = mapping::map_row(
                        &row,
                        header,
                        self.context.source,
                        &self.context.config.stages,
                    );
                    let formula_roles = || {
                        row.formula_columns
                            .iter()
                            .filter(|_| self.context.writes_back)
                            .filter_map(|column_idx| header.roles.get(*column_idx as usize))
                            .flatten()
                    };
                    let formula_fields = formula_roles()
                        .filter_map(|role| match role {
                            ColumnRole::Field(field) => Some(*field),
                            _ => None,
                        })
                        .collect();
                    let formula_extras = formula_roles()
                        .filter_map(|role| match role {
                            ColumnRole::Extra(name) => Some(name.clone()),
                            _ => None,
                        })
                        .collect();
                    batch.rows.push(clean);
                    batch.meta.push(RowMeta {
                        raw_hash,
                        clean_without_issues: row_issues.is_empty(),
                        formula_fields,
                        formula_extras,
                        date_rows_above: self
                            .date_columns
                            .iter()
                            .filter_map(|column_idx| state.last_date_row.get(column_idx).copied())
                            .collect(),
                    });
                    state.issues.extend(row_issues);
                }
            }
            for column_idx in &self.date_columns {
                if matches!(row.cell(*column_idx as usize), workbook::Cell::DateTime(_)) {
                    state.last_date_row.insert(*column_idx, row.row_number);
                }
            }
        }
    }
}

impl RowsState {
    /// Takes in what classing gathered.
    fn absorb(&mut self, gathered: RowsState) {
        self.claimed.extend(gathered.claimed);
        self.mirror_wanted.extend(gathered.mirror_wanted);
        self.counts.unchanged += gathered.counts.unchanged;
        self.n_quiet += gathered.n_quiet;
        // The mapping's issues come first, in row order; the diff's follow.
        let mut issues = gathered.issues;
        issues.append(&mut self.issues);
        self.issues = issues;
        self.n_columns = self.n_columns.max(gathered.n_columns);
        self.last_data_row = self.last_data_row.max(gathered.last_data_row);
        self.formula_cells.extend(gathered.formula_cells);
        self.last_date_row.extend(gathered.last_date_row);
    }
}

/// What the diff of a batch found, with the deals it loaded.
type Diffed = (diff::Changeset, Vec<RowIssue>, HashMap<DealId, Deal>);

/// Matches, merges and applies changed rows.
struct Applier<'a, 'c> {
    context: &'a Context<'a>,
    crm: &'a Db<'c>,
    applied: Vec<ChangeRecord>,
    /// The run the changes are recorded under, once a first import had some to write out.
    run_id: Option<i64>,
}

impl<'a, 'c> Applier<'a, 'c> {
    fn new(context: &'a Context<'a>, crm: &'a Db<'c>) -> Applier<'a, 'c> {
        Applier {
            context,
            crm,
            applied: Vec::new(),
            run_id: None,
        }
    }

    /// Writes the changes recorded so far under the sync's run (recorded now if need be, its
    /// counts brought up to date at the commit), so that an import holds no more than a batch of
    /// them.
    fn flush_changes(&mut self) -> Result<(), StoreError> {
        if self.applied.is_empty() {
            return Ok(());
        }
        let context = self.context;
        let run_id = match self.run_id {
            Some(run_id) => run_id,
            None => {
                let run_id = self.crm.record_run(&SyncRun {
                    id: 0,
                    source: context.source.name.clone(),
                    file: context.file.to_string(),
                    started_at: context.now,
                    finished_at: context.now,
                    status: status_name(FileStatus::Synced).to_string(),
                    counts: Default::default(),
                    message: None,
                })?;
                self.run_id = Some(run_id);
                run_id
            }
        };
        self.crm.record_changes(run_id, &self.applied)?;
        self.applied.clear();
        Ok(())
    }

    /// Phases 3 to 5 for the last changed rows: match and merge, the guard, apply.
    fn check_and_apply(
        &mut self,
        rows: Pending,
        mirror_rows: &[MirrorRow],
        state: &mut RowsState,
        (import, force): (bool, bool),
        n_file_rows: usize,
        head: Option<&MirrorHead>,
    ) -> Result<Result<(), Stop>, StoreError> {
        let (changeset, diff_issues, deals) = self.diff(&rows, mirror_rows, state, head)?;
        // The mass-delete guard: a sync that would archive or delete too many of the file's rows
        // is held — nothing of it is applied — until someone looks (`sync --force FILE`).
        let n_removing = changeset
            .removals
            .iter()
            .filter(|removal| matches!(removal, Removal::Archive(_) | Removal::Delete(_)))
            .count();
        let source = self.context.source;
        if !import && !force && source.max_delete.exceeded(n_removing, n_file_rows) {
            let path = self.context.file;
            let message = format!(
                "{path}: held: this sync would remove {n_removing} of the {n_file_rows} rows the file had ({}); nothing was applied. \
                 If that is right, run `funnelsync sync --force {path}`",
                match source.max_delete {
                    crate::config::MaxDelete::Share(share) => format!("max_delete = {:.0}%", share * 100.0),
                    crate::config::MaxDelete::Count(count) => format!("max_delete = {count}"),
                },
            );
            let mut issues = std::mem::take(&mut state.issues);
            issues.extend(diff_issues);
            return Ok(Err(Stop::Held { message, issues }));
        }
        state.issues.extend(diff_issues);
        self.apply(rows, mirror_rows, changeset, deals, state)?;
        Ok(Ok(()))
    }

    /// Matches and merges one batch of a first import, and applies it.
    fn apply_batch(
        &mut self,
        rows: Pending,
        mirror_rows: &[MirrorRow],
        state: &mut RowsState,
        _import: bool,
    ) -> Result<(), StoreError> {
        let (changeset, diff_issues, deals) = self.diff(&rows, mirror_rows, state, None)?;
        state.issues.extend(diff_issues);
        self.apply(rows, mirror_rows, changeset, deals, state)
    }

    /// Phase 3, match and merge: loads what the diff needs and runs it.
    fn diff(
        &self,
        rows: &Pending,
        mirror_rows: &[MirrorRow],
        state: &RowsState,
        head: Option<&MirrorHead>,
    ) -> Result<Diffed, StoreError> {
        let context = self.context;
        let source = context.source;
        let clean_rows = &rows.rows;
        let mut natural_matches = HashMap::new();
        let mut wanted_ids: Vec<DealId> = clean_rows.iter().filter_map(|row| row.id).collect();
        wanted_ids.extend(mirror_rows.iter().map(|row| row.deal_id));
        // Natural-key lookups in batches, one query per 500 values rather than one per row.
        let mut by_field: HashMap<Field, Vec<FieldValue>> = HashMap::new();
        for key in diff::lookups_needed(clean_rows, mirror_rows, &source.match_on) {
            let value = match key.0.kind() {
                FieldKind::Amount => key
                    .1
                    .parse::<f64>()
                    .map(FieldValue::Amount)
                    .unwrap_or(FieldValue::Text(key.1.clone())),
                _ => FieldValue::Text(key.1.clone()),
            };
            by_field.entry(key.0).or_default().push(value);
        }
        for (field, values) in by_field {
            for (text, deal_id) in self.crm.find_ids_by_values(field, &values)? {
                wanted_ids.push(deal_id);
                natural_matches.insert((field, text), deal_id);
            }
        }
        wanted_ids.sort_unstable();
        wanted_ids.dedup();
        let deals = self.crm.deals_by_ids(&wanted_ids)?;
        // Only mirror rows no row holds as they were can be removals.
        let removal_candidates: Vec<DealId> = mirror_rows.iter().map(|row| row.deal_id).collect();
        let deals_in_other_files =
            mirror::deals_in_other_files(self.crm, context.file, &removal_candidates)?;
        let formula_fields: HashMap<u32, Vec<Field>> = rows
            .rows
            .iter()
            .zip(&rows.meta)
            .filter(|(_, meta)| !meta.formula_fields.is_empty())
            .map(|(row, meta)| (row.row_number, meta.formula_fields.clone()))
            .collect();
        let formula_extras: HashMap<u32, Vec<String>> = rows
            .rows
            .iter()
            .zip(&rows.meta)
            .filter(|(_, meta)| !meta.formula_extras.is_empty())
            .map(|(row, meta)| (row.row_number, meta.formula_extras.clone()))
            .collect();
        let known_error_rows: HashSet<String> = head
            .map(|head| head.known_error_rows.iter().cloned().collect())
            .unwrap_or_default();
        let (changeset, issues) = diff::diff(&DiffInput {
            rows: clean_rows,
            mirror: mirror_rows,
            deals: &deals,
            natural_matches: &natural_matches,
            deals_in_other_files: &deals_in_other_files,
            match_on: &source.match_on,
            on_row_removed: source.on_row_removed,
            sheet_fields: &context.sheet_fields,
            sheet_extras: &context.sheet_extras,
            conflict_policy: source.conflict,
            file_modified: context.file_modified,
            formula_fields: &formula_fields,
            formula_extras: &formula_extras,
            known_error_rows: &known_error_rows,
            today: context.calendar.day_of(context.now),
            claimed: &state.claimed,
        });
        Ok((changeset, issues, deals))
    }

    /// Phase 5, apply: creates, updates, conflicts and removals; the mirror rows of the changed
    /// rows as read; and, for the write-back, what each row should show.
    fn apply(
        &mut self,
        rows: Pending,
        mirror_rows: &[MirrorRow],
        changeset: diff::Changeset,
        deals: HashMap<DealId, Deal>,
        state: &mut RowsState,
    ) -> Result<(), StoreError> {
        let context = self.context;
        let source = context.source;
        let crm = self.crm;
        let now = context.now;
        let _ = mirror_rows;
        let mut row_deals: Vec<Option<DealId>> = vec![None; rows.len()];
        let mut row_merged: Vec<Option<FieldMap>> = vec![None; rows.len()];
        let mut row_merged_extras: Vec<Option<ExtraMap>> = vec![None; rows.len()];
        // New deals are created together, many to a statement.
        // A row's fields are copied only when defaults add to them.
        let mut creations: Vec<(usize, Cow<'_, FieldMap>, Option<DateTime<Utc>>)> = Vec::new();
        for action in &changeset.actions {
            match action {
                RowAction::Create { row_idx } => {
                    let row = &rows.rows[*row_idx];
                    let mut fields = Cow::Borrowed(&row.fields);
                    // A new row in a filtered file belongs to that file's view: it takes the
                    // filter's values for the fields it leaves empty.
                    for (field, accepted) in &source.filter {
                        if let (false, Some(first)) = (fields.contains_key(field), accepted.first())
                        {
                            fields
                                .to_mut()
                                .insert(*field, FieldValue::Text(first.clone()));
                        }
                    }
                    // A new deal without a stage starts at the top of the funnel.
                    if !fields.contains_key(&Field::Stage) {
                        fields.to_mut().insert(
                            Field::Stage,
                            FieldValue::Text(context.config.stages.first().name.clone()),
                        );
                    }
                    // The day the deal entered its stage is known only when the sheet says so.
                    let entered = row
                        .fields
                        .get(&Field::StageSince)
                        .and_then(FieldValue::as_text)
                        .and_then(|text| chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
                        .map(|day| context.calendar.start_of(day));
                    creations.push((*row_idx, fields, entered));
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
                        self.applied.push(ChangeRecord::new(
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
                        self.applied.push(ChangeRecord::new(
                            *deal_id,
                            ChangeKind::Update,
                            Some(field.name().to_string()),
                            old,
                            value.as_ref().map(FieldValue::to_string),
                        ));
                    }
                    for (key, value) in extra_changes {
                        let old = before.and_then(|deal| deal.extra.get(key)).cloned();
                        self.applied.push(ChangeRecord::new(
                            *deal_id,
                            ChangeKind::Update,
                            Some(format!("extra.{key}")),
                            old,
                            value.clone(),
                        ));
                    }
                    state.counts.updated += 1;
                    row_deals[*row_idx] = Some(*deal_id);
                    if context.writes_back {
                        row_merged[*row_idx] = changeset.sheet_values.get(row_idx).cloned();
                        row_merged_extras[*row_idx] = changeset.sheet_extras.get(row_idx).cloned();
                    }
                }
                RowAction::Unchanged { row_idx, deal_id } => {
                    state.counts.unchanged += 1;
                    row_deals[*row_idx] = Some(*deal_id);
                    if context.writes_back {
                        row_merged[*row_idx] = changeset.sheet_values.get(row_idx).cloned();
                        row_merged_extras[*row_idx] = changeset.sheet_extras.get(row_idx).cloned();
                    }
                }
                RowAction::Skipped { row_idx, deal_id } => {
                    state.counts.errors += 1;
                    row_deals[*row_idx] = *deal_id;
                }
            }
        }
        let new_deals: Vec<crate::store::NewDeal<'_>> = creations
            .iter()
            .map(|(row_idx, fields, entered)| crate::store::NewDeal {
                fields: fields.as_ref(),
                extra: &rows.rows[*row_idx].extras,
                extra_json: rows.rows[*row_idx]
                    .json
                    .as_ref()
                    .map(|json| json.extras.as_str()),
                origin: &source.name,
                now,
                stage_entered_at: *entered,
            })
            .collect();
        let created = crm.create_deals(&new_deals)?;
        drop(new_deals);
        // Rows whose creation record holds exactly the fields the mirror row would: the mirror
        // row refers to it instead of holding a second copy.
        let mut fields_as_created = vec![false; rows.len()];
        for ((row_idx, fields, _), deal_id) in creations.into_iter().zip(created) {
            state.counts.created += 1;
            // Fields the defaults did not add to were encoded when the row was hashed.
            let row = &rows.rows[row_idx];
            let new_value = match (&row.json, &fields) {
                (Some(json), Cow::Borrowed(_)) => {
                    fields_as_created[row_idx] = true;
                    Some(json.fields.clone())
                }
                _ => serde_json::to_string(fields.as_ref()).ok(),
            };
            self.applied.push(ChangeRecord {
                id: 0,
                run_id: 0,
                deal_id,
                kind: ChangeKind::Create,
                field: None,
                old_value: None,
                new_value,
            });
            row_deals[row_idx] = Some(deal_id);
            // What the row should show: only the write-back asks.
            if context.writes_back {
                let mut fields = fields.into_owned();
                fields.retain(|field, _| context.sheet_fields.contains(field));
                row_merged[row_idx] = Some(fields);
            }
        }
        // Conflicts on extra columns are recorded like those on fields, named `extra.NAME` as in
        // the history.
        let text = |value: &Option<FieldValue>| value.as_ref().map(FieldValue::to_string);
        let conflicts = changeset
            .conflicts
            .iter()
            .map(|(row_idx, deal_id, conflict)| {
                (
                    *row_idx,
                    *deal_id,
                    Conflict {
                        field: conflict.field.name().to_string(),
                        base: text(&conflict.base),
                        sheet: text(&conflict.sheet),
                        store: text(&conflict.store),
                        winner: conflict.winner,
                        formula: conflict.formula,
                    },
                )
            })
            .chain(
                changeset
                    .extra_conflicts
                    .iter()
                    .map(|(row_idx, deal_id, conflict)| {
                        (
                            *row_idx,
                            *deal_id,
                            Conflict {
                                field: format!("extra.{}", conflict.field),
                                ..conflict.clone()
                            },
                        )
                    }),
            );
        for (row_idx, deal_id, conflict) in conflicts {
            let quoted = |value: &Option<String>| {
                quoted(&value.as_ref().map(|value| FieldValue::Text(value.clone())))
            };
            crm.record_conflict(&ConflictRecord {
                id: 0,
                deal_id,
                field: conflict.field.clone(),
                base_value: conflict.base.clone(),
                sheet_value: conflict.sheet.clone(),
                store_value: conflict.store.clone(),
                winner: conflict.winner.name().to_string(),
                policy: if conflict.formula {
                    "formula".to_string()
                } else {
                    source.conflict.name().to_string()
                },
                source: source.name.clone(),
                file: context.file.to_string(),
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
            state.issues.push(RowIssue::warning(
                Some(rows.rows[row_idx].row_number),
                message,
            ));
        }
        state.conflicts += (changeset.conflicts.len() + changeset.extra_conflicts.len()) as u64;
        let mut gone: Vec<DealId> = Vec::new();
        for removal in &changeset.removals {
            match removal {
                Removal::Archive(deal_id) => {
                    if crm.set_archived(*deal_id, true, now)? {
                        state.counts.archived += 1;
                        self.applied.push(ChangeRecord::new(
                            *deal_id,
                            ChangeKind::Archive,
                            None,
                            None,
                            None,
                        ));
                    }
                    gone.push(*deal_id);
                }
                Removal::Delete(deal_id) => {
                    let snapshot = deals
                        .get(deal_id)
                        .and_then(|deal| serde_json::to_string(deal).ok());
                    if crm.delete_deal(*deal_id)? {
                        state.counts.deleted += 1;
                        self.applied.push(ChangeRecord::new(
                            *deal_id,
                            ChangeKind::Delete,
                            None,
                            snapshot,
                            None,
                        ));
                    }
                    gone.push(*deal_id);
                }
                Removal::Forget(deal_id) | Removal::MovedAway(deal_id) => gone.push(*deal_id),
                Removal::Deferred(_) => {}
            }
        }
        state
            .known_error_rows
            .extend(changeset.known_error_rows.iter().cloned());

        // The mirror of the changed rows as read. A row with errors keeps its previous mirror row
        // (its deal keeps its state); a row that cleaned without a word remembers the hash of its
        // cells, so that next time it is not cleaned again while it stays so.
        let mut new_mirror_rows = Vec::new();
        for (row_idx, (row, meta)) in rows.rows.iter().zip(&rows.meta).enumerate() {
            let Some(deal_id) = row_deals[row_idx] else {
                continue;
            };
            if row.has_error {
                continue;
            }
            new_mirror_rows.push(mirror::MirrorRowRef {
                deal_id,
                row_number: row.row_number,
                row_hash: &row.hash,
                raw_hash: meta.clean_without_issues.then_some(meta.raw_hash),
                fields: &row.fields,
                extras: &row.extras,
                json: row.json.as_ref(),
                fields_as_created: fields_as_created[row_idx],
            });
        }
        // Mirror rows whose deal is now held by another row of this sheet are re-keyed by the
        // upsert; the deals that left the sheet go.
        mirror::upsert_row_refs(self.crm, context.file, &new_mirror_rows)?;
        drop(new_mirror_rows);
        mirror::delete_rows(self.crm, context.file, &gone)?;

        // What the write-back needs of these rows.
        let Pending { rows, meta } = rows;
        for (row_idx, (row, meta)) in rows.into_iter().zip(meta).enumerate() {
            if let Some(deal_id) = row_deals[row_idx] {
                state.claimed.insert(deal_id, row.row_number);
            }
            if context.writes_back {
                state.outcomes.push(RowOutcome {
                    row_number: row.row_number,
                    deal_id: row_deals[row_idx],
                    merged: if row.has_error {
                        None
                    } else {
                        row_merged[row_idx].take()
                    },
                    merged_extras: if row.has_error {
                        None
                    } else {
                        row_merged_extras[row_idx].take()
                    },
                    key_cell: row.id,
                    read: row.fields,
                    extras: row.extras,
                });
                state
                    .style_rows
                    .extend(meta.date_rows_above.iter().copied());
            }
        }
        if context.writes_back {
            let row_deal_ids: Vec<DealId> = row_deals.iter().flatten().copied().collect();
            for deal_id in row_deal_ids {
                if let Some(deal) = deals.get(&deal_id) {
                    state.deals_of_rows.insert(deal_id, deal.clone());
                }
            }
        }
        Ok(())
    }

    /// Phase 6, the write-back plan: the changed rows' cells, the rows whose deal left the view,
    /// and the deals the view gains.
    fn plan(
        &self,
        state: &mut RowsState,
        _mirror_rows: &[MirrorRow],
    ) -> Result<crate::writeback::SheetPlan, StoreError> {
        let context = self.context;
        let source = context.source;
        // New deals created by this sync are not among the deals loaded for the diff.
        let missing: Vec<DealId> = state
            .outcomes
            .iter()
            .filter_map(|outcome| outcome.deal_id)
            .filter(|deal_id| !state.deals_of_rows.contains_key(deal_id))
            .collect();
        for (deal_id, deal) in self.crm.deals_by_ids(&missing)? {
            state.deals_of_rows.insert(deal_id, deal);
        }
        let in_view =
            |deal: &Deal| deal.archived_at.is_none() && source.filter_matches(&deal.fields);
        let mut view: Vec<Deal> = state
            .deals_of_rows
            .values()
            .filter(|deal| in_view(deal))
            .cloned()
            .collect();
        if source.view == View::All {
            // Every live deal the filter takes that no row of this file holds joins it.
            let filter_fields: Vec<Field> = source.filter.keys().copied().collect();
            let joining: Vec<DealId> = self
                .crm
                .live_deal_fields(&filter_fields)?
                .into_iter()
                .filter(|(deal_id, fields)| {
                    !state.claimed.contains_key(deal_id) && source.filter_matches(fields)
                })
                .map(|(deal_id, _)| deal_id)
                .collect();
            view.extend(self.crm.deals_by_ids(&joining)?.into_values());
        }
        view.sort_by_key(|deal| deal.id);
        let mut plan =
            crate::writeback::plan(context.header, state.n_columns, &state.outcomes, &view);
        plan.style_rows = std::mem::take(&mut state.style_rows);
        plan.formula_cells = std::mem::take(&mut state.formula_cells);
        plan.last_data_row = state.last_data_row;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_quiet_only_when_their_cells_their_key_and_their_deal_are_as_before() {
        let index = QuietIndex::new(vec![(10, 1), (20, 2), (20, 3), (30, 4)]);
        let none: HashSet<DealId> = HashSet::new();
        let changed: HashSet<DealId> = [4].into_iter().collect();
        let cases = [
            // (raw hash, key cell, changed deals, expected class)
            (
                "same cells, no key column",
                10,
                None,
                &none,
                RowClass::Quiet(1),
            ),
            (
                "same cells, key agrees",
                10,
                Some(Some(1)),
                &none,
                RowClass::Quiet(1),
            ),
            (
                "same cells, key cleared",
                10,
                Some(None),
                &none,
                RowClass::Pending(Some(1)),
            ),
            (
                "same cells, key of another deal",
                10,
                Some(Some(9)),
                &none,
                RowClass::Pending(Some(1)),
            ),
            (
                "deal changed in the store",
                30,
                None,
                &changed,
                RowClass::Pending(Some(4)),
            ),
            ("cells changed", 99, None, &none, RowClass::Pending(None)),
        ];
        for (name, raw_hash, key_cell, changed, expected) in cases {
            assert_eq!(
                class_of(&index, raw_hash, key_cell, changed).0,
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn each_mirror_row_is_taken_once_so_a_copied_row_is_not_quiet() {
        let mut index = QuietIndex::new(vec![(20, 2), (20, 3)]);
        let none = HashSet::new();
        let (first, position) = class_of(&index, 20, None, &none);
        assert_eq!(first, RowClass::Quiet(2));
        index.take(position.expect("a position"));
        let (second, position) = class_of(&index, 20, None, &none);
        assert_eq!(second, RowClass::Quiet(3));
        index.take(position.expect("a position"));
        let (third, _) = class_of(&index, 20, None, &none);
        assert_eq!(third, RowClass::Pending(None), "a third copy is a new row");
    }

    proptest::proptest! {
        /// The bucketed lookup finds what a walk over the sorted entries finds, whatever the
        /// hashes (the extremes of i64 and repeats included) and whichever rows were taken.
        #[test]
        fn the_index_finds_what_a_walk_over_its_entries_finds(
            entries in proptest::collection::vec(
                (proptest::prop_oneof![
                    proptest::prelude::any::<i64>(),
                    proptest::prelude::Just(i64::MIN),
                    proptest::prelude::Just(i64::MAX),
                    proptest::prelude::Just(0i64),
                    -3i64..3,
                ], 1i64..50),
                0..300,
            ),
            lookups in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..100),
        ) {
            let mut index = QuietIndex::new(entries.clone());
            let mut walked = entries.clone();
            walked.sort_unstable();
            let mut taken = vec![false; walked.len()];
            let walk = |walked: &[(i64, DealId)], taken: &[bool], raw_hash: i64| {
                walked
                    .iter()
                    .enumerate()
                    .find(|(position, (hash, _))| *hash == raw_hash && !taken[*position])
                    .map(|(position, (_, deal_id))| (position, *deal_id))
            };
            for lookup in lookups {
                // Look up hashes that are there (and taking them), and one that is not.
                let raw_hash = if walked.is_empty() { 7 } else { walked[lookup.index(walked.len())].0 };
                let expected = walk(&walked, &taken, raw_hash);
                proptest::prop_assert_eq!(index.find(raw_hash), expected);
                if let Some((position, _)) = expected {
                    index.take(position);
                    taken[position] = true;
                }
                let absent = raw_hash.wrapping_add(1);
                proptest::prop_assert_eq!(index.find(absent), walk(&walked, &taken, absent));
            }
            // Taken or not, every entry still names its deal: the sync learns from them which
            // deals the file held.
            let mut listed: Vec<DealId> = index.deal_ids().collect();
            listed.sort_unstable();
            let mut held: Vec<DealId> = entries.iter().map(|(_, deal_id)| *deal_id).collect();
            held.sort_unstable();
            proptest::prop_assert_eq!(listed, held);
        }
    }
}
