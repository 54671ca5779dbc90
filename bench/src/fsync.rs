//! The raw fsync floor of the disk under the data directory.

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::{Context, Result};
use crate::stats::new_histogram;

pub const BLOCK_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Append a new 4 KiB block before every sync (the file grows, like a log).
    Append,
    /// Rewrite the same 4 KiB block before every sync (no metadata change).
    Overwrite,
}

#[derive(Debug, Serialize)]
pub struct FsyncStats {
    pub file: PathBuf,
    pub mode: FsyncMode,
    pub block_bytes: usize,
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl FsyncStats {
    /// The floor's rows of a scenario table: p50, p99, max, samples.
    pub fn rows(&self) -> Vec<crate::report::Row> {
        let mode = match self.mode {
            FsyncMode::Append => "append",
            FsyncMode::Overwrite => "overwrite",
        };
        let name = format!("fsync floor ({mode}, 4 KiB)");
        [
            ("p50", format!("{} µs", self.p50_us)),
            ("p99", format!("{} µs", self.p99_us)),
            ("max", format!("{} µs", self.max_us)),
            ("samples", self.samples.to_string()),
        ]
        .into_iter()
        .map(|(metric, value)| crate::report::Row::new(&name, metric, value, String::new()))
        .collect()
    }
}

/// Writes a 4 KiB block and `sync_data()`s it `samples` times in a scratch file
/// inside `dir`, timing each sync. Blocking: run it on a blocking thread.
pub fn measure(dir: &Path, samples: u64, mode: FsyncMode) -> Result<FsyncStats> {
    let path = dir.join(".meridian-bench-fsync-probe");
    let result = run(&path, samples, mode);
    let _ = fs::remove_file(&path);
    let hist = result?;
    Ok(FsyncStats {
        file: path,
        mode,
        block_bytes: BLOCK_BYTES,
        samples: hist.len(),
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        mean_us: hist.mean(),
    })
}

fn run(path: &Path, samples: u64, mode: FsyncMode) -> Result<Histogram<u64>> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut hist = new_histogram();
    let mut block = [0u8; BLOCK_BYTES];
    // One unmeasured round first: it pays for creating the file.
    for i in 0..=samples {
        // Different bytes each time, so nothing can skip an unchanged block.
        block[..8].copy_from_slice(&i.to_le_bytes());
        if mode == FsyncMode::Overwrite {
            file.seek(SeekFrom::Start(0))
                .with_context(|| format!("seeking in {}", path.display()))?;
        }
        file.write_all(&block)
            .with_context(|| format!("writing to {}", path.display()))?;
        let start = Instant::now();
        file.sync_data()
            .with_context(|| format!("fdatasync of {}", path.display()))?;
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        if i > 0 {
            hist.saturating_record(us.max(1));
        }
    }
    Ok(hist)
}
