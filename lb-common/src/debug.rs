//! Kernel-side debug events: what a hook decided, sent through the debug ring buffer
//! ([`crate::maps::DEBUG_EVENTS`]) only when the agent runs with `--kernel-debug`; the agent
//! logs them.

/// The load-time global (`u8`, 0 or 1) that turns the events on: `lb-ebpf`'s `DEBUG`, set by
/// the loader from `--kernel-debug`. Off, the verifier removes the code behind it.
pub const DEBUG_GLOBAL: &str = "DEBUG";

/// A connect() or unconnected datagram to socket-level service `id` went to backend `arg`.
pub const SOCKET_TRANSLATED: u32 = 1;
/// A connect() or sendmsg() to socket-level service `id` was refused: no backend.
pub const SOCKET_REFUSED: u32 = 2;
/// A new north-south flow of service `id` went to backend `arg`.
pub const XDP_NEW_FLOW: u32 = 3;
/// A packet of north-south service `id` was dropped; `arg` is the reason (a
/// [`crate::stats`] counter index).
pub const XDP_DROP: u32 = 4;

/// One event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugEvent {
    /// What happened (the constants above).
    pub kind: u32,
    /// The service id.
    pub id: u32,
    /// The backend id or reason.
    pub arg: u32,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<DebugEvent>() == 16);

impl DebugEvent {
    /// What `kind` is called in logs.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SOCKET_TRANSLATED => "socket_translated",
            SOCKET_REFUSED => "socket_refused",
            XDP_NEW_FLOW => "xdp_new_flow",
            XDP_DROP => "xdp_drop",
            _ => "unknown",
        }
    }
}
