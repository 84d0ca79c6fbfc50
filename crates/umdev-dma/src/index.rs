//! A dense copy of the mapping table for translation: what [`AddressSpace::translate`]
//! needs (range, permissions, backing kind, identity) in sorted arrays, without a pointer
//! to the mapping.
//!
//! At 65,535 mappings with random addresses a `BTreeMap` lookup is a chain of cache misses
//! through its nodes, and reading the mapping it finds is one more. Here the starts sit in
//! blocks of at most [`BLOCK`] sorted `u64`s, found through the sorted first starts of all
//! blocks: a binary search over one small array (a few KiB, mostly cached), then a count
//! over one block's starts whose loads are independent (the misses overlap instead of
//! following each other), then one entry.
//!
//! The index is changed under the table's write lock, right after the table, so both hold
//! the same mappings whenever neither lock is held for writing.
//!
//! [`AddressSpace::translate`]: crate::AddressSpace::translate

use crate::range::Prot;

/// Most starts in one block: 8 cache lines of starts.
const BLOCK: usize = 64;

/// What a translation needs to know of one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) start: u64,
    /// One past the last byte.
    pub(crate) end: u64,
    /// The mapping's identity (`Mapping::id`), unique for the life of the process.
    pub(crate) id: u64,
    pub(crate) prot: Prot,
    pub(crate) fd_backed: bool,
}

#[derive(Debug, Default)]
struct Block {
    starts: Vec<u64>,
    entries: Vec<Entry>,
}

/// Sorted, disjoint entries in blocks.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// First start of each block, sorted; no block is empty.
    firsts: Vec<u64>,
    blocks: Vec<Block>,
}

/// How many of the sorted `keys` are at most `x`, without a data-dependent branch.
fn count_le(keys: &[u64], x: u64) -> usize {
    keys.iter().map(|&k| usize::from(k <= x)).sum()
}

/// Index of the last of the sorted `keys` at most `x`, if any: a branchless binary search.
fn last_le(keys: &[u64], x: u64) -> Option<usize> {
    let mut base = 0usize;
    let mut len = keys.len();
    if len == 0 {
        return None;
    }
    while len > 1 {
        let half = len / 2;
        // `keys[base + half]` exists: base + half < base + len <= keys.len().
        base = if keys.get(base + half).is_some_and(|&k| k <= x) {
            base + half
        } else {
            base
        };
        len -= half;
    }
    keys.get(base).filter(|&&k| k <= x).map(|_| base)
}

impl Index {
    /// The entry containing `iova`.
    pub(crate) fn find(&self, iova: u64) -> Option<&Entry> {
        let b = self.blocks.get(last_le(&self.firsts, iova)?)?;
        let i = count_le(&b.starts, iova).checked_sub(1)?;
        b.entries.get(i).filter(|e| iova < e.end)
    }

    /// Adds `e`, which overlaps no entry.
    pub(crate) fn insert(&mut self, e: Entry) {
        let bi = last_le(&self.firsts, e.start).unwrap_or(0);
        let Some(b) = self.blocks.get_mut(bi) else {
            self.firsts.push(e.start);
            self.blocks.push(Block {
                starts: vec![e.start],
                entries: vec![e],
            });
            return;
        };
        let i = b.starts.partition_point(|&s| s < e.start);
        b.starts.insert(i, e.start);
        b.entries.insert(i, e);
        self.firsts[bi] = b.starts[0];
        if b.starts.len() > BLOCK {
            // Appending in ascending order (the usual way a VMM maps) leaves full blocks
            // behind; otherwise split in halves.
            let at = if i == BLOCK { BLOCK } else { BLOCK / 2 };
            let tail = Block {
                starts: b.starts.split_off(at),
                entries: b.entries.split_off(at),
            };
            self.firsts.insert(bi + 1, tail.starts[0]);
            self.blocks.insert(bi + 1, tail);
        }
    }

    /// Removes the entry starting at `start` with identity `id`, if there is one.
    pub(crate) fn remove(&mut self, start: u64, id: u64) {
        let Some(bi) = last_le(&self.firsts, start) else {
            return;
        };
        let Some(b) = self.blocks.get_mut(bi) else {
            return;
        };
        let Some(i) = b.starts.iter().position(|&s| s == start) else {
            return;
        };
        if b.entries[i].id != id {
            return;
        }
        b.starts.remove(i);
        b.entries.remove(i);
        if let Some(&first) = b.starts.first() {
            self.firsts[bi] = first;
        } else {
            self.firsts.remove(bi);
            self.blocks.remove(bi);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(start: u64, len: u64, id: u64) -> Entry {
        Entry {
            start,
            end: start + len,
            id,
            prot: Prot::READ,
            fd_backed: true,
        }
    }

    #[test]
    fn last_le_finds_the_last_key_at_most_x() {
        let keys = [10, 20, 30];
        assert_eq!(last_le(&keys, 5), None);
        assert_eq!(last_le(&keys, 10), Some(0));
        assert_eq!(last_le(&keys, 29), Some(1));
        assert_eq!(last_le(&keys, u64::MAX), Some(2));
        assert_eq!(last_le(&[], 1), None);
    }

    proptest! {
        #[test]
        fn index_agrees_with_a_linear_scan(
            ops in proptest::collection::vec((any::<bool>(), 0u64..600, 1u64..4), 1..800),
            probes in proptest::collection::vec(0u64..700, 50),
        ) {
            let mut index = Index::default();
            let mut model: Vec<Entry> = Vec::new();
            for (n, (add, start, len)) in ops.into_iter().enumerate() {
                let id = n as u64;
                if add {
                    let e = entry(start, len, id);
                    if model.iter().all(|m| e.end <= m.start || m.end <= e.start) {
                        index.insert(e);
                        model.push(e);
                    }
                } else if let Some(p) = model.iter().position(|m| m.start == start) {
                    index.remove(start, model[p].id);
                    model.remove(p);
                }
                prop_assert!(index.blocks.iter().all(|b| !b.starts.is_empty() && b.starts.len() <= BLOCK));
            }
            for x in probes {
                let want = model.iter().find(|m| m.start <= x && x < m.end);
                prop_assert_eq!(index.find(x), want);
            }
        }
    }
}
