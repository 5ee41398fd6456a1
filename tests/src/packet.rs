//! Frames for BPF_PROG_TEST_RUN: the builder and checking parser live in the agent's crate
//! (`lbctl explain` runs the XDP program on a built frame too); the tests use them from here.

pub use lb_userspace::cli::packet::*;
