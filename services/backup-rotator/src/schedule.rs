//! When backups run: a cron expression, in UTC (pure: no clock, no tokio).
//!
//! Five fields, as crontab(5) writes them: minute (0–59), hour (0–23), day of month (1–31),
//! month (1–12), day of week (0–7, 0 and 7 Sunday). Each field is `*`, a number, a range
//! `a-b`, a step `*/n` or `a-b/n`, or a list of those separated by commas. As in cron, when
//! both day fields are restricted a day matches if either does. Shorthands: `@hourly`
//! (`0 * * * *`), `@daily` (`0 0 * * *`), `@weekly`, `@monthly`. UTC, because a Pi's time zone
//! is often unset and summer time would skip or repeat an hour.

use proto::utc;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_any: bool,
    weekdays_any: bool,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let expanded = match t {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{t:?} has {} fields; a schedule has five (minute hour day-of-month month day-of-week, e.g. \"5 * * * *\") or is @hourly/@daily/@weekly/@monthly",
                fields.len()
            ));
        }
        let minutes = field(fields[0], 0, 59, "minute")?;
        let hours = field(fields[1], 0, 23, "hour")?;
        let days = field(fields[2], 1, 31, "day of month")?;
        let months = field(fields[3], 1, 12, "month")?;
        let mut weekdays = field(fields[4], 0, 7, "day of week")?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        Ok(Self {
            text: t.to_string(),
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_any: fields[2] == "*",
            weekdays_any: fields[4] == "*",
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn matches_day(&self, day: i64, weekday: i64) -> bool {
        let d = self.days & (1 << day) != 0;
        let w = self.weekdays & (1 << weekday) != 0;
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (false, true) => d,
            (true, false) => w,
            (false, false) => d || w,
        }
    }

    /// The first time (Unix seconds, on a whole minute) strictly after `after_s`, or `None` if
    /// none within eight years (e.g. `0 0 31 2 *`).
    pub fn next_after(&self, after_s: i64) -> Option<i64> {
        let mut t = after_s.div_euclid(60) * 60 + 60;
        let limit = t + 8 * 366 * 86_400;
        while t < limit {
            let (_, month, day, hour, minute, _) = utc::civil(t);
            let days = t.div_euclid(86_400);
            // 1970-01-01 was a Thursday (4).
            let weekday = (days + 4).rem_euclid(7);
            if self.months & (1 << month) == 0 || !self.matches_day(day, weekday) {
                t = (days + 1) * 86_400;
                continue;
            }
            if self.hours & (1 << hour) == 0 {
                t = t.div_euclid(3600) * 3600 + 3600;
                continue;
            }
            if self.minutes & (1 << minute) == 0 {
                t += 60;
                continue;
            }
            return Some(t);
        }
        None
    }
}

/// One field as a bit set of the values it allows.
fn field(text: &str, min: u32, max: u32, what: &str) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    format!("{what} {part:?}: the step must be a whole number above 0")
                })?;
                (r, step)
            }
            None => (part, 1),
        };
        let number = |s: &str| -> Result<u32, String> {
            s.parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    format!("{what} {part:?}: {s:?} is not a number from {min} to {max}")
                })
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (number(a)?, number(b)?);
            if a > b {
                return Err(format!("{what} {part:?}: the range runs backwards"));
            }
            (a, b)
        } else {
            let a = number(range)?;
            // `5/15` means from 5 to the end in steps of 15, as in Vixie cron.
            (a, if step > 1 { max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, mo: i64, d: i64, h: i64, mi: i64) -> i64 {
        utc::days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60
    }

    #[test]
    fn hourly_at_minute_five() {
        let s = Schedule::parse("5 * * * *").expect("valid");
        assert_eq!(
            s.next_after(at(2026, 12, 4, 10, 0)),
            Some(at(2026, 12, 4, 10, 5))
        );
        // Strictly after: a run at 10:05 is followed by 11:05.
        assert_eq!(
            s.next_after(at(2026, 12, 4, 10, 5)),
            Some(at(2026, 12, 4, 11, 5))
        );
        assert_eq!(
            s.next_after(at(2026, 12, 31, 23, 30)),
            Some(at(2027, 1, 1, 0, 5))
        );
    }

    #[test]
    fn steps_lists_ranges_and_shorthands() {
        let s = Schedule::parse("*/15 8-10,20 * * *").expect("valid");
        assert_eq!(
            s.next_after(at(2026, 12, 4, 10, 50)),
            Some(at(2026, 12, 4, 20, 0))
        );
        assert_eq!(
            s.next_after(at(2026, 12, 4, 20, 0)),
            Some(at(2026, 12, 4, 20, 15))
        );
        let d = Schedule::parse("@daily").expect("valid");
        assert_eq!(
            d.next_after(at(2026, 12, 4, 0, 0)),
            Some(at(2026, 12, 5, 0, 0))
        );
    }

    #[test]
    fn weekdays_and_days_of_month_as_cron_reads_them() {
        // 2026-12-04 is a Friday. Sundays at 03:00 (7 is Sunday too).
        for text in ["0 3 * * 0", "0 3 * * 7"] {
            let s = Schedule::parse(text).expect("valid");
            assert_eq!(
                s.next_after(at(2026, 12, 4, 0, 0)),
                Some(at(2026, 12, 6, 3, 0))
            );
        }
        // Both day fields restricted: either matches (the 10th, or a Sunday).
        let s = Schedule::parse("0 0 10 * 0").expect("valid");
        assert_eq!(
            s.next_after(at(2026, 12, 4, 0, 0)),
            Some(at(2026, 12, 6, 0, 0))
        );
        assert_eq!(
            s.next_after(at(2026, 12, 7, 0, 0)),
            Some(at(2026, 12, 10, 0, 0))
        );
        // Leap day only.
        let s = Schedule::parse("0 0 29 2 *").expect("valid");
        assert_eq!(
            s.next_after(at(2026, 3, 1, 0, 0)),
            Some(at(2028, 2, 29, 0, 0))
        );
        assert_eq!(
            Schedule::parse("0 0 31 2 *").expect("valid").next_after(0),
            None
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("5 * * *", "five"),
            ("60 * * * *", "minute \"60\""),
            ("* 24 * * *", "hour"),
            ("*/0 * * * *", "step"),
            ("10-5 * * * *", "backwards"),
            ("x * * * *", "not a number"),
        ] {
            let e = Schedule::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
