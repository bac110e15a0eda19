//! Where instance memory goes in the pool: the free-range arithmetic of
//! the placer (gaps between what is taken, the first aligned fit, on a
//! NUMA node when asked, the largest gap). The validator decides what to
//! place and says what is wrong; this module only computes ranges.

use std::ops::Range;

use super::model::{Machine, Pool};
use crate::units::{align_up, MemRange, PhysAddr};

/// What already holds a range of the pool: the range, who (for messages)
/// and where in the file it was given.
pub type Taken = (MemRange, String, Range<usize>);

/// The free gaps of the pool, ascending.
pub fn gaps(pool: &Pool, taken: &[Taken]) -> Vec<MemRange> {
    let mut used: Vec<MemRange> = taken.iter().map(|t| t.0).collect();
    used.sort();
    let mut out = Vec::new();
    let mut at = pool.range.start.0;
    for u in used {
        if u.start.0 > at {
            out.push(MemRange {
                start: PhysAddr(at),
                end: u.start.min(pool.range.end),
            });
        }
        at = at.max(u.end.0);
    }
    if at < pool.range.end.0 {
        out.push(MemRange {
            start: PhysAddr(at),
            end: pool.range.end,
        });
    }
    out
}

/// The first aligned free range of `size` bytes, inside `node` when given.
pub fn next_free(
    pool: &Pool,
    taken: &[Taken],
    size: u64,
    align: u64,
    node: Option<u32>,
    m: &Machine,
) -> Option<MemRange> {
    let limits: Vec<MemRange> = match node.and_then(|n| m.node(n)) {
        Some(n) => n.memory.clone(),
        None => vec![pool.range],
    };
    for g in gaps(pool, taken) {
        for lim in &limits {
            let start = align_up(g.start.0.max(lim.start.0), align)?;
            let end = g.end.0.min(lim.end.0);
            if start.checked_add(size).is_some_and(|e| e <= end) {
                return MemRange::new(start, size);
            }
        }
    }
    None
}

/// The largest free range of the pool, from an aligned start.
pub fn largest_gap(pool: &Pool, taken: &[Taken], align: u64) -> MemRange {
    gaps(pool, taken)
        .into_iter()
        .map(|g| {
            let s = align_up(g.start.0, align).unwrap_or(g.end.0).min(g.end.0);
            MemRange {
                start: PhysAddr(s),
                end: g.end,
            }
        })
        .max_by_key(MemRange::size)
        .unwrap_or(MemRange {
            start: pool.range.start,
            end: pool.range.start,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{ByteSize, MIB};

    fn pool(start: u64, size: u64) -> Pool {
        Pool {
            range: MemRange::new(start, size).unwrap(),
            align: ByteSize(2 * MIB),
        }
    }

    fn taken(start: u64, size: u64) -> Taken {
        (MemRange::new(start, size).unwrap(), "x".into(), 0..0)
    }

    #[test]
    fn gaps_and_first_fit_skip_what_is_taken_and_keep_alignment() {
        let p = pool(0x4000_0000, 64 * MIB);
        let t = [taken(0x4000_0000, 3 * MIB), taken(0x4100_0000, 16 * MIB)];
        let g = gaps(&p, &t);
        assert_eq!(
            g,
            vec![
                MemRange::new(0x4030_0000, 13 * MIB).unwrap(),
                MemRange::new(0x4200_0000, 32 * MIB).unwrap()
            ]
        );
        let m = Machine {
            discovered: false,
            nodes: Vec::new(),
        };
        // 3 MiB taken: the first 2 MiB-aligned start is 4 MiB in.
        assert_eq!(
            next_free(&p, &t, 8 * MIB, 2 * MIB, None, &m),
            MemRange::new(0x4040_0000, 8 * MIB)
        );
        // Too big for the first gap: the second one.
        assert_eq!(
            next_free(&p, &t, 16 * MIB, 2 * MIB, None, &m),
            MemRange::new(0x4200_0000, 16 * MIB)
        );
        assert_eq!(next_free(&p, &t, 64 * MIB, 2 * MIB, None, &m), None);
        assert_eq!(
            largest_gap(&p, &t, 2 * MIB),
            MemRange::new(0x4200_0000, 32 * MIB).unwrap()
        );
    }
}
