//! Quantities as people read them: byte sizes in binary units and parameter counts. Plain
//! arithmetic, used by `ulysses check`, the memory plan, step lines and reports.

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// A byte count in GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// 31.2 GiB, 712.0 KiB: sizes in the binary unit that suits them.
pub fn bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// A budget: `bytes`, or "unlimited" (an infinite budget).
pub fn limit(b: f64) -> String {
    if b.is_finite() {
        bytes(b)
    } else {
        "unlimited".into()
    }
}

/// A budget always in GiB ("70.0 GiB"), or "unlimited".
pub fn gib_limit(b: f64) -> String {
    if b.is_finite() {
        format!("{:.1} GiB", b / GIB)
    } else {
        "unlimited".into()
    }
}

/// 8.030B, 46.2K: parameter counts at a glance.
pub fn count(n: i64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.3}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_as_expected() {
        assert_eq!(bytes(31.25 * GIB), "31.2 GiB");
        assert_eq!(bytes(712.0 * 1024.0), "712.0 KiB");
        assert_eq!(limit(f64::INFINITY), "unlimited");
        assert_eq!(gib_limit(0.5 * GIB), "0.5 GiB");
        assert_eq!(count(8_030_261_248), "8.030B");
        assert_eq!(count(46_200), "46.2K");
        assert_eq!(gib(3 << 30), 3.0);
    }
}
