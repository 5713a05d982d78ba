//! The three-way, field-level merge of one row: base (what the file held at its last sync), sheet
//! (the file now) and store (the deal now). Pure logic on plain values.
//!
//! A field changed on one side only takes that side's value. A field changed on both sides to
//! different values is a conflict, decided by the source's [`ConflictPolicy`] and returned so the
//! caller can record it: the losing value is never silently dropped.
//!
//! Extra columns (the sheet's unmapped columns, kept in the deal's `extra` by header) are merged
//! the same way ([`merge_extras`]).
//!
//! A field whose cell holds a formula the user wrote is the sheet's: the write-back never
//! replaces a formula with a constant, so a store change to such a field is a conflict the sheet
//! wins, whatever the policy.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::ConflictPolicy;
use crate::deal::{ExtraMap, Field, FieldMap, FieldValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Sheet,
    Store,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Sheet => "sheet",
            Side::Store => "store",
        }
    }
}

/// A value both sides changed to different values: a mapped field ([`FieldConflict`]) or an
/// extra column ([`ExtraConflict`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict<K, V> {
    pub field: K,
    pub base: Option<V>,
    pub sheet: Option<V>,
    pub store: Option<V>,
    pub winner: Side,
    /// The sheet won because its cell holds a formula.
    pub formula: bool,
}

/// A mapped field both sides changed to different values.
pub type FieldConflict = Conflict<Field, FieldValue>;

/// An extra column (by its header) both sides changed to different values.
pub type ExtraConflict = Conflict<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct MergeOutcome<K = Field, V = FieldValue> {
    /// Values the store must take from the sheet.
    pub to_store: Vec<(K, Option<V>)>,
    /// What the sheet should show for the merged keys.
    pub merged: BTreeMap<K, V>,
    pub conflicts: Vec<Conflict<K, V>>,
}

impl<K, V> Default for MergeOutcome<K, V> {
    fn default() -> Self {
        MergeOutcome {
            to_store: Vec::new(),
            merged: BTreeMap::new(),
            conflicts: Vec::new(),
        }
    }
}

/// Merges the given fields (those the sheet has columns for). `sheet_is_newer` decides conflicts
/// under [`ConflictPolicy::Newest`]; `formula_fields` are the fields whose cell in this row holds
/// a formula (empty when the file is not written back).
pub fn merge_fields(
    fields: &[Field],
    base: &FieldMap,
    sheet: &FieldMap,
    store: &FieldMap,
    policy: ConflictPolicy,
    sheet_is_newer: bool,
    formula_fields: &[Field],
) -> MergeOutcome {
    merge_values(
        fields,
        base,
        sheet,
        store,
        policy,
        sheet_is_newer,
        formula_fields,
    )
}

/// Merges a row's extra columns (by header: those the sheet has as named columns) exactly as
/// [`merge_fields`] merges mapped fields: base (the mirror's extras), sheet, store (the deal's
/// `extra`).
pub fn merge_extras(
    columns: &[String],
    base: &ExtraMap,
    sheet: &ExtraMap,
    store: &ExtraMap,
    policy: ConflictPolicy,
    sheet_is_newer: bool,
    formula_columns: &[String],
) -> MergeOutcome<String, String> {
    merge_values(
        columns,
        base,
        sheet,
        store,
        policy,
        sheet_is_newer,
        formula_columns,
    )
}

/// The three-way merge of the given keys, for fields and extras alike.
fn merge_values<K: Ord + Clone, V: PartialEq + Clone>(
    keys: &[K],
    base: &BTreeMap<K, V>,
    sheet: &BTreeMap<K, V>,
    store: &BTreeMap<K, V>,
    policy: ConflictPolicy,
    sheet_is_newer: bool,
    formula_keys: &[K],
) -> MergeOutcome<K, V> {
    let mut outcome = MergeOutcome::default();
    for field in keys {
        let base_value = base.get(field);
        let sheet_value = sheet.get(field);
        let store_value = store.get(field);
        let sheet_changed = sheet_value != base_value;
        let store_changed = store_value != base_value;
        let is_formula = formula_keys.contains(field);
        let winner = match (sheet_changed, store_changed) {
            (_, true) if is_formula && sheet_value != store_value => {
                outcome.conflicts.push(Conflict {
                    field: field.clone(),
                    base: base_value.cloned(),
                    sheet: sheet_value.cloned(),
                    store: store_value.cloned(),
                    winner: Side::Sheet,
                    formula: true,
                });
                Side::Sheet
            }
            (false, _) => Side::Store,
            (true, false) => Side::Sheet,
            (true, true) if sheet_value == store_value => Side::Store,
            (true, true) => {
                let winner = match policy {
                    ConflictPolicy::Store => Side::Store,
                    ConflictPolicy::Sheet => Side::Sheet,
                    ConflictPolicy::Newest if sheet_is_newer => Side::Sheet,
                    ConflictPolicy::Newest => Side::Store,
                };
                outcome.conflicts.push(Conflict {
                    field: field.clone(),
                    base: base_value.cloned(),
                    sheet: sheet_value.cloned(),
                    store: store_value.cloned(),
                    winner,
                    formula: false,
                });
                winner
            }
        };
        let value = match winner {
            Side::Sheet => {
                outcome.to_store.push((field.clone(), sheet_value.cloned()));
                sheet_value
            }
            Side::Store => store_value,
        };
        if let Some(value) = value {
            outcome.merged.insert(field.clone(), value.clone());
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Field::{Amount, Company, Owner, Stage};

    fn map(pairs: &[(Field, &str)]) -> FieldMap {
        pairs
            .iter()
            .map(|(field, value)| (*field, FieldValue::Text(value.to_string())))
            .collect()
    }

    const FIELDS: [Field; 4] = [Company, Stage, Owner, Amount];

    #[test]
    fn one_sided_changes_are_kept_and_conflicts_follow_the_policy() {
        let base = map(&[(Company, "Acme"), (Stage, "Lead"), (Owner, "Alice")]);
        let sheet = map(&[(Company, "Acme"), (Stage, "Prospect"), (Owner, "Alice")]);
        let store = map(&[(Company, "Acme"), (Stage, "Lead"), (Owner, "Bob")]);
        let outcome = merge_fields(
            &FIELDS,
            &base,
            &sheet,
            &store,
            ConflictPolicy::Store,
            false,
            &[],
        );
        assert_eq!(
            outcome.to_store,
            vec![(Stage, Some(FieldValue::Text("Prospect".to_string())))]
        );
        assert_eq!(
            outcome.merged,
            map(&[(Company, "Acme"), (Stage, "Prospect"), (Owner, "Bob")])
        );
        assert!(outcome.conflicts.is_empty());

        let sheet = map(&[(Stage, "Won")]);
        let store = map(&[(Stage, "Lost")]);
        let base = map(&[(Stage, "Lead")]);
        let cases = [
            (ConflictPolicy::Store, false, Side::Store, "Lost"),
            (ConflictPolicy::Sheet, false, Side::Sheet, "Won"),
            (ConflictPolicy::Newest, true, Side::Sheet, "Won"),
            (ConflictPolicy::Newest, false, Side::Store, "Lost"),
        ];
        for (policy, sheet_is_newer, winner, value) in cases {
            let outcome =
                merge_fields(&[Stage], &base, &sheet, &store, policy, sheet_is_newer, &[]);
            assert_eq!(outcome.conflicts.len(), 1, "{policy:?}");
            assert_eq!(outcome.conflicts[0].winner, winner, "{policy:?}");
            assert_eq!(
                outcome.conflicts[0].sheet,
                Some(FieldValue::Text("Won".to_string()))
            );
            assert_eq!(
                outcome.conflicts[0].store,
                Some(FieldValue::Text("Lost".to_string()))
            );
            assert_eq!(
                outcome.merged[&Stage],
                FieldValue::Text(value.to_string()),
                "{policy:?}"
            );
            assert_eq!(
                outcome.to_store.is_empty(),
                winner == Side::Store,
                "{policy:?}"
            );
        }
    }

    #[test]
    fn the_same_change_on_both_sides_is_no_conflict() {
        let base = map(&[(Stage, "Lead")]);
        let both = map(&[(Stage, "Won")]);
        let outcome = merge_fields(
            &[Stage],
            &base,
            &both,
            &both,
            ConflictPolicy::Sheet,
            true,
            &[],
        );
        assert!(outcome.conflicts.is_empty());
        assert!(outcome.to_store.is_empty());
        assert_eq!(outcome.merged, both);
    }

    #[test]
    fn a_cleared_cell_is_a_change() {
        let base = map(&[(Owner, "Alice")]);
        let outcome = merge_fields(
            &[Owner],
            &base,
            &FieldMap::new(),
            &base,
            ConflictPolicy::Store,
            false,
            &[],
        );
        assert_eq!(outcome.to_store, vec![(Owner, None)]);
        assert!(outcome.merged.is_empty());
    }

    #[test]
    fn a_formula_cell_keeps_its_value_against_a_store_change_under_every_policy() {
        let base = map(&[(Amount, "5000"), (Stage, "Lead")]);
        let sheet = map(&[(Amount, "5000"), (Stage, "Lead")]);
        let store = map(&[(Amount, "4444"), (Stage, "Won")]);
        for policy in [
            ConflictPolicy::Store,
            ConflictPolicy::Sheet,
            ConflictPolicy::Newest,
        ] {
            let outcome = merge_fields(
                &[Amount, Stage],
                &base,
                &sheet,
                &store,
                policy,
                false,
                &[Amount],
            );
            assert_eq!(outcome.merged, map(&[(Amount, "5000"), (Stage, "Won")]));
            assert_eq!(
                outcome.to_store,
                vec![(Amount, Some(FieldValue::Text("5000".to_string())))],
                "{policy:?}: the store takes the formula's value back"
            );
            assert_eq!(outcome.conflicts.len(), 1);
            assert_eq!(outcome.conflicts[0].winner, Side::Sheet);
            assert!(outcome.conflicts[0].formula);
        }
        // The same value on both sides, or a change on the sheet alone, is no conflict.
        let outcome = merge_fields(
            &[Amount],
            &base,
            &sheet,
            &base,
            ConflictPolicy::Store,
            false,
            &[Amount],
        );
        assert!(outcome.conflicts.is_empty() && outcome.to_store.is_empty());
        let changed = map(&[(Amount, "6000")]);
        let outcome = merge_fields(
            &[Amount],
            &base,
            &changed,
            &base,
            ConflictPolicy::Store,
            false,
            &[Amount],
        );
        assert!(outcome.conflicts.is_empty());
        assert_eq!(outcome.merged, changed);
    }

    #[test]
    fn extra_columns_merge_like_fields() {
        let extras = |pairs: &[(&str, &str)]| -> ExtraMap {
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect()
        };
        let columns = ["Contract No".to_string(), "Region".to_string()];
        let base = extras(&[("Contract No", "HT-1"), ("Region", "North")]);
        // The store alone changed one, the sheet alone the other: each side's change is kept.
        let outcome = merge_extras(
            &columns,
            &base,
            &extras(&[("Contract No", "HT-1"), ("Region", "East")]),
            &extras(&[("Contract No", "HT-2"), ("Region", "North"), ("PO", "7")]),
            ConflictPolicy::Store,
            false,
            &[],
        );
        assert_eq!(
            outcome.merged,
            extras(&[("Contract No", "HT-2"), ("Region", "East")]),
            "an extra the sheet has no column for is not the sheet's"
        );
        assert_eq!(
            outcome.to_store,
            vec![("Region".to_string(), Some("East".to_string()))]
        );
        assert!(outcome.conflicts.is_empty());
        // Both changed it: a conflict under the policy; a formula cell is the sheet's.
        let sheet = extras(&[("Contract No", "HT-REP")]);
        let store = extras(&[("Contract No", "HT-API")]);
        let outcome = merge_extras(
            &columns[..1],
            &base,
            &sheet,
            &store,
            ConflictPolicy::Store,
            false,
            &[],
        );
        assert_eq!(outcome.merged, store);
        assert_eq!(outcome.conflicts.len(), 1);
        assert_eq!(outcome.conflicts[0].field, "Contract No");
        assert_eq!(outcome.conflicts[0].winner, Side::Store);
        let outcome = merge_extras(
            &columns[..1],
            &base,
            &base,
            &store,
            ConflictPolicy::Store,
            false,
            &columns[..1],
        );
        assert_eq!(outcome.merged["Contract No"], "HT-1");
        assert!(outcome.conflicts[0].formula);
    }

    fn field_map_strategy() -> impl Strategy<Value = FieldMap> {
        proptest::collection::btree_map(
            proptest::sample::select(FIELDS.to_vec()),
            "[a-c]{0,2}".prop_map(FieldValue::Text),
            0..4,
        )
    }

    fn policy_strategy() -> impl Strategy<Value = ConflictPolicy> {
        proptest::sample::select(vec![
            ConflictPolicy::Store,
            ConflictPolicy::Sheet,
            ConflictPolicy::Newest,
        ])
    }

    proptest! {
        #[test]
        fn merging_with_no_changes_is_the_identity(base in field_map_strategy(), policy in policy_strategy(), newer in any::<bool>()) {
            let outcome = merge_fields(&FIELDS, &base, &base, &base, policy, newer, &[]);
            prop_assert!(outcome.to_store.is_empty());
            prop_assert!(outcome.conflicts.is_empty());
            prop_assert_eq!(outcome.merged, base);
        }

        #[test]
        fn a_change_on_the_sheet_only_is_kept(base in field_map_strategy(), sheet in field_map_strategy(), policy in policy_strategy(), newer in any::<bool>()) {
            let outcome = merge_fields(&FIELDS, &base, &sheet, &base, policy, newer, &[]);
            prop_assert!(outcome.conflicts.is_empty());
            prop_assert_eq!(&outcome.merged, &sheet);
            for field in FIELDS {
                let changed = sheet.get(&field) != base.get(&field);
                let written = outcome.to_store.iter().any(|(written, _)| *written == field);
                prop_assert_eq!(changed, written);
            }
        }

        #[test]
        fn a_change_in_the_store_only_is_kept(base in field_map_strategy(), store in field_map_strategy(), policy in policy_strategy(), newer in any::<bool>()) {
            let outcome = merge_fields(&FIELDS, &base, &base, &store, policy, newer, &[]);
            prop_assert!(outcome.conflicts.is_empty());
            prop_assert!(outcome.to_store.is_empty());
            prop_assert_eq!(outcome.merged, store);
        }
    }
}
