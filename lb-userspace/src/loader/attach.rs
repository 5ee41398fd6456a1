//! Attaching the programs: to the cgroup, and to the XDP and overlay devices as they come and
//! go, through pinned links replaced in place.

use std::{fs, io, path::Path};

use aya::{
    maps::MapError,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        Xdp, XdpMode,
        links::FdLink,
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::maps;

use super::{
    Device, DeviceKind, LoadError, Loaded, OVERLAY_LINK_PREFIX, OVERLAY_PROGRAM, PROGRAMS,
    RELEASE_PROGRAM, TC_LINK_PREFIX, TC_PROGRAM, XDP_LINK_PREFIX, XDP_PROGRAM,
    migrate::{copy_map, resize_pin, written_by_programs},
    pins::{PinLayout, adopt_link, io_err, pin_over},
    program,
};

/// Attaches program `$prog` through the link pinned at `$pin`, replacing its program in
/// place, or, when there is none (or its device is gone), with `$attach`; then pins the link
/// there. Evaluates to whether the pinned link was reused. A macro, because the program
/// types share these methods by name, not through a trait.
macro_rules! attach_pinned {
    ($prog:expr, $link:ty, $name:expr, $pin:expr, |$p:ident| $attach:expr) => {{
        let prog = $prog;
        let perr = |source| LoadError::Program {
            name: $name,
            source,
        };
        let reused = match adopt_link($pin)? {
            Some(old) => <$link>::try_from(old)
                .ok()
                .and_then(|l| prog.attach_to_link(l).ok()),
            None => None,
        };
        let replaced = reused.is_some();
        let id = match reused {
            Some(id) => id,
            None => {
                let $p = &mut *prog;
                $attach.map_err(perr)?
            }
        };
        let link: FdLink = prog
            .take_link(id)
            .map_err(perr)?
            .try_into()
            .map_err(|source| LoadError::Link {
                name: $name,
                source,
            })?;
        pin_over(link, $pin, $name)?;
        replaced
    }};
}

impl Loaded {
    /// The devices the north-south programs are attached to as `kind` (from the link pins,
    /// so a restarted agent sees its predecessor's).
    pub fn attached_devices(&self, kind: DeviceKind) -> Result<Vec<String>, LoadError> {
        attached_devices(&self.layout, kind)
    }

    /// Attaches the north-south programs to `device` (XDP in `mode` at ingress, tc egress),
    /// or replaces the programs on it with this build's when a link is pinned already (in
    /// place: the device is never without a program); then marks it as a device the XDP
    /// program may redirect to. Returns whether both links were replaced in place.
    pub fn attach_device(&mut self, device: &Device, mode: XdpMode) -> Result<bool, LoadError> {
        let links = self.layout.links();
        let xdp_pin = links.join(format!("{XDP_LINK_PREFIX}{}", device.name));
        let xdp = attach_pinned!(
            program::<Xdp>(&mut self.ebpf, XDP_PROGRAM)?,
            XdpLink,
            XDP_PROGRAM,
            &xdp_pin,
            |p| p.attach_to_if_index(device.ifindex, mode)
        );
        let tc_pin = links.join(format!("{TC_LINK_PREFIX}{}", device.name));
        let tc = attach_pinned!(
            program::<SchedClassifier>(&mut self.ebpf, TC_PROGRAM)?,
            SchedClassifierLink,
            TC_PROGRAM,
            &tc_pin,
            |p| p.attach_with_options(
                &device.name,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        );
        self.mark_device(device, maps::DEVICE_XDP)?;
        Ok(xdp && tc)
    }

    /// Attaches the overlay program to `device` at tc ingress (or replaces it in place, as
    /// [`Self::attach_device`]), then marks it as an overlay device, through which flows to
    /// backends on other nodes may leave SNATed. For Ethernet devices (VXLAN, Geneve): the
    /// program parses Ethernet frames. Returns whether the link was replaced in place.
    pub fn attach_overlay(&mut self, device: &Device) -> Result<bool, LoadError> {
        let pin = self
            .layout
            .links()
            .join(format!("{OVERLAY_LINK_PREFIX}{}", device.name));
        let replaced = attach_pinned!(
            program::<SchedClassifier>(&mut self.ebpf, OVERLAY_PROGRAM)?,
            SchedClassifierLink,
            OVERLAY_PROGRAM,
            &pin,
            |p| p.attach_with_options(
                &device.name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        );
        self.mark_device(device, maps::DEVICE_OVERLAY)?;
        Ok(replaced)
    }

    /// Records in the device map that `device` runs the programs of `kind`.
    pub(super) fn mark_device(&mut self, device: &Device, kind: u8) -> Result<(), LoadError> {
        self.devices
            .insert(device.ifindex, kind, 0)
            .map_err(|source| LoadError::Map {
                name: maps::XDP_DEVICES,
                source,
            })
    }

    /// Detaches the north-south programs from the device called `name` (its link pins go)
    /// and forgets every device index not in `keep`.
    pub fn detach_device(&mut self, name: &str, keep: &[u32]) -> Result<(), LoadError> {
        let stale: Vec<u32> = self
            .devices
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !keep.contains(i))
            .collect();
        for ifindex in stale {
            match self.devices.remove(&ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(LoadError::Map {
                        name: maps::XDP_DEVICES,
                        source,
                    });
                }
            }
        }
        for prefix in [XDP_LINK_PREFIX, TC_LINK_PREFIX, OVERLAY_LINK_PREFIX] {
            let pin = self.layout.links().join(format!("{prefix}{name}"));
            match fs::remove_file(&pin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&pin)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Attaches every program to the cgroup at `cgroup` and pins the links, replacing the
    /// links of an earlier run only once the new ones are attached.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        // What the running programs wrote into the old maps of resized ones since the copy
        // at load (flows, reverse NAT, affinity) is copied again, just before they go.
        for name in std::mem::take(&mut self.resized) {
            if written_by_programs(name) {
                copy_map(&resize_pin(&self.layout, name), &self.layout, name)?;
            }
        }
        for (old, _) in std::mem::take(&mut self.converting) {
            crate::datapath::conntrack::convert_v1_map(
                &self.layout.map(old),
                &self.layout,
                &self.settings.ct_timeouts,
                self.settings.clock_offset,
            )?;
        }
        let cg = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let links = self.layout.links();
        // A macro, because the two program types share these methods by name only.
        macro_rules! attach_to_cgroup {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let prog = program::<$ty>(&mut self.ebpf, name)?;
                let perr = |source| LoadError::Program { name, source };
                let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| LoadError::Link { name, source })?;
                pin_over(link, &links.join(name), name)?;
            }};
        }
        for name in PROGRAMS {
            attach_to_cgroup!(CgroupSockAddr, name);
        }
        attach_to_cgroup!(CgroupSock, RELEASE_PROGRAM);
        Ok(())
    }
}

/// The devices with the programs of `kind` attached (a pinned link) under `layout`, by name.
pub fn attached_devices(layout: &PinLayout, kind: DeviceKind) -> Result<Vec<String>, LoadError> {
    let dir = layout.links();
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let name = entry.map_err(io_err(&dir))?.file_name();
        if let Some(dev) = name
            .to_str()
            .and_then(|n| n.strip_prefix(kind.link_prefix()))
        {
            names.push(dev.to_owned());
        }
    }
    names.sort();
    Ok(names)
}
