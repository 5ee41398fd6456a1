//! Incremental Internet checksum updates (RFC 1624): `HC' = ~(~HC + ~m + m')`.
//!
//! Values are taken as they lie in memory (network order), like the checksum field itself:
//! the one's complement sum does not depend on byte order as long as every term is read the
//! same way.

/// A running adjustment: the sum of `~old + new` over every changed 16-bit word.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    /// Accounts for a 16-bit word that changes from `old` to `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 = fold_once(self.0 + u32::from(!old) + u32::from(new));
    }

    /// Accounts for a 32-bit value (two words) that changes.
    #[inline(always)]
    pub fn dword(&mut self, old: u32, new: u32) {
        let (o, n) = (old.to_ne_bytes(), new.to_ne_bytes());
        self.word(
            u16::from_ne_bytes([o[0], o[1]]),
            u16::from_ne_bytes([n[0], n[1]]),
        );
        self.word(
            u16::from_ne_bytes([o[2], o[3]]),
            u16::from_ne_bytes([n[2], n[3]]),
        );
    }

    /// The checksum `check` updated for every change accounted for.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let sum = fold_once(u32::from(!check) + self.0);
        !(fold_once(sum) as u16)
    }
}

#[inline(always)]
fn fold_once(s: u32) -> u32 {
    (s & 0xffff) + (s >> 16)
}
