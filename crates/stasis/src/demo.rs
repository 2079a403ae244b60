//! `stasis demo`: a self-contained demonstration that needs nothing but the binary.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

/// The workload: a counter with a running checksum, printed every 100 ms.
pub fn workload(ticks: u64) -> Result<ExitCode> {
    let mut sum: u64 = 0;
    let out = std::io::stdout();
    for i in 0..ticks {
        sum = sum.wrapping_mul(31).wrapping_add(i * i + 7);
        writeln!(out.lock(), "tick {i} checksum {sum:016x}")?;
        std::thread::sleep(Duration::from_millis(100));
    }
    writeln!(out.lock(), "done after {ticks} ticks, checksum {sum:016x}")?;
    Ok(ExitCode::SUCCESS)
}

fn expected_checksums(ticks: u64) -> Vec<u64> {
    let mut sum: u64 = 0;
    (0..ticks)
        .map(|i| {
            sum = sum.wrapping_mul(31).wrapping_add(i * i + 7);
            sum
        })
        .collect()
}

struct Phase {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn start(cmd: &mut Command) -> Result<Phase> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting stasis")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Phase { child, lines: rx })
}

/// Runs the demonstration.
pub fn demo(dir: Option<PathBuf>) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the stasis binary")?;
    let temp = dir.is_none();
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("stasis-demo-{}", std::process::id()))
    });
    let ticks = 30u64;
    let want = expected_checksums(ticks);
    println!("stasis demo: a counter runs under stasis; it is checkpointed and killed twice,");
    println!("and each restart must continue with the next tick and the right checksum.");
    println!("checkpoints go to {}\n", dir.display());
    let mut seen: Vec<u64> = Vec::new();
    let mut phase = start(
        Command::new(&exe)
            // The job's /tmp is its own: a working directory there would be refused.
            .current_dir("/")
            .arg("run")
            .arg("--dir")
            .arg(&dir)
            .arg("--")
            .arg(&exe)
            .arg("demo-workload")
            .arg(ticks.to_string()),
    )?;
    for (round, stop_at) in [(1, 8u64), (2, 17u64)] {
        loop {
            let line = phase
                .lines
                .recv_timeout(Duration::from_secs(30))
                .context("the workload stopped printing")?;
            println!("  app | {line}");
            let n = check_line(&line, &want)?;
            if let Some(&last) = seen.last() {
                if n != last + 1 {
                    bail!("tick {n} follows tick {last}: the computation did not continue where it stopped");
                }
            }
            seen.push(n);
            if n == stop_at {
                break;
            }
        }
        let st = Command::new(&exe)
            .arg("checkpoint")
            .arg("--kill")
            .arg(&dir)
            .status()?;
        if !st.success() {
            bail!("checkpoint failed");
        }
        let code = phase.child.wait()?.code();
        println!("\n-- checkpoint {round} taken; the application was killed (stasis exited with {code:?})");
        println!("-- stasis restart {}\n", dir.display());
        phase = start(Command::new(&exe).arg("restart").arg(&dir))?;
    }
    while let Ok(line) = phase.lines.recv_timeout(Duration::from_secs(30)) {
        println!("  app | {line}");
        if line.starts_with("done") {
            break;
        }
        let n = check_line(&line, &want)?;
        if seen.last().is_some_and(|&l| n != l + 1) {
            bail!("tick {n} does not follow tick {:?}", seen.last());
        }
        seen.push(n);
    }
    let st = phase.child.wait()?;
    if temp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !st.success() || seen.len() as u64 != ticks {
        bail!(
            "the workload did not finish cleanly ({st}, {} ticks seen)",
            seen.len()
        );
    }
    println!("\nstasis demo: OK - all {ticks} ticks seen exactly once, checksums right, across 2 checkpoint/kill/restart cycles.");
    Ok(ExitCode::SUCCESS)
}

fn check_line(line: &str, want: &[u64]) -> Result<u64> {
    let mut w = line.split_whitespace();
    let (Some("tick"), Some(n), Some("checksum"), Some(sum)) =
        (w.next(), w.next(), w.next(), w.next())
    else {
        bail!("unexpected output {line:?}");
    };
    let n: u64 = n.parse()?;
    let sum = u64::from_str_radix(sum, 16)?;
    if want.get(n as usize) != Some(&sum) {
        bail!("wrong checksum at tick {n}: memory was not restored correctly");
    }
    Ok(n)
}
