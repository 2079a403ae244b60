//! Metadata of a checkpoint (`checkpoint.json`): plain, versioned structs.
//!
//! Every field is documented in docs/IMAGE-FORMAT.md. Adding a field: give it
//! `#[serde(default)]` so that older images still load; changing a meaning: bump
//! [`crate::FORMAT_VERSION`].
//!
//! One file per part of the image, all re-exported here (and from the crate root),
//! so `stasis_image::X` and `stasis_image::model::X` name each struct:
//!
//! - this file: the top-level [`Checkpoint`], how the job was started, timings,
//!   zombies, the job's private directories, System V IPC objects, hex helpers;
//! - [`process`]: a process, its threads, signals, settings, credentials, timers,
//!   limits, locks and job-control stop;
//! - [`memory`]: mappings, page runs, page files and page hashes, shared memory
//!   objects and deleted files;
//! - [`files`]: fds and the kinds of open file descriptions, pipes, pseudo-terminals;
//! - [`sockets`]: UNIX and inet sockets.

mod files;
mod memory;
mod process;
mod sockets;
#[cfg(test)]
mod tests;

pub use files::*;
pub use memory::*;
pub use process::*;
use serde::{Deserialize, Serialize};
pub use sockets::*;
pub use stasis_sys::arch::Regs;

/// Top-level metadata of one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Sequence number (the NNNNNN of `checkpoint-NNNNNN`).
    pub sequence: u64,
    /// Architecture the image was taken on (`x86_64`).
    pub arch: String,
    /// `uname -r` of the kernel the image was taken on.
    pub kernel: String,
    /// Page size of the image's page files.
    pub page_size: u64,
    /// How the processes were started: under `stasis run` or attached with `--pid`.
    pub origin: Origin,
    /// PID of the root of the saved tree.
    pub root_pid: i32,
    /// Every saved process, parents before children.
    pub processes: Vec<Process>,
    /// Earlier checkpoints (sequence numbers) whose page files this incremental
    /// checkpoint refers to; they must be kept and verified with it.
    #[serde(default)]
    pub depends_on: Vec<u64>,
    /// Children that had exited but were not reaped yet (zombies).
    #[serde(default)]
    pub zombies: Vec<Zombie>,
    /// Pipes held by the processes, with the bytes in flight.
    #[serde(default)]
    pub pipes: Vec<Pipe>,
    /// Pseudo-terminal pairs held by the processes (both ends inside the job).
    #[serde(default)]
    pub ptys: Vec<Pty>,
    /// UNIX domain sockets held by the processes.
    #[serde(default)]
    pub sockets: Vec<UnixSocket>,
    /// TCP and UDP sockets (IPv4, IPv6) held by the processes.
    #[serde(default)]
    pub inet_sockets: Vec<InetSocket>,
    /// The job had a network namespace of its own (`stasis run --network private`):
    /// restart creates a new one, and TCP connections were saved with `repair` state.
    #[serde(default)]
    pub private_network: bool,
    /// A node's part of a multi-node job: the node's addresses at checkpoint time, and
    /// the addresses of the job's first start (what its processes know), with the node
    /// address each stands for at this checkpoint (`[first, current]`). A restart onto
    /// other nodes publishes where each is now (see docs/PROTOCOL.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_map: Vec<[String; 2]>,
    /// Listener ports the job's processes may know that moved at an earlier restart
    /// (several parts on one node): where each is now on the node its address stands
    /// for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_map: Vec<PortMove>,
    /// The job's private /tmp and /dev/shm (`stasis run --tmp private`, the default),
    /// their whole content; restart mounts new ones and recreates it. Empty: the job
    /// used the host's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_dirs: Vec<PrivateDir>,
    /// System V IPC objects of the job's own IPC namespace.
    #[serde(default)]
    pub sysv: Sysv,
    /// Shared memory objects mapped by the processes, saved once each.
    #[serde(default)]
    pub shared_memory: Vec<SharedObject>,
    /// Where the time went while checkpointing.
    pub timings: Timings,
}

/// A directory private to the job (a tmpfs mounted by the namespace init), with
/// everything in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateDir {
    /// Where it is mounted (`/tmp`, `/dev/shm`).
    pub path: String,
    /// Its entries, each directory before what it holds; the first is the directory
    /// itself (path "").
    pub entries: Vec<DirEntry>,
    /// The data file holding the bytes of its regular files.
    pub data_file: String,
}

/// One file, directory, symbolic link or FIFO in a [`PrivateDir`]. (Sockets are not
/// saved: a listener of the job binds its name again at restore.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Relative to the private directory.
    pub path: String,
    pub kind: DirEntryKind,
    /// Permission bits (with setgid and sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Regular file: size in bytes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Regular file: the (offset, length) ranges holding data (the rest is holes),
    /// stored one after another in the data file from `data_offset`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_offset: u64,
    /// Symbolic link: its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Regular file: another name (a hard link) of the entry at this index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_of: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirEntryKind {
    Dir,
    File,
    Symlink,
    Fifo,
}

/// An exited, not yet reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Wait status as waitpid(2) would report it (exit code << 8, or the signal).
    pub status: i32,
}

/// System V IPC objects (svipc(7)) of the IPC namespace the job runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sysv {
    pub shm: Vec<SysvShm>,
    pub sem: Vec<SysvSem>,
    pub msg: Vec<SysvMsg>,
}

/// A shared memory segment (shmget(2)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvShm {
    pub key: i32,
    pub id: i32,
    pub mode: u32,
    pub size: u64,
    /// Data file with the content.
    pub data_file: String,
}

/// A semaphore set (semget(2)) with its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvSem {
    pub key: i32,
    pub id: i32,
    pub mode: u32,
    pub values: Vec<u16>,
}

/// A message queue (msgget(2)) with its messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvMsg {
    pub key: i32,
    pub id: i32,
    pub mode: u32,
    /// (mtype, length) of each message; the bytes follow each other in `data_file`.
    pub messages: Vec<(i64, u64)>,
    pub data_file: Option<String>,
}

/// How the checkpointed processes came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Launched by `stasis run` (or restored by `stasis restart`).
    Run,
    /// Attached with `stasis checkpoint --pid`.
    Attached,
}

/// Durations of the phases of a checkpoint, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// From the request to every thread stopped.
    pub freeze_us: u64,
    /// Reading state and memory while frozen (the application's pause, with `freeze_us`).
    pub dump_us: u64,
    /// Writing metadata and fsync of every file.
    pub sync_us: u64,
    /// Copying memory after the process resumed (from its copy-on-write snapshot).
    #[serde(default)]
    pub copy_us: u64,
    /// Whether memory was copied from a copy-on-write snapshot (while the process ran
    /// on, unless it was to be killed; false: stasis copied it from the frozen
    /// process).
    #[serde(default)]
    pub snapshot: bool,
    /// Bytes of page data written.
    pub pages_bytes: u64,
    /// Forking the copy-on-write snapshot (part of the pause).
    #[serde(default)]
    pub snapshot_us: u64,
    /// Whether the snapshot wrote its own pages into the page files (one copy);
    /// false: stasis copied them.
    #[serde(default)]
    pub one_copy: bool,
    /// No snapshot was taken although one could have been: the few pages written
    /// since the previous checkpoint were copied while frozen, which pauses the
    /// process no longer than a snapshot fork would.
    #[serde(default)]
    pub frozen_copy: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Lower-case hex of bytes (used for xstate and siginfo in the JSON metadata).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Inverse of [`to_hex`]; `None` on malformed input.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
