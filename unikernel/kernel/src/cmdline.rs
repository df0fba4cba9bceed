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

/// Displays a command line with the value of any `memd.token=` hidden, for
/// logs: the kernel takes its tokens from fw_cfg files and ignores that
/// word, but a host script may still put a secret there.
pub struct Redacted<'a>(pub &'a str);

impl core::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, word) in self.0.split_ascii_whitespace().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            if word.starts_with("memd.token=") {
                f.write_str("memd.token=<redacted>")?;
            } else {
                f.write_str(word)?;
            }
        }
        Ok(())
    }
}
