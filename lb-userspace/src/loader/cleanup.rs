//! `lb-agent --cleanup`: detaching the programs and removing the pins.

use std::{fs, io};

use super::{
    LoadError,
    pins::{PinLayout, io_err},
};

/// What [`cleanup`] removed.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Links unpinned (programs detached).
    pub links: usize,
    /// Maps unpinned.
    pub maps: usize,
}

/// Detaches every program and removes every pin under the layout. Links go first, so no
/// program runs against maps being removed. Safe to run when nothing is there.
pub fn cleanup(layout: &PinLayout) -> Result<Cleanup, LoadError> {
    let mut done = Cleanup::default();
    for (dir, count) in [
        (layout.links(), &mut done.links),
        (layout.maps(), &mut done.maps),
    ] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            *count += 1;
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
    }
    match fs::remove_dir(layout.root()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(layout.root())(e)),
        _ => Ok(done),
    }
}
