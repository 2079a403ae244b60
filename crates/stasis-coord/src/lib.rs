//! Checkpoints of jobs that span many nodes: the coordinator, its protocol and the
//! agent side (docs/PROTOCOL.md).
//!
//! A global checkpoint is a two-phase commit. The coordinator tells every agent to
//! `freeze` its node's part of the job; once all are frozen, to `dump` it into
//! `DIR/.checkpoint-N.partial/node-K` and sync it; once all are written, it publishes
//! the checkpoint with one rename to `DIR/checkpoint-N` and then tells every agent to
//! `resume` (or `kill`). If any agent fails, is lost or does not answer within the
//! timeout in freeze or dump, every agent is told to `abort` (its part runs on), the
//! partial checkpoint is removed and nothing is published.
//!
//! * [`protocol`]: the messages and their framing (one JSON object per line).
//! * [`coordinator`]: the coordinator's state machine and server.
//! * [`agent`]: the agent side and [`agent::LocalPart`], the hooks through which the
//!   checkpoint engine drives a node's part.
//! * [`simulate`]: a simulated part (tests, benchmark); [`client`]: asking for a
//!   checkpoint; [`bench`]: the scale benchmark.

pub mod agent;
pub mod bench;
pub mod client;
pub mod coordinator;
pub mod protocol;
pub mod simulate;
