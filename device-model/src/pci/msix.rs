//! MSI-X: the vector table, the pending bit array, and when a message may be sent.
//!
//! A message for vector `v` is sent only when MSI-X is enabled, the function is not masked and
//! entry `v` is not masked. Otherwise, with MSI-X enabled, the vector's pending bit is set, and
//! the message goes out as soon as the masks allow it (PCI Local Bus 3.0, section 6.8.2). With
//! MSI-X disabled nothing is sent or remembered (the function would use INTx, and it has no pin).

use super::regs::{
    PCI_MSIX_ENTRY_CTRL_MASKBIT, PCI_MSIX_ENTRY_DATA, PCI_MSIX_ENTRY_LOWER_ADDR,
    PCI_MSIX_ENTRY_SIZE, PCI_MSIX_ENTRY_UPPER_ADDR, PCI_MSIX_ENTRY_VECTOR_CTRL,
};

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub ctrl: u32,
}

impl MsixEntry {
    /// Power-on value: zero address and data, masked.
    const RESET: Self = Self {
        addr: 0,
        data: 0,
        ctrl: PCI_MSIX_ENTRY_CTRL_MASKBIT,
    };

    /// Whether the entry is masked.
    #[must_use]
    pub fn masked(&self) -> bool {
        self.ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT != 0
    }

    fn bytes(&self) -> [u8; PCI_MSIX_ENTRY_SIZE] {
        let mut out = [0u8; PCI_MSIX_ENTRY_SIZE];
        out[PCI_MSIX_ENTRY_LOWER_ADDR..PCI_MSIX_ENTRY_DATA]
            .copy_from_slice(&self.addr.to_le_bytes());
        out[PCI_MSIX_ENTRY_DATA..PCI_MSIX_ENTRY_VECTOR_CTRL]
            .copy_from_slice(&self.data.to_le_bytes());
        out[PCI_MSIX_ENTRY_VECTOR_CTRL..].copy_from_slice(&self.ctrl.to_le_bytes());
        out
    }
}

/// The MSI-X state of the function.
#[derive(Clone, Debug)]
pub(crate) struct Msix {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl Msix {
    pub(crate) fn new(vectors: u16) -> Self {
        let n = usize::from(vectors);
        Self {
            entries: vec![MsixEntry::RESET; n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
        }
    }

    /// Drop every pending message (function reset).
    pub(crate) fn clear_pending(&mut self) {
        self.pending.fill(0);
    }

    pub(crate) fn vectors(&self) -> u16 {
        u16::try_from(self.entries.len()).unwrap_or(u16::MAX)
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn function_masked(&self) -> bool {
        self.function_masked
    }

    pub(crate) fn entry(&self, v: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(v)).copied()
    }

    pub(crate) fn pending(&self, v: u16) -> bool {
        let v = usize::from(v);
        self.pending
            .get(v / 64)
            .is_some_and(|word| word & (1u64 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: u16, on: bool) {
        let v = usize::from(v);
        if let Some(word) = self.pending.get_mut(v / 64) {
            let bit = 1u64 << (v % 64);
            if on {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    /// Whether a message for `v` may go out now.
    fn deliverable(&self, v: u16) -> bool {
        self.enabled && !self.function_masked && self.entry(v).is_some_and(|e| !e.masked())
    }

    /// The device wants to interrupt vector `v`: `Some(v)` to send it now; otherwise it is
    /// made pending (if MSI-X is enabled and `v` exists) or dropped.
    pub(crate) fn trigger(&mut self, v: u16) -> Option<u16> {
        if !self.enabled || usize::from(v) >= self.entries.len() {
            return None;
        }
        if self.deliverable(v) {
            Some(v)
        } else {
            self.set_pending(v, true);
            None
        }
    }

    /// Send whatever pending vectors the masks now allow: clears their pending bits and
    /// passes each to `deliver`.
    pub(crate) fn release_pending(&mut self, mut deliver: impl FnMut(u16)) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.vectors() {
            if self.pending(v) && self.deliverable(v) {
                self.set_pending(v, false);
                deliver(v);
            }
        }
    }

    /// New enable and function-mask bits (from the capability's message control).
    pub(crate) fn set_control(&mut self, enabled: bool, function_masked: bool) {
        self.enabled = enabled;
        self.function_masked = function_masked;
    }

    /// Mask or unmask entry `v` (the vector control's mask bit).
    pub(crate) fn set_masked(&mut self, v: u16, masked: bool) {
        if let Some(e) = self.entries.get_mut(usize::from(v)) {
            if masked {
                e.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT;
            } else {
                e.ctrl &= !PCI_MSIX_ENTRY_CTRL_MASKBIT;
            }
        }
    }

    /// Read the table at `offset` (from the table's start); bytes past its end read zero.
    pub(crate) fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(u64::try_from(i).unwrap_or(u64::MAX))
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| {
                    let entry = self.entries.get(o / PCI_MSIX_ENTRY_SIZE)?;
                    entry.bytes().get(o % PCI_MSIX_ENTRY_SIZE).copied()
                })
                .unwrap_or(0);
        }
    }

    /// Write the table: only aligned dword accesses, or a qword to the message address, as the
    /// PCI spec allows; anything else is dropped.
    pub(crate) fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let Some(entry) = self.entries.get_mut(offset / PCI_MSIX_ENTRY_SIZE) else {
            return;
        };
        let field = offset % PCI_MSIX_ENTRY_SIZE;
        match (field, data.len()) {
            (PCI_MSIX_ENTRY_LOWER_ADDR, 8) => {
                if let Ok(b) = <[u8; 8]>::try_from(data) {
                    entry.addr = u64::from_le_bytes(b);
                }
            }
            (_, 4) => {
                let Ok(b) = <[u8; 4]>::try_from(data) else {
                    return;
                };
                let v = u32::from_le_bytes(b);
                match field {
                    PCI_MSIX_ENTRY_LOWER_ADDR => {
                        entry.addr = (entry.addr & !u64::from(u32::MAX)) | u64::from(v);
                    }
                    PCI_MSIX_ENTRY_UPPER_ADDR => {
                        entry.addr = (entry.addr & u64::from(u32::MAX)) | (u64::from(v) << 32);
                    }
                    PCI_MSIX_ENTRY_DATA => entry.data = v,
                    // Only the mask bit is implemented; the rest reads as zero.
                    PCI_MSIX_ENTRY_VECTOR_CTRL => entry.ctrl = v & PCI_MSIX_ENTRY_CTRL_MASKBIT,
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Read the pending bit array at `offset`; writes to it are ignored (it is read-only).
    pub(crate) fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(u64::try_from(i).unwrap_or(u64::MAX))
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.pending.get(o / 8)?.to_le_bytes().get(o % 8).copied())
                .unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(m: &mut Msix, v: u16) {
        let off = u64::from(v) * 16 + 12;
        m.write_table(off, &0u32.to_le_bytes());
    }

    #[test]
    fn mask_pending_unmask() {
        let mut m = Msix::new(3);
        // Disabled: nothing sent, nothing pending.
        assert_eq!(m.trigger(0), None);
        assert!(!m.pending(0));
        m.set_control(true, false);
        // Entries start masked.
        assert!(m.entry(1).unwrap().masked());
        assert_eq!(m.trigger(1), None);
        assert!(m.pending(1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        unmask(&mut m, 1);
        let mut sent = Vec::new();
        m.release_pending(|v| sent.push(v));
        assert_eq!(sent, [1]);
        assert!(!m.pending(1));
        assert_eq!(m.trigger(1), Some(1));
        // Function mask holds everything back.
        m.set_control(true, true);
        assert_eq!(m.trigger(1), None);
        m.release_pending(|v| sent.push(v));
        assert_eq!(sent, [1]);
        m.set_control(true, false);
        m.release_pending(|v| sent.push(v));
        assert_eq!(sent, [1, 1]);
        // Out of range.
        assert_eq!(m.trigger(3), None);
        assert_eq!(m.trigger(u16::MAX), None);
        m.set_control(true, true);
        assert_eq!(m.trigger(0), None);
        m.clear_pending();
        assert!(!m.pending(0));
    }

    #[test]
    fn table_access() {
        let mut m = Msix::new(2);
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(20, &0x1u32.to_le_bytes());
        m.write_table(24, &0x4041u32.to_le_bytes());
        m.write_table(28, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(
            m.entry(1).unwrap(),
            MsixEntry {
                addr: 0x1_fee0_0000,
                data: 0x4041,
                ctrl: 0
            }
        );
        m.write_table(0, &0x1234_5678_9abc_def0u64.to_le_bytes());
        assert_eq!(m.entry(0).unwrap().addr, 0x1234_5678_9abc_def0);
        // Odd sizes and offsets, and past the end: dropped.
        m.write_table(1, &[1, 2, 3, 4]);
        m.write_table(8, &[1, 2]);
        m.write_table(8, &[0; 8]);
        m.write_table(32, &[0; 4]);
        m.write_table(u64::MAX, &[0; 4]);
        assert_eq!(m.entry(0).unwrap().data, 0);
        let mut out = [0xffu8; 20];
        m.read_table(24, &mut out);
        assert_eq!(out[..4], 0x4041u32.to_le_bytes());
        assert_eq!(out[4..8], [0; 4]);
        assert_eq!(out[8..], [0; 12]);
        m.read_table(u64::MAX, &mut out);
        assert_eq!(out, [0; 20]);
        m.read_pba(u64::MAX - 2, &mut out);
        assert_eq!(out, [0; 20]);
    }
}
