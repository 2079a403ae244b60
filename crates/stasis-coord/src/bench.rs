//! The coordinator benchmark: one coordinator and N agents as threads of this process,
//! over loopback TCP, with a part that does nothing (only the protocol and the
//! publication are measured) or the simulated part (each agent writes and syncs 4 KiB).

use crate::agent::{self, LocalPart, Options};
use crate::client::Client;
use crate::coordinator::{Config, Coordinator};
use crate::protocol::Role;
use crate::simulate::{Null, Simulated};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// Times of the global checkpoints of one run, in milliseconds.
#[derive(Debug, Clone)]
pub struct Stats {
    pub agents: usize,
    pub rounds: usize,
    /// Time to connect all agents.
    pub join_ms: f64,
    /// Per checkpoint, as the client saw it (request to answer).
    pub median_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
    /// Medians of the coordinator's phases.
    pub freeze_ms: f64,
    pub dump_ms: f64,
    pub publish_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs `rounds` global checkpoints with `agents` agents; checkpoints go to `dir`
/// (removed again as it goes: each published one is deleted before the next).
pub fn run(agents: usize, rounds: usize, dir: &Path, write: bool) -> Result<Stats> {
    let mut cfg = Config::new(dir);
    cfg.timeout = Duration::from_secs(60);
    let addr = Coordinator::bind("127.0.0.1:0", cfg)?.spawn()?.to_string();
    let t = Instant::now();
    let mut conns = Vec::new();
    for k in 0..agents {
        let mut o = Options::new(Role::Agent);
        o.node = format!("sim{k}");
        conns.push(agent::connect(&addr, &o).with_context(|| format!("agent {k}"))?);
    }
    let join_ms = t.elapsed().as_secs_f64() * 1000.0;
    for (k, c) in conns.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("agent-{k}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut part: Box<dyn LocalPart> = if write {
                    Box::new(Simulated::new(&format!("sim{k}")))
                } else {
                    Box::new(Null)
                };
                c.serve(part.as_mut())
            })
            .context("cannot start an agent thread")?;
    }
    let mut client = Client::connect(&addr)?;
    let (mut total, mut fr, mut du, mut pu) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let r = client.checkpoint(false)?;
        total.push(t.elapsed().as_secs_f64() * 1000.0);
        fr.push(r.freeze_ms);
        du.push(r.dump_ms);
        pu.push(r.publish_ms);
        std::fs::remove_dir_all(&r.path).with_context(|| format!("cannot remove {}", r.path))?;
    }
    for v in [&mut total, &mut fr, &mut du, &mut pu] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Stats {
        agents,
        rounds,
        join_ms,
        median_ms: percentile(&total, 0.5),
        p95_ms: percentile(&total, 0.95),
        max_ms: total.last().copied().unwrap_or(0.0),
        freeze_ms: percentile(&fr, 0.5),
        dump_ms: percentile(&du, 0.5),
        publish_ms: percentile(&pu, 0.5),
    })
}
