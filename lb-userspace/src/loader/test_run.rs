//! Running the XDP program on a frame with `BPF_PROG_TEST_RUN` (`lbctl explain`, the fixtures).

use aya::programs::{
    ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp,
    links::{FdLink, PinnedLink},
};
use lb_common::external::XDP_DRY_RUN;

use super::{
    LoadError, Loaded, OVERLAY_PROGRAM, TC_PROGRAM, XDP_LINK_PREFIX, XDP_PROGRAM, pins::PinLayout,
    program,
};

impl Loaded {
    /// Runs the packet program `name` ([`XDP_PROGRAM`], [`XDP_PASS_PROGRAM`], [`TC_PROGRAM`]
    /// or [`OVERLAY_PROGRAM`]) on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times, as if it arrived
    /// on (XDP) or left by (tc) device `ifindex` (0: loopback) of the calling thread's
    /// network namespace. Returns what the program returned, the frame as it left it and
    /// the kernel's mean time per run. For tests and benchmarks.
    pub fn test_run(
        &mut self,
        name: &'static str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, LoadError> {
        let mut out = vec![0u8; frame.len() + 256];
        let perr = |source| LoadError::Program { name, source };
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; struct __sk_buff is only passed for its ifindex at offset 40.
        let mut ctx = Vec::new();
        let result = if name == TC_PROGRAM || name == OVERLAY_PROGRAM {
            let mut skb = [0u8; 192];
            skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            ctx.extend_from_slice(&skb);
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: (ifindex != 0).then_some(&ctx[..]),
                repeat,
                ..Default::default()
            };
            program::<SchedClassifier>(&mut self.ebpf, name)?
                .test_run(opts)
                .map_err(perr)?
        } else {
            return run_xdp(
                program::<Xdp>(&mut self.ebpf, name)?,
                frame,
                ifindex,
                repeat,
                false,
            )
            .map_err(perr);
        };
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value as i32,
            frame: out,
            duration: result.duration,
        })
    }
}

/// What one [`Loaded::test_run`] gave.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    /// The program's return value (XDP action, or tc verdict such as -1 for TCX_NEXT).
    pub verdict: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// Runs `prog` on `frame` with `BPF_PROG_TEST_RUN`, as if it arrived on device `ifindex`;
/// a dry run ([`XDP_DRY_RUN`] in the frame's metadata) when `dry`.
pub(super) fn run_xdp(
    prog: &Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    dry: bool,
) -> Result<TestRunOutput, ProgramError> {
    let meta = if dry {
        XDP_DRY_RUN.to_ne_bytes().to_vec()
    } else {
        Vec::new()
    };
    let data = [&meta[..], frame].concat();
    let mut out = vec![0u8; data.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; `data` is the metadata's length (offsets into `data_in`).
    let mut ctx = Vec::new();
    for word in [meta.len() as u32, data.len() as u32, 0, ifindex, 0, 0] {
        ctx.extend_from_slice(&word.to_ne_bytes());
    }
    let opts = TestRunOptions {
        data_in: Some(&data),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    let result = prog.test_run(opts)?;
    // The frame comes back after its metadata.
    out.truncate(result.data_size_out as usize);
    out.drain(..meta.len().min(out.len()));
    Ok(TestRunOutput {
        verdict: result.return_value as i32,
        frame: out,
        duration: result.duration,
    })
}

/// Runs the XDP program attached to `device` (through its pinned link) once on `frame`, as
/// if the frame arrived on that device: the datapath's own answer to where a packet goes.
/// A dry run ([`XDP_DRY_RUN`]): the program decides as for a packet but records no flow,
/// takes no SNAT port (an SNATed source shows port 0) and refreshes no flow; the global and
/// per-service counters count it like a packet.
pub fn run_attached_xdp(
    layout: &PinLayout,
    device: &str,
    ifindex: u32,
    frame: &[u8],
) -> Result<TestRunOutput, LoadError> {
    let name = XDP_PROGRAM;
    let pin = layout.links().join(format!("{XDP_LINK_PREFIX}{device}"));
    let link: FdLink = PinnedLink::from_pin(&pin)
        .map_err(|source| LoadError::Link { name, source })?
        .into();
    let id = link
        .info()
        .map_err(|source| LoadError::Link { name, source })?
        .program_id();
    let perr = |source| LoadError::Program { name, source };
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or_else(|| perr(ProgramError::NotLoaded))?;
    let prog = Xdp::from_program_info(
        info,
        name.into(),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .map_err(perr)?;
    run_xdp(&prog, frame, ifindex, 1, true).map_err(perr)
}
