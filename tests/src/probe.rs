//! What `lb-probe` prints: one JSON line per attempt, parsed by the tests.

use std::io;

use serde::{Deserialize, Serialize};

/// One request: a connect (or a datagram) and its answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The name of the backend that answered.
    pub backend: Option<String>,
    /// The client address the backend saw.
    pub client: Option<String>,
    /// The peer as the client sees it: `getpeername()` for connected sockets, the reply's
    /// source for unconnected UDP.
    pub peer: Option<String>,
    /// The error, by errno name, when the attempt failed.
    pub error: Option<String>,
    /// How long the attempt took, in microseconds.
    pub micros: u64,
}

/// Backend names, for comparing with what answered: `names(&["b0", "b1"])`.
pub fn names(list: &[&str]) -> std::collections::BTreeSet<String> {
    list.iter().map(std::string::ToString::to_string).collect()
}

impl Attempt {
    /// The backends that answered these attempts; panics on any failed attempt.
    pub fn backends(attempts: &[Self]) -> std::collections::BTreeSet<String> {
        attempts
            .iter()
            .map(|a| {
                assert_eq!(a.error, None, "answered: {a:?}");
                a.backend.clone().expect("answered")
            })
            .collect()
    }

    /// Parses `lb-probe` output.
    pub fn parse_all(stdout: &str) -> Vec<Self> {
        stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}"))
            })
            .collect()
    }
}

/// The errno name of an I/O error, as [`Attempt::error`] reports it.
pub fn errno_name(e: &io::Error) -> String {
    match (e.raw_os_error(), e.kind()) {
        (Some(libc::ECONNREFUSED), _) => "ECONNREFUSED".into(),
        (Some(libc::ENETUNREACH), _) => "ENETUNREACH".into(),
        (Some(libc::EHOSTUNREACH), _) => "EHOSTUNREACH".into(),
        (Some(libc::ECONNRESET), _) => "ECONNRESET".into(),
        (Some(libc::EPERM), _) => "EPERM".into(),
        (Some(libc::ECONNABORTED), _) => "ECONNABORTED".into(),
        (Some(libc::EDESTADDRREQ), _) => "EDESTADDRREQ".into(),
        (_, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => "ETIMEDOUT".into(),
        (_, io::ErrorKind::UnexpectedEof) => "EOF".into(),
        (Some(n), _) => format!("errno {n}"),
        (None, _) => e.to_string(),
    }
}
