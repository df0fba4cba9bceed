//! The deterministic fill pattern and checksum used by the DMA buffer
//! operations, shared so that clients can verify what the service did.

/// Byte `index` of the fill pattern for `seed`: 8-byte words of a
/// splitmix64 sequence keyed by the seed and the word index, so any range
/// can be produced or checked independently.
pub fn pattern_word(seed: u64, word_index: u64) -> u64 {
    let mut z = seed.wrapping_add(
        word_index
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fill `buf`, which starts `offset` bytes into the patterned region, with
/// the pattern for `seed`: one pattern word per 8 bytes (a partial word at
/// either end byte by byte).
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
    let (first, rest) = buf.split_at_mut(head);
    fill_bytes(seed, offset, first);
    let offset = offset + head as u64;
    let mut words = rest.chunks_exact_mut(8);
    let mut index = offset / 8;
    for w in words.by_ref() {
        w.copy_from_slice(&pattern_word(seed, index).to_le_bytes());
        index += 1;
    }
    fill_bytes(seed, index * 8, words.into_remainder());
}

/// [`fill_pattern`] one byte at a time: for the ragged ends.
fn fill_bytes(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = pattern_word(seed, pos / 8).to_le_bytes()[(pos % 8) as usize];
    }
}

/// FNV-1a 64-bit checksum state.
#[derive(Debug, Clone, Copy)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// A fresh checksum.
    pub const fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    /// Add bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        self.0 = h;
    }

    /// The checksum value.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of `bytes`.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(bytes);
    c.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_independent() {
        let mut whole = [0u8; 100];
        fill_pattern(42, 0, &mut whole);
        let mut part = [0u8; 37];
        fill_pattern(42, 13, &mut part);
        assert_eq!(&whole[13..50], &part[..]);
        let mut other = [0u8; 100];
        fill_pattern(43, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn word_fill_matches_byte_fill_at_every_alignment() {
        let mut bytes = [0u8; 80];
        let mut words = [0u8; 80];
        for offset in 0..17u64 {
            for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 63, 80] {
                fill_bytes(7, offset, &mut bytes[..len]);
                words[..len].fill(0);
                fill_pattern(7, offset, &mut words[..len]);
                assert_eq!(bytes[..len], words[..len], "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn checksum_streams() {
        let data = b"hello, memd";
        let mut c = Checksum::new();
        c.update(&data[..4]);
        c.update(&data[4..]);
        assert_eq!(c.value(), checksum(data));
        // FNV-1a 64 of "a".
        assert_eq!(checksum(b"a"), 0xaf63dc4c8601ec8c);
    }
}
