//! One address format for both families.

/// An IP address as the kernel's `bpf_sock_addr.user_ip6` holds it: four 32-bit words whose
/// bytes are in network order. IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`), so one
/// service table serves both families and an IPv6 socket connecting to a v4-mapped service
/// address finds the IPv4 service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr6 {
    /// The address bytes, four at a time, in memory (network) order.
    pub words: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<Addr6>() == 16);
const _: () = assert!(core::mem::align_of::<Addr6>() == 4);

/// The third word of a v4-mapped address: bytes `00 00 ff ff`.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr6 {
    /// The v4-mapped form of an IPv4 address given as `bpf_sock_addr.user_ip4` holds it
    /// (network byte order in memory).
    #[inline(always)]
    pub const fn v4_mapped(ip4_be: u32) -> Self {
        Self {
            words: [0, 0, V4_MAPPED_WORD, ip4_be],
        }
    }

    /// Whether this is a v4-mapped IPv4 address.
    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address of a v4-mapped address, in network byte order in memory.
    #[inline(always)]
    pub const fn v4_be(&self) -> u32 {
        self.words[3]
    }

    /// The address from its 16 bytes in network order (`Ipv6Addr::octets`).
    pub const fn from_octets(b: [u8; 16]) -> Self {
        Self {
            words: [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ],
        }
    }

    /// The 16 bytes in network order.
    pub const fn octets(&self) -> [u8; 16] {
        let w = self.words;
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trip() {
        let ip4_be = u32::from_ne_bytes([10, 96, 0, 10]);
        let a = Addr6::v4_mapped(ip4_be);
        assert!(a.is_v4_mapped());
        assert_eq!(a.v4_be(), ip4_be);
        assert_eq!(
            a.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(Addr6::from_octets(a.octets()), a);
    }

    #[test]
    fn v6_is_not_v4_mapped() {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[15] = 1;
        let a = Addr6::from_octets(b);
        assert!(!a.is_v4_mapped());
        assert_eq!(a.octets(), b);
    }
}
