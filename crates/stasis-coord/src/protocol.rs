//! The wire protocol between the coordinator, its agents and checkpoint clients
//! (docs/PROTOCOL.md): one JSON object per line over TCP, tagged by `type`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

/// The newest protocol version this build speaks.
pub const VERSION: u32 = 2;
/// The oldest protocol version this build speaks.
pub const MIN_VERSION: u32 = 1;
/// The longest line accepted (a message larger than this is a protocol error).
pub const MAX_LINE: usize = 1 << 20;

/// What a connection is to the coordinator (sent in `hello`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An agent holding a part of the job: it takes part in every checkpoint.
    Agent,
    /// An agent that only offers its node (for restarts); not part of checkpoints.
    Spare,
    /// A client asking for checkpoints (`stasis checkpoint --coordinator`).
    Client,
}

/// Every message of the protocol.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// First message of every connection, to the coordinator.
    Hello {
        /// The newest version the sender speaks.
        version: u32,
        /// The oldest version the sender speaks.
        min_version: u32,
        role: Role,
        /// The sender's node (its hostname).
        node: String,
        /// The sender's process id (for messages and logs).
        pid: u32,
        /// An agent restarting part K of a global checkpoint: K, its place in the
        /// next ones (version 2; absent otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        /// An agent's node's addresses (version 2): TCP connections of the job to
        /// them are between its parts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        addresses: Vec<String>,
    },
    /// The coordinator's answer to an acceptable `hello`.
    Welcome {
        /// The version both sides speak from now on.
        version: u32,
        /// The agent's number in this coordinator (in join order; 0 for clients).
        agent: u32,
        /// The coordinator's per-phase timeout in milliseconds.
        timeout_ms: u64,
    },
    /// The coordinator's answer to an unacceptable `hello`; it then closes.
    Refused { reason: String },

    /// Coordinator to agent: freeze the local part for checkpoint `ckpt`. `nodes`
    /// (version 2): the addresses of every node of the checkpoint (TCP connections to
    /// them are between parts of the job, saved on both ends).
    Freeze {
        ckpt: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nodes: Vec<String>,
    },
    /// Coordinator to agent: write the local part into `dir` (created by the agent, on
    /// a file system the coordinator sees) and sync it.
    Dump { ckpt: u64, dir: String },
    /// Coordinator to agent: the checkpoint is published; let the local part run on.
    Resume { ckpt: u64 },
    /// Coordinator to agent: the checkpoint is published; kill the local part.
    Kill { ckpt: u64 },
    /// Coordinator to agent: the checkpoint is abandoned; let the local part run on.
    Abort { ckpt: u64 },

    /// Agent to coordinator: frozen.
    Frozen { ckpt: u64 },
    /// Agent to coordinator: written and synced (`bytes` written).
    Dumped { ckpt: u64, bytes: u64 },
    /// Agent to coordinator: running again after `resume`.
    Resumed { ckpt: u64 },
    /// Agent to coordinator: killed after `kill`; the agent exits.
    Killed { ckpt: u64 },
    /// Agent to coordinator: running again after `abort` (or after abandoning it itself).
    Aborted { ckpt: u64 },
    /// Agent to coordinator: the current step of `ckpt` failed; the local part runs on.
    /// `passing` (version 2, absent when false): the part was in a passing state that
    /// cannot be saved (a connection not accepted yet...): the same checkpoint may
    /// succeed a moment later, and the coordinator tries again.
    Failed {
        ckpt: u64,
        error: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        passing: bool,
    },

    /// Client to coordinator: take a global checkpoint (and then kill the job).
    Checkpoint { kill: bool },
    /// Coordinator to client: checkpoint published.
    Done {
        ckpt: u64,
        /// The published checkpoint directory.
        path: String,
        /// One per agent, in part order (`node-0`, `node-1`, ...).
        nodes: Vec<String>,
        freeze_ms: f64,
        dump_ms: f64,
        publish_ms: f64,
        total_ms: f64,
        /// Agents that did not confirm resume/kill in time (the checkpoint stands).
        warnings: Vec<String>,
    },
    /// Coordinator to client: the checkpoint was abandoned (nothing published), or a
    /// placement failed.
    Error { reason: String },

    /// Client to coordinator (version 2): have the spare agent of `node` restart the
    /// node part in `dir` (one `node-K` of a global checkpoint) as its part of the job.
    Place {
        node: String,
        /// The node part to restart; empty when `cmd` is to be started instead.
        dir: String,
        /// A command line (run by `bash -c`) to start there as a new part of the job,
        /// as a remote shell would (`stasis ssh`); empty for a restart.
        #[serde(default)]
        cmd: String,
        /// A directory the restarted parts meet in to learn each other's new
        /// addresses (see `STASIS_RENDEZVOUS`); empty: none.
        #[serde(default)]
        rendezvous: String,
    },
    /// Coordinator to spare agent (version 2): restart the node part in `dir`; the
    /// agent then takes part in checkpoints as an agent.
    Restore {
        dir: String,
        /// As in `place`.
        #[serde(default)]
        cmd: String,
        /// As in `place`.
        #[serde(default)]
        rendezvous: String,
    },
    /// Spare agent to coordinator (version 2): the part in `dir` runs here now.
    Restored { dir: String },
    /// Spare agent to coordinator (version 2): restarting the part failed.
    RestoreFailed { dir: String, error: String },
    /// Coordinator to client (version 2): the part runs on `node` now.
    Placed { node: String },
}

impl Msg {
    /// The message's `type` (for errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Welcome { .. } => "welcome",
            Msg::Refused { .. } => "refused",
            Msg::Freeze { .. } => "freeze",
            Msg::Dump { .. } => "dump",
            Msg::Resume { .. } => "resume",
            Msg::Kill { .. } => "kill",
            Msg::Abort { .. } => "abort",
            Msg::Frozen { .. } => "frozen",
            Msg::Dumped { .. } => "dumped",
            Msg::Resumed { .. } => "resumed",
            Msg::Killed { .. } => "killed",
            Msg::Aborted { .. } => "aborted",
            Msg::Failed { .. } => "failed",
            Msg::Checkpoint { .. } => "checkpoint",
            Msg::Done { .. } => "done",
            Msg::Error { .. } => "error",
            Msg::Place { .. } => "place",
            Msg::Restore { .. } => "restore",
            Msg::Restored { .. } => "restored",
            Msg::RestoreFailed { .. } => "restore_failed",
            Msg::Placed { .. } => "placed",
        }
    }

    /// The checkpoint a message of a checkpoint's phases belongs to.
    pub fn ckpt(&self) -> Option<u64> {
        match self {
            Msg::Freeze { ckpt, .. }
            | Msg::Dump { ckpt, .. }
            | Msg::Resume { ckpt }
            | Msg::Kill { ckpt }
            | Msg::Abort { ckpt }
            | Msg::Frozen { ckpt }
            | Msg::Dumped { ckpt, .. }
            | Msg::Resumed { ckpt }
            | Msg::Killed { ckpt }
            | Msg::Aborted { ckpt }
            | Msg::Failed { ckpt, .. } => Some(*ckpt),
            _ => None,
        }
    }
}

/// Writes one message (one line) and flushes.
pub fn send(w: &mut impl Write, msg: &Msg) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one message; Ok(None) at a clean end of the stream. `peer` names the other
/// side in errors.
pub fn recv<R: BufRead>(r: &mut R, peer: &str) -> Result<Option<Msg>> {
    let mut line = Vec::new();
    let mut limited = std::io::Read::take(&mut *r, MAX_LINE as u64 + 1);
    let n = limited
        .read_until(b'\n', &mut line)
        .with_context(|| format!("reading from {peer}"))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() > MAX_LINE {
            bail!("{peer} sent a message longer than {MAX_LINE} bytes");
        }
        bail!("{peer} closed the connection in the middle of a message");
    }
    let msg = serde_json::from_slice(&line).with_context(|| {
        format!(
            "{peer} sent something that is not a stasis coordinator message: {}",
            String::from_utf8_lossy(&line[..line.len().min(200)]).trim_end()
        )
    })?;
    Ok(Some(msg))
}

/// The version two sides with these ranges speak, or why there is none.
pub fn negotiate(
    theirs: (u32, u32),
    ours: (u32, u32),
    who: &str,
) -> std::result::Result<u32, String> {
    let (their_min, their_max) = theirs;
    let (our_min, our_max) = ours;
    let v = their_max.min(our_max);
    if v < their_min.max(our_min) {
        return Err(format!(
            "protocol version mismatch: {who} speaks version {} and this coordinator {}; \
             use the same stasis release on every node",
            range(their_min, their_max),
            range(our_min, our_max)
        ));
    }
    Ok(v)
}

fn range(lo: u32, hi: u32) -> String {
    if lo == hi {
        format!("{lo}")
    } else {
        format!("{lo}-{hi}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_shape() {
        let m = Msg::Dump {
            ckpt: 3,
            dir: "/d/x".into(),
        };
        let mut buf = Vec::new();
        send(&mut buf, &m).unwrap();
        assert_eq!(
            String::from_utf8(buf.clone()).unwrap(),
            "{\"type\":\"dump\",\"ckpt\":3,\"dir\":\"/d/x\"}\n"
        );
        let mut r = std::io::BufReader::new(&buf[..]);
        assert_eq!(recv(&mut r, "x").unwrap(), Some(m));
        assert_eq!(recv(&mut r, "x").unwrap(), None);
    }

    #[test]
    fn passing_is_optional_on_the_wire() {
        let plain = Msg::Failed {
            ckpt: 2,
            error: "e".into(),
            passing: false,
        };
        let mut buf = Vec::new();
        send(&mut buf, &plain).unwrap();
        // As an agent that does not know `passing` sends it, and reads it.
        assert_eq!(
            String::from_utf8(buf.clone()).unwrap(),
            "{\"type\":\"failed\",\"ckpt\":2,\"error\":\"e\"}\n"
        );
        let mut r = std::io::BufReader::new(&buf[..]);
        assert_eq!(recv(&mut r, "x").unwrap(), Some(plain));
        let mut buf = Vec::new();
        let passing = Msg::Failed {
            ckpt: 2,
            error: "e".into(),
            passing: true,
        };
        send(&mut buf, &passing).unwrap();
        assert!(String::from_utf8(buf.clone())
            .unwrap()
            .contains("\"passing\":true"));
        let mut r = std::io::BufReader::new(&buf[..]);
        assert_eq!(recv(&mut r, "x").unwrap(), Some(passing));
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let mut r = std::io::BufReader::new(&b"{\"type\":\"nope\"}\n"[..]);
        let e = recv(&mut r, "agent 2").unwrap_err().to_string();
        assert!(e.contains("agent 2"), "{e}");
        let mut r = std::io::BufReader::new(&b"{\"type\":\"fro"[..]);
        assert!(format!("{:#}", recv(&mut r, "a").unwrap_err()).contains("middle"));
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate((1, 3), (1, 1), "a"), Ok(1));
        assert_eq!(negotiate((2, 2), (1, 3), "a"), Ok(2));
        let e = negotiate((2, 2), (1, 1), "agent on n1").unwrap_err();
        assert!(
            e.contains("version mismatch") && e.contains("agent on n1 speaks version 2"),
            "{e}"
        );
    }
}
