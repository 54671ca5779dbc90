//! Disk faults made for real: a small tmpfs that really fills up, and a flipped byte in a
//! stopped node's file.
//!
//! Mounting needs root (or CAP_SYS_ADMIN); callers skip with the reason [`SmallDisk::mount`]
//! gives, and say so.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size mounted at a directory, unmounted (lazily) when dropped.
pub struct SmallDisk {
    mount_point: PathBuf,
}

/// The name of the file [`SmallDisk::fill`] writes.
const FILLER: &str = "meridian-test-filler";

impl SmallDisk {
    /// Mounts a tmpfs of `size_mib` at `mount_point` (created if missing); why not, when
    /// that is refused (typically: not root).
    pub fn mount(mount_point: &Path, size_mib: u32) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(mount_point)
            .map_err(|e| format!("cannot create {}: {e}", mount_point.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(mount_point)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk {
            mount_point: mount_point.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// Free bytes on the file system, as `df` reports them.
    pub fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.mount_point)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }

    /// Takes up to `bytes` (as much as fits: `u64::MAX` fills the disk) with a file of zeros;
    /// how many bytes it took.
    pub fn fill(&self, bytes: u64) -> u64 {
        let chunk = vec![0u8; 1 << 20];
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.mount_point.join(FILLER))
            .expect("create the filler file");
        let mut taken = 0;
        while taken < bytes {
            let n = (bytes - taken).min(chunk.len() as u64) as usize;
            match std::io::Write::write(&mut file, &chunk[..n]) {
                Ok(0) | Err(_) => break,
                Ok(written) => taken += written as u64,
            }
        }
        taken
    }

    /// Gives back what [`SmallDisk::fill`] took.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.mount_point.join(FILLER));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
    }
}

/// XORs the first byte of `needle` wherever it stands in `file`, as a flipped bit on disk
/// would; how many places it changed.
pub fn flip_every(file: &Path, needle: &[u8]) -> std::io::Result<usize> {
    let mut bytes = std::fs::read(file)?;
    let places: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    for &at in &places {
        bytes[at] ^= 0x01;
    }
    std::fs::write(file, bytes)?;
    Ok(places.len())
}
