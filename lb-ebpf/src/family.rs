//! IPv4 and IPv6 views of a socket address, so the translation logic is written once.
//!
//! `addr` reads the address the hook is about: the destination for connect/sendmsg, the
//! peer for recvmsg/getpeername. All addresses are handled in the v4-mapped [`Addr6`] form.

use aya_ebpf::bindings::bpf_sock_addr;
use lb_common::Addr6;

/// One address family's fields of `bpf_sock_addr`.
pub trait Family {
    /// The address in v4-mapped form.
    fn addr(sa: &bpf_sock_addr) -> Addr6;
    /// Writes `addr`; returns false, writing nothing, when it cannot be expressed in this
    /// family (an IPv6 address on an IPv4 socket).
    fn set_addr(sa: &mut bpf_sock_addr, addr: &Addr6) -> bool;
}

/// `user_ip4`.
pub struct V4;
/// `user_ip6`, which also carries v4-mapped addresses of dual-stack sockets.
pub struct V6;

impl Family for V4 {
    #[inline(always)]
    fn addr(sa: &bpf_sock_addr) -> Addr6 {
        Addr6::v4_mapped(sa.user_ip4)
    }

    #[inline(always)]
    fn set_addr(sa: &mut bpf_sock_addr, addr: &Addr6) -> bool {
        if !addr.is_v4_mapped() {
            return false;
        }
        sa.user_ip4 = addr.v4_be();
        true
    }
}

impl Family for V6 {
    #[inline(always)]
    fn addr(sa: &bpf_sock_addr) -> Addr6 {
        // The verifier accepts 4-byte accesses to each word of user_ip6: keep them so.
        let p = sa.user_ip6.as_ptr();
        // SAFETY: reads of the four words of a valid context field.
        unsafe {
            Addr6 {
                words: [
                    p.read_volatile(),
                    p.add(1).read_volatile(),
                    p.add(2).read_volatile(),
                    p.add(3).read_volatile(),
                ],
            }
        }
    }

    #[inline(always)]
    fn set_addr(sa: &mut bpf_sock_addr, addr: &Addr6) -> bool {
        let p = sa.user_ip6.as_mut_ptr();
        // SAFETY: writes of the four words of a valid, writable context field.
        unsafe {
            p.write_volatile(addr.words[0]);
            p.add(1).write_volatile(addr.words[1]);
            p.add(2).write_volatile(addr.words[2]);
            p.add(3).write_volatile(addr.words[3]);
        }
        true
    }
}
