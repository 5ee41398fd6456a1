//! Datapath counters: indexes into the per-CPU stats map ([`crate::maps::STATS`]).
//!
//! Counters, not logs, are the production signal: every outcome of a hook that translated,
//! refused or failed to translate has one.

/// A connect() to a service was translated to a backend.
pub const CONNECT_TRANSLATED: u32 = 0;
/// A UDP sendmsg() to a service was translated to a backend.
pub const SENDMSG_TRANSLATED: u32 = 1;
/// A connect() or sendmsg() to a service with no backends was refused (ECONNREFUSED).
pub const REFUSED_NO_BACKEND: u32 = 2;
/// A received datagram's source or a socket's peer was restored to the service address.
pub const REVERSED: u32 = 3;
/// A service's slot was missing (the agent was mid-update or the maps are inconsistent); the
/// socket was left untranslated.
pub const ERR_SLOT_MISSING: u32 = 4;
/// A slot named a backend that does not exist; the socket was left untranslated.
pub const ERR_BACKEND_MISSING: u32 = 5;
/// A backend's address family did not fit the socket; the socket was left untranslated.
pub const ERR_FAMILY_MISMATCH: u32 = 6;
/// The reverse-NAT entry could not be written: the reply source or peer name will show the
/// backend rather than the service.
pub const ERR_REV_NAT_UPDATE: u32 = 7;
/// A connection of a client with session affinity went to its remembered backend.
pub const AFFINITY_HIT: u32 = 8;
/// The affinity entry could not be written: the client's next connection may pick anew.
pub const ERR_AFFINITY_UPDATE: u32 = 9;
/// Number of counters.
pub const COUNT: u32 = 10;

/// Counter names for display, indexed like the constants.
pub const NAMES: [&str; COUNT as usize] = [
    "connect_translated",
    "sendmsg_translated",
    "refused_no_backend",
    "reversed",
    "err_slot_missing",
    "err_backend_missing",
    "err_family_mismatch",
    "err_rev_nat_update",
    "affinity_hit",
    "err_affinity_update",
];
