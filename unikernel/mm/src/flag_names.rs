//! Flag sets by name, the way Linux spells them (`KERNEL|ZERO`,
//! `SLAB_POISON`): parsing and printing for [`crate::Gfp`] and
//! [`crate::SlabFlags`].

use core::fmt;

/// Parses `"A|B"`: names from `named` (case-insensitive, with or without
/// `prefix`, `|` or `,` separated; `none` or nothing is no flag at all), or
/// a number (decimal, or hex after `0x`). `None` for an unknown name.
pub(crate) fn parse<T: Copy>(
    s: &str,
    named: &[(&str, T)],
    bits: fn(T) -> u32,
    prefix: &str,
    none: &str,
) -> Option<u32> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x") {
        return u32::from_str_radix(hex, 16).ok();
    }
    if let Ok(n) = s.parse::<u32>() {
        return Some(n);
    }
    let mut set = 0;
    for part in s.split(['|', ',']) {
        let part = part.trim();
        let name = match part.get(..prefix.len()) {
            Some(p) if p.eq_ignore_ascii_case(prefix) => &part[prefix.len()..],
            _ => part,
        };
        if name.is_empty() || name.eq_ignore_ascii_case(none) {
            continue;
        }
        let (_, flag) = named.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))?;
        set |= bits(*flag);
    }
    Some(set)
}

/// Writes the names of the flags of `named` that `set` holds, `|`
/// separated, then the bits no name covers in hex; `none` for no bit at all.
pub(crate) fn write<T: Copy>(
    f: &mut fmt::Formatter<'_>,
    set: u32,
    named: &[(&str, T)],
    bits: fn(T) -> u32,
    none: &str,
) -> fmt::Result {
    let mut first = true;
    let mut sep = |f: &mut fmt::Formatter<'_>| {
        let s = if first { "" } else { "|" };
        first = false;
        f.write_str(s)
    };
    let mut known = 0;
    for (name, flag) in named {
        let b = bits(*flag);
        known |= b;
        if b != 0 && set & b == b {
            sep(f)?;
            f.write_str(name)?;
        }
    }
    let unknown = set & !known;
    if unknown != 0 {
        sep(f)?;
        write!(f, "{unknown:#x}")?;
    }
    if set == 0 {
        f.write_str(none)?;
    }
    Ok(())
}
