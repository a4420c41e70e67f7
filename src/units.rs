//! Sizes and times as people write and read them: `size=10G` options, human-readable byte
//! counts, RFC 3339 timestamps. Pure functions, no I/O.

/// Parses a byte count: plain bytes (`4096`) or a number with a binary unit `K`, `M`, `G`,
/// `T` (also `KB`, `KiB`, `k`…; every unit is a power of 1024, as with `docker run
/// --memory`). A fraction is allowed with a unit (`1.5G`); the result is rounded down to a
/// whole byte.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "invalid size {text:?}: {why} (write bytes, or a number with K, M, G or T, \
             e.g. 512M or 10G; units are powers of 1024)"
        )
    };
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let unit_lower = unit.to_ascii_lowercase();
    let shift = match unit_lower.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, f),
        None => (num, ""),
    };
    if whole.is_empty() || frac.contains('.') || (num.contains('.') && frac.is_empty()) {
        return Err(bad("malformed number"));
    }
    let whole: u64 = whole.parse().map_err(|_| bad("number too large"))?;
    let mut bytes = whole
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))?;
    if !frac.is_empty() {
        if shift == 0 {
            return Err(bad("a fraction of a byte"));
        }
        // frac / 10^len * 2^shift, without floating point.
        let digits = &frac[..frac.len().min(12)];
        let f: u128 = digits.parse().map_err(|_| bad("malformed number"))?;
        let part = (f << shift) / 10u128.pow(digits.len() as u32);
        bytes = bytes
            .checked_add(part as u64)
            .ok_or_else(|| bad("too large"))?;
    }
    Ok(bytes)
}

/// A byte count for people: `0B`, `512B`, `1.5KiB`, `10GiB` (powers of 1024, at most three
/// significant decimals, trailing zeros dropped).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes}B");
    }
    let mut s = format!("{value:.2}");
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.pop();
    }
    format!("{s}{}", UNITS[unit])
}

/// RFC 3339 in UTC with second precision, as Docker shows `CreatedAt`:
/// `2026-11-28T10:31:02Z`.
pub fn rfc3339(epoch_secs: i64) -> String {
    let days = epoch_secs.div_euclid(86_400);
    let secs = epoch_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A duration for people: `42s`, `3m12s`, `5h03m`, `2d04h`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_refuse_garbage() {
        let k = 1024u64;
        for (text, want) in [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("1K", k),
            ("1k", k),
            ("1KB", k),
            ("1KiB", k),
            ("512M", 512 * k * k),
            ("10G", 10 * k * k * k),
            ("10GiB", 10 * k * k * k),
            ("2T", 2 * k * k * k * k),
            ("1.5K", 1536),
            ("0.5M", 512 * k),
            (" 7M ", 7 * k * k),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "G",
            "-1",
            "1X",
            "1GG",
            "1.5",
            "1.K",
            ".5K",
            "1..5K",
            "1 G x",
            "99999999T",
            "18446744073709551616",
            "1e3",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }

    #[test]
    fn human_sizes_use_binary_units() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(1023), "1023B");
        assert_eq!(human_size(1024), "1KiB");
        assert_eq!(human_size(1536), "1.5KiB");
        assert_eq!(human_size(10 << 30), "10GiB");
        assert_eq!(human_size((1 << 20) + 1), "1MiB");
        assert_eq!(human_size(u64::MAX), "16EiB");
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_861_862), "2026-11-28T10:31:02Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(5 * 3600 + 180), "5h03m");
        assert_eq!(human_duration(2 * 86_400 + 4 * 3600), "2d04h");
    }
}
