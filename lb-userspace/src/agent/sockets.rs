//! Destroying connected UDP sockets that the socket hooks pointed at a backend that is gone.
//!
//! A connected UDP socket keeps the backend its `connect()` was translated to: when that
//! backend leaves the service (a DNS pod rolled), the application would keep sending into the
//! void. kube-proxy clears the conntrack entries; at the socket layer the equivalent is to
//! destroy the socket (sock_diag `SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY). The kernel aborts
//! and disconnects it: a pending or next receive fails with ECONNABORTED, a next send with
//! EDESTADDRREQ; the application reconnects, and the new connect is balanced again.
//!
//! Only sockets the hooks translated for that frontend are destroyed: the socket's entry in the
//! connected-UDP-socket map (kept until it closes, whatever else connects meanwhile), or else
//! its reverse-NAT entry (cookie, backend), must name the frontend. A socket that talks to the
//! pod IP directly is never touched. sock_diag works per network namespace, so every namespace
//! of the node (found where the runtime pins them, `--netns-dirs`, and through
//! `/proc/*/ns/net`) is dumped, from a short-lived thread that enters it. Established TCP connections are left alone, as kube-proxy leaves them: the
//! backend pod ends them when it terminates.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::AsRawFd as _,
    path::PathBuf,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{Endpoint, RevNatKey, UdpSocket, maps};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::debug;

use crate::{
    addr::to_endpoint,
    datapath::bpf::pinned,
    loader::{LoadError, PinLayout},
    reconcile::StaleUdp,
};

/// What [`destroy_stale`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Network namespaces looked at.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub sockets: usize,
    /// Namespaces that could not be looked at, and why.
    pub errors: Vec<String>,
}

/// Where the hooks sent a translated socket: the frontend.
pub trait Translations {
    /// The frontend a socket (by cookie) reached `backend` through, if the hooks translated it.
    fn frontend(&self, cookie: u64, backend: &Endpoint) -> Option<Endpoint>;
}

/// The pinned maps that say where sockets were sent: the connected-UDP-socket map, which
/// keeps a socket's entry until it closes, then the reverse-NAT map (an LRU, where a socket
/// connected when the other was full, or before it existed, may still be found).
struct Pinned {
    sockets: HashMap<MapData, u64, UdpSocket>,
    rev_nat: HashMap<MapData, RevNatKey, Endpoint>,
}

impl Translations for Pinned {
    fn frontend(&self, cookie: u64, backend: &Endpoint) -> Option<Endpoint> {
        match self.sockets.get(&cookie, 0) {
            Ok(s) if s.backend == *backend => Some(s.frontend),
            _ => self.rev_nat.get(&RevNatKey::new(cookie, backend), 0).ok(),
        }
    }
}

impl Pinned {
    fn open(layout: &PinLayout) -> Result<Self, LoadError> {
        let merr = |name| move |source| LoadError::Map { name, source };
        Ok(Self {
            sockets: HashMap::try_from(Map::HashMap(pinned(layout, maps::UDP_SOCKETS)?))
                .map_err(merr(maps::UDP_SOCKETS))?,
            rev_nat: HashMap::try_from(Map::LruHashMap(pinned(layout, maps::REV_NAT)?))
                .map_err(merr(maps::REV_NAT))?,
        })
    }
}

/// Whether a connected socket (cookie, destination) is stale: it was translated to a backend
/// that has left the frontend it was translated for.
pub fn is_stale(
    stale: &[StaleUdp],
    translations: &impl Translations,
    cookie: u64,
    dst: &Endpoint,
) -> bool {
    stale
        .iter()
        .any(|s| s.backend == *dst && translations.frontend(cookie, dst) == Some(s.frontend))
}

/// Destroys the connected UDP sockets of every network namespace that are stale: those of
/// the processes in /proc and those pinned in `netns_dirs`.
pub fn destroy_stale(
    layout: &PinLayout,
    netns_dirs: &[PathBuf],
    stale: &[StaleUdp],
) -> Result<Destroyed, LoadError> {
    let translations = Pinned::open(layout)?;
    let backends: BTreeSet<Endpoint> = stale.iter().map(|s| s.backend).collect();
    let mut done = Destroyed::default();
    for (inode, path) in namespaces(netns_dirs) {
        done.namespaces += 1;
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| in_namespace(&path, &backends, stale, &translations))
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        });
        match result {
            Ok(n) => done.sockets += n,
            // A process that exited between listing and entering is no error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => done
                .errors
                .push(format!("netns {inode} ({}): {e}", path.display())),
        }
    }
    Ok(done)
}

/// One path per network namespace, by inode: of the processes in /proc (those the agent
/// may look into; all of the node's with the host's PID namespace and CAP_SYS_PTRACE), and
/// the namespaces pinned in `dirs` (by the container runtime or CNI: every pod's, with no
/// such privilege).
fn namespaces(dirs: &[PathBuf]) -> BTreeMap<u64, PathBuf> {
    let mut found = BTreeMap::new();
    let mut add = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path) {
            use std::os::unix::fs::MetadataExt as _;
            found.entry(meta.ino()).or_insert(path);
        }
    };
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name();
        if pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            add(entry.path().join("ns/net"));
        }
    }
    for dir in dirs {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            add(entry.path());
        }
    }
    found
}

/// Enters the namespace (this thread only) and destroys its stale UDP sockets.
fn in_namespace(
    path: &PathBuf,
    backends: &BTreeSet<Endpoint>,
    stale: &[StaleUdp],
    translations: &impl Translations,
) -> io::Result<usize> {
    let ns = fs::File::open(path)?;
    // SAFETY: setns on this thread, which ends after this function.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut destroyed = 0;
    for family in [AF_INET, AF_INET6] {
        for id in dump_udp(&socket, family)? {
            let dst = to_endpoint((id.destination_address, id.destination_port).into());
            let c = id.cookie;
            let cookie = u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                | u64::from(u32::from_ne_bytes([c[4], c[5], c[6], c[7]])) << 32;
            if backends.contains(&dst) && is_stale(stale, translations, cookie, &dst) {
                match destroy(&socket, family, id) {
                    Ok(()) => destroyed += 1,
                    Err(e) => debug!(error = %e, "socket gone before it was destroyed"),
                }
            }
        }
    }
    Ok(destroyed)
}

fn send<T>(socket: &Socket, payload: T, flags: u16) -> io::Result<()>
where
    T: NetlinkSerializable + std::fmt::Debug,
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0).map(drop)
}

fn request(family: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

/// Every UDP socket of one family in this namespace.
fn dump_udp(socket: &Socket, family: u8) -> io::Result<Vec<SocketId>> {
    let any = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    send(socket, request(family, any), NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    ids.push(r.header.socket_id);
                }
                NetlinkPayload::Done(_) => return Ok(ids),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Destroys one socket and waits for the kernel's answer.
fn destroy(socket: &Socket, family: u8, id: SocketId) -> io::Result<()> {
    send(
        socket,
        SockDiagDestroy::new(request(family, id)),
        NLM_F_REQUEST | NLM_F_ACK,
    )?;
    let mut buf = vec![0u8; 4096];
    let size = socket.recv(&mut &mut buf[..], 0)?;
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[..size])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match msg.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Vec<(u64, Endpoint, Endpoint)>);

    impl Translations for Fake {
        fn frontend(&self, cookie: u64, backend: &Endpoint) -> Option<Endpoint> {
            self.0
                .iter()
                .find(|(c, b, _)| *c == cookie && b == backend)
                .map(|(_, _, f)| *f)
        }
    }

    fn ep(s: &str) -> Endpoint {
        to_endpoint(s.parse().unwrap())
    }

    #[test]
    fn only_sockets_translated_for_the_frontend_are_stale() {
        let (vip, other_vip) = (ep("10.96.0.10:53"), ep("10.96.0.11:53"));
        let gone = ep("10.0.0.1:53");
        let stale = [StaleUdp {
            frontend: vip,
            backend: gone,
        }];
        let rev = Fake(vec![(1, gone, vip), (2, gone, other_vip)]);
        assert!(
            is_stale(&stale, &rev, 1, &gone),
            "translated via the frontend"
        );
        assert!(
            !is_stale(&stale, &rev, 2, &gone),
            "translated via another frontend"
        );
        assert!(
            !is_stale(&stale, &rev, 3, &gone),
            "talks to the pod directly"
        );
        assert!(
            !is_stale(&stale, &rev, 1, &ep("10.0.0.2:53")),
            "another backend"
        );
    }

    #[test]
    fn every_process_namespace_is_found_once() {
        let found = namespaces(&[]);
        assert!(!found.is_empty(), "at least our own");
        let own = fs::metadata("/proc/self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.ino()
        });
        assert!(own.is_ok_and(|ino| found.contains_key(&ino)));
    }
}
