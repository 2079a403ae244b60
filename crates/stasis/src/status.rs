//! `stasis status DIR`: whether a job runs under the directory, and its checkpoints
//! (when each was taken, its size, how long the job was paused), from the files as
//! they are: nothing is verified (`stasis verify` does that) and nothing waits.

use crate::control;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// One checkpoint, as `status --json` prints it.
#[derive(Debug, Serialize)]
struct Entry {
    name: String,
    sequence: u64,
    /// When it was published (milliseconds since the Unix epoch; 0 if unknown).
    created_unix_ms: u64,
    /// Bytes of its files.
    bytes: u64,
    /// How long the application was paused for it, in milliseconds.
    pause_ms: f64,
    /// Processes saved in it.
    processes: usize,
    /// Earlier checkpoints it refers to (incremental).
    depends_on: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct Status {
    dir: String,
    /// A `stasis run`/`restart` supervises the directory now.
    running: bool,
    checkpoints: Vec<Entry>,
}

fn entry(seq: u64, path: &Path) -> Entry {
    let json = |name: &str| -> serde_json::Value {
        std::fs::read(path.join(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let manifest = json("manifest.json");
    let meta = json("checkpoint.json");
    let bytes = std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let t = &meta["timings"];
    let us = |k: &str| t[k].as_u64().unwrap_or(0) as f64;
    Entry {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sequence: seq,
        created_unix_ms: manifest["manifest"]["created_unix_ms"]
            .as_u64()
            .unwrap_or(0),
        bytes,
        pause_ms: (us("freeze_us") + us("dump_us")) / 1000.0,
        processes: meta["processes"].as_array().map_or(0, |p| p.len()),
        depends_on: meta["depends_on"]
            .as_array()
            .map(|d| d.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default(),
    }
}

/// A time of day (UTC) and how long ago, for people.
fn when(ms: u64) -> String {
    if ms == 0 {
        return "time unknown".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(ms);
    let s = ms / 1000;
    let ago = now.saturating_sub(ms) / 1000;
    let ago = match ago {
        0..=119 => format!("{ago} s ago"),
        120..=7199 => format!("{} min ago", ago / 60),
        _ => format!("{:.1} h ago", ago as f64 / 3600.0),
    };
    format!(
        "{:02}:{:02}:{:02} UTC, {ago}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60
    )
}

/// Prints the status of the job under `dir`.
pub fn status(dir: &Path, json: bool) -> Result<()> {
    let dir = control::canonical(dir)?;
    let list = stasis_image::store::list_checkpoints(&dir)
        .with_context(|| format!("listing {}", dir.display()))?;
    let st = Status {
        dir: dir.display().to_string(),
        running: control::is_supervised(&dir),
        checkpoints: list.iter().map(|(seq, p)| entry(*seq, p)).collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!("directory    {}", st.dir);
    println!(
        "job          {}",
        if st.running {
            "running (a `stasis run` or `stasis restart` supervises it)"
        } else {
            "not running here"
        }
    );
    match st.checkpoints.last() {
        None => println!("checkpoints  none"),
        Some(newest) => {
            println!(
                "checkpoints  {} (newest: {}, {})",
                st.checkpoints.len(),
                newest.name,
                when(newest.created_unix_ms)
            );
            for c in &st.checkpoints {
                println!(
                    "  {}  {}  {:>9.1} MiB  {} process(es)  paused {:.1} ms{}",
                    c.name,
                    when(c.created_unix_ms),
                    c.bytes as f64 / 1048576.0,
                    c.processes,
                    c.pause_ms,
                    if c.depends_on.is_empty() {
                        String::new()
                    } else {
                        format!("  (incremental: also needs {:?})", c.depends_on)
                    }
                );
            }
        }
    }
    Ok(())
}
