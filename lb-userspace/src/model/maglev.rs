//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table a north-south
//! service's new flows pick their backend from. Pure, no I/O.
//!
//! Each backend has a preference list, a permutation of the table's positions given by an
//! offset and a skip derived from two hashes of its address and port. The table is filled in
//! rounds: in each round every backend takes its next preferred position that is still free
//! (a backend of weight `w` takes `w` positions per round). So with equal weights every
//! backend gets `M/N` positions give or take one, and when one backend goes away the others
//! keep almost all of theirs: close to `1/N` of the positions change.
//!
//! Every node computes the same table for the same backends and table size: the hashes
//! depend only on the backends' addresses and ports (XXH64 with fixed seeds), never on
//! node-local ids or on the order the backends are given in.

use lb_common::Endpoint;
use xxhash_rust::xxh64::xxh64;

/// Smallest table size accepted.
pub const MIN_TABLE_SIZE: u32 = 7;
/// Largest table size accepted (a prime; the table is indexed by a 32-bit hash).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Whether `n` is prime.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// A Maglev table size the datapath cannot use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableSizeError {
    /// Outside [`MIN_TABLE_SIZE`, `MAX_TABLE_SIZE`].
    #[error("the Maglev table size {0} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}")]
    OutOfRange(u32),
    /// Not a prime, so the permutations would not cover the table.
    #[error("the Maglev table size {0} is not a prime (e.g. 251, 1021, 4093, 16381, 65537)")]
    NotPrime(u32),
}

/// Checks a table size: a prime within [`MIN_TABLE_SIZE`, `MAX_TABLE_SIZE`].
pub fn check_table_size(m: u32) -> Result<(), TableSizeError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) {
        return Err(TableSizeError::OutOfRange(m));
    }
    if !is_prime(m) {
        return Err(TableSizeError::NotPrime(m));
    }
    Ok(())
}

/// The table sizes a service's table is chosen from: primes, each about twice the last.
pub const SIZE_CLASSES: [u32; 13] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071, 262_139, 524_287, 1_048_573,
];

/// The table size for a service of `backends` backends: the smallest of [`SIZE_CLASSES`] with
/// at least `per_backend` entries per backend, or `max` (itself a valid size) when that is
/// smaller. Sizing from the backend count keeps a small service's table small: the spread
/// stays even (every backend holds `M/N` entries give or take one) while memory follows the
/// service, at the cost of more entries moving between the remaining backends when one
/// leaves than a large table would have (see docs/north-south.md).
pub fn table_size(backends: usize, per_backend: u32, max: u32) -> u32 {
    let want = (backends as u64).max(1) * u64::from(per_backend.max(1));
    SIZE_CLASSES
        .iter()
        .copied()
        .find(|m| u64::from(*m) >= want)
        .map_or(max, |m| m.min(max))
}

/// The bytes a backend is hashed by: its address (16 bytes, IPv4 v4-mapped) and port.
fn identity(ep: &Endpoint) -> [u8; 18] {
    let mut b = [0u8; 18];
    for (i, w) in ep.addr.words.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b[16..].copy_from_slice(&ep.port_be.to_ne_bytes());
    b
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The lookup table of size `m` (a prime, checked by [`check_table_size`]) for `backends`
/// with their weights: each position holds an index into `backends`. Backends of weight 0
/// get no position; with no backend of positive weight the table is empty.
pub fn table(backends: &[(Endpoint, u32)], m: u32) -> Vec<u32> {
    debug_assert!(is_prime(m), "table size {m} must be prime");
    // Visit backends in a canonical order (by identity), so the caller's order does not
    // matter; equal weights are reduced to 1 so rounds stay short.
    let mut order: Vec<(usize, [u8; 18])> = backends
        .iter()
        .enumerate()
        .filter(|(_, (_, w))| *w > 0)
        .map(|(i, (ep, _))| (i, identity(ep)))
        .collect();
    if order.is_empty() {
        return Vec::new();
    }
    order.sort_by_key(|a| a.1);
    order.dedup_by(|a, b| a.1 == b.1);
    let common = order
        .iter()
        .map(|(i, _)| backends[*i].1)
        .fold(0, gcd)
        .max(1);
    let m64 = u64::from(m);
    struct Pref {
        index: u32,
        weight: u32,
        offset: u64,
        skip: u64,
        next: u64,
    }
    let mut prefs: Vec<Pref> = order
        .iter()
        .map(|(i, id)| Pref {
            index: *i as u32,
            weight: backends[*i].1 / common,
            offset: xxh64(id, 0) % m64,
            skip: xxh64(id, 1) % (m64 - 1) + 1,
            next: 0,
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut entries = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    loop {
        for p in &mut prefs {
            for _ in 0..p.weight {
                // The permutation visits every position once in `m` steps (m is prime and
                // 0 < skip < m), so a free one is always found while the table is not full.
                let mut pos = (p.offset + p.next * p.skip) % m64;
                while entries[pos as usize] != EMPTY {
                    p.next += 1;
                    pos = (p.offset + p.next * p.skip) % m64;
                }
                entries[pos as usize] = p.index;
                p.next += 1;
                filled += 1;
                if filled == m {
                    return entries;
                }
            }
        }
    }
}

/// How many positions of `table` each backend index holds (index -> count), for summaries.
pub fn shares(table: &[u32], backends: usize) -> Vec<u32> {
    let mut counts = vec![0u32; backends];
    for &i in table {
        if let Some(c) = counts.get_mut(i as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::addr::to_endpoint;

    fn ep(i: u32) -> Endpoint {
        to_endpoint(SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 8080)))
    }

    fn equal(n: u32) -> Vec<(Endpoint, u32)> {
        (1..=n).map(|i| (ep(i), 1)).collect()
    }

    /// The table as endpoints, so tables of different backend lists compare.
    fn resolved(backends: &[(Endpoint, u32)], m: u32) -> Vec<Endpoint> {
        table(backends, m)
            .into_iter()
            .map(|i| backends[i as usize].0)
            .collect()
    }

    #[test]
    fn table_sizes_must_be_prime_and_in_range() {
        for m in [7, 251, 1021, 4093, 16381, 65537] {
            assert_eq!(check_table_size(m), Ok(()), "{m}");
        }
        for m in [0, 1, 5, 16384, 65536, 2_000_003] {
            assert!(check_table_size(m).is_err(), "{m}");
        }
    }

    #[test]
    fn size_classes_are_valid_sizes() {
        for m in SIZE_CLASSES {
            assert_eq!(check_table_size(m), Ok(()), "{m}");
        }
        assert!(SIZE_CLASSES.windows(2).all(|w| w[1] > w[0] * 19 / 10));
    }

    #[test]
    fn tables_are_sized_from_the_backend_count() {
        let max = 16381;
        assert_eq!(table_size(0, 100, max), 251);
        assert_eq!(table_size(1, 100, max), 251);
        assert_eq!(table_size(3, 100, max), 509);
        assert_eq!(table_size(10, 100, max), 1021);
        assert_eq!(table_size(11, 100, max), 2039);
        assert_eq!(table_size(100, 100, max), 16381);
        assert_eq!(table_size(5000, 100, max), max, "capped");
        assert_eq!(table_size(10, 1000, 65521), 16381);
        assert_eq!(table_size(3, 100, 61), 61, "a smaller maximum wins");
    }

    #[test]
    fn every_backend_gets_its_share_within_one_position() {
        for (n, m) in [(1, 251), (3, 251), (10, 16381), (100, 16381), (1000, 65537)] {
            let backends = equal(n);
            let t = table(&backends, m);
            assert_eq!(t.len(), m as usize);
            let shares = shares(&t, n as usize);
            let (lo, hi) = (m / n, m.div_ceil(n));
            for (i, s) in shares.iter().enumerate() {
                assert!(
                    (lo..=hi).contains(s),
                    "n={n} m={m}: backend {i} holds {s}, expected {lo}..={hi}"
                );
            }
        }
    }

    /// Positions that change when backend `removed` of `n` leaves a table of size `m`, as
    /// a multiple of `m/n` (1.0: only the removed backend's own positions).
    fn disruption(n: u32, m: u32, removed: usize) -> f64 {
        let before_set = equal(n);
        let before = resolved(&before_set, m);
        let mut after_set = before_set.clone();
        let gone = after_set.remove(removed).0;
        let after = resolved(&after_set, m);
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(b, a)| b != &gone || a != &gone),
            "every position of the removed backend moves"
        );
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        changed as f64 / (f64::from(m) / f64::from(n))
    }

    #[test]
    fn removing_one_backend_moves_close_to_one_nth_of_the_positions() {
        // The paper's advice, a table over 100 times the backends, keeps the change within
        // twice the removed backend's share; a much larger table, within a quarter more.
        for (n, m, bound) in [
            (5u32, 16381u32, 1.25),
            (10, 16381, 1.25),
            (50, 16381, 2.0),
            (100, 65537, 2.0),
        ] {
            for removed in [0, n as usize / 2, n as usize - 1] {
                let d = disruption(n, m, removed);
                assert!(
                    d <= bound,
                    "n={n} m={m}: removing backend {removed} changed {d:.2} x m/n positions"
                );
            }
        }
    }

    #[test]
    fn adding_one_backend_moves_close_to_one_nth_of_the_positions() {
        let (n, m) = (20u32, 16381u32);
        let before = resolved(&equal(n), m);
        let after = resolved(&equal(n + 1), m);
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(
            (changed as f64) <= 1.25 * f64::from(m) / f64::from(n + 1),
            "{changed} of {m} positions changed"
        );
    }

    #[test]
    fn the_table_does_not_depend_on_the_order_backends_are_given_in() {
        let mut backends = equal(7);
        let a = resolved(&backends, 1021);
        backends.reverse();
        backends.swap(1, 4);
        assert_eq!(resolved(&backends, 1021), a);
    }

    #[test]
    fn weights_divide_the_table_in_proportion() {
        let backends = vec![(ep(1), 1), (ep(2), 3), (ep(3), 0)];
        let m = 16381;
        let shares = shares(&table(&backends, m), 3);
        assert_eq!(shares[2], 0, "weight 0 gets nothing");
        assert_eq!(shares[0] + shares[1], m);
        let ratio = f64::from(shares[1]) / f64::from(shares[0]);
        assert!((2.9..3.1).contains(&ratio), "{shares:?}");
        // Equal weights of any size are the same as weight 1.
        let heavy: Vec<(Endpoint, u32)> = equal(4).into_iter().map(|(e, _)| (e, 5)).collect();
        assert_eq!(table(&heavy, 251), table(&equal(4), 251));
    }

    #[test]
    fn no_backend_is_an_empty_table() {
        assert!(table(&[], 251).is_empty());
        assert!(table(&[(ep(1), 0)], 251).is_empty());
    }
}
