//! Processes placed in a namespace and a cgroup, and the cgroup itself; both removed on drop.

use std::{
    fs,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// A cgroup v2 directory, emptied (its processes killed) and removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `name` under the root of the cgroup2 mount.
    pub fn create(name: &str) -> io::Result<Self> {
        let root = lb_userspace::loader::host::cgroup2_root().map_err(io::Error::other)?;
        let path = root.join(name);
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Kills every process in a cgroup and removes it, waiting (boundedly) for them to exit.
fn remove_cgroup(path: &Path) -> io::Result<()> {
    // cgroup.kill (5.14+) kills the whole subtree at once.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.path) {
            eprintln!("cleanup: removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// Removes the cgroups of sandboxes whose creating process is gone.
pub fn sweep_stale_cgroups() {
    let Ok(root) = lb_userspace::loader::host::cgroup2_root() else {
        return;
    };
    let Ok(entries) = fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::owner_pid(&name).is_some_and(|pid| !crate::alive(pid)) {
            let _ = remove_cgroup(&entry.path());
        }
    }
}

/// A command that runs inside `netns` and, if given, in `cgroup` (so the socket hooks
/// attached there apply to it). The child joins both before it executes the program.
pub fn command_in(program: &Path, netns: &Netns, cgroup: Option<&Cgroup>) -> io::Result<Command> {
    let ns = fs::File::open(netns.path())?;
    let procs = cgroup
        .map(|c| {
            fs::OpenOptions::new()
                .write(true)
                .open(c.path().join("cgroup.procs"))
        })
        .transpose()?;
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes async-signal-safe system calls on descriptors opened
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Spawns `cmd`. The child is killed when the thread that spawned it ends, so a killed
    /// test run leaves no processes behind.
    pub fn spawn(mut cmd: Command) -> io::Result<Self> {
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Self {
            child: cmd.spawn()?,
        })
    }

    /// The child, e.g. to write to its stdin.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit; kills it after that.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        None
    }

    /// Writes a line to its stdin.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("stdin is not piped"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills the processes whose command line mentions `tag` (an agent of a stale sandbox).
pub fn kill_mentioning(tag: &str) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(tag) {
            // SAFETY: plain signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
