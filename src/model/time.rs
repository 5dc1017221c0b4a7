//! RFC 3339 timestamps to and from Unix milliseconds, without a clock or a date crate.
//!
//! Callers pass `now`; this module only converts.

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// The time of one GC pass, on two clocks. `mono` never steps back or jumps: every duration the
/// GC measures (grace periods, the two observations of empty blocks and orphan handles, backoff)
/// is a difference of `mono` readings. `wall` is for comparisons with timestamps stored in
/// objects (the IP cooldown) and for reports. A lone `Millis` stands for both (snapshots, tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassTime {
    pub wall: Millis,
    pub mono: Millis,
}

impl PassTime {
    /// The wall time at which a `mono` reading of this process was taken, as this pass sees it.
    pub fn wall_of(self, mono: Millis) -> Millis {
        self.wall - (self.mono - mono)
    }
}

impl From<Millis> for PassTime {
    fn from(both: Millis) -> Self {
        PassTime { wall: both, mono: both }
    }
}

/// Parses `2026-01-02T03:04:05Z`, `...05.123456789Z`, `...05+01:00` and Go's `time.Time.String()`
/// form `2026-01-02 03:04:05.1 +0000 UTC` (what Calico's CNI writes into `timestamp`).
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let s = text.trim();
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') {
        return None;
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut scaled = 0i64;
        for (i, c) in frac.bytes().take(3).enumerate() {
            if i < digits {
                scaled = scaled * 10 + i64::from(c - b'0');
            }
        }
        for _ in digits.min(3)..3 {
            scaled *= 10;
        }
        millis = scaled;
        rest = &frac[digits..];
    }
    let rest = rest.trim_start();
    let offset_minutes = if rest.is_empty() || rest.eq_ignore_ascii_case("z") || rest.eq_ignore_ascii_case("utc") {
        0
    } else {
        let (sign, tail) = match rest.as_bytes()[0] {
            b'+' => (1, &rest[1..]),
            b'-' => (-1, &rest[1..]),
            b'Z' | b'z' => (0, ""),
            _ => return None,
        };
        // `+01:00`, `+0100`, optionally followed by a zone name (` UTC`).
        let tail = tail.split_whitespace().next().unwrap_or("");
        let digits: String = tail.chars().filter(|c| *c != ':').collect();
        if sign == 0 {
            0
        } else {
            if digits.len() != 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let h: i64 = digits[..2].parse().ok()?;
            let m: i64 = digits[2..].parse().ok()?;
            sign * (h * 60 + m)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(secs * 1000 + millis)
}

/// Formats as `YYYY-MM-DDTHH:MM:SSZ`, the form Kubernetes and Calico write.
pub fn format_rfc3339(millis: Millis) -> String {
    let secs = millis.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Formats as Go's `time.Time.String()` of a UTC time, `2026-01-02 03:04:05.123 +0000 UTC`: the
/// fraction without trailing zeros, none at all on a whole second (Go's `.999999999` layout).
/// Upstream writes this into IPAM attributes' `timestamp`; [`parse_rfc3339`] reads it back.
pub fn format_go_utc(millis: Millis) -> String {
    let secs = millis.div_euclid(1000);
    let frac = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let fraction = if frac == 0 { String::new() } else { format!(".{frac:03}").trim_end_matches('0').to_string() };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}{fraction} +0000 UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

// Howard Hinnant's days-from-civil algorithm (public-domain arithmetic on the proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses a Go duration as Kubernetes and Calico write it (`15m`, `1h30m`, `500ms`, `0s`, `1.5s`).
pub fn parse_go_duration(text: &str) -> Option<Millis> {
    let s = text.trim();
    if s == "0" {
        return Some(0);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.bytes().take_while(|c| c.is_ascii_digit() || *c == b'.').count();
        if n == 0 {
            return None;
        }
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest.bytes().take_while(|c| c.is_ascii_alphabetic() || *c == 0xc2 || *c == 0xb5).count();
        let unit_ms = match &rest[..u] {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 60e3,
            "h" => 3600e3,
            _ => return None,
        };
        total += value * unit_ms;
        rest = &rest[u..];
    }
    Some(total.round() as Millis)
}

/// Formats milliseconds as a Go duration (`15m0s`), the form upstream writes into status.
pub fn format_go_duration(ms: Millis) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 { format!("{s}s") } else { format!("{s}.{frac:03}s").replace("0s", "s") };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_through_millis() {
        let t = parse_rfc3339("2026-11-28T05:06:20Z").unwrap();
        assert_eq!(format_rfc3339(t), "2026-11-28T05:06:20Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1500));
    }

    #[test]
    fn offsets_and_go_time_strings_are_understood() {
        let utc = parse_rfc3339("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(parse_rfc3339("2026-01-02T04:04:05+01:00"), Some(utc));
        assert_eq!(parse_rfc3339("2026-01-02 03:04:05.000000001 +0000 UTC"), Some(utc));
    }

    #[test]
    fn garbage_timestamps_are_rejected_not_panicked_on() {
        for bad in ["", "2026", "2026-13-01T00:00:00Z", "2026-01-01T00:00:00+1", "2026-01-01X00:00:00Z", "2026-01-01T00:00:00.Z"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn go_utc_strings_trim_the_fraction_as_go_does_and_read_back() {
        let t = parse_rfc3339("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(format_go_utc(t), "2026-01-02 03:04:05 +0000 UTC");
        assert_eq!(format_go_utc(t + 120), "2026-01-02 03:04:05.12 +0000 UTC");
        assert_eq!(format_go_utc(t + 7), "2026-01-02 03:04:05.007 +0000 UTC");
        assert_eq!(format_go_utc(0), "1970-01-01 00:00:00 +0000 UTC");
        for ms in [t, t + 120, t + 7, 0] {
            assert_eq!(parse_rfc3339(&format_go_utc(ms)), Some(ms));
        }
    }

    #[test]
    fn go_durations_parse_like_go() {
        assert_eq!(parse_go_duration("15m"), Some(900_000));
        assert_eq!(parse_go_duration("1h30m"), Some(5_400_000));
        assert_eq!(parse_go_duration("500ms"), Some(500));
        assert_eq!(parse_go_duration("1.5s"), Some(1500));
        assert_eq!(parse_go_duration("0s"), Some(0));
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(format_go_duration(900_000), "15m0s");
        assert_eq!(format_go_duration(3_600_000), "1h0m0s");
    }
}
