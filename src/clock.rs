//! Wall-clock arithmetic in a time zone: when a local time happens on a day (DST aware), the next
//! weekly moment, the end of a local day. Pure: the time is always a parameter.
//!
//! The reminder schedule, the weekly digest and the outbox's give-up time share these rules. This
//! module knows time zones only: no config, no store.

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

/// The moment `at` happens on `day` in `timezone`: the earlier one when the clock is set back, the
/// first valid moment after a gap when it is set forward.
pub fn moment(timezone: Tz, day: NaiveDate, at: NaiveTime) -> Option<DateTime<Utc>> {
    let local = day.and_time(at);
    match timezone.from_local_datetime(&local) {
        chrono::LocalResult::Single(moment) => Some(moment.with_timezone(&Utc)),
        chrono::LocalResult::Ambiguous(earlier, _) => Some(earlier.with_timezone(&Utc)),
        chrono::LocalResult::None => {
            // In a spring-forward gap: the same wall time an hour later exists.
            let later = local + chrono::Duration::hours(1);
            timezone
                .from_local_datetime(&later)
                .earliest()
                .map(|moment| moment.with_timezone(&Utc))
        }
    }
}

/// The first moment strictly after `after` that is `weekday` at `at` in `timezone`.
pub fn next_weekly(
    timezone: Tz,
    weekday: Weekday,
    at: NaiveTime,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let today = after.with_timezone(&timezone).date_naive();
    today
        .iter_days()
        .take(15)
        .filter(|day| day.weekday() == weekday)
        .filter_map(|day| moment(timezone, day, at))
        .find(|due| *due > after)
}

/// The first moment of the day after the one `now` falls on in `timezone`: when a message that
/// could not be delivered today is given up.
pub fn end_of_day(timezone: Tz, now: DateTime<Utc>) -> DateTime<Utc> {
    now.with_timezone(&timezone)
        .date_naive()
        .succ_opt()
        .and_then(|tomorrow| moment(timezone, tomorrow, NaiveTime::MIN))
        .unwrap_or(now + chrono::Duration::hours(24))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time stamp")
            .with_timezone(&Utc)
    }

    fn time(hour: u32, minute: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(hour, minute, 0).expect("time")
    }

    #[test]
    fn local_times_across_daylight_saving_changes() {
        let new_york = chrono_tz::America::New_York;
        let day = |text: &str| NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("day");
        let cases = [
            // An ordinary day: 09:00 EST is 14:00 UTC.
            ("2026-03-07", time(9, 0), "2026-03-07T14:00:00Z"),
            // Spring forward: 02:30 does not exist; the same wall time an hour later does.
            ("2026-03-08", time(2, 30), "2026-03-08T07:30:00Z"),
            // Fall back: 01:30 happens twice; the earlier one (EDT) counts.
            ("2026-11-01", time(1, 30), "2026-11-01T05:30:00Z"),
        ];
        for (local_day, local_time, expected) in cases {
            assert_eq!(
                moment(new_york, day(local_day), local_time),
                Some(at(expected)),
                "{local_day} {local_time}"
            );
        }
    }

    #[test]
    fn the_next_weekly_moment_is_strictly_later() {
        let shanghai = chrono_tz::Asia::Shanghai;
        // Friday 2026-11-27 10:00 in Shanghai; Monday 08:00 is the next Monday morning.
        let cases = [
            (
                "2026-11-27T02:00:00Z",
                Weekday::Mon,
                time(8, 0),
                "2026-11-30T00:00:00Z",
            ),
            // Friday 09:00 has just passed: a week later.
            (
                "2026-11-27T01:00:00Z",
                Weekday::Fri,
                time(9, 0),
                "2026-12-04T01:00:00Z",
            ),
            (
                "2026-11-27T00:59:00Z",
                Weekday::Fri,
                time(9, 0),
                "2026-11-27T01:00:00Z",
            ),
        ];
        for (after, weekday, at_time, expected) in cases {
            assert_eq!(
                next_weekly(shanghai, weekday, at_time, at(after)),
                Some(at(expected)),
                "after {after}"
            );
        }
    }

    #[test]
    fn the_day_ends_at_local_midnight() {
        let cases = [
            (
                chrono_tz::UTC,
                "2026-11-27T23:59:00Z",
                "2026-11-28T00:00:00Z",
            ),
            // 07:30 in Shanghai on the 28th is still the 27th in UTC.
            (
                chrono_tz::Asia::Shanghai,
                "2026-11-27T23:30:00Z",
                "2026-11-28T16:00:00Z",
            ),
            (
                chrono_tz::Asia::Shanghai,
                "2026-11-27T15:59:00Z",
                "2026-11-27T16:00:00Z",
            ),
        ];
        for (timezone, now, expected) in cases {
            assert_eq!(
                end_of_day(timezone, at(now)),
                at(expected),
                "{timezone} {now}"
            );
        }
    }
}
