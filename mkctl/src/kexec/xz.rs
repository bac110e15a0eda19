//! The `.xz` container around a kernel's payload, for the one case the
//! `lzma-rs` crate does not read: a block whose filter chain starts with the
//! x86 branch converter (BCJ), as `scripts/xz_wrap.sh` writes every x86
//! kernel built with `CONFIG_KERNEL_XZ` (`xz --x86 --lzma2`). The container
//! is read here (stream header, block header, index skipped), the LZMA2 data
//! is decoded by `lzma-rs`, and the x86 conversion undone by [`bcj_x86`];
//! the block's check is verified when it is a CRC32 (what kernels use).
//!
//! Written from the `.xz` file format specification (version 1.2.1,
//! sections 2.1 and 3.1) and the description of the x86 filter in it; every
//! length read from the input is checked.

use std::fmt;

const STREAM_MAGIC: &[u8; 6] = b"\xfd7zXZ\x00";
const FILTER_X86: u64 = 0x04;
const FILTER_LZMA2: u64 = 0x21;
const CHECK_NONE: u8 = 0x00;
const CHECK_CRC32: u8 = 0x01;

/// What is wrong with an `.xz` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzError(pub String);

impl fmt::Display for XzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XzError {}

fn bad(s: impl Into<String>) -> XzError {
    XzError(s.into())
}

/// The filters of the stream's first block, by id (`None` when the stream
/// cannot be read that far).
pub fn first_block_filters(stream: &[u8]) -> Option<Vec<u64>> {
    parse_block_header(stream).ok().map(|h| h.filters)
}

struct BlockHeader {
    /// Offset of the compressed data.
    data: usize,
    filters: Vec<u64>,
    /// x86 filter start offset (its optional 4-byte property).
    x86_start: u32,
    check: u8,
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, XzError> {
    let mut v: u64 = 0;
    for i in 0..9 {
        let byte = *b
            .get(*pos)
            .ok_or_else(|| bad("block header ends inside a number"))?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("a number in the block header is longer than 9 bytes"))
}

fn parse_block_header(s: &[u8]) -> Result<BlockHeader, XzError> {
    if s.len() < 12 || &s[..6] != STREAM_MAGIC {
        return Err(bad("no .xz stream header"));
    }
    if s[6] != 0 || s[7] & 0xf0 != 0 {
        return Err(bad(format!(
            "unsupported stream flags {:02x} {:02x}",
            s[6], s[7]
        )));
    }
    let check = s[7] & 0x0f;
    let start = 12;
    let size_byte = *s.get(start).ok_or_else(|| bad("no block"))?;
    if size_byte == 0 {
        return Err(bad("the stream has no block"));
    }
    let hsize = (usize::from(size_byte) + 1) * 4;
    let header = s
        .get(start..start + hsize)
        .ok_or_else(|| bad("the block header runs past the end"))?;
    let flags = header[1];
    if flags & 0x3c != 0 {
        return Err(bad(format!("reserved block flags set ({flags:#04x})")));
    }
    let mut pos = 2;
    if flags & 0x40 != 0 {
        varint(header, &mut pos)?; // compressed size
    }
    if flags & 0x80 != 0 {
        varint(header, &mut pos)?; // uncompressed size
    }
    let nfilters = usize::from(flags & 0x03) + 1;
    let mut filters = Vec::with_capacity(nfilters);
    let mut x86_start = 0u32;
    for _ in 0..nfilters {
        let id = varint(header, &mut pos)?;
        let plen = usize::try_from(varint(header, &mut pos)?)
            .map_err(|_| bad("filter properties too long"))?;
        let props = header
            .get(
                pos..pos
                    .checked_add(plen)
                    .ok_or_else(|| bad("filter properties too long"))?,
            )
            .ok_or_else(|| bad("filter properties run past the block header"))?;
        if id == FILTER_X86 {
            match plen {
                0 => {}
                4 => x86_start = u32::from_le_bytes([props[0], props[1], props[2], props[3]]),
                n => return Err(bad(format!("x86 filter with {n} property bytes"))),
            }
        }
        pos += plen;
        filters.push(id);
    }
    if pos > hsize - 4 {
        return Err(bad("the block header's filters overrun its size"));
    }
    let crc = u32::from_le_bytes(header[hsize - 4..].try_into().expect("4 bytes"));
    if crc32(&header[..hsize - 4]) != crc {
        return Err(bad("the block header's CRC32 does not match"));
    }
    Ok(BlockHeader {
        data: start + hsize,
        filters,
        x86_start,
        check,
    })
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

/// Decodes the first block of an `.xz` stream whose filters are x86 BCJ
/// then LZMA2; the output grows at most to `limit` bytes.
pub fn decode_x86_lzma2(stream: &[u8], limit: usize) -> Result<Vec<u8>, XzError> {
    let h = parse_block_header(stream)?;
    if h.filters != [FILTER_X86, FILTER_LZMA2] {
        return Err(bad(format!(
            "filter chain {:x?} (only [x86, LZMA2] is read here)",
            h.filters
        )));
    }
    let mut input = &stream[h.data..];
    let before = input.len();
    let mut out = Vec::new();
    {
        let mut w = Limited {
            out: &mut out,
            limit,
        };
        lzma_rs::lzma2_decompress(&mut input, &mut w)
            .map_err(|e| bad(format!("LZMA2 data: {e}")))?;
    }
    let used = before - input.len();
    bcj_x86(&mut out, h.x86_start);
    // Block padding to a multiple of 4, then the check.
    let end = h.data + used;
    let check_at = end.next_multiple_of(4);
    match h.check {
        CHECK_CRC32 => {
            let want = stream
                .get(check_at..check_at + 4)
                .ok_or_else(|| bad("the block's CRC32 is missing"))?;
            if crc32(&out) != u32::from_le_bytes(want.try_into().expect("4 bytes")) {
                return Err(bad(
                    "the decoded data fails the block's CRC32 (corrupt image, or an x86 filter \
                     this reader undoes wrongly)",
                ));
            }
        }
        CHECK_NONE => {}
        // CRC64 and SHA-256 are not verified (kernels use CRC32).
        _ => {}
    }
    Ok(out)
}

struct Limited<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
}

impl std::io::Write for Limited<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > self.limit {
            return Err(std::io::Error::other("decoded data exceeds the size limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Undoes the x86 branch converter: the encoder replaced the 32-bit
/// relative operand of E8 (CALL) and E9 (JMP) opcodes by an absolute one
/// (operand + position after the instruction) when its top byte was 0x00 or
/// 0xff, skipping candidates that a short history of nearby E8/E9 bytes
/// marks as likely data. The decoder runs the same history and subtracts.
pub fn bcj_x86(buf: &mut [u8], start: u32) {
    // Which 3-bit histories allow a conversion, and how far into the
    // operand the byte to test sits for each.
    const ALLOWED: [bool; 8] = [true, true, true, false, true, false, false, false];
    const BIT: [u32; 8] = [0, 1, 2, 2, 3, 3, 3, 3];
    let top_ok = |b: u8| b == 0x00 || b == 0xff;

    if buf.len() < 5 {
        return;
    }
    let mut prev_mask: u32 = 0;
    // Position of the previous E8/E9 seen, relative to `start`; starts
    // "long ago" so the first one begins with an empty history.
    let mut prev_pos: u32 = start.wrapping_sub(5);
    let mut i = 0usize;
    while i + 5 <= buf.len() {
        let b = buf[i];
        if b != 0xe8 && b != 0xe9 {
            i += 1;
            continue;
        }
        // Positions are 32-bit and wrap, as in the encoder.
        let now = start.wrapping_add(i as u32);
        let gap = now.wrapping_sub(prev_pos);
        prev_pos = now;
        if gap > 5 {
            prev_mask = 0;
        } else {
            for _ in 0..gap {
                prev_mask = (prev_mask & 0x77) << 1;
            }
        }
        let b4 = buf[i + 4];
        let h = ((prev_mask >> 1) & 7) as usize;
        if top_ok(b4) && ALLOWED[h] && (prev_mask >> 1) < 0x10 {
            let mut src = u32::from_le_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]);
            let after = now.wrapping_add(5);
            let mut dest;
            loop {
                dest = src.wrapping_sub(after);
                if prev_mask == 0 {
                    break;
                }
                let j = BIT[((prev_mask >> 1) & 7) as usize] * 8;
                if !top_ok((dest >> (24 - j)) as u8) {
                    break;
                }
                src = dest ^ ((1u32 << (32 - j)) - 1);
            }
            // Sign-extend from bit 24: the top byte becomes 0x00 or 0xff.
            dest &= 0x01ff_ffff;
            if dest & 0x0100_0000 != 0 {
                dest |= 0xff00_0000;
            }
            buf[i + 1..i + 5].copy_from_slice(&dest.to_le_bytes());
            i += 5;
            prev_mask = 0;
        } else {
            i += 1;
            prev_mask |= 1;
            if top_ok(b4) {
                prev_mask |= 0x10;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcj_leaves_data_without_branches_alone() {
        let mut b = vec![0x90u8; 64];
        let c = b.clone();
        bcj_x86(&mut b, 0);
        assert_eq!(b, c);
    }

    #[test]
    fn bcj_turns_an_absolute_call_back_into_a_relative_one() {
        // CALL at 0x10 to 0x100: relative 0x100 - 0x15 = 0xeb; the encoder
        // stored the absolute 0x100.
        let mut b = vec![0x90u8; 32];
        b[0x10] = 0xe8;
        b[0x11..0x15].copy_from_slice(&0x100u32.to_le_bytes());
        bcj_x86(&mut b, 0);
        assert_eq!(&b[0x11..0x15], &0xebu32.to_le_bytes());
    }

    #[test]
    fn header_errors_are_named_not_panics() {
        assert!(decode_x86_lzma2(b"", 10).is_err());
        assert!(decode_x86_lzma2(b"\xfd7zXZ\x00\x00\x01\0\0\0\0\0", 10).is_err());
        let mut s = b"\xfd7zXZ\x00\x00\x01\0\0\0\0".to_vec();
        s.extend_from_slice(&[0xff; 8]);
        assert!(decode_x86_lzma2(&s, 10).is_err());
    }
}
