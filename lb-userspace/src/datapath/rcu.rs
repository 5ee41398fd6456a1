//! maps for nothing else: rewriting its element returns once every program that was running
//! has returned.
//!
//! That takes milliseconds, so it runs on a thread of its own: the agent asks for a grace
//! period after a sync ([`Grace::begin`]) and goes on; what the sync switched away from is
//! deleted once [`Grace::done`] says the period has ended (or, when something must be
//! reused now, after [`Grace::wait`]). Requests that queue up while one runs are served by
//! the next one.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Condvar, Mutex, mpsc},
    time::Duration,
};

use aya::maps::{Array, ArrayOfMaps, Map, MapData, MapError};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_map_type};

/// The two maps whose update is a grace period.
struct Barrier {
    outer: ArrayOfMaps<MapData, Array<MapData, u32>>,
    inner: Array<MapData, u32>,
}

impl Barrier {
    fn new() -> Result<Self, MapError> {
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
    fn wait(&mut self) -> Result<(), MapError> {
        self.outer.set(0, &self.inner, 0)
    }
}

/// What the grace thread has done.
#[derive(Default)]
struct Done {
    /// The last grace period ended.
    ended: u64,
    /// Why the last attempt failed, if it did (it is tried again every second).
    error: Option<Arc<MapError>>,
}

/// Grace periods on demand, waited for on a thread of their own.
pub struct Grace {
    requested: u64,
    requests: mpsc::Sender<u64>,
    done: Arc<(Mutex<Done>, Condvar)>,
}

impl Grace {
    /// Creates the maps (unpinned: they go with the process) and starts the thread.
    pub fn new() -> Result<Self, MapError> {
        let mut barrier = Barrier::new()?;
        let (requests, rx) = mpsc::channel::<u64>();
        let done = Arc::new((Mutex::new(Done::default()), Condvar::new()));
        let shared = done.clone();
        std::thread::Builder::new()
            .name("lb-grace".into())
            .spawn(move || {
                while let Ok(mut n) = rx.recv() {
                    // One period serves every request made before it starts.
                    n = rx.try_iter().fold(n, u64::max);
                    let outcome = loop {
                        match barrier.wait() {
                            Ok(()) => break None,
                            Err(e) => {
                                let (lock, cv) = &*shared;
                                lock.lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .error = Some(Arc::new(e));
                                cv.notify_all();
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                    };
                    let (lock, cv) = &*shared;
                    let mut d = lock
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    d.ended = n;
                    d.error = outcome;
                    cv.notify_all();
                }
            })
            .map_err(MapError::IoError)?;
        Ok(Self {
            requested: 0,
            requests,
            done,
        })
    }

    /// Asks for a grace period; returns its number. It has ended once [`Self::done`] is at
    /// least that.
    pub fn begin(&mut self) -> u64 {
        self.requested += 1;
        // The thread lives as long as this value.
        let _ = self.requests.send(self.requested);
        self.requested
    }

    /// The last grace period that has ended.
    pub fn done(&self) -> u64 {
        self.done
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ended
    }

    /// Waits until grace period `n` has ended; an error if the thread cannot get one now.
    pub fn wait(&self, n: u64) -> Result<(), Arc<MapError>> {
        let (lock, cv) = &*self.done;
        let mut d = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while d.ended < n {
            if let Some(e) = &d.error {
                return Err(e.clone());
            }
            d = cv
                .wait(d)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Ok(())
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
        let mut barrier = Barrier::new().expect("creating the grace maps (needs CAP_BPF)");
        let mean = |n: u32, f: &mut dyn FnMut()| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed() / n
        };
        let plain = mean(100, &mut || barrier.inner.set(0, 1, 0).unwrap());
        let waited = mean(3, &mut || barrier.wait().unwrap());
        assert!(
            waited > plain * 10 && waited > Duration::from_micros(100),
            "a wait took {waited:?}, a plain update {plain:?}"
        );
    }

    #[test]
    fn grace_periods_end_in_order_on_their_thread() {
        let mut grace = Grace::new().expect("creating the grace maps (needs CAP_BPF)");
        assert_eq!(grace.done(), 0);
        let first = grace.begin();
        let second = grace.begin();
        assert!(second > first);
        grace.wait(second).unwrap();
        assert!(grace.done() >= second);
        // Asking does not wait.
        let t = Instant::now();
        let third = grace.begin();
        assert!(t.elapsed() < Duration::from_millis(1));
        grace.wait(third).unwrap();
    }
}
