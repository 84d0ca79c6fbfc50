//! The emulated MSI-X vector table and pending-bit array.
//!
//! Both live in a device BAR but belong to the framework: accesses to them never reach the
//! device. A VMM such as QEMU usually emulates the table itself and never writes ours, so
//! the table's power-on mask bits would silence every vector if taken at face value. A
//! vector's mask bit is therefore honoured only once its vector-control word has been
//! written since the last reset; the function mask, which powers on clear, always is.

/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Offset of the vector-control word within an entry.
const VECTOR_CONTROL: usize = 12;
/// Vector-control bit: the vector is masked.
const VECTOR_MASKED: u8 = 1;

/// Table, PBA and function-level state of an MSI-X capability.
#[derive(Debug)]
pub(crate) struct MsixTable {
    entries: Vec<u8>,
    programmed: Vec<bool>,
    pba: Vec<u64>,
    function_mask: bool,
}

impl MsixTable {
    /// A table of `vectors` entries at power-on state (all masked, none pending).
    pub(crate) fn new(vectors: u32) -> Self {
        let n = usize::try_from(vectors).unwrap_or(0);
        let mut table = Self {
            entries: vec![0; n * 16],
            programmed: vec![false; n],
            pba: vec![0; n.div_ceil(64)],
            function_mask: false,
        };
        table.reset();
        table
    }

    /// Back to power-on state.
    pub(crate) fn reset(&mut self) {
        self.entries.fill(0);
        for entry in self.entries.chunks_mut(16) {
            entry[VECTOR_CONTROL] = VECTOR_MASKED;
        }
        self.programmed.fill(false);
        self.pba.fill(0);
        self.function_mask = false;
    }

    /// The table, which vectors were programmed, the PBA and the function mask (for a
    /// hand-over).
    pub(crate) fn parts(&self) -> (&[u8], &[bool], &[u64], bool) {
        (
            &self.entries,
            &self.programmed,
            &self.pba,
            self.function_mask,
        )
    }

    /// Sets what [`parts`](Self::parts) gave; EINVAL if the sizes are not this table's.
    /// Whether [`set_parts`](Self::set_parts) would take these.
    pub(crate) fn fits(&self, entries: &[u8], programmed: &[bool], pba: &[u64]) -> bool {
        entries.len() == self.entries.len()
            && programmed.len() == self.programmed.len()
            && pba.len() == self.pba.len()
    }

    pub(crate) fn set_parts(
        &mut self,
        entries: &[u8],
        programmed: &[bool],
        pba: &[u64],
        function_mask: bool,
    ) -> Result<(), rustix::io::Errno> {
        if !self.fits(entries, programmed, pba) {
            return Err(rustix::io::Errno::INVAL);
        }
        self.entries.copy_from_slice(entries);
        self.programmed.copy_from_slice(programmed);
        self.pba.copy_from_slice(pba);
        self.function_mask = function_mask;
        Ok(())
    }

    /// Number of vectors.
    pub(crate) fn vectors(&self) -> usize {
        self.programmed.len()
    }

    /// Reads table bytes at `offset` (relative to the table start; caller checked bounds).
    pub(crate) fn read_table(&self, offset: usize, data: &mut [u8]) {
        if let Some(src) = self.entries.get(offset..offset + data.len()) {
            data.copy_from_slice(src);
        }
    }

    /// Writes table bytes; returns the vectors whose mask bit went from set to clear.
    pub(crate) fn write_table(&mut self, offset: usize, data: &[u8]) -> Vec<usize> {
        let mut unmasked = Vec::new();
        for (i, &byte) in data.iter().enumerate() {
            let pos = offset + i;
            let (vector, field) = (pos / 16, pos % 16);
            let Some(old) = self.entries.get(pos).copied() else {
                continue;
            };
            let new = match field {
                // Message address is dword aligned: bits 1:0 read as zero.
                0 => byte & 0xfc,
                1..=11 => byte,
                VECTOR_CONTROL => byte & VECTOR_MASKED,
                _ => 0,
            };
            if field == VECTOR_CONTROL {
                self.programmed[vector] = true;
                if old & VECTOR_MASKED != 0 && new & VECTOR_MASKED == 0 {
                    unmasked.push(vector);
                }
            }
            self.entries[pos] = new;
        }
        unmasked
    }

    /// Reads PBA bytes at `offset` (relative to the PBA start; caller checked bounds).
    pub(crate) fn read_pba(&self, offset: usize, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let pos = offset + i;
            *out = self
                .pba
                .get(pos / 8)
                .map_or(0, |word| word.to_le_bytes()[pos % 8]);
        }
    }

    /// Whether a trigger of `vector` must be held pending instead of delivered.
    pub(crate) fn is_masked(&self, vector: usize) -> bool {
        let entry_masked = self.programmed.get(vector).copied().unwrap_or(false)
            && self
                .entries
                .get(vector * 16 + VECTOR_CONTROL)
                .is_some_and(|c| c & VECTOR_MASKED != 0);
        self.function_mask || entry_masked
    }

    /// Marks `vector` pending.
    pub(crate) fn set_pending(&mut self, vector: usize) {
        if let Some(word) = self.pba.get_mut(vector / 64) {
            *word |= 1 << (vector % 64);
        }
    }

    /// Clears `vector`'s pending bit; returns whether it was set.
    pub(crate) fn take_pending(&mut self, vector: usize) -> bool {
        match self.pba.get_mut(vector / 64) {
            Some(word) => {
                let bit = 1 << (vector % 64);
                let was = *word & bit != 0;
                *word &= !bit;
                was
            }
            None => false,
        }
    }

    /// Sets the function mask from the capability's control register.
    pub(crate) fn set_function_mask(&mut self, masked: bool) {
        self.function_mask = masked;
    }

    /// The vectors now unmasked with their pending bit set, which must be delivered.
    pub(crate) fn deliverable(&self) -> Vec<usize> {
        (0..self.vectors())
            .filter(|&v| !self.is_masked(v) && self.pba[v / 64] & (1 << (v % 64)) != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_power_on_masked() {
        let t = MsixTable::new(3);
        let mut ctrl = [0u8; 4];
        t.read_table(2 * 16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 1);
    }

    #[test]
    fn power_on_mask_is_not_honoured_until_written() {
        let mut t = MsixTable::new(2);
        assert!(!t.is_masked(0));
        t.write_table(12, &1u32.to_le_bytes());
        assert!(t.is_masked(0));
        assert!(!t.is_masked(1));
    }

    #[test]
    fn unmask_reports_the_vector() {
        let mut t = MsixTable::new(2);
        t.write_table(16 + 12, &1u32.to_le_bytes());
        assert_eq!(t.write_table(16 + 12, &0u32.to_le_bytes()), vec![1]);
    }

    #[test]
    fn reserved_control_bits_read_zero() {
        let mut t = MsixTable::new(1);
        t.write_table(0, &[0xff; 16]);
        let mut e = [0u8; 16];
        t.read_table(0, &mut e);
        assert_eq!(&e[0..4], &[0xfc, 0xff, 0xff, 0xff]);
        assert_eq!(&e[12..16], &[1, 0, 0, 0]);
    }

    #[test]
    fn pending_bits_show_in_pba() {
        let mut t = MsixTable::new(70);
        t.set_pending(65);
        let mut w = [0u8; 8];
        t.read_pba(8, &mut w);
        assert_eq!(u64::from_le_bytes(w), 2);
        assert!(t.take_pending(65));
        assert!(!t.take_pending(65));
    }

    #[test]
    fn function_mask_masks_everything() {
        let mut t = MsixTable::new(2);
        t.set_function_mask(true);
        assert!(t.is_masked(1));
        t.set_pending(1);
        assert!(t.deliverable().is_empty());
        t.set_function_mask(false);
        assert_eq!(t.deliverable(), vec![1]);
    }
}
