//! Byte search in frames as they were read: a byte, a key, the number after a key (no JSON parse).

/// Position of `needle` in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = find_byte(&hay[from..], first) {
        let at = from + i;
        if hay[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Position of the first `byte` in `hay`, 8 bytes a step (std has no public `memchr`, and a plain
/// `position` goes a byte a step): SSE lines and frame keys are found with it.
pub(crate) fn find_byte(hay: &[u8], byte: u8) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = u64::from_ne_bytes([byte; 8]);
    let mut words = hay.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ pattern;
        // A high bit for each zero byte of `x` (the lowest one is exact; bits above it may be
        // false, which does not matter as only the lowest is used).
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(at + zero.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == byte)
        .map(|i| at + i)
}

/// The unsigned integer right after the first `key` in `hay`, and the offset just past it.
pub(crate) fn number_after(hay: &[u8], key: &[u8]) -> Option<(u64, usize)> {
    let start = find(hay, key)? + key.len();
    let mut n: u64 = 0;
    let mut end = start;
    while let Some(&b) = hay.get(end) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        end += 1;
    }
    (end > start).then_some((n, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_keys_are_found_like_a_plain_search() {
        let naive = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
        // Every position, every length, needles next to look-alikes and high bytes (0x80, 0xff
        // around the byte sought, where a carry could go wrong).
        let mut hay = Vec::new();
        for i in 0..67u8 {
            hay.push(
                [b'a', b'\n', 0x80, 0xff, 0x0b, 0x09, b'"', 0][usize::from(i) % 8] ^ (i & 0x40),
            );
        }
        for len in 0..hay.len() {
            for start in 0..len.min(9) {
                let h = &hay[start..len];
                for b in [b'\n', 0x80, 0xff, 0, b'"', 0x0b, b'x', 0x41, 0xbf] {
                    assert_eq!(find_byte(h, b), h.iter().position(|&c| c == b), "{h:?} {b}");
                }
            }
        }
        for pos in 0..40 {
            let mut h = vec![b'x'; 40];
            h[pos] = b'\n';
            assert_eq!(find_byte(&h, b'\n'), Some(pos));
            h[pos] = 0x0b; // '\n' + 1: a borrow would turn it into a false match
            assert_eq!(find_byte(&h, b'\n'), None);
        }
        let frame: &[u8] =
            b"{\"type\":\"event\",\"channel\":\"room:r\",\"seq\":12,\"epoch\":\"e\",\
            \"data\":{\"pad\":\"\\\"t\\\":\",\"t\":1795249035673804}}";
        for needle in [
            &b"\"seq\":"[..],
            b"\"t\":",
            b"\"",
            b"}}",
            b"\"missing\":",
            b"{",
        ] {
            for cut in 0..frame.len() {
                assert_eq!(find(&frame[cut..], needle), naive(&frame[cut..], needle));
            }
        }
        assert_eq!(find(b"", b"x"), None);
    }
}
