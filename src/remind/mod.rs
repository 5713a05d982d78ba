//! Stalled deals and the reminders about them. This module is the pure core: the stall rule
//! (calendar or business days, holidays), the reminder schedule (time zone and DST aware), and
//! which stalls are due a reminder or an escalation. Time is always a parameter.
//!
//! `remind::digest` turns stalls into email text; `remind::outbox` records them, with the
//! reminders they carry, in the mail outbox (the only part that does I/O). This module must not
//! send mail, read files or touch the store.

pub mod digest;
pub mod outbox;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc, Weekday};
use chrono_tz::Tz;

use crate::clock::moment;
use crate::config::{Config, RemindConfig, Stages};
use crate::deal::{Deal, DealId, Field};

/// How days are counted. There is one calendar, the configured one (`[remind]`'s business days,
/// holidays and time zone; calendar days in UTC without `[remind]`): every use of the stall rule
/// takes it from [`Calendar::of`].
#[derive(Debug, Clone, Default)]
pub struct Calendar {
    /// Count Monday to Friday only.
    pub business_days: bool,
    /// Days that never count (with `business_days`).
    pub holidays: Vec<NaiveDate>,
    /// The time zone in which a time stamp becomes a day.
    pub timezone: Option<Tz>,
}

impl Calendar {
    /// The configured calendar.
    pub fn of(config: &Config) -> Calendar {
        Calendar::from_config(config.remind.as_ref())
    }

    pub fn from_config(remind: Option<&RemindConfig>) -> Calendar {
        match remind {
            Some(remind) => Calendar {
                business_days: remind.business_days,
                holidays: remind.holidays.clone(),
                timezone: Some(remind.timezone),
            },
            None => Calendar::default(),
        }
    }

    /// The day a time stamp falls on, in the calendar's time zone.
    pub fn day_of(&self, at: DateTime<Utc>) -> NaiveDate {
        match self.timezone {
            Some(timezone) => at.with_timezone(&timezone).date_naive(),
            None => at.date_naive(),
        }
    }

    /// The first moment of a day in the calendar's time zone.
    pub fn start_of(&self, day: NaiveDate) -> DateTime<Utc> {
        match self.timezone {
            Some(timezone) => moment(timezone, day, NaiveTime::MIN)
                .unwrap_or_else(|| day.and_time(NaiveTime::MIN).and_utc()),
            None => day.and_time(NaiveTime::MIN).and_utc(),
        }
    }

    fn counts(&self, day: NaiveDate) -> bool {
        !self.business_days
            || (!matches!(day.weekday(), Weekday::Sat | Weekday::Sun)
                && !self.holidays.contains(&day))
    }

    /// Days from `from` to `to`: calendar days, or the counted days after `from` up to and
    /// including `to`.
    pub fn days_between(&self, from: NaiveDate, to: NaiveDate) -> i64 {
        if !self.business_days {
            return (to - from).num_days();
        }
        if to <= from {
            return 0;
        }
        from.iter_days()
            .skip(1)
            .take_while(|day| *day <= to)
            .filter(|day| self.counts(*day))
            .count() as i64
    }
}

/// One stall: a deal idle in a stage for longer than the stage allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    pub deal_id: DealId,
    pub stage: String,
    /// Days (as counted) since the later of entering the stage and the last contact.
    pub idle_days: i64,
    /// Days in the stage, when the day it entered the stage is known.
    pub days_in_stage: Option<i64>,
    pub last_contact_days: Option<i64>,
    pub limit: u32,
    /// The day the idle time counts from. With the deal and stage it names the stall: a stage
    /// change or a new contact ends it and any later stall is a new one.
    pub since: NaiveDate,
    pub reason: String,
}

impl Stall {
    /// The key reminders about this stall are recorded under.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.deal_id, self.stage, self.since)
    }

    /// How far over its limit the deal is; larger is worse.
    pub fn overdue(&self) -> i64 {
        self.idle_days - i64::from(self.limit)
    }
}

/// The day a deal entered its current stage, when known: the stage-since date a sheet (or a
/// stage change funnelsync saw) gave it, else the day of `stage_entered_at`. A deal imported from
/// a sheet that does not say has none.
pub fn entered_day(deal: &Deal, calendar: &Calendar) -> Option<NaiveDate> {
    deal.date(Field::StageSince)
        .or_else(|| deal.stage_entered_at.map(|at| calendar.day_of(at)))
}

/// The stall rule: a live deal in a non-terminal stage with `stall_after_days` is stalled when the
/// days since the later of entering the stage and the last contact exceed that limit. When the
/// day it entered its stage is unknown, the last contact alone counts (or the later of it and the
/// created date a sheet gives): a deal imported today whose last contact was 40 days ago is
/// stalled today. A deal with none of these dates counts from the day funnelsync first saw it.
pub fn stall_of(
    deal: &Deal,
    stages: &Stages,
    calendar: &Calendar,
    today: NaiveDate,
) -> Option<Stall> {
    if deal.archived_at.is_some() {
        return None;
    }
    let stage = stages.resolve(deal.text(Field::Stage)?)?;
    if stage.terminal.is_some() {
        return None;
    }
    let limit = stage.stall_after_days?;
    let entered = entered_day(deal, calendar);
    let last_contact = deal.date(Field::LastContact);
    let created = deal.date(Field::CreatedOn);
    // Without any date from the sheet, the deal has been in its stage at least since funnelsync
    // first saw it there.
    let first_seen = calendar.day_of(deal.created_at);
    let since = [entered.or(created), last_contact]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(first_seen);
    let idle_days = calendar.days_between(since, today);
    if idle_days <= i64::from(limit) {
        return None;
    }
    let days_in_stage = entered.map(|entered| calendar.days_between(entered, today));
    let last_contact_days = last_contact.map(|contact| calendar.days_between(contact, today));
    let unit = if calendar.business_days {
        "business days"
    } else {
        "days"
    };
    let mut reason = match days_in_stage {
        Some(days) => format!("in {} for {days} {unit}", stage.name),
        None => format!("in {} (stage date unknown)", stage.name),
    };
    if entered.is_none() {
        match (created, last_contact) {
            (Some(created), _) => {
                let days = calendar.days_between(created, today);
                reason.push_str(&format!(", created {days} {unit} ago"));
            }
            (None, None) => {
                let days = calendar.days_between(first_seen, today);
                reason.push_str(&format!(", first seen {days} {unit} ago"));
            }
            (None, Some(_)) => {}
        }
    }
    match last_contact_days {
        Some(days) => reason.push_str(&format!(", last contact {days} {unit} ago")),
        None => reason.push_str(", no contact recorded"),
    }
    reason.push_str(&format!("; limit {limit}"));
    Some(Stall {
        deal_id: deal.id,
        stage: stage.name.clone(),
        idle_days,
        days_in_stage,
        last_contact_days,
        limit,
        since,
        reason,
    })
}

/// Every stalled deal, worst first.
/// Keeps only the stalled deals, worst first, and returns each one's reason (`deals list
/// --stalled`, the API and the pages).
pub fn keep_stalled(
    deals: &mut Vec<Deal>,
    config: &crate::config::Config,
    now: DateTime<Utc>,
) -> std::collections::HashMap<DealId, String> {
    let calendar = Calendar::of(config);
    let stalls = stalls(deals, &config.stages, &calendar, calendar.day_of(now));
    let order: Vec<DealId> = stalls.iter().map(|stall| stall.deal_id).collect();
    let reasons: std::collections::HashMap<DealId, String> = stalls
        .into_iter()
        .map(|stall| (stall.deal_id, stall.reason))
        .collect();
    deals.retain(|deal| reasons.contains_key(&deal.id));
    deals.sort_by_key(|deal| order.iter().position(|id| *id == deal.id));
    reasons
}

pub fn stalls(
    deals: &[Deal],
    stages: &Stages,
    calendar: &Calendar,
    today: NaiveDate,
) -> Vec<Stall> {
    let mut found: Vec<Stall> = deals
        .iter()
        .filter_map(|deal| stall_of(deal, stages, calendar, today))
        .collect();
    found.sort_by(|left, right| {
        right
            .overdue()
            .cmp(&left.overdue())
            .then(left.deal_id.cmp(&right.deal_id))
    });
    found
}

/// What was already sent (or is pending) about one stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReminderHistory {
    pub n_reminders: u32,
    pub last_day: Option<NaiveDate>,
}

/// What a run does about one stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Reminded too recently.
    Skip,
    Remind,
    /// Remind the rep and copy the manager.
    RemindAndEscalate,
}

/// Whether a stall is due a reminder today: not within `repeat_every_days` of the last one
/// (unless forced); escalated once `escalate_after` reminders went out about it.
pub fn decide(
    history: ReminderHistory,
    remind: &RemindConfig,
    today: NaiveDate,
    force: bool,
) -> Decision {
    let recent = history
        .last_day
        .is_some_and(|last| (today - last).num_days() < i64::from(remind.repeat_every_days));
    if recent && !force {
        return Decision::Skip;
    }
    if history.n_reminders >= remind.escalate_after {
        Decision::RemindAndEscalate
    } else {
        Decision::Remind
    }
}

fn is_run_day(remind: &RemindConfig, day: NaiveDate) -> bool {
    !remind.weekdays_only || !matches!(day.weekday(), Weekday::Sat | Weekday::Sun)
}

/// The first due time strictly after `after`.
pub fn next_due(remind: &RemindConfig, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let today = after.with_timezone(&remind.timezone).date_naive();
    today
        .iter_days()
        .take(15)
        .filter(|day| is_run_day(remind, *day))
        .filter_map(|day| moment(remind.timezone, day, remind.at))
        .find(|due| *due > after)
}

/// The latest due time at or before `now`, for catching up after downtime.
pub fn previous_due(remind: &RemindConfig, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let today = now.with_timezone(&remind.timezone).date_naive();
    (0..15)
        .filter_map(|back| today.checked_sub_days(chrono::Days::new(back)))
        .filter(|day| is_run_day(remind, *day))
        .filter_map(|day| moment(remind.timezone, day, remind.at))
        .find(|due| *due <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Language, Stages};
    use crate::deal::{ExtraMap, FieldMap, FieldValue};

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("date")
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn deal(stage: &str, entered: &str, last_contact: Option<&str>) -> Deal {
        let mut fields = FieldMap::new();
        fields.insert(Field::Stage, FieldValue::Text(stage.to_string()));
        if let Some(contact) = last_contact {
            fields.insert(Field::LastContact, FieldValue::Text(contact.to_string()));
        }
        Deal {
            id: 1,
            fields,
            extra: ExtraMap::new(),
            created_at: at(entered),
            updated_at: at(entered),
            stage_entered_at: Some(at(entered)),
            archived_at: None,
        }
    }

    fn remind_config() -> RemindConfig {
        RemindConfig {
            at: NaiveTime::from_hms_opt(9, 0, 0).expect("time"),
            timezone: chrono_tz::Asia::Shanghai,
            weekdays_only: true,
            repeat_every_days: 2,
            escalate_after: 3,
            manager: None,
            fallback_to: None,
            language: Language::English,
            business_days: false,
            holidays: vec![],
        }
    }

    #[test]
    fn stall_rule_cases() {
        let stages = Stages::built_in();
        let calendar_days = Calendar {
            timezone: Some(chrono_tz::Asia::Shanghai),
            ..Calendar::default()
        };
        let business = Calendar {
            business_days: true,
            holidays: vec![day("2026-10-01")],
            timezone: Some(chrono_tz::Asia::Shanghai),
        };
        // (stage, entered, last contact, today, calendar, stalled?, idle days)
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a str>,
            &'a str,
            &'a Calendar,
            Option<i64>,
        );
        let cases: Vec<Case> = vec![
            // Prospect allows 10 days.
            (
                "Prospect",
                "2026-11-01T02:00:00Z",
                None,
                "2026-11-11",
                &calendar_days,
                None,
            ),
            (
                "Prospect",
                "2026-11-01T02:00:00Z",
                None,
                "2026-11-12",
                &calendar_days,
                Some(11),
            ),
            // A later contact restarts the count.
            (
                "Prospect",
                "2026-11-01T02:00:00Z",
                Some("2026-11-05"),
                "2026-11-12",
                &calendar_days,
                None,
            ),
            // Terminal stages never stall.
            (
                "Won",
                "2026-01-01T02:00:00Z",
                None,
                "2026-11-12",
                &calendar_days,
                None,
            ),
            // Late on the 31st in UTC is already the 1st in Shanghai.
            (
                "Lead",
                "2026-10-31T20:00:00Z",
                None,
                "2026-11-08",
                &calendar_days,
                None,
            ),
            (
                "Lead",
                "2026-10-31T20:00:00Z",
                None,
                "2026-11-09",
                &calendar_days,
                Some(8),
            ),
            // Business days: Fri 2026-11-20 to Tue 2026-12-01 is 7 business days (Lead allows 7).
            (
                "Lead",
                "2026-11-20T02:00:00Z",
                None,
                "2026-12-01",
                &business,
                None,
            ),
            (
                "Lead",
                "2026-11-20T02:00:00Z",
                None,
                "2026-12-02",
                &business,
                Some(8),
            ),
            // The holiday on Thu 2026-10-01 does not count: Wed 09-23 → Mon 10-05 is 7 business days.
            (
                "Lead",
                "2026-09-23T02:00:00Z",
                None,
                "2026-10-05",
                &business,
                None,
            ),
            (
                "Lead",
                "2026-09-23T02:00:00Z",
                None,
                "2026-10-06",
                &business,
                Some(8),
            ),
        ];
        for (stage, entered, contact, today, calendar, expected) in cases {
            let found = stall_of(
                &deal(stage, entered, contact),
                &stages,
                calendar,
                day(today),
            );
            assert_eq!(
                found.as_ref().map(|stall| stall.idle_days),
                expected,
                "{stage} entered {entered}, contact {contact:?}, today {today}"
            );
        }
        let stall = stall_of(
            &deal("Prospect", "2026-11-01T02:00:00Z", Some("2026-10-30")),
            &stages,
            &calendar_days,
            day("2026-11-12"),
        )
        .expect("stalled");
        assert_eq!(
            stall.reason,
            "in Prospect for 11 days, last contact 13 days ago; limit 10"
        );
    }

    #[test]
    fn the_stall_rule_when_the_stage_date_is_unknown_or_given_by_the_sheet() {
        let stages = Stages::built_in();
        let calendar = Calendar::default();
        let today = day("2026-11-28");
        // (stage date field, created field, last contact, imported at) → idle days and reason
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            Option<(i64, &'a str)>,
        );
        let cases: Vec<Case> = vec![
            // Imported today, last contacted 40 days ago: stalled today.
            (
                None,
                None,
                Some("2026-10-19"),
                "2026-11-28T08:00:00Z",
                Some((
                    40,
                    "in Prospect (stage date unknown), last contact 40 days ago; limit 10",
                )),
            ),
            // The created date stands in for the stage date; a later contact still wins.
            (
                None,
                Some("2026-10-01"),
                Some("2026-11-20"),
                "2026-11-28T08:00:00Z",
                None,
            ),
            (
                None,
                Some("2026-10-01"),
                None,
                "2026-11-28T08:00:00Z",
                Some((
                    58,
                    "in Prospect (stage date unknown), created 58 days ago, no contact recorded; limit 10",
                )),
            ),
            // The sheet's stage date.
            (
                Some("2026-11-08"),
                None,
                None,
                "2026-11-28T08:00:00Z",
                Some((20, "in Prospect for 20 days, no contact recorded; limit 10")),
            ),
            // No date at all: counted from the day funnelsync first saw the deal.
            (None, None, None, "2026-11-28T08:00:00Z", None),
            (
                None,
                None,
                None,
                "2026-11-10T08:00:00Z",
                Some((
                    18,
                    "in Prospect (stage date unknown), first seen 18 days ago, no contact recorded; limit 10",
                )),
            ),
        ];
        for (stage_since, created, contact, imported, expected) in cases {
            let mut deal = deal("Prospect", imported, contact);
            deal.stage_entered_at = None;
            if let Some(since) = stage_since {
                deal.fields
                    .insert(Field::StageSince, FieldValue::Text(since.to_string()));
            }
            if let Some(created) = created {
                deal.fields
                    .insert(Field::CreatedOn, FieldValue::Text(created.to_string()));
            }
            let found = stall_of(&deal, &stages, &calendar, today);
            assert_eq!(
                found
                    .as_ref()
                    .map(|stall| (stall.idle_days, stall.reason.as_str())),
                expected,
                "since {stage_since:?}, created {created:?}, contact {contact:?}, imported {imported}"
            );
        }
    }

    #[test]
    fn reminders_repeat_and_escalate_as_configured() {
        let remind = remind_config();
        let today = day("2026-11-12");
        let history = |n, last: Option<&str>| ReminderHistory {
            n_reminders: n,
            last_day: last.map(day),
        };
        assert_eq!(
            decide(history(0, None), &remind, today, false),
            Decision::Remind
        );
        assert_eq!(
            decide(history(1, Some("2026-11-12")), &remind, today, false),
            Decision::Skip
        );
        assert_eq!(
            decide(history(1, Some("2026-11-11")), &remind, today, false),
            Decision::Skip
        );
        assert_eq!(
            decide(history(1, Some("2026-11-10")), &remind, today, false),
            Decision::Remind
        );
        assert_eq!(
            decide(history(1, Some("2026-11-12")), &remind, today, true),
            Decision::Remind
        );
        assert_eq!(
            decide(history(3, Some("2026-11-10")), &remind, today, false),
            Decision::RemindAndEscalate
        );
    }

    #[test]
    fn schedule_is_time_zone_and_dst_aware() {
        let mut remind = remind_config();
        // Friday 2026-11-27 10:00 in Shanghai: next run Monday 09:00 (weekdays only).
        assert_eq!(
            next_due(&remind, at("2026-11-27T02:00:00Z")),
            Some(at("2026-11-30T01:00:00Z"))
        );
        assert_eq!(
            next_due(&remind, at("2026-11-27T00:59:00Z")),
            Some(at("2026-11-27T01:00:00Z"))
        );
        assert_eq!(
            previous_due(&remind, at("2026-11-29T12:00:00Z")),
            Some(at("2026-11-27T01:00:00Z"))
        );
        remind.weekdays_only = false;
        assert_eq!(
            next_due(&remind, at("2026-11-27T02:00:00Z")),
            Some(at("2026-11-28T01:00:00Z"))
        );
        // New York springs forward on 2026-03-08: 02:30 does not exist that day, 03:30 EDT does.
        remind.timezone = chrono_tz::America::New_York;
        remind.at = NaiveTime::from_hms_opt(2, 30, 0).expect("time");
        assert_eq!(
            next_due(&remind, at("2026-03-08T05:00:00Z")),
            Some(at("2026-03-08T07:30:00Z"))
        );
        // Before and after the change, 09:00 local is 14:00 and 13:00 UTC.
        remind.at = NaiveTime::from_hms_opt(9, 0, 0).expect("time");
        assert_eq!(
            next_due(&remind, at("2026-03-07T15:00:00Z")),
            Some(at("2026-03-08T13:00:00Z"))
        );
        assert_eq!(
            next_due(&remind, at("2026-03-06T15:00:00Z")),
            Some(at("2026-03-07T14:00:00Z"))
        );
    }
}
