//! A simulated local part, for tests and the benchmark: each phase may take a given
//! time or fail, `dump` writes a small file and syncs it, and the part's state can be
//! written to a file (so tests can watch it from outside).

use crate::agent::LocalPart;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The phases a simulated part can be told to delay or fail.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Phase {
    Freeze,
    Dump,
    Resume,
    Kill,
    Abort,
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Phase, String> {
        Ok(match s {
            "freeze" => Phase::Freeze,
            "dump" => Phase::Dump,
            "resume" => Phase::Resume,
            "kill" => Phase::Kill,
            "abort" => Phase::Abort,
            _ => {
                return Err(format!(
                    "unknown phase {s:?} (freeze, dump, resume, kill, abort)"
                ))
            }
        })
    }
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Simulated {
    /// Named in the part's file and errors.
    pub node: String,
    pub delays: BTreeMap<Phase, Duration>,
    pub fail: Option<Phase>,
    /// The first this many dumps fail on a passing state ([`crate::agent::Passing`]).
    pub passing_dumps: u32,
    /// Where the state is written ("running", "freezing N", "frozen N", "dumping N",
    /// "dumped N", "killed N"), replaced atomically at every change.
    pub state_file: Option<PathBuf>,
    /// Size of the file `dump` writes.
    pub bytes: usize,
}

impl Simulated {
    pub fn new(node: &str) -> Simulated {
        Simulated {
            node: node.into(),
            bytes: 4096,
            ..Default::default()
        }
    }

    /// Writes the initial state ("running").
    pub fn start(&mut self) -> Result<()> {
        self.state("running")
    }

    fn state(&mut self, s: &str) -> Result<()> {
        let Some(p) = &self.state_file else {
            return Ok(());
        };
        let tmp = p.with_extension("tmp");
        fs::write(&tmp, format!("{s}\n"))
            .and_then(|()| fs::rename(&tmp, p))
            .with_context(|| format!("cannot write the simulated part's state to {}", p.display()))
    }

    fn step(&mut self, phase: Phase, ckpt: u64) -> Result<()> {
        if let Some(d) = self.delays.get(&phase) {
            std::thread::sleep(*d);
        }
        if self.fail == Some(phase) {
            bail!(
                "the simulated part on {} fails {phase:?} of checkpoint {ckpt} (as told)",
                self.node
            );
        }
        Ok(())
    }
}

impl LocalPart for Simulated {
    fn freeze(&mut self, ckpt: u64) -> Result<()> {
        self.state(&format!("freezing {ckpt}"))?;
        self.step(Phase::Freeze, ckpt)?;
        self.state(&format!("frozen {ckpt}"))
    }

    fn dump(&mut self, ckpt: u64, dir: &Path) -> Result<u64> {
        self.state(&format!("dumping {ckpt}"))?;
        self.step(Phase::Dump, ckpt)?;
        if self.passing_dumps > 0 {
            self.passing_dumps -= 1;
            return Err(crate::agent::Passing(format!(
                "the simulated part on {} meets a passing state at checkpoint {ckpt} (as told)",
                self.node
            ))
            .into());
        }
        fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("part.json");
        let head = serde_json::json!({
            "simulated": true,
            "node": self.node,
            "checkpoint": ckpt,
            "pid": std::process::id(),
        })
        .to_string();
        let mut body = head.into_bytes();
        body.push(b'\n');
        let pad = self.bytes.saturating_sub(body.len());
        body.extend(std::iter::repeat_n(b' ', pad));
        let mut f =
            fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
        self.state(&format!("dumped {ckpt}"))?;
        Ok(body.len() as u64)
    }

    fn resume(&mut self, ckpt: u64) -> Result<()> {
        self.step(Phase::Resume, ckpt)?;
        self.state("running")
    }

    fn kill(&mut self, ckpt: u64) -> Result<()> {
        self.step(Phase::Kill, ckpt)?;
        self.state(&format!("killed {ckpt}"))
    }

    fn abort(&mut self, ckpt: u64) -> Result<()> {
        self.step(Phase::Abort, ckpt)?;
        self.state("running")
    }
}

/// A part that does nothing at all (the benchmark's: only the protocol is measured).
pub struct Null;

impl LocalPart for Null {
    fn freeze(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
    fn dump(&mut self, _: u64, dir: &Path) -> Result<u64> {
        fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(0)
    }
    fn resume(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
    fn kill(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
    fn abort(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
}
