//! `stasis`: transparent checkpoint/restart of Linux processes, without root.
//!
//! This crate is the command line: argument parsing ([`cli`]), the supervisor and the
//! namespace init that `run` and `restart` start ([`supervise`]), the control socket
//! that `checkpoint` talks to ([`control`]), `inspect` ([`inspect`]), `status`
//! ([`status`]) and the built-in
//! demonstration ([`demo`]), and the multi-node coordinator, agent and global checkpoint
//! client ([`coord`], over the stasis-coord crate). The engine is in the stasis-core crate.

mod cli;
mod control;
mod coord;
mod demo;
mod inspect;
mod status;
mod supervise;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let level = match (args.quiet, args.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
