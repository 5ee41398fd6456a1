//! What the agent needs from the host: a BPF filesystem and the cgroup v2 hierarchy.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;

/// A host prerequisite that is missing.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// bpffs could not be mounted.
    #[error(
        "{path} is not a BPF filesystem and mounting one there failed: {source} \
         (the agent needs CAP_SYS_ADMIN and a writable /sys/fs/bpf, e.g. a hostPath mount)"
    )]
    MountBpffs {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); the socket hooks \
         attach to a cgroup v2: mount one or pass --cgroup"
    )]
    NoCgroup2,
    /// The given cgroup is not a cgroup v2 directory.
    #[error("{path} is not a cgroup v2 directory: {reason}")]
    NotCgroup2 {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An I/O error on a host file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn fs_type(path: &Path) -> io::Result<libc::c_long> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` writes into the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as libc::c_long)
}

/// Makes sure `path` is a mounted BPF filesystem, mounting one when it is not (as Cilium
/// does). Returns whether it mounted one.
pub fn ensure_bpffs(path: &Path) -> Result<bool, HostError> {
    let err = |source| HostError::MountBpffs {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    if fs_type(path).map_err(err)? == BPF_FS_MAGIC {
        return Ok(false);
    }
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(true)
}

/// Checks that `path` is a directory of a cgroup v2 hierarchy.
pub fn check_cgroup2(path: &Path) -> Result<(), HostError> {
    let kind = fs_type(path).map_err(|e| HostError::NotCgroup2 {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if kind != CGROUP2_SUPER_MAGIC {
        return Err(HostError::NotCgroup2 {
            path: path.to_owned(),
            reason: format!("filesystem type {kind:#x} is not cgroup2"),
        });
    }
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy (the root cgroup).
pub fn cgroup2_root() -> Result<PathBuf, HostError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| HostError::Io {
        path: path.to_owned(),
        source,
    })?;
    cgroup2_mount_in(&text).ok_or(HostError::NoCgroup2)
}

/// The first cgroup2 mount point listed in a mountinfo text.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <type> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(left.split_whitespace().nth(4)?)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let text = "\
25 18 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape(r"/mnt/my\040cgroup"), "/mnt/my cgroup");
        assert_eq!(unescape(r"/a\0"), r"/a\0");
    }
}
