//! The three-way, field-level merge of one row: base (what the file held at its last sync), sheet
//! (the file now) and store (the deal now). Pure logic on plain values.
//!
//! A field changed on one side only takes that side's value. A field changed on both sides to
//! different values is a conflict, decided by the source's [`ConflictPolicy`] and returned so the
//! caller can record it: the losing value is never silently dropped.
//!
//! A field whose cell holds a formula the user wrote is the sheet's: the write-back never
//! replaces a formula with a constant, so a store change to such a field is a conflict the sheet
//! wins, whatever the policy.

use serde::Serialize;

use crate::config::ConflictPolicy;
use crate::deal::{Field, FieldChanges, FieldMap, FieldValue};

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

/// A field both sides changed to different values.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldConflict {
    pub field: Field,
    pub base: Option<FieldValue>,
    pub sheet: Option<FieldValue>,
    pub store: Option<FieldValue>,
    pub winner: Side,
    /// The sheet won because its cell holds a formula.
    pub formula: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergeOutcome {
    /// Fields the store must take from the sheet.
    pub to_store: FieldChanges,
    /// What the sheet should show for the merged fields.
    pub merged: FieldMap,
    pub conflicts: Vec<FieldConflict>,
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
    let mut outcome = MergeOutcome::default();
    for field in fields {
        let base_value = base.get(field);
        let sheet_value = sheet.get(field);
        let store_value = store.get(field);
        let sheet_changed = sheet_value != base_value;
        let store_changed = store_value != base_value;
        let is_formula = formula_fields.contains(field);
        let winner = match (sheet_changed, store_changed) {
            (_, true) if is_formula && sheet_value != store_value => {
                outcome.conflicts.push(FieldConflict {
                    field: *field,
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
                outcome.conflicts.push(FieldConflict {
                    field: *field,
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
                outcome.to_store.push((*field, sheet_value.cloned()));
                sheet_value
            }
            Side::Store => store_value,
        };
        if let Some(value) = value {
            outcome.merged.insert(*field, value.clone());
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
