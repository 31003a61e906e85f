//! `--at`: when a drain starts. An RFC 3339 time (`2026-12-06T03:00:00Z`,
//! `2026-12-06T03:00:00+01:00`), a local `HH:MM` (its next occurrence), or
//! `+DURATION` from now (`+90s`, `+2h 30m`, humantime's syntax).

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Instant(SystemTime),
    /// Local wall-clock time, today's if still ahead, else tomorrow's.
    Local {
        hour: u8,
        minute: u8,
    },
    After(Duration),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AtError {
    #[error(
        "{0:?} is not a time: give RFC 3339 (2026-12-06T03:00:00Z, or with an offset \
         like +01:00), HH:MM (local time, next occurrence) or +DURATION (+90s, +2h)"
    )]
    Unreadable(String),
    #[error("{0:?}: {1}")]
    Duration(String, String),
    #[error("there is no local time {hour:02}:{minute:02} in the next two days")]
    NoSuchLocalTime { hour: u8, minute: u8 },
}

impl FromStr for At {
    type Err = AtError;

    fn from_str(text: &str) -> Result<Self, AtError> {
        let text = text.trim();
        if let Some(duration) = text.strip_prefix('+') {
            return humantime::parse_duration(duration)
                .map(At::After)
                .map_err(|e| AtError::Duration(text.to_owned(), e.to_string()));
        }
        if let Some((hour, minute)) = text.split_once(':').filter(|_| text.len() <= 5) {
            let number = |s: &str, digits: &[usize], max: u8| {
                s.parse::<u8>()
                    .ok()
                    .filter(|n| *n <= max && digits.contains(&s.len()))
            };
            return match (number(hour, &[1, 2], 23), number(minute, &[2], 59)) {
                (Some(hour), Some(minute)) => Ok(At::Local { hour, minute }),
                _ => Err(AtError::Unreadable(text.to_owned())),
            };
        }
        rfc3339(text)
            .map(At::Instant)
            .ok_or_else(|| AtError::Unreadable(text.to_owned()))
    }
}

/// RFC 3339 with `Z` or a numeric offset (humantime reads only `Z`).
fn rfc3339(text: &str) -> Option<SystemTime> {
    let (local, offset_secs) = match text.len().checked_sub(6).map(|i| text.split_at(i)) {
        Some((local, offset))
            if offset.len() == 6
                && (offset.starts_with('+') || offset.starts_with('-'))
                && offset.as_bytes()[3] == b':'
                && local.contains('T') =>
        {
            let hours: i64 = offset[1..3].parse().ok()?;
            let minutes: i64 = offset[4..6].parse().ok()?;
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            (format!("{local}Z"), sign * (hours * 3600 + minutes * 60))
        }
        _ => (text.to_owned(), 0),
    };
    let utc_reading = humantime::parse_rfc3339(&local).ok()?;
    // 03:00+01:00 is 02:00 UTC.
    let secs = Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        utc_reading.checked_sub(secs)
    } else {
        utc_reading.checked_add(secs)
    }
}

impl At {
    /// The moment it names, seen at `now`.
    pub fn resolve(&self, now: SystemTime) -> Result<SystemTime, AtError> {
        match *self {
            At::Instant(at) => Ok(at),
            At::After(d) => Ok(now + d),
            At::Local { hour, minute } => next_local(hour, minute, now),
        }
    }
}

/// The first moment after `now` that the local clock reads `hour:minute`;
/// the C library applies the time zone and its daylight saving rules.
fn next_local(hour: u8, minute: u8, now: SystemTime) -> Result<SystemTime, AtError> {
    let none = AtError::NoSuchLocalTime { hour, minute };
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| none.clone())?
        .as_secs();
    let now_t = libc::time_t::try_from(now_secs).map_err(|_| none.clone())?;
    // SAFETY: an all-zero tm is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r is reentrant.
    if unsafe { libc::localtime_r(&now_t, &mut tm) }.is_null() {
        return Err(none);
    }
    for days_ahead in 0..2 {
        let mut want = tm;
        want.tm_mday += days_ahead;
        want.tm_hour = i32::from(hour);
        want.tm_min = i32::from(minute);
        want.tm_sec = 0;
        // Let mktime work out whether daylight saving is in force then.
        want.tm_isdst = -1;
        // SAFETY: `want` is a valid tm, which mktime normalises in place.
        let t = unsafe { libc::mktime(&mut want) };
        if t > now_t && want.tm_hour == i32::from(hour) && want.tm_min == i32::from(minute) {
            let secs = u64::try_from(t).map_err(|_| none.clone())?;
            return Ok(UNIX_EPOCH + Duration::from_secs(secs));
        }
    }
    Err(none)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(text: &str) -> At {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn rfc3339_in_utc() {
        let expected = UNIX_EPOCH + Duration::from_secs(1_796_526_000);
        assert_eq!(at("2026-12-06T03:00:00Z"), At::Instant(expected));
    }

    #[test]
    fn rfc3339_with_an_offset() {
        let utc = UNIX_EPOCH + Duration::from_secs(1_796_526_000);
        assert_eq!(at("2026-12-06T04:00:00+01:00"), At::Instant(utc));
        assert_eq!(at("2026-12-05T22:30:00-04:30"), At::Instant(utc));
    }

    #[test]
    fn hh_mm_is_local() {
        assert_eq!(at("03:00"), At::Local { hour: 3, minute: 0 });
        assert_eq!(
            at("23:59"),
            At::Local {
                hour: 23,
                minute: 59
            }
        );
        assert_eq!(at("7:05"), At::Local { hour: 7, minute: 5 });
    }

    #[test]
    fn plus_duration() {
        assert_eq!(at("+90s"), At::After(Duration::from_secs(90)));
        assert_eq!(at("+2h 30m"), At::After(Duration::from_secs(9000)));
    }

    #[test]
    fn rejects_what_is_not_a_time() {
        for text in [
            "24:00",
            "12:60",
            "12:5",
            "noon",
            "2026-12-06",
            "+soon",
            "",
            "1:2:3",
        ] {
            assert!(text.parse::<At>().is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn a_duration_counts_from_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let when = At::After(Duration::from_secs(5)).resolve(now).unwrap();
        assert_eq!(when, now + Duration::from_secs(5));
    }

    #[test]
    fn a_local_time_is_its_next_occurrence() {
        let now = SystemTime::now();
        for (hour, minute) in [(0, 0), (3, 0), (12, 30), (23, 59)] {
            let when = At::Local { hour, minute }.resolve(now).unwrap();
            assert!(when > now, "{hour}:{minute} is in the past");
            assert!(
                when <= now + Duration::from_secs(25 * 3600),
                "{hour}:{minute} is more than a day ahead"
            );
            let secs = when.duration_since(UNIX_EPOCH).unwrap().as_secs();
            let t = libc::time_t::try_from(secs).unwrap();
            // SAFETY: as in next_local.
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            // SAFETY: as in next_local.
            assert!(!unsafe { libc::localtime_r(&t, &mut tm) }.is_null());
            assert_eq!(
                (tm.tm_hour, tm.tm_min, tm.tm_sec),
                (hour.into(), minute.into(), 0)
            );
        }
    }
}
