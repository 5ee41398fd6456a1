//! The node's addresses (which serve node ports) and the devices running the north-south
//! programs: read again every poll, the programs attached to new devices and detached from
//! those that left.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use aya::programs::XdpMode;
use ipnet::IpNet;
use tracing::{error, info, warn};

use super::{
    AgentError,
    config::{AgentArgs, Devices, XdpModeArg},
    netdev,
};
use crate::{
    k8s::{ObjectRef, store::Store},
    loader::{self, DeviceKind, Loaded},
};

/// The node's addresses (which serve node ports) and the devices running the north-south
/// programs, looked at again every [`NETWORK_POLL`].
pub(super) struct Network {
    devices: Devices,
    overlays: Devices,
    mode: XdpMode,
    cidrs: Vec<IpNet>,
    /// The node's `/proc/sys/net`, written to.
    proc_sys_net: PathBuf,
    /// Devices with programs attached, by name: what they run, and the index they were
    /// attached at (unknown for those adopted from a previous agent until replaced).
    attached: BTreeMap<String, (DeviceKind, Option<u32>)>,
    /// Devices that could not be attached (warned about once).
    failed: BTreeSet<String>,
}

impl Network {
    /// What `args` asks for, with the devices a previous agent left attached adopted.
    pub(super) fn new(args: &AgentArgs, loaded: &Loaded) -> Result<Self, AgentError> {
        let mut attached = BTreeMap::new();
        for kind in [DeviceKind::Xdp, DeviceKind::Overlay] {
            for name in loaded.attached_devices(kind)? {
                attached.insert(name, (kind, None));
            }
        }
        Ok(Self {
            devices: args.xdp_devices()?,
            overlays: args.overlay_devices()?,
            mode: match args.xdp_mode {
                XdpModeArg::Auto => XdpMode::Default,
                XdpModeArg::Native => XdpMode::Driver,
                XdpModeArg::Generic => XdpMode::Skb,
            },
            cidrs: args.nodeport_cidrs()?,
            proc_sys_net: args.proc_sys_net.clone(),
            attached,
            failed: BTreeSet::new(),
        })
    }

    /// Reads the node's addresses into the store and attaches or detaches devices; returns
    /// the services to recompute.
    pub(super) fn poll(&mut self, store: &mut Store, loaded: &mut Loaded) -> BTreeSet<ObjectRef> {
        let Some((changed, addrs)) = self.addresses(store) else {
            return BTreeSet::new();
        };
        self.attach_devices(&addrs, store, loaded);
        changed
    }

    /// Reads the node's addresses into the store: the services to recompute, and every
    /// interface's addresses (`None` when they cannot be listed).
    pub(super) fn addresses(
        &self,
        store: &mut Store,
    ) -> Option<(BTreeSet<ObjectRef>, Vec<netdev::IfAddr>)> {
        let addrs = match netdev::interfaces() {
            Ok(addrs) => addrs,
            Err(e) => {
                warn!(error = %e, "cannot list the node's addresses; keeping the last ones");
                return None;
            }
        };
        let mut changed = store.set_addresses(netdev::nodeport_addresses(&addrs, &self.cidrs));
        changed.extend(store.set_interface_addresses(addrs.iter().map(|a| a.ip).collect()));
        Some((changed, addrs))
    }

    /// The devices that should run the north-south programs, and what each should run: the
    /// XDP devices, then (while there is any) the overlay devices that are not XDP ones.
    fn wanted(&self, addrs: &[netdev::IfAddr], store: &Store) -> Vec<(String, DeviceKind)> {
        let xdp: Vec<String> = match &self.devices {
            Devices::None => Vec::new(),
            Devices::Named(names) => names.clone(),
            Devices::Auto => {
                netdev::auto_devices(addrs, store.node_ips(), &netdev::default_route_devices())
            }
        };
        let overlays = match &self.overlays {
            _ if xdp.is_empty() => Vec::new(),
            Devices::None => Vec::new(),
            Devices::Named(names) => names.clone(),
            Devices::Auto => netdev::overlay_devices(),
        };
        let overlays: Vec<String> = overlays.into_iter().filter(|o| !xdp.contains(o)).collect();
        let xdp = xdp.into_iter().map(|n| (n, DeviceKind::Xdp));
        xdp.chain(overlays.into_iter().map(|n| (n, DeviceKind::Overlay)))
            .collect()
    }

    /// Attaches the north-south programs to the devices that should run them, and detaches
    /// them from the others.
    pub(super) fn attach_devices(
        &mut self,
        addrs: &[netdev::IfAddr],
        store: &Store,
        loaded: &mut Loaded,
    ) {
        let present: Vec<(String, DeviceKind, u32)> = self
            .wanted(addrs, store)
            .into_iter()
            .filter_map(|(name, kind)| {
                if let Some(i) = netdev::ifindex(&name) {
                    Some((name, kind, i))
                } else {
                    if self.failed.insert(name.clone()) {
                        warn!(device = %name, ?kind, "device not found; attaching once it appears");
                    }
                    None
                }
            })
            .collect();
        let keep: Vec<u32> = present.iter().map(|(_, _, i)| *i).collect();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, (kind, _))| !present.iter().any(|(n, k, _)| n == *name && k == kind))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            match loaded.detach_device(&name, &keep) {
                Ok(()) => {
                    info!(device = %name, "north-south programs detached");
                    self.attached.remove(&name);
                }
                Err(e) => {
                    warn!(device = %name, error = %e, "cannot detach the north-south programs");
                }
            }
        }
        for (name, kind, ifindex) in present {
            if self.attached.get(&name) == Some(&(kind, Some(ifindex))) {
                continue;
            }
            match attach(loaded, &name, kind, ifindex, self.mode) {
                Ok(replaced) => {
                    if let Err(e) = netdev::accept_local(&self.proc_sys_net, &name) {
                        warn!(device = %name, error = %e, "cannot set accept_local: SNATed packets the stack forwards will be dropped");
                    }
                    if kind == DeviceKind::Xdp && netdev::strict_rp_filter(&name) {
                        warn!(device = %name, "strict reverse-path filtering (rp_filter 1) drops the IPv4 flows XDP SNATs and hands to the stack (to backends behind an overlay, or before a next hop's MAC is known); set net.ipv4.conf.all.rp_filter and net.ipv4.conf.{name}.rp_filter to 2 (loose)");
                    }
                    let what = match kind {
                        DeviceKind::Xdp => "XDP ingress, tc egress",
                        DeviceKind::Overlay => "overlay: tc ingress",
                    };
                    if replaced {
                        info!(device = %name, ifindex, "north-south programs replaced in place on their pinned links ({what})");
                    } else {
                        info!(device = %name, ifindex, mode = ?self.mode, "north-south programs attached ({what})");
                    }
                    self.attached.insert(name.clone(), (kind, Some(ifindex)));
                    self.failed.remove(&name);
                }
                Err(e) => {
                    if self.failed.insert(name.clone()) {
                        error!(device = %name, ?kind, error = %e, "cannot attach the north-south programs; retrying");
                    }
                }
            }
        }
    }
}

/// Attaches the programs of `kind` to device `name` (index `ifindex`); whether they replaced
/// a previous agent's in place.
fn attach(
    loaded: &mut Loaded,
    name: &str,
    kind: DeviceKind,
    ifindex: u32,
    mode: XdpMode,
) -> Result<bool, loader::LoadError> {
    let device = loader::Device {
        name: name.to_owned(),
        ifindex,
    };
    match kind {
        DeviceKind::Xdp => loaded.attach_device(&device, mode),
        DeviceKind::Overlay => {
            let hardware_type = netdev::hardware_type(name);
            if hardware_type != Some(netdev::ARPHRD_ETHER) {
                return Err(loader::LoadError::NotEthernet {
                    device: device.name,
                    hardware_type,
                });
            }
            loaded.attach_overlay(&device)
        }
    }
}
