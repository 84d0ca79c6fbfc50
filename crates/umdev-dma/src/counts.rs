//! Per-page counters for pins: a two-level array, allocated in 512-page chunks on first use.
//!
//! A mapping can be terabytes long while only a few of its pages are ever pinned, so a flat
//! array would waste memory and a hash map would cost a hash per page on the pin path. The
//! chunk table grows to the highest chunk used; a chunk (2 KiB of counters for 2 MiB of
//! memory) stays allocated until the owner goes, so pin/unpin cycles never allocate.

/// Pages per chunk.
const CHUNK: usize = 512;

/// Counters for the pages `0..n` of one mapping (or one shared mmap).
#[derive(Debug, Default)]
pub(crate) struct PageCounts {
    chunks: Vec<Option<Box<[u32; CHUNK]>>>,
    /// Pages whose counter is not 0.
    nonzero: u64,
}

impl PageCounts {
    /// The counter of page `i`.
    pub(crate) fn get(&self, i: usize) -> u32 {
        match self.chunks.get(i / CHUNK) {
            Some(Some(c)) => c[i % CHUNK],
            _ => 0,
        }
    }

    /// Adds one to page `i`; returns the old value, or `None` (nothing changed) if the counter
    /// is saturated.
    pub(crate) fn inc(&mut self, i: usize) -> Option<u32> {
        let ci = i / CHUNK;
        if self.chunks.len() <= ci {
            self.chunks.resize_with(ci + 1, || None);
        }
        let chunk = self.chunks[ci].get_or_insert_with(|| Box::new([0; CHUNK]));
        let c = &mut chunk[i % CHUNK];
        let old = *c;
        *c = old.checked_add(1)?;
        if old == 0 {
            self.nonzero += 1;
        }
        Some(old)
    }

    /// Takes one from page `i`; returns the old value (0: nothing changed).
    pub(crate) fn dec(&mut self, i: usize) -> u32 {
        let Some(Some(chunk)) = self.chunks.get_mut(i / CHUNK) else {
            return 0;
        };
        let c = &mut chunk[i % CHUNK];
        let old = *c;
        if old > 0 {
            *c = old - 1;
            if old == 1 {
                self.nonzero -= 1;
            }
        }
        old
    }

    /// Number of pages with a counter above 0.
    pub(crate) fn nonzero(&self) -> u64 {
        self.nonzero
    }

    /// Every page with a counter above 0, with its counter, in page order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| c.as_ref().map(|c| (ci, c)))
            .flat_map(|(ci, c)| {
                c.iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(move |(j, &n)| (ci * CHUNK + j, n))
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;

    #[test]
    fn counts_go_up_and_down_and_track_nonzero_pages() {
        let mut c = PageCounts::default();
        assert_eq!(c.inc(5), Some(0));
        assert_eq!(c.inc(5), Some(1));
        assert_eq!(c.inc(100_000), Some(0));
        assert_eq!(c.nonzero(), 2);
        assert_eq!(c.get(5), 2);
        assert_eq!(c.dec(5), 2);
        assert_eq!(c.dec(5), 1);
        assert_eq!(c.dec(5), 0, "already 0: unchanged");
        assert_eq!(c.nonzero(), 1);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![(100_000, 1)]);
        assert_eq!(c.dec(100_000), 1);
        assert_eq!(c.nonzero(), 0);
    }

    #[test]
    fn untouched_pages_read_zero() {
        let c = PageCounts::default();
        assert_eq!(c.get(0), 0);
        assert_eq!(c.get(usize::MAX), 0);
    }
}
