//! The `meridian` binary of this build, and its one-shot commands.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The `meridian` binary: `$MERIDIAN_BIN` if set, else `meridian` in the `target/<profile>`
/// folder of the running executable (test executables live in its `deps/`, binaries such as
/// `restart-visibility` in the folder itself), built first if it is missing. Panics if it
/// cannot be built.
pub fn meridian_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MERIDIAN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let folder = exe.parent().expect("the executable's folder");
    let profile_dir = if folder.ends_with("deps") {
        folder.parent().expect("target/<profile> folder")
    } else {
        folder
    };
    meridian_bin_in(profile_dir).unwrap_or_else(|e| panic!("{e}"))
}

/// The binary could not be built (cargo's own output says why).
#[derive(Debug)]
pub struct BuildError;

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("building the meridian binary failed")
    }
}

impl std::error::Error for BuildError {}

/// `meridian` in `profile_dir` (`target/debug` or `target/release`), built with cargo in that
/// profile if it is missing.
pub fn meridian_bin_in(profile_dir: &Path) -> Result<PathBuf, BuildError> {
    let bin = profile_dir.join("meridian");
    if !bin.is_file() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "meridian-node", "--bin", "meridian"]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        if !cmd.status().is_ok_and(|s| s.success()) {
            return Err(BuildError);
        }
    }
    Ok(bin)
}

/// What a finished `meridian` command printed, and how it exited.
#[derive(Clone, Debug)]
pub struct CliRun {
    /// `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout followed by stderr, for messages and for checks that do not care which.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Run `meridian <args>` to completion. Panics if it cannot be started.
pub fn run_meridian<I, S>(args: I) -> CliRun
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(meridian_bin())
        .args(args)
        .output()
        .expect("run meridian");
    CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `meridian certs`: a development CA and every node's certificate for `topology`, in
/// `out_dir`. Panics if the topology is invalid or the command fails.
pub fn write_certs(topology: &Path, out_dir: &Path) {
    let run = run_meridian([
        OsStr::new("certs"),
        OsStr::new("--topology"),
        topology.as_os_str(),
        OsStr::new("--out"),
        out_dir.as_os_str(),
    ]);
    assert_eq!(
        run.code,
        Some(0),
        "meridian certs for {}:\n{}",
        topology.display(),
        run.output()
    );
}

/// `meridian residency audit --topology <topology> --data-dir <data_dir> <extra>`.
pub fn residency_audit(topology: &Path, data_dir: &Path, extra: &[&str]) -> CliRun {
    let mut args = vec![
        OsStr::new("residency"),
        OsStr::new("audit"),
        OsStr::new("--topology"),
        topology.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    run_meridian(args)
}

/// The keys `meridian dump --json` lists for `data_dir`, in its order. Panics unless the dump
/// succeeds.
pub fn dumped_keys(data_dir: &Path) -> Vec<String> {
    let run = run_meridian([
        OsStr::new("dump"),
        OsStr::new("--json"),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let doc: Value = serde_json::from_str(&run.stdout).expect("dump JSON");
    doc["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["key"].as_str().map(str::to_owned))
        .collect()
}

/// `meridian topology check`: panics, with the problems, unless `topology` is valid.
pub fn assert_valid_topology(topology: &Path) {
    let run = run_meridian([
        OsStr::new("topology"),
        OsStr::new("check"),
        topology.as_os_str(),
    ]);
    assert_eq!(
        run.code,
        Some(0),
        "{} is not a valid topology:\n{}",
        topology.display(),
        run.output()
    );
}
