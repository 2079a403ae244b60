//! Restarting a global checkpoint on other nodes (`stasis restart --coordinator
//! --nodes`) and starting a part for a launcher (`stasis ssh`): both ask the
//! coordinator to have a node's spare agent take a part, waiting for the agent to
//! join when told to ([`agents_wait`]).

use super::{Launch, RemoveOnDrop, Simulation};
use anyhow::{bail, Context, Result};
use stasis_coord::client::Client;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The global checkpoint `dir` names (one checkpoint-NNNNNN, or the newest in a
/// coordinator's directory, or the one `from` names there).
fn global_checkpoint(dir: &Path, from: Option<&str>) -> Result<PathBuf> {
    if dir.join("global.json").is_file() {
        if from.is_some() {
            bail!("--from picks a checkpoint in a coordinator's directory; {} is one checkpoint already", dir.display());
        }
        return Ok(dir.to_path_buf());
    }
    let n = match from {
        Some(f) => f
            .trim_start_matches("checkpoint-")
            .parse::<u64>()
            .with_context(|| format!("--from {f}: not a checkpoint number"))?,
        None => *stasis_coord::coordinator::published(dir)?
            .last()
            .with_context(|| format!("{} holds no global checkpoint", dir.display()))?,
    };
    let g = dir.join(stasis_coord::coordinator::checkpoint_name(n));
    if !g.join("global.json").is_file() {
        bail!("{} is not a published global checkpoint", g.display());
    }
    Ok(g)
}

/// `stasis restart --coordinator ADDR --nodes H0,H1,... DIR`: node part K of the global
/// checkpoint goes to node HK; part 0 is restarted here.
pub fn restart(
    coordinator: &str,
    nodes: &[String],
    dir: &Path,
    from: Option<&str>,
    wait: Duration,
    quiet: bool,
) -> Result<ExitCode> {
    let g = global_checkpoint(dir, from)?;
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(g.join("global.json"))
            .with_context(|| format!("reading {}/global.json", g.display()))?,
    )
    .with_context(|| format!("{}/global.json is damaged", g.display()))?;
    let old: Vec<String> = manifest["parts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["node"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default();
    if old.len() != nodes.len() {
        bail!(
            "{} holds {} node part(s) (taken on {}), but --nodes names {}: give one node per part, in order",
            g.display(),
            old.len(),
            old.join(", "),
            nodes.len()
        );
    }
    // Parts that shared a node at checkpoint time share its addresses in their images:
    // which of them a connection saved with one was to cannot be told apart once they
    // are on different nodes.
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_string();
    for k in 0..old.len() {
        for l in k + 1..old.len() {
            if short(&old[k]) == short(&old[l]) && short(&nodes[k]) != short(&nodes[l]) {
                bail!(
                    "parts {k} and {l} ran on one node ({}) at checkpoint time, and --nodes puts them on {} and {}: restart them on one node again (name the same node for both), or restart an earlier checkpoint taken before they shared one",
                    old[k],
                    nodes[k],
                    nodes[l]
                );
            }
        }
    }
    let parts: Vec<PathBuf> = (0..old.len())
        .map(|k| g.join(format!("node-{k}")))
        .collect();
    if let Some(missing) = parts.iter().find(|p| !p.is_dir()) {
        bail!("{} is missing", missing.display());
    }
    let here = stasis_coord::agent::hostname();
    if short(&here) != short(&nodes[0]) {
        bail!(
            "run this command on {}, the first node of --nodes (its part's output comes out here); this is {here}",
            nodes[0]
        );
    }
    // Where the restarted parts learn each other's new addresses: fresh for this
    // restart, next to the checkpoints, removed when this command ends.
    let rendezvous = g.parent().unwrap_or(Path::new(".")).join(format!(
        ".rendezvous-{}.{}",
        g.file_name()
            .map_or("x".into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    std::fs::create_dir_all(&rendezvous)
        .with_context(|| format!("creating {}", rendezvous.display()))?;
    let _remove = RemoveOnDrop(rendezvous.clone());
    let rv = rendezvous.display().to_string();
    let mut client = Client::connect_waiting(coordinator, wait)?;
    for k in 1..parts.len() {
        let part = parts[k].display().to_string();
        placing(&nodes[k], wait, quiet, || client.place(&nodes[k], &part, &rv))
            .with_context(|| {
                format!(
                    "restarting part {k} (from node {}) on node {}{}",
                    old[k],
                    nodes[k],
                    if k > 1 {
                        "; the parts restarted before it run on: stop them with `stasis checkpoint --coordinator ADDR --kill`"
                    } else {
                        ""
                    }
                )
            })?;
        if !quiet {
            eprintln!(
                "stasis: part {k} (from node {}) restarted on node {}",
                old[k], nodes[k]
            );
        }
    }
    drop(client);
    let sim = Simulation::off();
    super::agent(
        coordinator,
        Some(nodes[0].clone()),
        true,
        sim,
        None,
        Some(Launch::Restart {
            dir: parts[0].clone(),
            rendezvous: Some(rendezvous.clone()),
        }),
        quiet,
    )
}

/// How long to wait for a node's spare agent: `given`, else $STASIS_WAIT_AGENTS
/// seconds, else not at all.
pub fn agents_wait(given: Option<u64>) -> Duration {
    let secs = given.or_else(|| {
        std::env::var("STASIS_WAIT_AGENTS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
    });
    Duration::from_secs(secs.unwrap_or(0))
}

/// Runs `place` (a request for `node`'s spare agent) until it succeeds, or fails for
/// another reason than the agent not having joined yet, or `wait` has passed.
fn placing(
    node: &str,
    wait: Duration,
    quiet: bool,
    mut place: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match place() {
            Err(e)
                if e.to_string().starts_with("no spare agent on node")
                    && Instant::now() < deadline =>
            {
                if !said && !quiet {
                    eprintln!(
                        "stasis: waiting up to {} s for the spare agent of node {node} to join",
                        wait.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

/// ssh's options that take an argument (skipped with it by `stasis ssh`).
const SSH_OPTS_WITH_ARG: &str = "bBcDeEFIiJlLmoOpQRSwW";

/// `stasis ssh [SSH-OPTIONS] NODE COMMAND...` (see its --help).
pub fn ssh(coordinator: Option<String>, args: &[String], quiet: bool) -> Result<ExitCode> {
    let coordinator = coordinator
        .or_else(|| std::env::var("STASIS_COORDINATOR").ok())
        .context("no coordinator: give --coordinator ADDR:PORT or set STASIS_COORDINATOR (every part of a multi-node job has it)")?;
    let mut rest = args.iter();
    let node = loop {
        let Some(a) = rest.next() else {
            bail!("usage: stasis ssh [SSH-OPTIONS] NODE COMMAND...");
        };
        if a == "--" {
            break rest
                .next()
                .context("usage: stasis ssh [SSH-OPTIONS] NODE COMMAND...")?;
        }
        match a.strip_prefix('-') {
            // `-p 22`, but not `-p22`
            Some(o) if o.len() == 1 && SSH_OPTS_WITH_ARG.contains(o) => {
                rest.next();
            }
            Some(_) => {}
            None => break a,
        }
    };
    // user@host: the user is ours anyway.
    let node = node.rsplit('@').next().unwrap_or(node);
    let cmd: Vec<&str> = rest.map(String::as_str).collect();
    if cmd.is_empty() {
        bail!("stasis ssh {node}: no command (an interactive shell is not offered)");
    }
    let line = cmd.join(" ");
    let mut client = Client::connect_waiting(&coordinator, agents_wait(None))?;
    placing(node, agents_wait(None), quiet, || {
        client.start_on(node, &line)
    })
    .with_context(|| format!("starting {line:?} on node {node}"))?;
    if !quiet {
        tracing::info!("started {line:?} on node {node}");
    }
    Ok(ExitCode::SUCCESS)
}
