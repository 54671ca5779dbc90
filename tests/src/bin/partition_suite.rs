//! `partition-suite`: the Jepsen-style run of `meridian_tests::partition`, from the command
//! line.

use std::process::ExitCode;

use clap::Parser;
use meridian_tests::partition::{self, Args};

fn main() -> ExitCode {
    partition::main(Args::parse())
}
