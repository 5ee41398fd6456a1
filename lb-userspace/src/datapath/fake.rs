//! An in-memory datapath for tests: it enforces capacities like the kernel, can fail a
//! chosen write, and checks after every write that lookups see only whole services, and
//! that every lookup begun since the last grace period still sees the table it began with.

use lb_common::{Backend, ServiceValue, external::ExternalService};

use super::{Capacities, Contents, Datapath, DatapathError, Op};

/// A service entry as a program may have read it since the last grace period, with the
/// backends its table held then.
#[derive(Debug)]
enum Reader {
    Socket(ServiceValue, Vec<Option<Backend>>),
    External(ExternalService, Vec<Option<Backend>>),
}

impl Reader {
    fn socket(c: &Contents, v: &ServiceValue) -> Self {
        let table = (0..u32::from(v.count))
            .map(|i| {
                let key = lb_common::SlotKey::new(v.id, v.slot_gen(), i);
                c.slots.get(&key).and_then(|b| c.backends.get(b)).copied()
            })
            .collect();
        Self::Socket(*v, table)
    }

    fn external(c: &Contents, v: &ExternalService) -> Self {
        let table = c
            .table_of(v)
            .unwrap_or_default()
            .iter()
            .map(|b| c.backends.get(b).copied())
            .collect();
        Self::External(*v, table)
    }

    /// Whether the table this reader began with is still there, unchanged.
    fn check(&self, c: &Contents) -> Result<(), String> {
        let (now, then) = match self {
            Self::Socket(v, then) => (Self::socket(c, v), then),
            Self::External(v, then) => (Self::external(c, v), then),
        };
        let (Self::Socket(_, now) | Self::External(_, now)) = now;
        if &now != then {
            return Err(format!(
                "a lookup that read {self:?} before the last grace period now finds {now:?}"
            ));
        }
        Ok(())
    }
}

/// The in-memory datapath.
#[derive(Debug)]
pub struct FakeDatapath {
    /// What the maps hold.
    pub contents: Contents,
    /// Every write performed, in order.
    pub log: Vec<Op>,
    /// Fail the write with this index in `log` order (counting attempts).
    pub fail_at: Option<usize>,
    /// Grace periods asked for.
    pub graces: usize,
    /// Grace periods that have ended.
    pub graces_ended: usize,
    /// Whether a grace period ends only when waited for or ended by [`Self::end_graces`]
    /// (else at once).
    pub slow_graces: bool,
    attempts: usize,
    caps: Capacities,
    /// Every service entry written since the last grace period.
    readers: Vec<Reader>,
}

impl FakeDatapath {
    /// An empty datapath with these capacities.
    pub fn new(caps: Capacities) -> Self {
        Self::with_contents(caps, Contents::default())
    }

    /// A datapath that already holds `contents` (as after an agent restart).
    pub fn with_contents(caps: Capacities, contents: Contents) -> Self {
        let mut fake = Self {
            contents,
            log: Vec::new(),
            fail_at: None,
            graces: 0,
            graces_ended: 0,
            slow_graces: false,
            attempts: 0,
            caps,
            readers: Vec::new(),
        };
        fake.readers = fake.current_readers();
        fake
    }

    /// Ends every grace period asked for: the lookups begun so far are over.
    pub fn end_graces(&mut self) {
        self.graces_ended = self.graces;
        self.readers = self.current_readers();
    }

    /// The entries lookups can read now, with their tables.
    fn current_readers(&self) -> Vec<Reader> {
        let c = &self.contents;
        let socket = c.services.values().map(|v| Reader::socket(c, v));
        socket
            .chain(c.external.values().map(|v| Reader::external(c, v)))
            .collect()
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
            Op::PutExternalMatch(k, _) => {
                !c.external_match.contains_key(k)
                    && c.external_match.len() >= self.caps.external_match as usize
            }
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
        let c = &self.contents;
        match op {
            Op::PutService(_, v) => self.readers.push(Reader::socket(c, v)),
            Op::PutExternal(_, v) => self.readers.push(Reader::external(c, v)),
            _ => {}
        }
        for r in &self.readers {
            if let Err(e) = r.check(&self.contents) {
                panic!("after {op:?}: {e}");
            }
        }
        Ok(())
    }

    fn capacities(&self) -> Capacities {
        self.caps
    }

    fn begin_grace(&mut self) -> u64 {
        self.graces += 1;
        if !self.slow_graces {
            self.end_graces();
        }
        self.graces as u64
    }

    fn graces_ended(&self) -> u64 {
        self.graces_ended as u64
    }

    fn wait_grace(&mut self, _n: u64) -> Result<(), DatapathError> {
        self.end_graces();
        Ok(())
    }
}
