//! The programs' decisions as log lines (aya-log), off unless the agent runs with
//! `--kernel-debug`.
//!
//! aya-log's level is a read-only global (`AYA_LOG_LEVEL`) the loader sets before
//! verification: 0 (nothing) unless `--kernel-debug`, then debug. The verifier knows its
//! value, so when it is off the logging code is dead and removed from the programs: no cost
//! at all (a test compares the translated programs). When on, each line is a record in
//! aya-log's ring buffer (`AYA_LOGS`) that the agent reads and logs.

/// Logs one decision at debug level under the `lb_ebpf` target: `decision!("fmt", args..)`,
/// with aya-log's format hints (`{}`, `{:x}`, `{:i}`). aya-log-ebpf 0.2 takes a context it
/// does not use; the helpers that decide have none, so a unit stands in.
macro_rules! decision {
    ($($arg:tt)+) => {
        aya_log_ebpf::debug!(&(), target: "lb_ebpf", $($arg)+)
    };
}
pub(crate) use decision;
