//! The diff: which deal each row of a sheet is, and what must change in the store. Pure logic —
//! rows, the mirror and pre-fetched deals in; a [`Changeset`] and issues out. It does no I/O and
//! never fails on a bad row.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};

use super::merge::{merge_extras, merge_fields, ExtraConflict, FieldConflict};
use crate::config::{ConflictPolicy, RowRemoved};
use crate::deal::{
    normalize_label, Deal, DealId, ExtraChanges, ExtraMap, Field, FieldChanges, FieldMap,
    FieldValue,
};
use crate::mapping::{CleanRow, RowIssue};
use crate::store::mirror::MirrorRow;

/// What the store is asked to look up before the diff: deals whose `match_on` field holds one of
/// these values. Keyed by field and the value's text.
pub type NaturalKey = (Field, String);

pub fn natural_key(field: Field, value: &FieldValue) -> NaturalKey {
    (field, value.to_string())
}

/// Deals held by rows of a sheet, each with the row that first held it. Consecutive deals on
/// consecutive rows (what an import creates, and what the next sync finds again) are kept as one
/// run, so that the deals of a sheet at Excel's limit take a few entries, not a million.
#[derive(Debug, Default, Clone)]
pub struct DealRows {
    /// The first deal of each run, with the row that holds it and how many deals the run has.
    runs: std::collections::BTreeMap<DealId, (u32, u32)>,
}

impl DealRows {
    /// The row that holds `deal_id`, if a row does.
    pub fn get(&self, deal_id: &DealId) -> Option<u32> {
        let (first, (row_number, n_deals)) = self.runs.range(..=*deal_id).next_back()?;
        let offset = u32::try_from(deal_id.checked_sub(*first)?).ok()?;
        (offset < *n_deals).then(|| row_number + offset)
    }

    pub fn contains_key(&self, deal_id: &DealId) -> bool {
        self.get(deal_id).is_some()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.runs
            .values()
            .map(|(_, n_deals)| *n_deals as usize)
            .sum()
    }

    /// Records that `row_number` holds `deal_id`. A deal already held keeps its first row.
    pub fn insert(&mut self, deal_id: DealId, row_number: u32) {
        if self.contains_key(&deal_id) {
            return;
        }
        if let Some((first, (first_row, n_deals))) = self.runs.range_mut(..deal_id).next_back() {
            let follows_deal = first.checked_add(i64::from(*n_deals)) == Some(deal_id);
            let follows_row = first_row.checked_add(*n_deals) == Some(row_number);
            if follows_deal && follows_row {
                *n_deals += 1;
                return;
            }
        }
        self.runs.insert(deal_id, (row_number, 1));
    }

    /// Every deal with its row, in deal order.
    pub fn iter(&self) -> impl Iterator<Item = (DealId, u32)> + '_ {
        self.runs.iter().flat_map(|(first, (row_number, n_deals))| {
            (0..*n_deals).map(move |offset| (first + i64::from(offset), row_number + offset))
        })
    }

    /// Takes in the deals of `other` (those already held keep their row).
    pub fn extend(&mut self, other: DealRows) {
        // Mostly one side is empty (the quiet rows of a sync, or the deals an import created):
        // the other is then taken whole instead of deal by deal.
        if self.runs.is_empty() {
            *self = other;
            return;
        }
        for (deal_id, row_number) in other.iter() {
            self.insert(deal_id, row_number);
        }
    }
}

/// Everything the diff needs, already loaded.
#[derive(Debug)]
pub struct DiffInput<'a> {
    pub rows: &'a [CleanRow],
    /// What the file held at its last sync.
    pub mirror: &'a [MirrorRow],
    /// Current store state of every deal a row or mirror row refers to, and of natural-key matches.
    pub deals: &'a HashMap<DealId, Deal>,
    /// Deals found in the store by a `match_on` value.
    pub natural_matches: &'a HashMap<NaturalKey, DealId>,
    /// Deals that some other file's mirror also holds: leaving this file does not archive them.
    pub deals_in_other_files: &'a HashSet<DealId>,
    pub match_on: &'a [Field],
    pub on_row_removed: RowRemoved,
    /// The fields the sheet has columns for: the only ones merged both ways.
    pub sheet_fields: &'a [Field],
    /// The sheet's extra columns by header (its named columns that map to no field): merged both
    /// ways like the mapped fields. Other extras (data under an empty header) flow to the store
    /// only.
    pub sheet_extras: &'a [String],
    pub conflict_policy: ConflictPolicy,
    /// When the file was last modified, for [`ConflictPolicy::Newest`].
    pub file_modified: Option<DateTime<Utc>>,
    /// Per Excel row number, the mapped fields whose cell holds a formula. Empty unless the
    /// file is written back (only then can a store value overwrite a formula).
    pub formula_fields: &'a HashMap<u32, Vec<Field>>,
    /// Per Excel row number, the extra columns (of `sheet_extras`) whose cell holds a formula.
    pub formula_extras: &'a HashMap<u32, Vec<String>>,
    /// Rows with errors (by [`CleanRow::error_hash`]) that the last sync saw beside every row the
    /// file held: they cannot be the row of a deal whose row is gone now.
    pub known_error_rows: &'a HashSet<String>,
    /// Today in the configured calendar: the stage-since date of a stage change seen now.
    pub today: NaiveDate,
    /// Deals already held by rows the diff does not see (rows unchanged since the last sync, or
    /// rows of earlier batches), with the row that holds each: no row here can be them.
    pub claimed: &'a DealRows,
}

/// What happens to one row of the sheet.
#[derive(Debug, Clone, PartialEq)]
pub enum RowAction {
    Create {
        row_idx: usize,
    },
    Update {
        row_idx: usize,
        deal_id: DealId,
        changes: FieldChanges,
        extra_changes: ExtraChanges,
        unarchive: bool,
    },
    Unchanged {
        row_idx: usize,
        deal_id: DealId,
    },
    /// The row has errors and is not applied; its deal (if it was recognised) keeps its state and
    /// its mirror row is kept as it was.
    Skipped {
        row_idx: usize,
        deal_id: Option<DealId>,
    },
}

/// What happens to a deal whose row is gone from the sheet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Archive(DealId),
    Delete(DealId),
    /// `on_row_removed = "ignore"`, or the deal is already archived: only the mirror forgets it.
    Forget(DealId),
    /// The deal now lives in another file; only this file's mirror forgets it.
    MovedAway(DealId),
    /// Not applied because a row with errors that could not be recognised may be this deal's
    /// row: it is new or changed since the last sync and shares an identifying value with it.
    Deferred(DealId),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changeset {
    pub actions: Vec<RowAction>,
    pub removals: Vec<Removal>,
    /// For each recognised row (by index), what its mapped cells should show after the merge.
    pub sheet_values: HashMap<usize, FieldMap>,
    /// For each recognised row (by index), what its extra columns should show after the merge.
    pub sheet_extras: HashMap<usize, ExtraMap>,
    /// Fields both sides changed, by row index and deal.
    pub conflicts: Vec<(usize, DealId, FieldConflict)>,
    /// Extra columns both sides changed, by row index and deal.
    pub extra_conflicts: Vec<(usize, DealId, ExtraConflict)>,
    /// What the mirror should remember as known rows with errors (see
    /// [`DiffInput::known_error_rows`]): the unrecognised ones that held back no removal.
    pub known_error_rows: Vec<String>,
}

/// The natural-key values the store should be asked about before the diff: those of rows that
/// cannot be recognised from their id or from an identical row in the mirror.
pub fn lookups_needed(
    rows: &[CleanRow],
    mirror: &[MirrorRow],
    match_on: &[Field],
) -> Vec<NaturalKey> {
    let mirror_hashes: HashSet<&str> = mirror.iter().map(|row| row.row_hash.as_str()).collect();
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    for row in rows {
        if row.id.is_some() || mirror_hashes.contains(row.hash.as_str()) {
            continue;
        }
        for field in match_on {
            if let Some(value) = row.fields.get(field) {
                let key = natural_key(*field, value);
                if seen.insert(key.clone()) {
                    keys.push(key);
                }
            }
        }
    }
    keys
}

/// The fallback identity of a row without id or natural key: company and contact, folded.
fn identity(fields: &FieldMap) -> Option<String> {
    let company = fields
        .get(&Field::Company)
        .map(|value| normalize_label(&value.to_string()));
    let contact = fields
        .get(&Field::Contact)
        .map(|value| normalize_label(&value.to_string()));
    match (company, contact) {
        (None, None) => None,
        (company, contact) => Some(format!(
            "{}\u{1f}{}",
            company.unwrap_or_default(),
            contact.unwrap_or_default()
        )),
    }
}

pub fn diff(input: &DiffInput<'_>) -> (Changeset, Vec<RowIssue>) {
    let mut issues = Vec::new();
    let mirror_by_deal: HashMap<DealId, &MirrorRow> =
        input.mirror.iter().map(|row| (row.deal_id, row)).collect();
    let (matched, claimed) = match_rows(input, &mirror_by_deal, &mut issues);
    let (mut changeset, unrecognised_error_rows) = classify_rows(input, &matched, &mirror_by_deal);
    decide_removals(
        input,
        &claimed,
        &unrecognised_error_rows,
        &mut changeset,
        &mut issues,
    );
    (changeset, issues)
}

/// The deals rows have claimed: those the caller says rows held before these (quiet rows, an
/// import's earlier batches), looked up where they are, and those these rows claim. The earlier
/// ones are not copied: an import applied batch by batch would otherwise copy every deal it had
/// created so far once per batch, a cost that grows with the square of the sheet.
struct Claimed<'a> {
    before: &'a DealRows,
    now: HashSet<DealId>,
}

impl Claimed<'_> {
    fn contains(&self, deal_id: &DealId) -> bool {
        self.now.contains(deal_id) || self.before.contains_key(deal_id)
    }

    fn insert(&mut self, deal_id: DealId) {
        self.now.insert(deal_id);
    }
}

/// Which deal each row is, found in passes from the surest evidence to the weakest: its CRM ID,
/// an identical mirror row, the natural key and then company + contact against the mirror, the
/// natural key against the whole store. Returns each row's deal and every deal claimed by a row
/// (or by another file).
fn match_rows<'a>(
    input: &DiffInput<'a>,
    mirror_by_deal: &HashMap<DealId, &MirrorRow>,
    issues: &mut Vec<RowIssue>,
) -> (Vec<Option<DealId>>, Claimed<'a>) {
    let mut matched: Vec<Option<DealId>> = vec![None; input.rows.len()];
    let mut claimed = Claimed {
        before: input.claimed,
        now: HashSet::new(),
    };
    // Rows whose id repeats an earlier row's: people copy rows, so these become new deals.
    let mut forced_new: HashSet<usize> = HashSet::new();
    let hashes: Vec<&str> = input.rows.iter().map(|row| row.hash.as_str()).collect();

    // Pass 1: the key column.
    let mut first_row_of_id: HashMap<DealId, u32> = HashMap::new();
    for (row_idx, row) in input.rows.iter().enumerate() {
        let Some(id) = row.id else { continue };
        if let Some(first_row) = first_row_of_id
            .get(&id)
            .copied()
            .or_else(|| input.claimed.get(&id))
        {
            issues.push(RowIssue::warning(
                Some(row.row_number),
                format!("CRM ID {id} is also on row {first_row}; this row is treated as a new deal (a copied row?)"),
            ));
            forced_new.insert(row_idx);
            continue;
        }
        first_row_of_id.insert(id, row.row_number);
        if input.deals.contains_key(&id) {
            matched[row_idx] = Some(id);
            claimed.insert(id);
        } else {
            issues.push(RowIssue::warning(
                Some(row.row_number),
                format!(
                    "CRM ID {id} is not a deal in the store; the row is matched as if it had no id"
                ),
            ));
        }
    }

    let unmatched_rows = |matched: &Vec<Option<DealId>>| -> Vec<usize> {
        (0..input.rows.len())
            .filter(|row_idx| matched[*row_idx].is_none() && !forced_new.contains(row_idx))
            .collect()
    };
    let live_mirror = |claimed: &Claimed<'_>| -> Vec<&MirrorRow> {
        input
            .mirror
            .iter()
            .filter(|mirror_row| {
                !claimed.contains(&mirror_row.deal_id)
                    && input.deals.contains_key(&mirror_row.deal_id)
            })
            .collect()
    };

    // Pass 2: a row identical to a mirror row is that row.
    {
        let mut by_hash: HashMap<&str, Vec<DealId>> = HashMap::new();
        for mirror_row in live_mirror(&claimed).into_iter().rev() {
            by_hash
                .entry(mirror_row.row_hash.as_str())
                .or_default()
                .push(mirror_row.deal_id);
        }
        for row_idx in unmatched_rows(&matched) {
            if let Some(deal_id) = by_hash.get_mut(hashes[row_idx]).and_then(Vec::pop) {
                matched[row_idx] = Some(deal_id);
                claimed.insert(deal_id);
            }
        }
    }

    // Pass 3: the natural key against the mirror; pass 4: company + contact against the mirror,
    // only where that identity is unique on both sides.
    for field in input.match_on {
        let mut by_value: HashMap<String, Vec<DealId>> = HashMap::new();
        for mirror_row in live_mirror(&claimed).into_iter().rev() {
            if let Some(value) = mirror_row.fields.get(field) {
                by_value
                    .entry(value.to_string())
                    .or_default()
                    .push(mirror_row.deal_id);
            }
        }
        for row_idx in unmatched_rows(&matched) {
            let Some(value) = input.rows[row_idx].fields.get(field) else {
                continue;
            };
            if let Some(deal_id) = by_value.get_mut(&value.to_string()).and_then(Vec::pop) {
                matched[row_idx] = Some(deal_id);
                claimed.insert(deal_id);
            }
        }
    }
    {
        let mut mirror_by_identity: HashMap<String, Vec<DealId>> = HashMap::new();
        for mirror_row in live_mirror(&claimed) {
            if let Some(identity) = identity(&mirror_row.fields) {
                mirror_by_identity
                    .entry(identity)
                    .or_default()
                    .push(mirror_row.deal_id);
            }
        }
        let mut rows_by_identity: HashMap<String, Vec<usize>> = HashMap::new();
        // With no mirror row left to match (a first import), no row can match by identity.
        let unmatched = if mirror_by_identity.is_empty() {
            Vec::new()
        } else {
            unmatched_rows(&matched)
        };
        for row_idx in unmatched {
            if let Some(identity) = identity(&input.rows[row_idx].fields) {
                rows_by_identity.entry(identity).or_default().push(row_idx);
            }
        }
        for (identity, row_indexes) in rows_by_identity {
            if let (Some(deal_ids), [row_idx]) =
                (mirror_by_identity.get(&identity), row_indexes.as_slice())
            {
                if let [deal_id] = deal_ids.as_slice() {
                    matched[*row_idx] = Some(*deal_id);
                    claimed.insert(*deal_id);
                }
            }
        }
    }

    // Pass 5: the natural key against the whole store, so importing the same list twice (or in
    // another file) does not duplicate deals.
    for row_idx in unmatched_rows(&matched) {
        for field in input.match_on {
            let Some(value) = input.rows[row_idx].fields.get(field) else {
                continue;
            };
            if let Some(deal_id) = input.natural_matches.get(&natural_key(*field, value)) {
                if input.deals.contains_key(deal_id)
                    && !claimed.contains(deal_id)
                    && !mirror_by_deal.contains_key(deal_id)
                {
                    matched[row_idx] = Some(*deal_id);
                    claimed.insert(*deal_id);
                    break;
                }
            }
        }
    }

    (matched, claimed)
}

/// What each row does to its deal: created, updated with the merged changes, unchanged, or
/// skipped for its errors. Returns the changeset so far and the rows with errors that match no
/// deal (each may be a deal's row the rep is editing).
fn classify_rows(
    input: &DiffInput<'_>,
    matched: &[Option<DealId>],
    mirror_by_deal: &HashMap<DealId, &MirrorRow>,
) -> (Changeset, Vec<usize>) {
    let mut changeset = Changeset::default();
    // Rows with errors that match no deal: each may be a deal's row the rep is editing.
    let mut unrecognised_error_rows: Vec<usize> = Vec::new();
    for (row_idx, row) in input.rows.iter().enumerate() {
        let deal_id = matched[row_idx];
        if row.has_error {
            if deal_id.is_none() {
                unrecognised_error_rows.push(row_idx);
            }
            changeset
                .actions
                .push(RowAction::Skipped { row_idx, deal_id });
            continue;
        }
        let Some(deal_id) = deal_id else {
            changeset.actions.push(RowAction::Create { row_idx });
            continue;
        };
        let Some(deal) = input.deals.get(&deal_id) else {
            changeset.actions.push(RowAction::Create { row_idx });
            continue;
        };
        let (changes, extra_changes) = match mirror_by_deal.get(&deal_id) {
            Some(mirror_row) => {
                let sheet_is_newer = input
                    .file_modified
                    .is_some_and(|modified| modified > deal.updated_at);
                let outcome = merge_fields(
                    input.sheet_fields,
                    &mirror_row.fields,
                    &row.fields,
                    &deal.fields,
                    input.conflict_policy,
                    sheet_is_newer,
                    input
                        .formula_fields
                        .get(&row.row_number)
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                );
                let mut changes = outcome.to_store;
                // Without a currency column the currency comes from the amount's symbol: it
                // changes with the amount the sheet changed.
                if !input.sheet_fields.contains(&Field::Currency)
                    && changes.iter().any(|(field, _)| *field == Field::Amount)
                {
                    if let Some(currency) = row
                        .fields
                        .get(&Field::Currency)
                        .filter(|currency| deal.fields.get(&Field::Currency) != Some(*currency))
                    {
                        changes.push((Field::Currency, Some(currency.clone())));
                    }
                }
                changeset.conflicts.extend(
                    outcome
                        .conflicts
                        .into_iter()
                        .map(|conflict| (row_idx, deal_id, conflict)),
                );
                changeset.sheet_values.insert(row_idx, outcome.merged);
                let extras = merge_extras(
                    input.sheet_extras,
                    &mirror_row.extras,
                    &row.extras,
                    &deal.extra,
                    input.conflict_policy,
                    sheet_is_newer,
                    input
                        .formula_extras
                        .get(&row.row_number)
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                );
                let mut extra_changes = extras.to_store;
                extra_changes.extend(extra_changes_since_mirror(
                    row,
                    mirror_row,
                    deal,
                    input.sheet_extras,
                ));
                changeset.extra_conflicts.extend(
                    extras
                        .conflicts
                        .into_iter()
                        .map(|conflict| (row_idx, deal_id, conflict)),
                );
                changeset.sheet_extras.insert(row_idx, extras.merged);
                (changes, extra_changes)
            }
            None => {
                let (changes, extra_changes) = changes_against_store(row, deal);
                // Extra columns the row leaves empty show what the store holds, like fields.
                let formula_extras = input.formula_extras.get(&row.row_number);
                let shown_extras: ExtraMap = input
                    .sheet_extras
                    .iter()
                    .filter_map(|column| {
                        let value = match row.extras.get(column) {
                            Some(value) => value,
                            None if formula_extras.is_some_and(|f| f.contains(column)) => {
                                return None
                            }
                            None => deal.extra.get(column)?,
                        };
                        Some((column.clone(), value.clone()))
                    })
                    .collect();
                changeset.sheet_extras.insert(row_idx, shown_extras);
                let mut shown: FieldMap = deal.fields.clone();
                shown.extend(
                    row.fields
                        .iter()
                        .map(|(field, value)| (*field, value.clone())),
                );
                shown.retain(|field, _| input.sheet_fields.contains(field));
                // A formula cell shows what the formula gives, never a value from the store.
                for field in input
                    .formula_fields
                    .get(&row.row_number)
                    .into_iter()
                    .flatten()
                {
                    if !row.fields.contains_key(field) {
                        shown.remove(field);
                    }
                }
                changeset.sheet_values.insert(row_idx, shown);
                (changes, extra_changes)
            }
        };
        let mut changes = changes;
        date_stage_change(&mut changes, deal, input.today);
        if let (Some(since), Some(shown)) = (
            changes
                .iter()
                .find(|(field, _)| *field == Field::StageSince)
                .map(|(_, value)| value.clone()),
            changeset.sheet_values.get_mut(&row_idx),
        ) {
            if input.sheet_fields.contains(&Field::StageSince) {
                match since {
                    Some(since) => shown.insert(Field::StageSince, since),
                    None => shown.remove(&Field::StageSince),
                };
            }
        }
        let unarchive = deal.archived_at.is_some();
        if changes.is_empty() && extra_changes.is_empty() && !unarchive {
            changeset
                .actions
                .push(RowAction::Unchanged { row_idx, deal_id });
        } else {
            changeset.actions.push(RowAction::Update {
                row_idx,
                deal_id,
                changes,
                extra_changes,
                unarchive,
            });
        }
    }

    (changeset, unrecognised_error_rows)
}

/// What happens to the deals of mirror rows no row claimed: archived, deleted, forgotten, moved
/// to another file, or held back while a row with errors may be theirs.
fn decide_removals(
    input: &DiffInput<'_>,
    claimed: &Claimed<'_>,
    unrecognised_error_rows: &[usize],
    changeset: &mut Changeset,
    issues: &mut Vec<RowIssue>,
) {
    let removed: Vec<&MirrorRow> = input
        .mirror
        .iter()
        .filter(|mirror_row| !claimed.contains(&mirror_row.deal_id))
        .collect();
    // An unrecognised row with errors holds back a removal only when it could be that deal's
    // row: it is new or changed since the last sync (an old one was there beside the deal's row)
    // and it shares an identifying value with the deal.
    let suspects: Vec<usize> = unrecognised_error_rows
        .iter()
        .copied()
        .filter(|row_idx| {
            input.rows[*row_idx]
                .error_hash
                .as_ref()
                .is_none_or(|hash| !input.known_error_rows.contains(hash))
        })
        .collect();
    let mut holding: HashSet<usize> = HashSet::new();
    let mut held: Vec<(DealId, Vec<u32>)> = Vec::new();
    for mirror_row in &removed {
        let deal = input.deals.get(&mirror_row.deal_id);
        let rows: Vec<usize> = suspects
            .iter()
            .copied()
            .filter(|row_idx| may_be_the_row_of(&input.rows[*row_idx], mirror_row, deal))
            .collect();
        if !rows.is_empty() {
            holding.extend(rows.iter().copied());
            held.push((
                mirror_row.deal_id,
                rows.iter()
                    .map(|row_idx| input.rows[*row_idx].row_number)
                    .collect(),
            ));
        }
    }
    changeset.known_error_rows = unrecognised_error_rows
        .iter()
        .filter(|row_idx| !holding.contains(row_idx))
        .filter_map(|row_idx| input.rows[*row_idx].error_hash.clone())
        .collect();
    if !held.is_empty() {
        let named: Vec<String> = held
            .iter()
            .map(|(deal_id, row_numbers)| {
                let rows: Vec<String> = row_numbers.iter().map(u32::to_string).collect();
                let name = input
                    .mirror
                    .iter()
                    .find(|mirror_row| mirror_row.deal_id == *deal_id)
                    .and_then(|mirror_row| deal_name(&mirror_row.fields))
                    .map(|name| format!(" ({name})"))
                    .unwrap_or_default();
                format!("deal {deal_id}{name} may be row {}", rows.join(" or row "))
            })
            .collect();
        issues.push(RowIssue::warning(
            None,
            format!(
                "{} row(s) missing from the sheet were not archived or deleted because a row with errors may be them: {}; fix the errors and sync again",
                held.len(),
                named.join("; ")
            ),
        ));
    }
    let held_ids: HashSet<DealId> = held.iter().map(|(deal_id, _)| *deal_id).collect();
    for mirror_row in removed {
        let deal_id = mirror_row.deal_id;
        let removal = if held_ids.contains(&deal_id) {
            Removal::Deferred(deal_id)
        } else if input.deals_in_other_files.contains(&deal_id) {
            Removal::MovedAway(deal_id)
        } else {
            match (input.on_row_removed, input.deals.get(&deal_id)) {
                (_, None) => Removal::Forget(deal_id),
                (RowRemoved::Ignore, _) => Removal::Forget(deal_id),
                (RowRemoved::Archive, Some(deal)) if deal.archived_at.is_some() => {
                    Removal::Forget(deal_id)
                }
                (RowRemoved::Archive, Some(_)) => Removal::Archive(deal_id),
                (RowRemoved::Delete, Some(_)) => Removal::Delete(deal_id),
            }
        };
        changeset.removals.push(removal);
    }
}

/// A stage change dates itself: when `changes` move the deal to another stage and do not say
/// since when, it is in the new stage since `today` (the day funnelsync sees the change).
pub fn date_stage_change(changes: &mut FieldChanges, deal: &Deal, today: NaiveDate) {
    let moves = changes.iter().any(|(field, value)| {
        *field == Field::Stage
            && value.is_some()
            && value.as_ref() != deal.fields.get(&Field::Stage)
    });
    let dated = changes.iter().any(|(field, _)| *field == Field::StageSince);
    if moves && !dated {
        changes.push((Field::StageSince, Some(FieldValue::date(today))));
    }
}

/// The fields that identify a deal to a person reading the sheet.
const IDENTIFYING: [Field; 4] = [Field::Company, Field::Contact, Field::Email, Field::Phone];

/// Whether a row with errors could be the row a deal had: it carries the deal's id, or shares a
/// company, contact, email or phone with what the file held for it (or with the deal now).
fn may_be_the_row_of(row: &CleanRow, mirror_row: &MirrorRow, deal: Option<&Deal>) -> bool {
    if row.id == Some(mirror_row.deal_id) {
        return true;
    }
    IDENTIFYING.iter().any(|field| {
        let Some(value) = row
            .fields
            .get(field)
            .map(|value| normalize_label(&value.to_string()))
        else {
            return false;
        };
        let same = |fields: &FieldMap| {
            fields
                .get(field)
                .is_some_and(|other| normalize_label(&other.to_string()) == value)
        };
        same(&mirror_row.fields) || deal.is_some_and(|deal| same(&deal.fields))
    })
}

/// How a deal is named in a message: its company, else its contact, else its email.
fn deal_name(fields: &FieldMap) -> Option<String> {
    [Field::Company, Field::Contact, Field::Email]
        .iter()
        .find_map(|field| fields.get(field).map(FieldValue::to_string))
}

/// Extras outside the sheet's named extra columns (data under an empty header) that the sheet
/// changed since the last sync (cleared cells included), leaving out those the store already
/// holds. These flow from the sheet to the store only; the named columns are merged.
fn extra_changes_since_mirror(
    row: &CleanRow,
    mirror_row: &MirrorRow,
    deal: &Deal,
    sheet_extras: &[String],
) -> ExtraChanges {
    let mut extra_changes = Vec::new();
    let keys: std::collections::BTreeSet<&String> = row
        .extras
        .keys()
        .chain(mirror_row.extras.keys())
        .filter(|key| !sheet_extras.contains(key))
        .collect();
    for key in keys {
        let now = row.extras.get(key);
        if now != mirror_row.extras.get(key) && now != deal.extra.get(key) {
            extra_changes.push((key.clone(), now.cloned()));
        }
    }
    extra_changes
}

/// For a deal this file did not hold before: the row's non-empty values that differ from the
/// store. Empty cells do not clear what the store knows from elsewhere.
fn changes_against_store(row: &CleanRow, deal: &Deal) -> (FieldChanges, ExtraChanges) {
    let changes = row
        .fields
        .iter()
        .filter(|(field, value)| deal.fields.get(field) != Some(value))
        .map(|(field, value)| (*field, Some(value.clone())))
        .collect();
    let extra_changes = row
        .extras
        .iter()
        .filter(|(key, value)| deal.extra.get(*key) != Some(value))
        .map(|(key, value)| (key.clone(), Some(value.clone())))
        .collect();
    (changes, extra_changes)
}

#[cfg(test)]
mod deal_rows_tests {
    use super::DealRows;

    #[test]
    fn deals_on_rows_are_kept_as_runs_and_found_as_a_map_would() {
        let cases: &[(&str, &[(i64, u32)], usize)] = &[
            ("an import: one run", &[(1, 2), (2, 3), (3, 4), (4, 5)], 1),
            ("a gap in the rows", &[(1, 2), (2, 3), (3, 5), (4, 6)], 2),
            ("a gap in the deals", &[(1, 2), (2, 3), (5, 4), (6, 5)], 2),
            ("out of order", &[(7, 9), (3, 2), (1, 4), (2, 5)], 3),
            (
                "a deal twice keeps its first row",
                &[(1, 2), (1, 9), (2, 3)],
                1,
            ),
            (
                "at the ends of the ranges",
                &[(i64::MAX, u32::MAX), (i64::MIN, 1)],
                2,
            ),
        ];
        for (name, inserts, n_runs) in cases {
            let mut rows = DealRows::default();
            let mut map = std::collections::HashMap::new();
            for (deal_id, row_number) in inserts.iter() {
                rows.insert(*deal_id, *row_number);
                map.entry(*deal_id).or_insert(*row_number);
            }
            assert_eq!(rows.runs.len(), *n_runs, "{name}");
            assert_eq!(rows.len(), map.len(), "{name}");
            for deal_id in -2..12 {
                assert_eq!(
                    rows.get(&deal_id),
                    map.get(&deal_id).copied(),
                    "{name}: {deal_id}"
                );
            }
            let mut listed: Vec<(i64, u32)> = rows.iter().collect();
            let mut expected: Vec<(i64, u32)> = map.into_iter().collect();
            listed.sort_unstable();
            expected.sort_unstable();
            assert_eq!(listed, expected, "{name}");
            let mut copy = DealRows::default();
            copy.extend(rows.clone());
            assert_eq!(
                copy.iter().collect::<Vec<_>>(),
                rows.iter().collect::<Vec<_>>(),
                "{name}"
            );
            // Taken in half by half, as a sync takes in what classing gathered.
            let (first_half, second_half) = inserts.split_at(inserts.len() / 2);
            let mut halves = [DealRows::default(), DealRows::default()];
            for (half, inserts) in halves.iter_mut().zip([first_half, second_half]) {
                for (deal_id, row_number) in inserts {
                    half.insert(*deal_id, *row_number);
                }
            }
            let [mut joined, second] = halves;
            joined.extend(second);
            assert_eq!(
                joined.iter().collect::<Vec<_>>(),
                rows.iter().collect::<Vec<_>>(),
                "{name}: in halves"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    use crate::deal::{row_hash, ExtraMap};

    fn fields(pairs: &[(Field, &str)]) -> FieldMap {
        pairs
            .iter()
            .map(|(field, value)| (*field, FieldValue::Text(value.to_string())))
            .collect()
    }

    fn row(row_number: u32, id: Option<DealId>, pairs: &[(Field, &str)]) -> CleanRow {
        let fields = fields(pairs);
        let extras = ExtraMap::new();
        let hash = row_hash(&fields, &extras);
        CleanRow {
            row_number,
            id,
            fields,
            extras,
            has_error: false,
            hash,
            error_hash: None,
            json: None,
        }
    }

    fn mirror_row(deal_id: DealId, row_number: u32, pairs: &[(Field, &str)]) -> MirrorRow {
        let fields = fields(pairs);
        let extras = ExtraMap::new();
        MirrorRow {
            deal_id,
            row_number,
            row_hash: row_hash(&fields, &extras),
            raw_hash: None,
            fields,
            extras,
        }
    }

    fn deal(id: DealId, pairs: &[(Field, &str)]) -> Deal {
        let at = Utc
            .with_ymd_and_hms(2026, 11, 1, 9, 0, 0)
            .single()
            .expect("time");
        Deal {
            id,
            fields: fields(pairs),
            extra: ExtraMap::new(),
            created_at: at,
            updated_at: at,
            stage_entered_at: Some(at),
            archived_at: None,
        }
    }

    struct Case {
        name: &'static str,
        rows: Vec<CleanRow>,
        mirror: Vec<MirrorRow>,
        deals: Vec<Deal>,
        natural: Vec<(NaturalKey, DealId)>,
        other_files: Vec<DealId>,
        known_error_rows: Vec<&'static str>,
        on_row_removed: RowRemoved,
        expected_actions: Vec<RowAction>,
        expected_removals: Vec<Removal>,
        n_issues: usize,
    }

    impl Default for Case {
        fn default() -> Case {
            Case {
                name: "",
                rows: Vec::new(),
                mirror: Vec::new(),
                deals: Vec::new(),
                natural: Vec::new(),
                other_files: Vec::new(),
                known_error_rows: Vec::new(),
                on_row_removed: RowRemoved::Archive,
                expected_actions: Vec::new(),
                expected_removals: Vec::new(),
                n_issues: 0,
            }
        }
    }

    use Field::{Company, Contact, Email, Stage, StageSince};

    /// A row with errors: only its cleaned values are in `fields`; `raw` stands for its cells as
    /// written.
    fn bad_row(row_number: u32, pairs: &[(Field, &str)], raw: &str) -> CleanRow {
        CleanRow {
            has_error: true,
            error_hash: Some(raw.to_string()),
            ..row(row_number, None, pairs)
        }
    }

    fn cases() -> Vec<Case> {
        let acme = [(Company, "Acme"), (Email, "ann@acme.com"), (Stage, "Lead")];
        let beta = [(Company, "Beta"), (Contact, "Ben"), (Stage, "Lead")];
        vec![
            Case {
                name: "unchanged rows, even moved, are unchanged",
                rows: vec![row(2, None, &beta), row(3, None, &acme)],
                mirror: vec![mirror_row(1, 2, &acme), mirror_row(2, 3, &beta)],
                deals: vec![deal(1, &acme), deal(2, &beta)],
                expected_actions: vec![
                    RowAction::Unchanged {
                        row_idx: 0,
                        deal_id: 2,
                    },
                    RowAction::Unchanged {
                        row_idx: 1,
                        deal_id: 1,
                    },
                ],
                ..Case::default()
            },
            Case {
                name: "a changed stage is the only change, dated today",
                rows: vec![row(
                    2,
                    None,
                    &[(Company, "Acme"), (Email, "ann@acme.com"), (Stage, "Won")],
                )],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![RowAction::Update {
                    row_idx: 0,
                    deal_id: 1,
                    changes: vec![
                        (Stage, Some(FieldValue::Text("Won".to_string()))),
                        (StageSince, Some(FieldValue::Text("2026-11-28".to_string()))),
                    ],
                    extra_changes: vec![],
                    unarchive: false,
                }],
                ..Case::default()
            },
            Case {
                name: "a cleared cell clears the field",
                rows: vec![row(2, None, &[(Company, "Acme"), (Stage, "Lead")])],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![RowAction::Update {
                    row_idx: 0,
                    deal_id: 1,
                    changes: vec![(Email, None)],
                    extra_changes: vec![],
                    unarchive: false,
                }],
                ..Case::default()
            },
            Case {
                name: "a renamed company is still recognised by email",
                rows: vec![row(
                    2,
                    None,
                    &[
                        (Company, "Acme Inc"),
                        (Email, "ann@acme.com"),
                        (Stage, "Lead"),
                    ],
                )],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![RowAction::Update {
                    row_idx: 0,
                    deal_id: 1,
                    changes: vec![(Company, Some(FieldValue::Text("Acme Inc".to_string())))],
                    extra_changes: vec![],
                    unarchive: false,
                }],
                ..Case::default()
            },
            Case {
                name: "a row without email is recognised by company and contact",
                rows: vec![row(
                    2,
                    None,
                    &[(Company, "Beta"), (Contact, "Ben"), (Stage, "Won")],
                )],
                mirror: vec![mirror_row(2, 2, &beta)],
                deals: vec![deal(2, &beta)],
                expected_actions: vec![RowAction::Update {
                    row_idx: 0,
                    deal_id: 2,
                    changes: vec![
                        (Stage, Some(FieldValue::Text("Won".to_string()))),
                        (StageSince, Some(FieldValue::Text("2026-11-28".to_string()))),
                    ],
                    extra_changes: vec![],
                    unarchive: false,
                }],
                ..Case::default()
            },
            Case {
                name: "a removed row is archived",
                rows: vec![row(2, None, &acme)],
                mirror: vec![mirror_row(1, 2, &acme), mirror_row(2, 3, &beta)],
                deals: vec![deal(1, &acme), deal(2, &beta)],
                expected_actions: vec![RowAction::Unchanged {
                    row_idx: 0,
                    deal_id: 1,
                }],
                expected_removals: vec![Removal::Archive(2)],
                ..Case::default()
            },
            Case {
                name: "delete policy deletes",
                rows: vec![],
                mirror: vec![mirror_row(2, 3, &beta)],
                deals: vec![deal(2, &beta)],
                on_row_removed: RowRemoved::Delete,
                expected_removals: vec![Removal::Delete(2)],
                ..Case::default()
            },
            Case {
                name: "ignore policy only forgets",
                rows: vec![],
                mirror: vec![mirror_row(2, 3, &beta)],
                deals: vec![deal(2, &beta)],
                on_row_removed: RowRemoved::Ignore,
                expected_removals: vec![Removal::Forget(2)],
                ..Case::default()
            },
            Case {
                name: "a deal that moved to another file is not archived",
                rows: vec![],
                mirror: vec![mirror_row(2, 3, &beta)],
                deals: vec![deal(2, &beta)],
                other_files: vec![2],
                expected_removals: vec![Removal::MovedAway(2)],
                ..Case::default()
            },
            Case {
                name: "a new row with errors that shares the company of a missing row holds its removal back",
                rows: vec![bad_row(2, &[(Company, "ACME "), (Contact, "Ann B"), (Stage, "Lead")], "acme, ann@")],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![RowAction::Skipped {
                    row_idx: 0,
                    deal_id: None,
                }],
                expected_removals: vec![Removal::Deferred(1)],
                n_issues: 1,
                ..Case::default()
            },
            Case {
                name: "a row with errors that shares nothing with a missing row does not hold it back",
                rows: vec![bad_row(2, &[(Company, "Zeta"), (Stage, "Lead")], "zeta, bad")],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![RowAction::Skipped {
                    row_idx: 0,
                    deal_id: None,
                }],
                expected_removals: vec![Removal::Archive(1)],
                ..Case::default()
            },
            Case {
                name: "an old row with errors (there beside the missing row last time) does not hold it back",
                rows: vec![bad_row(2, &[(Company, "Acme"), (Contact, "Ann B"), (Stage, "Lead")], "acme, old")],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                known_error_rows: vec!["acme, old"],
                expected_actions: vec![RowAction::Skipped {
                    row_idx: 0,
                    deal_id: None,
                }],
                expected_removals: vec![Removal::Archive(1)],
                ..Case::default()
            },
            Case {
                name: "a row with errors holds back only the removals it may be; the others proceed",
                rows: vec![bad_row(
                    2,
                    &[(Contact, "Ben"), (Stage, "Lead")],
                    "ben, bad amount",
                )],
                mirror: vec![mirror_row(1, 2, &acme), mirror_row(2, 3, &beta)],
                deals: vec![deal(1, &acme), deal(2, &beta)],
                expected_actions: vec![RowAction::Skipped {
                    row_idx: 0,
                    deal_id: None,
                }],
                expected_removals: vec![Removal::Archive(1), Removal::Deferred(2)],
                n_issues: 1,
                ..Case::default()
            },
            Case {
                name: "a recognised row with errors is skipped and not removed",
                rows: vec![CleanRow {
                    has_error: true,
                    ..row(2, None, &[(Company, "Acme"), (Email, "ann@acme.com")])
                }],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![RowAction::Skipped {
                    row_idx: 0,
                    deal_id: Some(1),
                }],
                ..Case::default()
            },
            Case {
                name: "a repeated id makes a new deal with a warning",
                rows: vec![
                    row(2, Some(1), &acme),
                    row(3, Some(1), &[(Company, "Acme East")]),
                ],
                mirror: vec![mirror_row(1, 2, &acme)],
                deals: vec![deal(1, &acme)],
                expected_actions: vec![
                    RowAction::Unchanged {
                        row_idx: 0,
                        deal_id: 1,
                    },
                    RowAction::Create { row_idx: 1 },
                ],
                n_issues: 1,
                ..Case::default()
            },
            Case {
                name: "an unknown id is warned about and the row created",
                rows: vec![row(2, Some(99), &[(Company, "Gamma")])],
                expected_actions: vec![RowAction::Create { row_idx: 0 }],
                n_issues: 1,
                ..Case::default()
            },
            Case {
                name:
                    "a new row matching a store deal by email updates only what differs and is set",
                rows: vec![row(2, None, &[(Email, "ann@acme.com"), (Stage, "Won")])],
                deals: vec![deal(1, &acme)],
                natural: vec![((Email, "ann@acme.com".to_string()), 1)],
                expected_actions: vec![RowAction::Update {
                    row_idx: 0,
                    deal_id: 1,
                    changes: vec![
                        (Stage, Some(FieldValue::Text("Won".to_string()))),
                        (StageSince, Some(FieldValue::Text("2026-11-28".to_string()))),
                    ],
                    extra_changes: vec![],
                    unarchive: false,
                }],
                ..Case::default()
            },
            Case {
                name: "the id wins over the email",
                rows: vec![row(2, Some(2), &beta)],
                mirror: vec![mirror_row(2, 2, &beta)],
                deals: vec![deal(1, &acme), deal(2, &beta)],
                natural: vec![((Email, "ann@acme.com".to_string()), 1)],
                expected_actions: vec![RowAction::Unchanged {
                    row_idx: 0,
                    deal_id: 2,
                }],
                ..Case::default()
            },
        ]
    }

    fn run(case: &Case) -> (Changeset, Vec<RowIssue>) {
        let deals: HashMap<DealId, Deal> = case
            .deals
            .iter()
            .map(|deal| (deal.id, deal.clone()))
            .collect();
        let natural: HashMap<NaturalKey, DealId> = case.natural.iter().cloned().collect();
        let other_files: HashSet<DealId> = case.other_files.iter().copied().collect();
        let known_error_rows: HashSet<String> = case
            .known_error_rows
            .iter()
            .map(|hash| hash.to_string())
            .collect();
        diff(&DiffInput {
            rows: &case.rows,
            mirror: &case.mirror,
            deals: &deals,
            natural_matches: &natural,
            deals_in_other_files: &other_files,
            match_on: &[Email],
            on_row_removed: case.on_row_removed,
            sheet_fields: &[Company, Contact, Email, Stage],
            conflict_policy: ConflictPolicy::Store,
            file_modified: None,
            sheet_extras: &[],
            formula_extras: &HashMap::new(),
            formula_fields: &HashMap::new(),
            claimed: &DealRows::default(),
            known_error_rows: &known_error_rows,
            today: NaiveDate::from_ymd_opt(2026, 11, 28).expect("date"),
        })
    }

    #[test]
    fn diff_cases() {
        for case in cases() {
            let (changeset, issues) = run(&case);
            assert_eq!(changeset.actions, case.expected_actions, "{}", case.name);
            assert_eq!(changeset.removals, case.expected_removals, "{}", case.name);
            assert_eq!(issues.len(), case.n_issues, "{}: {:?}", case.name, issues);
        }
    }

    #[test]
    fn only_rows_not_recognised_otherwise_need_store_lookups() {
        let acme = [(Company, "Acme"), (Email, "ann@acme.com")];
        let rows = vec![
            row(2, None, &acme),
            row(3, Some(5), &[(Email, "x@y.com")]),
            row(4, None, &[(Email, "new@y.com")]),
        ];
        let mirror = vec![mirror_row(1, 2, &acme)];
        assert_eq!(
            lookups_needed(&rows, &mirror, &[Email]),
            vec![(Email, "new@y.com".to_string())]
        );
    }

    proptest! {
        /// Whatever the rows, syncing a file against a mirror of exactly those rows changes nothing.
        #[test]
        fn a_file_equal_to_its_mirror_is_all_unchanged(companies in proptest::collection::vec("[a-z]{0,6}", 0..20)) {
            let mut rows = Vec::new();
            let mut mirror = Vec::new();
            let mut deals = Vec::new();
            for (index, company) in companies.iter().enumerate() {
                let pairs = [(Company, company.as_str()), (Stage, "Lead")];
                rows.push(row(index as u32 + 2, None, &pairs));
                mirror.push(mirror_row(index as DealId + 1, index as u32 + 2, &pairs));
                deals.push(deal(index as DealId + 1, &pairs));
            }
            let case = Case { rows, mirror, deals, ..Case::default() };
            let (changeset, issues) = run(&case);
            prop_assert!(issues.is_empty());
            prop_assert!(changeset.removals.is_empty());
            let all_unchanged = changeset.actions.iter().all(|action| matches!(action, RowAction::Unchanged { .. }));
            prop_assert!(all_unchanged);
        }
    }
}
