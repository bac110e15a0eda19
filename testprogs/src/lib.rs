//! Test programs for process migration. The binaries live in `src/bin/`; this
//! library holds what a test needs to predict their output (the memory
//! pattern and its checksum), so a test can check a migrated process against
//! a value computed independently of it.

/// The byte at offset `i` of mkcounter's buffer: a xorshift-style mix of the
/// offset, so that a page moved to the wrong address or left zero changes the
/// checksum.
pub fn pattern_byte(i: u64) -> u8 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_5A5A_C3C3_3C3C;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    x.to_le_bytes()[0]
}

/// Fills `buf` with the pattern (offset 0 = first byte).
pub fn fill_pattern(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(i as u64);
    }
}

/// FNV-1a over the buffer, folded per 8 bytes so it runs at memory speed in
/// release builds; any changed byte changes the result.
pub fn checksum(buf: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = buf.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The checksum mkcounter prints for a buffer of `len` bytes.
pub fn expected_checksum(len: usize) -> u64 {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v);
    checksum(&v)
}

/// Parses a size like `64M`, `16m`, `4096`, `1G`, `512K`.
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1usize << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn checksum_sees_one_byte() {
        let mut v = vec![0u8; 4096 * 3];
        fill_pattern(&mut v);
        let a = checksum(&v);
        v[4096 + 17] ^= 1;
        assert_ne!(a, checksum(&v));
    }
}
