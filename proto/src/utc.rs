//! UTC calendar dates of Unix times, for timestamps people read or other programs write (file
//! names, logs, InfluxDB's RFC 3339 answers). Howard Hinnant's `civil_from_days` and
//! `days_from_civil`: exact for every date, no time-zone data, no crate.

/// Unix seconds to UTC `(year, month, day, hour, minute, second)`.
pub fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 of a UTC date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_across_leap_days_and_centuries() {
        for secs in [
            0,
            951_782_400,   // 2000-02-29
            1_709_209_815, // 2024-02-29T12:30:15Z
            4_107_456_000, // 2100-03-01
            -86_400,
        ] {
            let (y, m, d, h, mi, s) = civil(secs);
            assert_eq!(
                days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + s,
                secs
            );
        }
        assert_eq!(civil(1_709_209_815), (2024, 2, 29, 12, 30, 15));
    }
}
