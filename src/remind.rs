//! Stalled deals: the rule that says a deal has sat in its stage too long. Pure logic with the day
//! as a parameter.
//!
//! This module must not send mail or read files; it only judges deals.

use chrono::NaiveDate;

use crate::config::Stages;
use crate::deal::{Deal, Field};

/// How many days a deal has been idle: since the later of entering its stage and its last
/// contact.
pub fn idle_days(deal: &Deal, today: NaiveDate) -> Option<i64> {
    let entered = deal.stage_entered_at.map(|at| at.date_naive());
    let last_contact = deal.text(Field::LastContact).and_then(|text| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok());
    let since = match (entered, last_contact) {
        (Some(entered), Some(contact)) => entered.max(contact),
        (Some(day), None) | (None, Some(day)) => day,
        (None, None) => return None,
    };
    Some((today - since).num_days())
}

/// Whether a live, non-terminal deal has been idle longer than its stage's `stall_after_days`.
pub fn is_stalled(deal: &Deal, stages: &Stages, today: NaiveDate) -> bool {
    if deal.archived_at.is_some() {
        return false;
    }
    let Some(stage) = deal.text(Field::Stage).and_then(|name| stages.resolve(name)) else { return false };
    if stage.terminal.is_some() {
        return false;
    }
    match (stage.stall_after_days, idle_days(deal, today)) {
        (Some(limit), Some(days)) => days > i64::from(limit),
        _ => false,
    }
}
