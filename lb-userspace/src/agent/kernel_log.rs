//! The programs' log lines (`--kernel-debug`, aya-log) into the agent's log.

use tracing::{info, warn};

/// Where the programs' log lines go: the agent's log, at info level (the programs only log
/// when asked to with `--kernel-debug`), target `lb_ebpf`.
pub(super) struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        info!(target: "lb_ebpf", "kernel: {}", record.args());
    }

    fn flush(&self) {}
}

/// Logs the programs' decisions as they come (`--kernel-debug`).
pub(super) async fn log_kernel_decisions(logger: aya_log::EbpfLogger<KernelLog>) {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns its ring buffer's file descriptor, open until it is dropped
    // with the AsyncFd, and always returns that descriptor.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot read the programs' log");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                warn!(error = %e, "cannot read the programs' log");
                return;
            }
        };
        // aya-log panics on a record it cannot parse: stop logging rather than lose the task
        // silently.
        let logger = guard.get_inner_mut();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
            warn!("a malformed record in the programs' log: kernel logging stops");
            return;
        }
        guard.clear_ready();
    }
}
