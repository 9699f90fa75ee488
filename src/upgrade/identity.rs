//! Which file the gateway runs from, and whether it has been replaced on disk since.
//!
//! A package upgrade writes the new binary aside and renames it over the old path: the path then
//! names a new inode, while `/proc/self/exe` still names the one the process runs. Comparing the
//! device and inode taken at start with those of the path now tells the two apart; the contents
//! are never compared.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The executable as it was when the gateway started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExeIdentity {
    /// The path the executable was started from, to look at again on SIGHUP.
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// What the path holds now, compared with the executable at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisk {
    /// The same file: a reload is a configuration reload only.
    Unchanged,
    /// Another file at the same path: a new binary to re-execute.
    Replaced,
    /// Nothing (or nothing readable) at the path: there is no new binary to run.
    Missing,
}

impl ExeIdentity {
    /// The running executable: the path from the `/proc/self/exe` link, the identity from the
    /// file the process actually runs (which the link still reaches after a rename over it).
    pub fn current() -> std::io::Result<ExeIdentity> {
        let path = std::fs::read_link("/proc/self/exe")?;
        let running = std::fs::metadata("/proc/self/exe")?;
        Ok(ExeIdentity {
            path: strip_deleted(path),
            dev: running.dev(),
            ino: running.ino(),
        })
    }

    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<ExeIdentity> {
        let metadata = std::fs::metadata(path)?;
        Ok(ExeIdentity {
            path: path.to_path_buf(),
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }

    /// Whether the path now holds another file.
    pub fn on_disk(&self) -> OnDisk {
        match std::fs::metadata(&self.path) {
            Ok(metadata) if metadata.is_file() => {
                if (metadata.dev(), metadata.ino()) == (self.dev, self.ino) {
                    OnDisk::Unchanged
                } else {
                    OnDisk::Replaced
                }
            }
            _ => OnDisk::Missing,
        }
    }
}

/// The kernel appends ` (deleted)` to the link of an executable whose path was unlinked or
/// renamed over; the path to look at is the one before it.
fn strip_deleted(path: PathBuf) -> PathBuf {
    match path
        .to_str()
        .and_then(|text| text.strip_suffix(" (deleted)"))
    {
        Some(stripped) => PathBuf::from(stripped),
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_renamed_over_the_path_counts_as_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway");
        std::fs::write(&path, b"old").expect("write");
        let identity = ExeIdentity::of(&path).expect("identity");
        assert_eq!(identity.on_disk(), OnDisk::Unchanged);

        let aside = dir.path().join("gateway.new");
        std::fs::write(&aside, b"old").expect("write aside");
        std::fs::rename(&aside, &path).expect("rename over");
        assert_eq!(identity.on_disk(), OnDisk::Replaced);
    }

    #[test]
    fn a_file_rewritten_in_place_is_unchanged_and_a_removed_one_is_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway");
        std::fs::write(&path, b"old").expect("write");
        let identity = ExeIdentity::of(&path).expect("identity");
        // Same inode, new contents: not an upgrade the gateway can tell (nor one a package does).
        std::fs::write(&path, b"new").expect("rewrite");
        assert_eq!(identity.on_disk(), OnDisk::Unchanged);
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(identity.on_disk(), OnDisk::Missing);
    }

    #[test]
    fn the_running_executable_is_unchanged_on_disk() {
        let identity = ExeIdentity::current().expect("identity");
        assert_eq!(identity.on_disk(), OnDisk::Unchanged);
    }

    #[test]
    fn the_deleted_suffix_of_the_exe_link_is_dropped() {
        assert_eq!(
            strip_deleted(PathBuf::from("/usr/bin/gateway (deleted)")),
            PathBuf::from("/usr/bin/gateway")
        );
        assert_eq!(
            strip_deleted(PathBuf::from("/usr/bin/gateway")),
            PathBuf::from("/usr/bin/gateway")
        );
    }
}
