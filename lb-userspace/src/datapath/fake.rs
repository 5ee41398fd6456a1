//! An in-memory datapath for tests: it enforces capacities like the kernel, can fail a
//! chosen write, and checks after every write that lookups see only whole services.

use super::{Capacities, Contents, Datapath, DatapathError, Op};

/// The in-memory datapath.
#[derive(Debug)]
pub struct FakeDatapath {
    /// What the maps hold.
    pub contents: Contents,
    /// Every write performed, in order.
    pub log: Vec<Op>,
    /// Fail the write with this index in `log` order (counting attempts).
    pub fail_at: Option<usize>,
    attempts: usize,
    caps: Capacities,
}

impl FakeDatapath {
    /// An empty datapath with these capacities.
    pub fn new(caps: Capacities) -> Self {
        Self::with_contents(caps, Contents::default())
    }

    /// A datapath that already holds `contents` (as after an agent restart).
    pub fn with_contents(caps: Capacities, contents: Contents) -> Self {
        Self {
            contents,
            log: Vec::new(),
            fail_at: None,
            attempts: 0,
            caps,
        }
    }

    fn full(&self, op: &Op) -> bool {
        let c = &self.contents;
        match op {
            Op::PutService(k, _) => {
                !c.services.contains_key(k) && c.services.len() >= self.caps.services as usize
            }
            Op::PutInfo(id, _) => {
                !c.info.contains_key(id) && c.info.len() >= self.caps.services as usize
            }
            Op::PutSlot(k, _) => {
                !c.slots.contains_key(k) && c.slots.len() >= self.caps.slots as usize
            }
            Op::PutBackend(id, _) => {
                !c.backends.contains_key(id) && c.backends.len() >= self.caps.backends as usize
            }
            Op::PutMatch(k) => {
                !c.affinity_match.contains(k)
                    && c.affinity_match.len() >= self.caps.affinity_match as usize
            }
            Op::PutExternal(k, _) => {
                !c.external.contains_key(k) && c.external.len() >= self.caps.external as usize
            }
            // Ids run from 1 to the capacity (the kernel's array and info maps hold one more).
            Op::PutExternalInfo(id, _) | Op::ResetCounters(id) => *id > self.caps.external_ids,
            Op::ResetServiceCounters(id) => *id > self.caps.services,
            Op::ResetBackendCounters(id) => *id > self.caps.backends,
            Op::PutRange(k) => !c.ranges.contains(k) && c.ranges.len() >= self.caps.ranges as usize,
            Op::PutTable { start, at, ids } => {
                (start + at) as usize + ids.len() > self.caps.table_entries as usize
            }
            Op::ClearTable { start, len } => start + len > self.caps.table_entries,
            _ => false,
        }
    }
}

impl Datapath for FakeDatapath {
    fn read(&self) -> Result<Contents, DatapathError> {
        Ok(self.contents.clone())
    }

    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        let attempt = self.attempts;
        self.attempts += 1;
        if self.fail_at == Some(attempt) {
            return Err(DatapathError::Write {
                op: Box::new(op.clone()),
                source: "injected failure".into(),
            });
        }
        if self.full(op) {
            return Err(DatapathError::Write {
                op: Box::new(op.clone()),
                source: "map full (E2BIG)".into(),
            });
        }
        self.contents.apply(op);
        self.log.push(op.clone());
        if let Err(e) = self.contents.check_lookups() {
            panic!("after {op:?} a lookup could see a half-written service: {e}");
        }
        Ok(())
    }

    fn capacities(&self) -> Capacities {
        self.caps
    }
}
