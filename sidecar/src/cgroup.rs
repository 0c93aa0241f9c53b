//! The container's memory limit, from its cgroup, for the heap-near-limit alert.

use std::path::Path;

/// cgroup v2, then v1. `None` when there is no limit or no cgroup to read.
pub fn memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(Path::new(path)).ok())
    .and_then(|text| parse_memory_limit(&text))
}

/// v2 writes `max` for no limit; v1 writes a page-rounded near-`i64::MAX` number.
pub fn parse_memory_limit(text: &str) -> Option<u64> {
    const UNLIMITED_ABOVE: u64 = 1 << 60;
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes > 0 && bytes < UNLIMITED_ABOVE).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_their_absence() {
        assert_eq!(parse_memory_limit("536870912\n"), Some(536_870_912));
        assert_eq!(parse_memory_limit("max\n"), None, "v2 without a limit");
        assert_eq!(
            parse_memory_limit("9223372036854771712\n"),
            None,
            "v1 without a limit"
        );
        assert_eq!(parse_memory_limit(""), None);
        assert_eq!(parse_memory_limit("0"), None);
    }
}
