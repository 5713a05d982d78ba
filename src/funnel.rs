//! Funnel analytics: per stage, the open deals and their (weighted) amounts, conversion to later
//! stages, win rates, time in stage; totals; and the forecast. Pure logic over deals and their
//! stage history, with the period and "now" as parameters.
//!
//! Ranks: the non-terminal stages in funnel order, then the won stage(s). A deal "reaches" a rank
//! when it first enters that stage or any later one, so a deal that skips a stage counts as having
//! passed it, and one that moves backwards and forwards again counts once. Lost stages have no
//! rank. Amounts are summed as numbers; deals in different currencies are not converted.
//!
//! This module must not read the store or write files; `cli` and `report` do.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::config::{Stage, Stages, Terminal};
use crate::deal::{Deal, DealId, Field};
use crate::remind::{entered_day, stall_of, Calendar};
use crate::store::StageChange;

/// The period the flows (conversion, time in stage, won and lost) are counted over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Period {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

impl Period {
    /// The period from the start of `since` to the end of `until` (UTC days); without `until`,
    /// up to today, and without `since`, the 90 days before `until`.
    pub fn between(
        since: Option<NaiveDate>,
        until: Option<NaiveDate>,
        now: DateTime<Utc>,
    ) -> Period {
        let until_day = until.unwrap_or_else(|| now.date_naive());
        let since_day = since.unwrap_or_else(|| until_day - chrono::Duration::days(90));
        let start = since_day.and_time(chrono::NaiveTime::MIN).and_utc();
        let end = until_day
            .and_hms_opt(23, 59, 59)
            .map(|end| end.and_utc())
            .unwrap_or(now);
        Period {
            since: start,
            until: end,
        }
    }

    fn contains(&self, at: DateTime<Utc>) -> bool {
        at >= self.since && at <= self.until
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageStats {
    pub stage: String,
    pub probability: f64,
    pub open_count: u64,
    pub open_amount: f64,
    pub weighted_amount: f64,
    /// Deals that reached this stage in the period.
    pub entered: u64,
    /// Of those, how many reached a later stage (by now).
    pub converted: u64,
    pub conversion_rate: Option<f64>,
    /// Of those, how many were won.
    pub won: u64,
    pub win_rate: Option<f64>,
    /// Days spent in the stage by visits that ended in the period.
    pub n_left: u64,
    pub median_days: Option<f64>,
    pub mean_days: Option<f64>,
    /// Visits that ended in the period but whose start is unknown (deals imported without a
    /// stage-since date): left out of `n_left`, the median and the mean rather than counted as
    /// 0 days.
    pub n_unknown_start: u64,
    /// Deals in the stage now: the age of the oldest (of those whose stage date is known), and
    /// how many are stalled.
    pub oldest_open_days: Option<i64>,
    pub n_stalled: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    /// Open deals now, in every open stage (the sum of the stages' `open_count`).
    pub open_count: u64,
    /// Their amount (the sum of the stages' `open_amount`).
    pub open_amount: f64,
    pub won_count: u64,
    pub won_amount: f64,
    pub lost_count: u64,
    /// Of the deals that reached the first stage in the period, the share won (by now).
    pub lead_to_won_rate: Option<f64>,
    /// For deals won in the period: mean days from their first stage to won.
    pub average_days_to_won: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForecastLine {
    pub deal_id: DealId,
    pub company: Option<String>,
    pub owner: Option<String>,
    pub stage: String,
    pub amount: f64,
    pub probability: f64,
    pub weighted: f64,
    /// The share of deals that reached this stage (ever) and were won.
    pub historical_win_rate: Option<f64>,
    pub history_based: f64,
    pub expected_close: Option<String>,
    pub closes_in_period: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub weighted_pipeline: f64,
    pub history_based: f64,
    /// Open deals, those expected to close in the period first, then by weighted amount.
    pub deals: Vec<ForecastLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnerStats {
    pub owner: String,
    pub open_count: u64,
    pub weighted_pipeline: f64,
    pub won_count: u64,
    pub won_amount: f64,
    pub n_stalled: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StalledLine {
    pub deal_id: DealId,
    pub company: Option<String>,
    pub owner: Option<String>,
    pub stage: String,
    pub amount: Option<f64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelReport {
    pub period: Period,
    pub owner: Option<String>,
    pub stages: Vec<StageStats>,
    pub totals: Totals,
    pub forecast: Forecast,
    pub by_owner: Vec<OwnerStats>,
    pub stalled: Vec<StalledLine>,
}

/// A sum of amounts that is 0, not -0, when there is nothing to add (`Iterator::sum` of no `f64`
/// is -0.0, which JSON and tables would show as "-0").
fn total(amounts: impl Iterator<Item = f64>) -> f64 {
    amounts.fold(0.0, |sum, amount| sum + amount)
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn days(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_seconds() as f64 / 86_400.0
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|left, right| left.total_cmp(right));
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 0 {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    })
}

/// The funnel over `deals` (already filtered by owner if wanted) and their stage history: one
/// phase each for the stages, the totals, the forecast and the owners with the stalled list.
pub fn compute(
    deals: &[Deal],
    history: &[StageChange],
    stages: &Stages,
    calendar: &Calendar,
    period: Period,
    now: DateTime<Utc>,
    owner: Option<String>,
) -> FunnelReport {
    let funnel = Funnel::new(deals, history, stages, calendar, period, now);
    let won_in_period = funnel.won_in_period();
    let (by_owner, stalled) = funnel.owners_and_stalled(&won_in_period);
    let stage_stats = funnel.stage_stats();
    let mut totals = funnel.totals(&won_in_period);
    totals.open_count = stage_stats.iter().map(|stats| stats.open_count).sum();
    totals.open_amount = total(stage_stats.iter().map(|stats| stats.open_amount));
    FunnelReport {
        period,
        owner,
        stages: stage_stats,
        totals,
        forecast: funnel.forecast(),
        by_owner,
        stalled,
    }
}

/// A deal's amount, when it has one.
fn amount_of(deal: &Deal) -> Option<f64> {
    deal.fields
        .get(&Field::Amount)
        .and_then(|value| value.as_amount())
}

/// What every phase of [`compute`] works from: the stages by rank, the history by deal, when each
/// deal first reached each rank, and the live deals.
struct Funnel<'a> {
    deals: &'a [Deal],
    stages: &'a Stages,
    calendar: &'a Calendar,
    period: Period,
    now: DateTime<Utc>,
    today: NaiveDate,
    /// The open stages in funnel order; the won stages share the rank after the last of them.
    open_stages: Vec<&'a Stage>,
    won_rank: usize,
    /// Each deal's stage changes, oldest first.
    by_deal: HashMap<DealId, Vec<&'a StageChange>>,
    /// When each deal first reached each rank (up to now).
    first_reached: HashMap<DealId, Vec<Option<DateTime<Utc>>>>,
    live: Vec<&'a Deal>,
}

impl<'a> Funnel<'a> {
    fn new(
        deals: &'a [Deal],
        history: &'a [StageChange],
        stages: &'a Stages,
        calendar: &'a Calendar,
        period: Period,
        now: DateTime<Utc>,
    ) -> Funnel<'a> {
        let open_stages: Vec<&Stage> = stages
            .stages
            .iter()
            .filter(|stage| stage.terminal.is_none())
            .collect();
        let mut by_deal: HashMap<DealId, Vec<&StageChange>> = HashMap::new();
        for change in history {
            by_deal.entry(change.deal_id).or_default().push(change);
        }
        for changes in by_deal.values_mut() {
            changes.sort_by_key(|change| change.at);
        }
        let mut funnel = Funnel {
            deals,
            stages,
            calendar,
            period,
            now,
            today: calendar.day_of(now),
            won_rank: open_stages.len(),
            open_stages,
            by_deal,
            first_reached: HashMap::new(),
            live: deals
                .iter()
                .filter(|deal| deal.archived_at.is_none())
                .collect(),
        };
        funnel.first_reached = deals
            .iter()
            .map(|deal| (deal.id, funnel.ranks_reached(deal.id)))
            .collect();
        funnel
    }

    /// A stage's rank: its place among the open stages, the won rank, or none for a lost stage.
    fn rank_of(&self, name: &str) -> Option<usize> {
        let stage = self.stages.resolve(name)?;
        match stage.terminal {
            None => self
                .open_stages
                .iter()
                .position(|open| open.name == stage.name),
            Some(Terminal::Won) => Some(self.won_rank),
            Some(Terminal::Lost) => None,
        }
    }

    fn is_lost(&self, name: &str) -> bool {
        self.stages
            .resolve(name)
            .is_some_and(|stage| stage.terminal == Some(Terminal::Lost))
    }

    fn changes_of(&self, deal_id: DealId) -> &[&'a StageChange] {
        self.by_deal.get(&deal_id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// When the deal first reached each rank up to now: reaching a rank reaches every rank
    /// before it too.
    fn ranks_reached(&self, deal_id: DealId) -> Vec<Option<DateTime<Utc>>> {
        let mut reached = vec![None; self.won_rank + 1];
        for change in self.changes_of(deal_id) {
            if change.at > self.now {
                continue;
            }
            if let Some(rank) = self.rank_of(&change.to_stage) {
                for slot in reached.iter_mut().take(rank + 1) {
                    if slot.is_none() {
                        *slot = Some(change.at);
                    }
                }
            }
        }
        reached
    }

    /// Of the deals that ever reached `rank`, the share won.
    fn historical_win_rate(&self, rank: usize) -> Option<f64> {
        let reached = self
            .first_reached
            .values()
            .filter(|ranks| ranks[rank].is_some())
            .count() as u64;
        let won = self
            .first_reached
            .values()
            .filter(|ranks| ranks[rank].is_some() && ranks[self.won_rank].is_some())
            .count() as u64;
        ratio(won, reached)
    }

    /// The deals that reached the won rank in the period.
    fn won_in_period(&self) -> Vec<&'a Deal> {
        self.deals
            .iter()
            .filter(|deal| {
                self.first_reached
                    .get(&deal.id)
                    .and_then(|ranks| ranks[self.won_rank])
                    .is_some_and(|at| self.period.contains(at))
            })
            .collect()
    }

    fn stage_stats(&self) -> Vec<StageStats> {
        self.open_stages
            .iter()
            .enumerate()
            .map(|(rank, stage)| self.stage_stats_of(rank, stage))
            .collect()
    }

    fn stage_stats_of(&self, rank: usize, stage: &Stage) -> StageStats {
        let open: Vec<&Deal> = self
            .live
            .iter()
            .copied()
            .filter(|deal| deal.text(Field::Stage) == Some(stage.name.as_str()))
            .collect();
        let open_amount = total(open.iter().copied().filter_map(amount_of));
        let entered: Vec<&Vec<Option<DateTime<Utc>>>> = self
            .first_reached
            .values()
            .filter(|ranks| ranks[rank].is_some_and(|at| self.period.contains(at)))
            .collect();
        let converted = entered
            .iter()
            .filter(|ranks| ranks[rank + 1].is_some())
            .count() as u64;
        let won = entered
            .iter()
            .filter(|ranks| ranks[self.won_rank].is_some())
            .count() as u64;
        let (mut durations, n_unknown_start) = self.visits_ended(&stage.name);
        let mean_days =
            (!durations.is_empty()).then(|| durations.iter().sum::<f64>() / durations.len() as f64);
        let oldest_open_days = open
            .iter()
            .filter_map(|deal| entered_day(deal, self.calendar))
            .map(|day| (self.today - day).num_days())
            .max();
        let n_stalled = open
            .iter()
            .filter(|deal| stall_of(deal, self.stages, self.calendar, self.today).is_some())
            .count() as u64;
        StageStats {
            stage: stage.name.clone(),
            probability: stage.probability,
            open_count: open.len() as u64,
            open_amount,
            weighted_amount: open_amount * stage.probability,
            entered: entered.len() as u64,
            converted,
            conversion_rate: ratio(converted, entered.len() as u64),
            won,
            win_rate: ratio(won, entered.len() as u64),
            n_left: durations.len() as u64,
            median_days: median(&mut durations),
            mean_days,
            n_unknown_start,
            oldest_open_days,
            n_stalled,
        }
    }

    /// The days spent in a stage by the visits of it that ended in the period, and how many such
    /// visits have no known start (left out rather than counted as 0 days).
    fn visits_ended(&self, stage_name: &str) -> (Vec<f64>, u64) {
        let mut durations = Vec::new();
        let mut n_unknown_start = 0;
        for changes in self.by_deal.values() {
            for (change_idx, change) in changes.iter().enumerate() {
                if change.to_stage != stage_name {
                    continue;
                }
                let Some(next) = changes.get(change_idx + 1) else {
                    continue;
                };
                if self.period.contains(next.at) && next.at <= self.now {
                    if change.start_known {
                        durations.push(days(change.at, next.at));
                    } else {
                        n_unknown_start += 1;
                    }
                }
            }
        }
        (durations, n_unknown_start)
    }

    fn totals(&self, won_in_period: &[&Deal]) -> Totals {
        let won_amount = total(won_in_period.iter().copied().filter_map(amount_of));
        let lost_count = self
            .by_deal
            .values()
            .filter(|changes| {
                changes
                    .iter()
                    .any(|change| self.is_lost(&change.to_stage) && self.period.contains(change.at))
            })
            .count() as u64;
        let started: Vec<&Vec<Option<DateTime<Utc>>>> = self
            .first_reached
            .values()
            .filter(|ranks| ranks[0].is_some_and(|at| self.period.contains(at)))
            .collect();
        let started_won = started
            .iter()
            .filter(|ranks| ranks[self.won_rank].is_some())
            .count() as u64;
        let days_to_won: Vec<f64> = won_in_period
            .iter()
            .filter_map(|deal| self.days_to_won(deal))
            .collect();
        Totals {
            open_count: 0,
            open_amount: 0.0,
            won_count: won_in_period.len() as u64,
            won_amount,
            lost_count,
            lead_to_won_rate: ratio(started_won, started.len() as u64),
            average_days_to_won: (!days_to_won.is_empty())
                .then(|| days_to_won.iter().sum::<f64>() / days_to_won.len() as f64),
        }
    }

    /// Days from a won deal's first stage to won. A deal first seen mid-funnel without a stage
    /// date, or first seen already won, has no known start of its way to won.
    fn days_to_won(&self, deal: &Deal) -> Option<f64> {
        let ranks = self.first_reached.get(&deal.id)?;
        let first = self
            .changes_of(deal.id)
            .first()
            .filter(|first| {
                first.start_known
                    && self
                        .rank_of(&first.to_stage)
                        .is_some_and(|rank| rank < self.won_rank)
            })?
            .at;
        Some(days(first, ranks[self.won_rank]?))
    }

    /// The open deals, weighted by their stage's probability and by the historical win rate;
    /// those expected to close in the period first, then by weighted amount.
    fn forecast(&self) -> Forecast {
        let mut lines: Vec<ForecastLine> = self
            .live
            .iter()
            .filter_map(|deal| self.forecast_line(deal))
            .collect();
        lines.sort_by(|left, right| {
            right
                .closes_in_period
                .cmp(&left.closes_in_period)
                .then(right.weighted.total_cmp(&left.weighted))
                .then(left.deal_id.cmp(&right.deal_id))
        });
        Forecast {
            weighted_pipeline: total(lines.iter().map(|line| line.weighted)),
            history_based: total(lines.iter().map(|line| line.history_based)),
            deals: lines,
        }
    }

    fn forecast_line(&self, deal: &Deal) -> Option<ForecastLine> {
        let stage_name = deal.text(Field::Stage)?;
        let rank = self
            .rank_of(stage_name)
            .filter(|rank| *rank < self.won_rank)?;
        let stage = self.open_stages[rank];
        let amount = amount_of(deal).unwrap_or(0.0);
        let win_rate = self.historical_win_rate(rank);
        let expected_close = deal.text(Field::ExpectedClose).map(str::to_string);
        let (first_day, last_day) = (
            self.period.since.date_naive(),
            self.period.until.date_naive(),
        );
        let closes_in_period = expected_close
            .as_deref()
            .and_then(|text| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
            .is_some_and(|day| day >= first_day && day <= last_day);
        Some(ForecastLine {
            deal_id: deal.id,
            company: deal.text(Field::Company).map(str::to_string),
            owner: deal.text(Field::Owner).map(str::to_string),
            stage: stage.name.clone(),
            amount,
            probability: stage.probability,
            weighted: amount * stage.probability,
            historical_win_rate: win_rate,
            history_based: amount * win_rate.unwrap_or(0.0),
            expected_close,
            closes_in_period,
        })
    }

    /// Per owner (as written, trimmed): open deals, weighted pipeline, won in the period,
    /// stalled; and the stalled deals, worst first.
    fn owners_and_stalled(&self, won_in_period: &[&Deal]) -> (Vec<OwnerStats>, Vec<StalledLine>) {
        let mut owners: BTreeMap<String, OwnerStats> = BTreeMap::new();
        let mut stalled = Vec::new();
        for deal in &self.live {
            let owner_name = deal
                .text(Field::Owner)
                .map(|owner| owner.trim().to_string())
                .unwrap_or_default();
            let entry = owners
                .entry(owner_name.clone())
                .or_insert_with(|| OwnerStats {
                    owner: owner_name.clone(),
                    open_count: 0,
                    weighted_pipeline: 0.0,
                    won_count: 0,
                    won_amount: 0.0,
                    n_stalled: 0,
                });
            let amount = amount_of(deal);
            match deal
                .text(Field::Stage)
                .and_then(|name| self.stages.resolve(name))
            {
                Some(stage) if stage.terminal.is_none() => {
                    entry.open_count += 1;
                    entry.weighted_pipeline += amount.unwrap_or(0.0) * stage.probability;
                    if let Some(stall) = stall_of(deal, self.stages, self.calendar, self.today) {
                        entry.n_stalled += 1;
                        stalled.push((
                            stall.overdue(),
                            StalledLine {
                                deal_id: deal.id,
                                company: deal.text(Field::Company).map(str::to_string),
                                owner: deal.text(Field::Owner).map(str::to_string),
                                stage: stage.name.clone(),
                                amount,
                                reason: stall.reason,
                            },
                        ));
                    }
                }
                Some(stage)
                    if stage.terminal == Some(Terminal::Won)
                        && won_in_period.iter().any(|won| won.id == deal.id) =>
                {
                    entry.won_count += 1;
                    entry.won_amount += amount.unwrap_or(0.0);
                }
                _ => {}
            }
        }
        stalled.sort_by(|left, right| {
            right
                .0
                .cmp(&left.0)
                .then(left.1.deal_id.cmp(&right.1.deal_id))
        });
        (
            owners.into_values().collect(),
            stalled.into_iter().map(|(_, line)| line).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::{ExtraMap, FieldMap, FieldValue};

    fn at(day: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-{day:02}T10:00:00Z"))
            .expect("time")
            .with_timezone(&Utc)
    }

    fn deal(
        id: DealId,
        stage: &str,
        amount: f64,
        entered: u32,
        owner: &str,
        close: Option<&str>,
    ) -> Deal {
        let mut fields = FieldMap::new();
        fields.insert(Field::Company, FieldValue::Text(format!("Company {id}")));
        fields.insert(Field::Stage, FieldValue::Text(stage.to_string()));
        fields.insert(Field::Amount, FieldValue::Amount(amount));
        fields.insert(Field::Owner, FieldValue::Text(owner.to_string()));
        if let Some(close) = close {
            fields.insert(Field::ExpectedClose, FieldValue::Text(close.to_string()));
        }
        Deal {
            id,
            fields,
            extra: ExtraMap::new(),
            created_at: at(1),
            updated_at: at(entered),
            stage_entered_at: Some(at(entered)),
            archived_at: None,
        }
    }

    fn moves(deal_id: DealId, path: &[(&str, u32)]) -> Vec<StageChange> {
        let mut from: Option<String> = None;
        path.iter()
            .map(|(stage, day)| {
                let change = StageChange {
                    deal_id,
                    from_stage: from.clone(),
                    to_stage: stage.to_string(),
                    at: at(*day),
                    source: "test".to_string(),
                    start_known: true,
                };
                from = Some(stage.to_string());
                change
            })
            .collect()
    }

    /// Five deals with a known history (days of November 2026):
    /// 1: Lead(1) → Prospect(3) → Opportunity(7) → Won(11)             amount 1000
    /// 2: Lead(2) → Opportunity(4) (skips Prospect)                     amount 2000
    /// 3: Lead(2) → Prospect(5) → Lead(6) → Prospect(8) (back and forth) amount 3000
    /// 4: Lead(3) → Lost(5)                                             amount 4000
    /// 5: Lead(10)                                                      amount 5000, closes 2026-11-25
    fn fixture() -> (Vec<Deal>, Vec<StageChange>) {
        let deals = vec![
            deal(1, "Won", 1000.0, 11, "Alice", None),
            deal(2, "Opportunity", 2000.0, 4, "Alice", Some("2026-12-15")),
            deal(3, "Prospect", 3000.0, 8, "Bob", None),
            deal(4, "Lost", 4000.0, 5, "Bob", None),
            deal(5, "Lead", 5000.0, 10, "Bob", Some("2026-11-25")),
        ];
        let mut history = Vec::new();
        history.extend(moves(
            1,
            &[
                ("Lead", 1),
                ("Prospect", 3),
                ("Opportunity", 7),
                ("Won", 11),
            ],
        ));
        history.extend(moves(2, &[("Lead", 2), ("Opportunity", 4)]));
        history.extend(moves(
            3,
            &[("Lead", 2), ("Prospect", 5), ("Lead", 6), ("Prospect", 8)],
        ));
        history.extend(moves(4, &[("Lead", 3), ("Lost", 5)]));
        history.extend(moves(5, &[("Lead", 10)]));
        (deals, history)
    }

    fn report() -> FunnelReport {
        let (deals, history) = fixture();
        let period = Period {
            since: at(1),
            until: at(30),
        };
        compute(
            &deals,
            &history,
            &Stages::built_in(),
            &Calendar::default(),
            period,
            at(28),
            None,
        )
    }

    #[test]
    fn open_deals_counts_and_weighted_amounts() {
        let report = report();
        let by_stage: Vec<(&str, u64, f64, f64)> = report
            .stages
            .iter()
            .map(|stats| {
                (
                    stats.stage.as_str(),
                    stats.open_count,
                    stats.open_amount,
                    stats.weighted_amount,
                )
            })
            .collect();
        assert_eq!(
            by_stage,
            vec![
                ("Lead", 1, 5000.0, 500.0),
                ("Prospect", 1, 3000.0, 900.0),
                ("Opportunity", 1, 2000.0, 1200.0)
            ]
        );
    }

    #[test]
    fn conversion_counts_skips_and_back_and_forth_once() {
        let report = report();
        let lead = &report.stages[0];
        let prospect = &report.stages[1];
        let opportunity = &report.stages[2];
        // Lead: all five entered; 1, 2, 3 moved on (4 was lost, 5 is still there).
        assert_eq!((lead.entered, lead.converted, lead.won), (5, 3, 1));
        assert_eq!(lead.conversion_rate, Some(0.6));
        // Prospect: 1, 3, and 2 (which skipped it); 1 and 2 reached Opportunity.
        assert_eq!(
            (prospect.entered, prospect.converted, prospect.won),
            (3, 2, 1)
        );
        // Opportunity: 1 and 2; 1 was won.
        assert_eq!(
            (opportunity.entered, opportunity.converted, opportunity.won),
            (2, 1, 1)
        );
        assert_eq!(opportunity.win_rate, Some(0.5));
    }

    #[test]
    fn time_in_stage_and_totals() {
        let report = report();
        let lead = &report.stages[0];
        // Lead visits that ended: 1 (2 days), 2 (2), 3 (3, and 2 more after coming back), 4 (2).
        assert_eq!(lead.n_left, 5);
        assert_eq!(lead.median_days, Some(2.0));
        assert_eq!(lead.mean_days, Some(11.0 / 5.0));
        assert_eq!(lead.oldest_open_days, Some(18));
        // Prospect: deal 1 for 4 days, deal 3 for 1 day (then back in from day 8, still there).
        assert_eq!(report.stages[1].median_days, Some(2.5));
        let totals = &report.totals;
        assert_eq!(
            (totals.won_count, totals.won_amount, totals.lost_count),
            (1, 1000.0, 1)
        );
        assert_eq!(totals.lead_to_won_rate, Some(0.2));
        assert_eq!(totals.average_days_to_won, Some(10.0));
    }

    #[test]
    fn forecast_weights_and_history() {
        let report = report();
        let forecast = &report.forecast;
        assert_eq!(forecast.weighted_pipeline, 500.0 + 900.0 + 1200.0);
        // Historical win rates: Lead 1/5, Prospect 1/3, Opportunity 1/2.
        let expected = 5000.0 * 0.2 + 3000.0 / 3.0 + 2000.0 * 0.5;
        assert!(
            (forecast.history_based - expected).abs() < 1e-9,
            "{}",
            forecast.history_based
        );
        assert_eq!(
            forecast.deals[0].deal_id, 5,
            "the deal closing in the period comes first"
        );
        assert!(forecast.deals[0].closes_in_period);
        assert_eq!(forecast.deals[1].deal_id, 2, "then by weighted amount");
        let alice = report
            .by_owner
            .iter()
            .find(|owner| owner.owner == "Alice")
            .expect("Alice");
        assert_eq!(
            (alice.open_count, alice.won_count, alice.won_amount),
            (1, 1, 1000.0)
        );
        assert_eq!(
            report.stalled.len(),
            3,
            "every open deal is past its limit by day 28"
        );
    }

    #[test]
    fn visits_whose_start_is_unknown_are_left_out_and_counted() {
        let (deals, mut history) = fixture();
        // Deal 2 was imported already in Lead (its stage date unknown), then moved on day 4.
        for change in history.iter_mut().filter(|change| change.deal_id == 2) {
            change.start_known = change.from_stage.is_some();
        }
        let report = compute(
            &deals,
            &history,
            &Stages::built_in(),
            &Calendar::default(),
            Period {
                since: at(1),
                until: at(30),
            },
            at(28),
            None,
        );
        let lead = &report.stages[0];
        assert_eq!(lead.n_unknown_start, 1);
        assert_eq!(lead.n_left, 4, "deal 2's Lead visit is not a 2-day visit");
        assert_eq!(lead.mean_days, Some(9.0 / 4.0));
    }

    #[test]
    fn the_period_limits_the_flows() {
        let (deals, history) = fixture();
        let period = Period {
            since: at(9),
            until: at(30),
        };
        let report = compute(
            &deals,
            &history,
            &Stages::built_in(),
            &Calendar::default(),
            period,
            at(28),
            None,
        );
        assert_eq!(
            report.stages[0].entered, 1,
            "only deal 5 reached Lead from day 9"
        );
        assert_eq!(report.totals.won_count, 1);
        assert_eq!(report.totals.lost_count, 0);
    }
}
