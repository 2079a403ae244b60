//! Global checkpoints on disk: their names, the published ones, and publishing one
//! (global.json written and synced, then one rename).

use super::state::Round;
use crate::protocol;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// K of a node part's directory `.../node-K` (None for any other name).
pub fn part_number(dir: &str) -> Option<u32> {
    dir.trim_end_matches('/')
        .rsplit('/')
        .next()?
        .strip_prefix("node-")?
        .parse()
        .ok()
}

/// The name of checkpoint `n` in the checkpoint directory.
pub fn checkpoint_name(n: u64) -> String {
    format!("checkpoint-{n:06}")
}

pub(super) fn partial_name(n: u64) -> String {
    format!(".{}.partial", checkpoint_name(n))
}

/// The numbers of the published checkpoints in `dir`, oldest first.
pub fn published(dir: &Path) -> Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        if let Some(n) = e
            .file_name()
            .to_str()
            .and_then(|s| s.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Writes the manifest, syncs, and renames the partial checkpoint into place (the
/// commit point of the checkpoint).
pub(super) fn publish(dir: &Path, r: &Round) -> Result<PathBuf> {
    use std::io::Write;
    let parts: Vec<serde_json::Value> = r
        .nodes
        .iter()
        .enumerate()
        .map(|(k, node)| {
            serde_json::json!({
                "part": format!("node-{k}"),
                "node": node,
                "bytes": r.bytes.get(&r.members[k]).copied().unwrap_or(0),
            })
        })
        .collect();
    let taken = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let manifest = serde_json::json!({
        "format": 1,
        "protocol_version": protocol::VERSION,
        "checkpoint": r.ckpt,
        "taken_at_unix": taken,
        "killed": r.kill,
        "parts": parts,
    });
    for k in 0..r.members.len() {
        let part = r.staging.join(format!("node-{k}"));
        if !part.is_dir() {
            anyhow::bail!(
                "{} is missing although its agent said it was written",
                part.display()
            );
        }
    }
    let path = r.staging.join("global.json");
    let mut f =
        fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(&r.staging)?;
    let final_path = dir.join(checkpoint_name(r.ckpt));
    fs::rename(&r.staging, &final_path).with_context(|| {
        format!(
            "cannot rename {} to {}",
            r.staging.display(),
            final_path.display()
        )
    })?;
    sync_dir(dir)?;
    Ok(final_path)
}
