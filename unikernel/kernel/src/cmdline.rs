//! The kernel command line: space-separated `key=value` words. The memory
//! manager parses its own keys (`memd.dma_reserve=`, `memd.max_order=`,
//! `memmap=`); the kernel reads the rest.

/// Value of the last `key=value` word for `key`, if any.
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .rfind(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether a boolean flag is on (`key=1`, `key=on`, `key=true`, `key=yes`).
pub fn flag(cmdline: &str, key: &str) -> bool {
    matches!(get(cmdline, key), Some("1" | "on" | "true" | "yes"))
}
