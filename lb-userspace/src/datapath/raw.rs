//! Map calls by file descriptor that aya 0.14 lacks (batch lookups and updates), and the
//! element calls beside them, for typed keys and values (`aya::Pod`): the conntrack sweep
//! and the benchmarks use them.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
};

use crate::loader::{LoadError, PinLayout, open_writable};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_NOEXIST`: an update that fails when the key is there.
pub const BPF_NOEXIST: u64 = 1;
/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;

/// A map by file descriptor, with element and batch calls of typed keys and values.
pub struct RawMap {
    fd: OwnedFd,
}

/// `union bpf_attr` for the element calls.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch calls.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a `bpf_attr` prefix of the size passed, valid for the call; the
    // pointers inside it point at buffers the caller sized for the map.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RawMap {
    /// The map `name` pinned under `layout`, checked against its spec, for writing; and
    /// its capacity.
    pub fn open(layout: &PinLayout, name: &'static str) -> Result<(Self, u32), LoadError> {
        let data = open_writable(layout, name)?;
        let capacity = data
            .info()
            .map(|i| i.max_entries())
            .map_err(|source| LoadError::Map { name, source })?;
        let map = Self::from_data(&data).map_err(|source| LoadError::Io {
            path: layout.map(name),
            source,
        })?;
        Ok((map, capacity))
    }

    /// The map `data` (its descriptor duplicated).
    pub fn from_data(data: &aya::maps::MapData) -> io::Result<Self> {
        Ok(Self {
            fd: data.fd().as_fd().try_clone_to_owned()?,
        })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Writes `keys[i]` -> `values[i]` for every `i` in one `BPF_MAP_UPDATE_BATCH` call.
    pub fn update_batch<K: aya::Pod, V: aya::Pod>(
        &self,
        keys: &[K],
        values: &[V],
    ) -> io::Result<()> {
        assert_eq!(keys.len(), values.len(), "one value per key");
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: self.raw() as u32,
            elem_flags: 0,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
    }

    /// The value of `key`, if any.
    pub fn lookup<K: aya::Pod, V: aya::Pod>(&self, key: &K) -> io::Result<Option<V>> {
        self.value_of(BPF_MAP_LOOKUP_ELEM, key)
    }

    /// Deletes `key` and returns the value it held at that instant, if any
    /// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, Linux 5.14 for hash maps): a caller that finds
    /// a value other than the one it meant to delete can put it back.
    pub fn take<K: aya::Pod, V: aya::Pod>(&self, key: &K) -> io::Result<Option<V>> {
        self.value_of(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key)
    }

    /// An element call `cmd` on `key` that reads its value.
    fn value_of<K: aya::Pod, V: aya::Pod>(
        &self,
        cmd: libc::c_long,
        key: &K,
    ) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::uninit();
        let mut attr = ElemAttr {
            map_fd: self.raw() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(cmd, &mut attr) {
            // SAFETY: the kernel wrote a whole value (a Pod type of the map's value size).
            Ok(()) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `key` -> `value` with `flags`; false when `BPF_NOEXIST` found the key there.
    pub fn update<K: aya::Pod, V: aya::Pod>(
        &self,
        key: &K,
        value: &V,
        flags: u64,
    ) -> io::Result<bool> {
        let mut attr = ElemAttr {
            map_fd: self.raw() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_ref(value) as u64,
            flags,
        };
        match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every entry, read [`BATCH`] at a time with `BPF_MAP_LOOKUP_BATCH` (entries inserted
    /// or deleted meanwhile may or may not be seen).
    pub fn lookup_batch<K: aya::Pod, V: aya::Pod>(&self) -> io::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        let mut keys = vec![0u8; BATCH * size_of::<K>()];
        let mut values = vec![0u8; BATCH * size_of::<V>()];
        // Hash maps' batch position is a bucket index (u32).
        let (mut token_in, mut token_out) = (0u64, 0u64);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    std::ptr::from_ref(&token_in) as u64
                },
                out_batch: std::ptr::from_mut(&mut token_out) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: self.raw() as u32,
                elem_flags: 0,
                flags: 0,
            };
            let rc = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = attr.count as usize;
            for i in 0..n.min(BATCH) {
                // SAFETY: the kernel wrote `n` whole keys and values (Pod types of the map's
                // sizes) into the buffers; read unaligned.
                unsafe {
                    let k = std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()).cast());
                    let v =
                        std::ptr::read_unaligned(values.as_ptr().add(i * size_of::<V>()).cast());
                    out.push((k, v));
                }
            }
            match rc {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
    }
}
