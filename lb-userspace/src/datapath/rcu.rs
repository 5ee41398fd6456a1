//! Waiting out the BPF programs that are running now: the agent's grace period.
//!
//! A program that looked up a map value keeps using it until it returns; it runs under
//! `rcu_read_lock()`. So after the agent switches a frontend to a new table, a program that
//! read the old entry may still read the old table for a moment, and the old table may be
//! deleted only once every such program has returned.
//!
//! The kernel offers userspace one way to wait for that: after an update of a map-of-maps
//! element through the `bpf()` system call it calls `synchronize_rcu()`, so that userspace
//! knows every non-sleepable program still running saw the new value
//! (`maybe_wait_bpf_programs()`, Linux 4.15 and later). [`Grace`] keeps a one-element array of
//! maps for nothing else: [`Grace::wait`] rewrites its element, and returns once every program
//! that was running has returned.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::maps::{Array, ArrayOfMaps, Map, MapData, MapError};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_map_type};

/// A grace period on demand (see the module documentation).
pub struct Grace {
    outer: ArrayOfMaps<MapData, Array<MapData, u32>>,
    inner: Array<MapData, u32>,
}

impl Grace {
    /// Creates the two maps it needs (unpinned: they go with the process).
    pub fn new() -> Result<Self, MapError> {
        let obj =
            aya_obj::Map::new_from_params(bpf_map_type::BPF_MAP_TYPE_ARRAY as u32, 4, 4, 1, 0);
        let inner = MapData::create(obj, "lb_grace_inner", None)?;
        let outer = create_array_of_maps(inner.fd().as_fd().as_raw_fd()).map_err(|io_error| {
            MapError::CreateError {
                name: "lb_grace".into(),
                io_error,
            }
        })?;
        let outer = ArrayOfMaps::try_from(Map::ArrayOfMaps(MapData::from_fd(outer)?))?;
        let inner = Array::try_from(Map::Array(inner))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program that was running when it was called has returned.
    pub fn wait(&mut self) -> Result<(), MapError> {
        self.outer.set(0, &self.inner, 0)
    }
}

/// `BPF_MAP_CREATE` of a one-element `BPF_MAP_TYPE_ARRAY_OF_MAPS` whose inner maps are like
/// `inner_fd`'s (aya creates maps of maps only from an object file).
fn create_array_of_maps(inner_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero bpf_attr is the documented "no options" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the map-create member of the union, which is what BPF_MAP_CREATE reads.
    let create = unsafe { &mut attr.__bindgen_anon_1 };
    create.map_type = bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS as u32;
    create.key_size = 4;
    create.value_size = 4;
    create.max_entries = 1;
    create.inner_map_fd = inner_fd as u32;
    for (dst, src) in create.map_name.iter_mut().zip(b"lb_grace") {
        *dst = *src as core::ffi::c_char;
    }
    // SAFETY: the bpf() system call with a valid, fully initialised attribute of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_CREATE as libc::c_long,
            &attr as *const bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// `synchronize_rcu()` lasts at least a scheduler tick or so (milliseconds) where a plain
    /// map update takes a microsecond: a wait that long is the kernel waiting for the grace
    /// period, which is the only thing the update of a map of maps waits for.
    #[test]
    fn a_grace_period_is_waited_for() {
        let mut grace = Grace::new().expect("creating the grace maps (needs CAP_BPF)");
        let mean = |n: u32, f: &mut dyn FnMut()| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed() / n
        };
        let plain = mean(100, &mut || grace.inner.set(0, 1, 0).unwrap());
        let waited = mean(3, &mut || grace.wait().unwrap());
        assert!(
            waited > plain * 10 && waited > Duration::from_micros(100),
            "a wait took {waited:?}, a plain update {plain:?}"
        );
    }
}
