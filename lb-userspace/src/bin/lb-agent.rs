//! lb-agent: keeps the socket-level service load balancer programmed. See `--help`.

use clap::Parser as _;
use lb_userspace::{agent, agent::config, agent::privileges};

fn main() -> std::process::ExitCode {
    let args = config::AgentArgs::parse();
    config::init_logging(args.log_format);
    // Before any other thread exists: threads inherit the set.
    match privileges::limit(&privileges::startup()) {
        Ok(l) => {
            tracing::info!(dropped = ?l.dropped, kept = ?l.kept, "capabilities limited for start-up");
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot limit the capabilities; running with all of them");
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The blocking pool's threads (map reads for metrics, stale UDP sockets) never need
        // the start-up capabilities: they start with the running set, whenever they start.
        .on_thread_start(|| {
            let _kept_all = privileges::limit(&privileges::RUNTIME);
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error with its causes: "a: b: c".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
