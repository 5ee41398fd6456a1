//! Every byte that crosses the kernel/userspace boundary.
//!
//! The kernel programs (`lb-ebpf`) and the agent and CLI (`lb-userspace`) both use these
//! types, so their layout is defined once. Rules, checked by the `const` assertions under
//! each type:
//! - `#[repr(C)]`, `Copy`, only fixed-width integers and arrays; no `bool`, `Option` or enum;
//! - explicit `_pad` fields, zeroed by the constructors (padding in a hash key is hashed);
//! - values in network byte order carry it in their name (`port_be`) or type ([`Addr6`]);
//! - alignment of at most 8.
//!
//! With the `user` feature, every map key and value implements `aya::Pod`.
#![no_std]

pub mod addr;
pub mod external;
pub mod maps;
pub mod service;
pub mod stats;

pub use addr::Addr6;
pub use service::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
    ServiceKey, ServiceValue, SlotKey, UdpSocket, node,
};

/// IANA protocol numbers, as the kernel reports them in `bpf_sock_addr.protocol`.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

#[cfg(feature = "user")]
mod pod {
    use crate::{
        AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
        ServiceKey, ServiceValue, SlotKey,
    };

    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and integer
    // arrays, with every padding byte an explicit field (see the size assertions).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for crate::UdpSocket {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for crate::external::ExternalService {}
    unsafe impl aya::Pod for crate::external::FlowKey {}
    unsafe impl aya::Pod for crate::external::CtEntry {}
    unsafe impl aya::Pod for crate::external::CtEntryV1 {}
    unsafe impl aya::Pod for crate::external::CtTimeouts {}
    unsafe impl aya::Pod for crate::external::FlowRevNat {}
    unsafe impl aya::Pod for crate::external::SourceRange {}
    unsafe impl aya::Pod for crate::external::ExternalCounters {}
    unsafe impl aya::Pod for crate::external::ExternalAffinityKey {}
    unsafe impl aya::Pod for crate::external::ExternalAffinityValue {}
    unsafe impl aya::Pod for crate::external::ExternalAffinityMatchKey {}
    unsafe impl aya::Pod for crate::stats::SocketCounters {}
}
