//! Line-rate traffic for the north-south benchmark, made by the kernel: a small XDP program
//! returning `XDP_TX`, run by `BPF_PROG_TEST_RUN` in live-frames mode on a veth, transmits
//! the same frame `repeat` times to the veth's peer (as a NIC would deliver it); and a
//! two-instruction sink that drops at tc ingress (TCX), after the stack built the packet's
//! skb. No ELF object, no userspace per packet.
//!
//! Live-frames mode recycles its pages without copying the frame in again, and whoever
//! receives a frame may rewrite it in place (a load balancer translating it does), so the
//! generator writes the whole frame back into the page before every transmission, from
//! store-immediate instructions built for the frame.
//!
//! Both act on devices of the calling thread's network namespace: run them inside the
//! sandbox (`ip netns exec`).

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// `XDP_DROP`.
const XDP_DROP: i32 = 1;
/// `XDP_TX`.
const XDP_TX: i32 = 3;
/// `TC_ACT_SHOT`.
const TC_ACT_SHOT: i32 = 2;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed, 128-byte bpf_attr laid out for `cmd`; the kernel reads at
    // most its size, which is passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Stores a u32 at byte `offset` of a bpf_attr (little- or big-endian as the host).
fn put32(attr: &mut [u64; 16], offset: usize, value: u32) {
    let word = &mut attr[offset / 8];
    let mut bytes = word.to_ne_bytes();
    bytes[offset % 8..offset % 8 + 4].copy_from_slice(&value.to_ne_bytes());
    *word = u64::from_ne_bytes(bytes);
}

fn fd(rc: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// One `struct bpf_insn`: code, dst and src registers (4 bits each; the low nibble is dst on
/// little-endian hosts), offset, immediate.
#[cfg(target_endian = "little")]
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = dst | (src << 4);
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}

const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x61;
const ST_W: u8 = 0x62;
const ST_H: u8 = 0x6a;
const ST_B: u8 = 0x72;
const JGT_REG: u8 = 0x2d;
const EXIT: u8 = 0x95;

/// The generator's instructions: if the frame holds `frame.len()` bytes, write `frame` into
/// it and return `XDP_TX`; otherwise `XDP_DROP`.
fn generator(frame: &[u8]) -> Vec<[u8; 8]> {
    let mut stores = Vec::new();
    let mut at = 0;
    while at < frame.len() {
        let rest = &frame[at..];
        let (code, width, imm) = match rest.len() {
            4.. => (
                ST_W,
                4,
                i32::from_ne_bytes(rest[..4].try_into().expect("4 bytes")),
            ),
            2 | 3 => (
                ST_H,
                2,
                i32::from(i16::from_ne_bytes(rest[..2].try_into().expect("2 bytes"))),
            ),
            _ => (ST_B, 1, i32::from(rest[0] as i8)),
        };
        stores.push(insn(code, 2, 0, at as i16, imm));
        at += width;
    }
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0), // r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0), // r3 = ctx->data_end
        insn(MOV64_REG, 4, 2, 0, 0),
        insn(ADD64_IMM, 4, 0, 0, frame.len() as i32),
        // if r2 + len > data_end: skip the stores and XDP_TX, to XDP_DROP.
        insn(JGT_REG, 4, 3, stores.len() as i16 + 2, 0),
    ];
    p.extend(stores);
    p.extend([
        insn(MOV64_IMM, 0, 0, 0, XDP_TX),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_IMM, 0, 0, 0, XDP_DROP),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// Loads the generator for `frame` (at most 256 bytes): an XDP program that writes the frame
/// and returns `XDP_TX`.
pub fn load_generator(frame: &[u8]) -> io::Result<OwnedFd> {
    if frame.len() > 256 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    load(BPF_PROG_TYPE_XDP, 0, &generator(frame))
}

/// Loads the sink: a tc program that drops (to attach with [`attach_tc_ingress`]).
pub fn load_sink() -> io::Result<OwnedFd> {
    let insns = [
        insn(MOV64_IMM, 0, 0, 0, TC_ACT_SHOT),
        insn(EXIT, 0, 0, 0, 0),
    ];
    load(BPF_PROG_TYPE_SCHED_CLS, BPF_TCX_INGRESS, &insns)
}

/// Loads a program of `prog_type` made of `insns`.
fn load(prog_type: u32, attach_type: u32, insns: &[[u8; 8]]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u64; 16];
    put32(&mut attr, 0, prog_type);
    put32(&mut attr, 4, insns.len() as u32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    put32(&mut attr, 68, attach_type); // expected_attach_type
    bpf(BPF_PROG_LOAD, &mut attr).map(fd)
}

/// Attaches the sink at tc ingress (TCX) of device `ifindex` through a BPF link; it stays
/// attached while the returned link is open.
pub fn attach_tc_ingress(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let mut attr = [0u64; 16];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, ifindex);
    put32(&mut attr, 8, BPF_TCX_INGRESS);
    bpf(BPF_LINK_CREATE, &mut attr).map(fd)
}

/// Runs `prog` (an `XDP_TX` program) `repeat` times on `frame` as received on `ifindex`, in
/// live-frames mode: each run transmits the frame out of that device. Returns how long it
/// took.
pub fn transmit(prog: &OwnedFd, frame: &[u8], ifindex: u32, repeat: u32) -> io::Result<Duration> {
    use std::os::fd::AsRawFd as _;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut attr = [0u64; 16];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 8, frame.len() as u32);
    attr[2] = frame.as_ptr() as u64;
    put32(&mut attr, 32, repeat);
    put32(&mut attr, 40, size_of_val(&ctx) as u32);
    attr[6] = ctx.as_ptr() as u64;
    put32(&mut attr, 64, BPF_F_TEST_XDP_LIVE_FRAMES);
    // batch_size 0: the kernel's default (64 frames per batch).
    let started = Instant::now();
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_fields_land_at_their_offsets() {
        let mut attr = [0u64; 16];
        put32(&mut attr, 4, 7);
        put32(&mut attr, 64, 9);
        let bytes: Vec<u8> = attr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(u32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(bytes[64..68].try_into().unwrap()), 9);
        assert_eq!(bytes.iter().filter(|b| **b != 0).count(), 2);
    }

    #[test]
    fn the_generator_stores_every_byte_of_the_frame() {
        let frame: Vec<u8> = (1..=7).collect();
        let p = generator(&frame);
        // 5 to check the length, a word, a half word and a byte, then 4 to return.
        assert_eq!(p.len(), 5 + 3 + 4);
        assert_eq!(p[4], insn(JGT_REG, 4, 3, 5, 0), "skips to XDP_DROP");
        assert_eq!(p[5], insn(ST_W, 2, 0, 0, i32::from_ne_bytes([1, 2, 3, 4])));
        assert_eq!(
            p[6],
            insn(ST_H, 2, 0, 4, i32::from(i16::from_ne_bytes([5, 6])))
        );
        assert_eq!(p[7], insn(ST_B, 2, 0, 6, 7));
        assert_eq!(p[10], insn(MOV64_IMM, 0, 0, 0, XDP_DROP));
    }
}
