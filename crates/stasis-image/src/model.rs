//! Metadata of a checkpoint (`checkpoint.json`): plain, versioned structs.
//!
//! Every field is documented in docs/IMAGE-FORMAT.md. Adding a field: give it
//! `#[serde(default)]` so that older images still load; changing a meaning: bump
//! [`crate::FORMAT_VERSION`].

use serde::{Deserialize, Serialize};
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

/// A shared memory object (shmem inode), with its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedObject {
    /// Identifier the mappings refer to (the inode number at checkpoint time).
    pub id: u64,
    /// memfd name, or empty.
    pub name: String,
    /// Size in bytes (the largest extent mapped).
    pub size: u64,
    /// Data file with the content (pages no process had populated are holes).
    pub data_file: String,
    /// Permission bits (st_mode & 07777), when some process held the object as an fd
    /// (older images: none, the object keeps the mode it is created with).
    #[serde(default)]
    pub mode: Option<u32>,
    /// A memfd's seals (F_GET_SEALS; F_SEAL_SEAL alone for one created without
    /// MFD_ALLOW_SEALING), when some process held it as an fd. None: created without
    /// sealing, as older images were.
    #[serde(default)]
    pub seals: Option<u32>,
    /// Set when the object is a regular file deleted while open (not a memfd or an
    /// anonymous region): it is recreated as an unnamed file (O_TMPFILE) on the
    /// filesystem it was on, with its owner and times.
    #[serde(default)]
    pub deleted: Option<DeletedFile>,
}

/// What a regular file deleted while open had besides its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedFile {
    /// The path it had (without " (deleted)"); its directory is where it is recreated
    /// (or the nearest ancestor still there).
    pub path: String,
    /// Owner and group (restored where the restarting user may), and access and
    /// modification times as (seconds, nanoseconds): known when some process held
    /// the file as an fd (a file only mapped cannot be stat'ed without privilege).
    #[serde(default)]
    pub owner: Option<(u32, u32)>,
    #[serde(default)]
    pub atime: Option<(i64, i64)>,
    #[serde(default)]
    pub mtime: Option<(i64, i64)>,
}

/// A pseudo-terminal pair (pty(7)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pty {
    /// Its index (N of /dev/pts/N) at checkpoint time; restore gets a new one.
    pub id: u64,
    /// `struct termios` of the terminal (raw bytes, hex).
    pub termios: String,
    /// Window size: rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
    /// Session whose controlling terminal it is (0: none).
    #[serde(default)]
    pub session: i32,
    /// Foreground process group (0: none).
    #[serde(default)]
    pub foreground: i32,
    /// Bytes written to the master that the slave had not read yet (hex), as the
    /// slave's line discipline holds them (already processed by its input settings;
    /// in canonical mode, complete lines and a partial one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub input: String,
    /// Bytes written to the slave that the master had not read yet (hex), after the
    /// slave's output processing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
}

/// A UNIX domain socket (unix(7)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocket {
    /// Identifier the fds refer to (the socket's inode number at checkpoint time).
    pub id: u64,
    /// SOCK_STREAM (1), SOCK_DGRAM (2) or SOCK_SEQPACKET (5).
    pub sock_type: i32,
    /// `listening`, `connected` or `unconnected`.
    pub state: String,
    /// Bound address: a path, "@name" (abstract), or empty.
    pub name: String,
    /// For a relative path name: the directory it was bound in (the holder's cwd).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bound_in: String,
    /// The socket it is connected to (id), 0 if none.
    pub peer: u64,
    /// For the client end of a connection not yet accepted: the listener's id.
    #[serde(default)]
    pub pending_on: u64,
    /// For listeners: listen(2) backlog.
    #[serde(default)]
    pub backlog: u32,
    /// shutdown(2) bits: 1 = SHUT_RD, 2 = SHUT_WR.
    #[serde(default)]
    pub shutdown: u8,
    /// SO_PASSCRED.
    #[serde(default)]
    pub passcred: bool,
    /// Data file with the bytes waiting to be read, if any.
    pub data_file: Option<String>,
    /// Length of each queued message (one entry for a byte stream).
    #[serde(default)]
    pub messages: Vec<u64>,
    /// For datagram sockets: the address each queued message was sent from (what
    /// recvfrom(2) names: a path, "@name", or empty for an unbound sender), one per
    /// entry of `messages`. Empty in older images (every message then comes from the
    /// peer, or from an unbound socket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<String>,
    /// Still connected to a peer that was closed (released): a stream reader gets the
    /// queued bytes then end-of-file, a datagram socket's send fails with
    /// ECONNREFUSED. `peer` is 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_gone: bool,
    /// Connected to a socket outside the checkpoint, saved with
    /// `--unix-external=reconnect`: the name (path or "@name") to connect to again at
    /// restore. `peer` is 0.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reconnect: String,
    /// For `reconnect` with a relative name: the directory it is resolved in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reconnect_in: String,
    /// File descriptors in flight (sent with SCM_RIGHTS, not received yet), with the
    /// queued message that carries them. A stream's `messages` are then the segments
    /// between such messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight: Vec<InFlight>,
}

/// The file descriptors one queued message of a UNIX socket carries (SCM_RIGHTS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// Index of the message in the socket's `messages`.
    pub message: u64,
    /// The descriptors, in the order they were sent (`fd` is that position); their
    /// descriptions are shared with the processes' fds as usual (`desc`).
    pub fds: Vec<Fd>,
}

/// A TCP or UDP socket over IPv4 or IPv6 (ip(7), ipv6(7), tcp(7), udp(7)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetSocket {
    /// Identifier the fds refer to (the socket's inode number at checkpoint time).
    pub id: u64,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `listening`, `connected` (TCP: established or half-closed; UDP: connect(2)ed),
    /// `bound`, `unbound`, or `reset` (a TCP connection to a peer outside the
    /// checkpoint, saved with `--tcp-external=reset`: it comes back reset).
    pub state: String,
    /// Local address as `127.0.0.1:5000` or `[::1]:5000`; empty if unbound.
    pub local: String,
    /// Remote address (same form); empty if not connected.
    #[serde(default)]
    pub remote: String,
    /// TCP: the other end of the connection (id) when it is in the checkpoint, else 0.
    #[serde(default)]
    pub peer: u64,
    /// TCP: for the client end of a connection not yet accepted, the listener's id.
    #[serde(default)]
    pub pending_on: u64,
    /// TCP: the peer closed its end (a FIN came) and is not in the checkpoint: the
    /// queued bytes are followed by end of file.
    #[serde(default)]
    pub peer_closed: bool,
    /// For listeners: listen(2) backlog.
    #[serde(default)]
    pub backlog: u32,
    /// shutdown(2) bits applied to this end: 1 = SHUT_RD, 2 = SHUT_WR.
    #[serde(default)]
    pub shutdown: u8,
    /// Socket options that differ from a new socket's (name, value); see
    /// docs/IMAGE-FORMAT.md for the names.
    #[serde(default)]
    pub options: Vec<SocketOption>,
    /// Data file with the bytes waiting to be read (TCP: the receive queue and the
    /// peer's unread send queue, in order; UDP: the datagrams, concatenated), at
    /// `data_offset` in it (the sum of `messages` long). Every socket of a checkpoint
    /// shares one file, `inet.img`.
    #[serde(default)]
    pub data_file: Option<String>,
    #[serde(default)]
    pub data_offset: u64,
    /// Length of each queued datagram (TCP: one entry, the bytes queued).
    #[serde(default)]
    pub messages: Vec<u64>,
    /// UDP: sender address of each queued datagram.
    #[serde(default)]
    pub sources: Vec<String>,
    /// TCP, in a job's own network namespace: the connection's exact state, read with
    /// TCP_REPAIR. `data_file` then holds the receive queue followed by the send queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<TcpRepair>,
}

/// The state of an established TCP connection as TCP_REPAIR reads and sets it (tcp(7),
/// include/uapi/linux/tcp.h).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRepair {
    /// Sequence number after the last byte written (write_seq).
    pub snd_seq: u32,
    /// Sequence number after the last byte received (rcv_nxt).
    pub rcv_seq: u32,
    /// Bytes received and not yet read (the start of `data_file`).
    pub inq_len: u32,
    /// Bytes written and not yet acknowledged (the rest of `data_file`), of which
    /// `unsent_len` were not sent yet.
    pub outq_len: u32,
    pub unsent_len: u32,
    /// TCP options negotiated: maximum segment size, window scales, SACK, timestamps.
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub wscale_ok: bool,
    pub sack_ok: bool,
    pub timestamps_ok: bool,
    /// TCP_TIMESTAMP: the connection's current timestamp value.
    pub timestamp: u32,
    /// TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

/// One socket option, by its name in the C headers (`TCP_NODELAY`, `SO_LINGER`...).
/// `SO_LINGER` is the linger time in seconds, -1 when off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketOption {
    pub name: String,
    pub value: i64,
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

/// A pipe (pipe(2)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipe {
    /// Identifier the fds refer to (the pipe's inode number at checkpoint time).
    pub id: u64,
    /// Capacity (F_GETPIPE_SZ).
    pub capacity: u64,
    /// Data file holding the bytes that were in the pipe, if any.
    pub data_file: Option<String>,
    /// Number of bytes in flight.
    pub len: u64,
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

/// One process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    /// PID (in the PID namespace the image was taken in).
    pub pid: i32,
    /// Parent PID at checkpoint time.
    pub ppid: i32,
    /// Process group.
    #[serde(default)]
    pub pgid: i32,
    /// Session.
    #[serde(default)]
    pub sid: i32,
    /// The pseudo-terminal (id of `Checkpoint::ptys`) that is this process's
    /// controlling terminal, if it is one of the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctty: Option<u64>,
    /// Command name (`/proc/PID/comm`).
    pub comm: String,
    /// The executable (`/proc/PID/exe`).
    pub exe: FileId,
    /// Current working directory.
    pub cwd: String,
    /// The working directory had been removed (`cwd` then ends with " (deleted)"): the
    /// process gets a new, empty directory that is removed again, made next to where
    /// it was (or in the nearest ancestor left).
    #[serde(default)]
    pub cwd_removed: bool,
    /// File mode creation mask.
    pub umask: u32,
    /// Execution domain (personality(2)).
    pub personality: u32,
    /// Resource limits (getrlimit(2)); `u64::MAX` is RLIM_INFINITY.
    pub rlimits: Vec<Rlimit>,
    /// The `mm` fields that PR_SET_MM_MAP restores.
    pub mm: MmFields,
    /// Memory mappings in address order.
    pub mappings: Vec<Mapping>,
    /// The data files holding this process's pages.
    pub pages: PageFiles,
    /// Name of the data file with the content hash of every page of this
    /// checkpoint's page file (see [`PageHashes`]): what the next incremental
    /// checkpoint compares pages against when it cannot track writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_hashes: Option<String>,
    /// Name of the data file with the page runs of every mapping (see
    /// [`PageRun::encode_all`]); their `pages` are then empty in the JSON. Readers
    /// put them back ([`Process::attach_runs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_file: Option<String>,
    /// Open file descriptors.
    pub fds: Vec<Fd>,
    /// The parent whose file descriptor table this process shares (clone(2) with
    /// CLONE_FILES): restored sharing it again; `fds` are then the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_table_of: Option<i32>,
    /// Process-wide signal state.
    pub signals: Signals,
    /// Interval timers (ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF).
    pub itimers: Vec<Itimer>,
    /// POSIX interval timers (timer_create(2)), by ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_timers: Vec<PosixTimer>,
    /// Process-wide settings made with prctl(2) and /proc/PID files.
    #[serde(default)]
    pub settings: ProcessSettings,
    /// Stopped by job control at checkpoint time; restored stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_stop: Option<JobStop>,
    /// User and group IDs, capabilities and no_new_privs (as seen from the user
    /// namespace stasis ran in). None in images made before they were saved: the
    /// restored process then keeps the restorer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds: Option<Creds>,
    /// Threads; the first is the thread-group leader.
    pub threads: Vec<Thread>,
    /// File locks this process holds (POSIX record locks), or that are held by an
    /// open file description it has (OFD locks, flock), each recorded once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<FileLock>,
}

/// One file lock, taken again at restore through fd `fd` of its process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    /// The fd it is held through (POSIX: the process owns it; OFD and flock: the fd's
    /// open file description owns it).
    pub fd: i32,
    pub kind: LockKind,
    /// A write (exclusive) lock, else a read (shared) lock.
    pub write: bool,
    /// First byte (0 for flock, which locks the whole file).
    pub start: u64,
    /// Last byte, inclusive; None: to the end of the file and beyond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<u64>,
    /// OFD and flock locks held through no fd but through a mapping of this file (the
    /// JVM's perfdata file: flocked, mapped, closed): `fd` is -1 and the lock is taken
    /// again on the file the restored mapping is made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped: Option<String>,
}

/// Which kind of file lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// fcntl F_SETLK/F_SETLKW: owned by the process.
    Posix,
    /// fcntl F_OFD_SETLK: owned by the open file description.
    Ofd,
    /// flock(2): owned by the open file description.
    Flock,
}

/// A process stopped by job control (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU): it is
/// restored stopped and continues on SIGCONT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStop {
    /// The signal that stopped it (what its parent's waitpid reports as WSTOPSIG).
    pub signal: i32,
    /// Its parent had collected the stop (waitpid with WUNTRACED): waiting reports
    /// nothing more until it continues. False: the stop is still to be collected. True
    /// for a process whose parent is not in the image.
    pub waited: bool,
}

/// Process-wide settings a process makes about itself with prctl(2) or /proc/PID
/// files. The defaults are those of a new process (an image without them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessSettings {
    /// PR_SET_CHILD_SUBREAPER: orphaned descendants are reparented to this process.
    pub child_subreaper: bool,
    /// PR_GET_THP_DISABLE: 0 (transparent huge pages allowed), 1 (disabled), 3
    /// (disabled except where MADV_HUGEPAGE asks for them, PR_THP_DISABLE_EXCEPT_ADVISED).
    pub thp_disable: u32,
    /// PR_GET_DUMPABLE: 1 (dumpable), 0 (not: only a privileged tracer may attach), 2.
    pub dumpable: u32,
    /// /proc/PID/oom_score_adj (-1000..1000).
    pub oom_score_adj: i32,
    /// membarrier(2) registrations, as MEMBARRIER_CMD_GET_REGISTRATIONS reports them:
    /// the MEMBARRIER_CMD_REGISTER_* commands issued (GLOBAL_EXPEDITED 4,
    /// PRIVATE_EXPEDITED 16, PRIVATE_EXPEDITED_SYNC_CORE 64, PRIVATE_EXPEDITED_RSEQ 256).
    pub membarrier: u32,
    /// mlockall(2) flags in force for mappings made from now on: MCL_FUTURE (2), with
    /// MCL_ONFAULT (4) when so given; 0 when none. Seen at checkpoint time on the page
    /// stasis maps into the process (locked, or locked on fault, by them).
    pub mlockall: i32,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        ProcessSettings {
            child_subreaper: false,
            thp_disable: 0,
            dumpable: 1,
            oom_score_adj: 0,
            membarrier: 0,
            mlockall: 0,
        }
    }
}

/// The credentials of a process (its thread-group leader's: threads that changed
/// their own IDs with a raw syscall are not told apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    /// Real, effective, saved and filesystem user IDs.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem group IDs.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Capability sets, one bit per capability (`CapInh`, `CapPrm`, `CapEff`, `CapBnd`,
    /// `CapAmb` of /proc/PID/status).
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    /// PR_SET_NO_NEW_PRIVS.
    pub no_new_privs: bool,
}

/// A POSIX interval timer (timer_create(2)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    /// Its timer ID (what timer_create returned).
    pub id: i32,
    /// The clock (CLOCK_REALTIME 0, CLOCK_MONOTONIC 1, ...).
    pub clock: i32,
    /// `sigev_notify`: SIGEV_SIGNAL 0, SIGEV_NONE 1, with SIGEV_THREAD_ID (4) when it
    /// signals the thread `thread`.
    pub notify: u32,
    pub signal: i32,
    /// `sigev_value` (the pointer or integer the signal carries).
    pub value: u64,
    #[serde(default)]
    pub thread: i32,
    /// Period and time left, nanoseconds (0: not armed).
    pub interval_ns: u64,
    pub value_ns: u64,
}

/// One resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// RLIMIT_* number.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The memory-descriptor fields of `struct prctl_mm_map`, plus the auxiliary vector.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// The auxiliary vector as saved by the kernel (`/proc/PID/auxv`), as u64 words.
    pub auxv: Vec<u64>,
}

/// Identity of a file at checkpoint time, to detect that it changed before restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MappingKind {
    /// Anonymous memory (including `[heap]` and `[stack]`).
    Anonymous,
    /// A mapping of a regular file.
    File {
        file: FileId,
        /// Offset in the file, bytes.
        offset: u64,
    },
    /// Memory of an object with no file name left: MAP_SHARED|MAP_ANONYMOUS, a memfd,
    /// or a regular file deleted while open (also in /dev/shm). `id` is an object of
    /// `Checkpoint::shared_memory`, mapped from `offset`, MAP_SHARED or (memfds and
    /// deleted files) MAP_PRIVATE as `shared` says; a private one has its
    /// copied-on-write pages in `pages`.
    SharedMemory { id: u64, offset: u64 },
    /// An attached System V shared memory segment (`Checkpoint::sysv`).
    SysvShm { shmid: i32 },
    /// `[vdso]`: placed by the kernel, moved into place at restore.
    Vdso,
    /// `[vvar]`.
    Vvar,
    /// `[vvar_vclock]`.
    VvarVclock,
    /// `[vsyscall]`: fixed by the kernel, nothing to do.
    Vsyscall,
}

/// One memory mapping (one line of `/proc/PID/maps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    /// MAP_SHARED (true) or MAP_PRIVATE (false).
    pub shared: bool,
    pub kind: MappingKind,
    /// The name column of `/proc/PID/maps` (`[heap]`, `[stack]`, a path, or empty).
    pub name: String,
    /// VM_GROWSDOWN (`gd` in smaps VmFlags): the stack grows into the gap below.
    #[serde(default)]
    pub growsdown: bool,
    /// madvise(2) advice to re-apply: `dontfork`, `wipeonfork`, `dontdump`,
    /// `hugepage`, `nohugepage`.
    #[serde(default)]
    pub advice: Vec<String>,
    /// Saved pages: runs of consecutive pages and where they are in the page file.
    /// Stored in the process's `runs_file` (not in the JSON) by this release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageRun>,
    /// For a small shared file mapping: the data file holding the file's content at
    /// checkpoint time, used to recreate the file if it is missing at restore (e.g. the
    /// JVM's /tmp/hsperfdata_USER/PID on another node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_file: Option<String>,
}

impl Mapping {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range (never produced by the kernel).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Number of saved pages.
    pub fn saved_pages(&self) -> u64 {
        self.pages.iter().map(|r| r.npages).sum()
    }
}

/// A run of consecutive saved pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Virtual address of the first page.
    pub addr: u64,
    /// Number of pages.
    pub npages: u64,
    /// Byte offset of the first page in the page file (page-aligned).
    pub offset: u64,
    /// Sequence number of the (earlier) checkpoint whose page file holds these pages,
    /// for an incremental checkpoint; 0: this checkpoint.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from: u64,
}

impl PageRun {
    /// Size of one encoded run.
    pub const SIZE: usize = 32;

    /// Encodes runs, little-endian: addr, npages, offset, from (8 bytes each).
    pub fn encode_all<'a>(runs: impl IntoIterator<Item = &'a PageRun>) -> Vec<u8> {
        let mut out = Vec::new();
        for r in runs {
            for v in [r.addr, r.npages, r.offset, r.from] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a runs file; None when its size is not a whole number of runs.
    pub fn decode_all(b: &[u8]) -> Option<Vec<PageRun>> {
        if !b.len().is_multiple_of(Self::SIZE) {
            return None;
        }
        let u = |c: &[u8], k: usize| {
            u64::from_le_bytes(c[k * 8..k * 8 + 8].try_into().unwrap_or_default())
        };
        Some(
            b.chunks_exact(Self::SIZE)
                .map(|c| PageRun {
                    addr: u(c, 0),
                    npages: u(c, 1),
                    offset: u(c, 2),
                    from: u(c, 3),
                })
                .collect(),
        )
    }
}

impl Process {
    /// Puts runs read from the process's `runs_file` (in address order) into the
    /// mappings that hold them. Errs on a run that no mapping holds whole.
    pub fn attach_runs(&mut self, runs: Vec<PageRun>) -> Result<(), String> {
        let mut maps: Vec<&mut Mapping> = self.mappings.iter_mut().collect();
        maps.sort_unstable_by_key(|m| m.start);
        let mut k = 0;
        for r in runs {
            let end = r
                .npages
                .checked_mul(crate::PAGE_SIZE)
                .and_then(|len| r.addr.checked_add(len))
                .ok_or_else(|| format!("page run at {:x} overflows", r.addr))?;
            while k < maps.len() && maps[k].end <= r.addr {
                k += 1;
            }
            match maps.get_mut(k) {
                Some(m) if m.start <= r.addr && end <= m.end => m.pages.push(r),
                _ => {
                    return Err(format!(
                        "page run {:x}-{end:x} is outside every mapping (or out of order)",
                        r.addr
                    ))
                }
            }
        }
        Ok(())
    }
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A `page-hashes-PID.bin` file: the xxh3-128 hash of each page of a checkpoint's
/// (logical) page file, in page-file order, 16 bytes little-endian (low half first)
/// per page. Pages that are holes (zero, or referred to in an earlier checkpoint)
/// have the hash of a zero page. Its size grows with the pages the checkpoint stores,
/// not with the process.
pub struct PageHashes;

impl PageHashes {
    /// Size of one encoded hash.
    pub const SIZE: usize = 16;

    /// Encodes hashes, in page-file order.
    pub fn encode(hashes: &[u128]) -> Vec<u8> {
        let mut out = Vec::with_capacity(hashes.len() * Self::SIZE);
        for h in hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out
    }

    /// Appends the encoding of `hashes` to `out` without a copy per hash where the
    /// machine is little-endian (the encoding is then the memory layout).
    pub fn encode_into(hashes: &[u128], out: &mut impl FnMut(&[u8])) {
        if cfg!(target_endian = "little") {
            // SAFETY: u128 has no padding and every byte pattern is a valid u8; the
            // slice covers exactly the memory of `hashes`, which outlives it.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    hashes.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(hashes),
                )
            };
            out(bytes);
        } else {
            for chunk in hashes.chunks(4096) {
                out(&Self::encode(chunk));
            }
        }
    }

    /// Decodes a file (a trailing partial record is ignored).
    pub fn decode(b: &[u8]) -> Vec<u128> {
        b.chunks_exact(Self::SIZE)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()
    }
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    /// FD_CLOEXEC.
    pub cloexec: bool,
    pub kind: FdKind,
    /// Open file description: fds (of any processes) with the same number share one
    /// description (offset, flags), as after dup(2) or fork(2).
    #[serde(default)]
    pub desc: u64,
    /// Signal-driven I/O (O_ASYNC): who gets the signal and which (not for IP
    /// sockets, whose kind holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<FdOwner>,
}

/// The owner of an fd's signal-driven I/O (F_GETOWN_EX) and its signal (F_GETSIG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdOwner {
    /// F_OWNER_TID 0, F_OWNER_PID 1, F_OWNER_PGRP 2.
    pub kind: i32,
    /// 0: none.
    pub pid: i32,
    /// 0: SIGIO.
    pub signal: i32,
}

/// What an fd refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FdKind {
    /// One of the stdio streams that came from outside stasis (index 0, 1 or 2): bound
    /// at restart to the restarting stasis's own stream of that index.
    Stdio { index: u8 },
    /// A regular file or directory, reopened by path.
    File {
        file: FileId,
        /// open(2) flags (access mode, O_APPEND, O_NONBLOCK, ...), without O_CLOEXEC.
        flags: i32,
        /// File offset.
        pos: u64,
        /// The standard stream (0, 1, 2) of a process checkpointed with `--pid` that
        /// this file was (`nohup ./sim >out.log`): reopened like any file, or, with
        /// `stasis restart --stdio inherit`, bound to the restart's own stream.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stdio: Option<u8>,
    },
    /// A regular file deleted while open. Its inode is the object `object` of
    /// `Checkpoint::shared_memory` (saved once, however many fds and mappings refer
    /// to it); images from older versions have no object and the content of this fd's
    /// file in `data_file`.
    Deleted {
        path: String,
        flags: i32,
        pos: u64,
        mode: u32,
        /// Name of the data file in the checkpoint holding the content (older images;
        /// empty when `object` is set).
        data_file: String,
        size: u64,
        #[serde(default)]
        object: Option<u64>,
    },
    /// A directory removed while open (`path` without " (deleted)"): always empty,
    /// nothing can be created in it. Restored as a new directory made next to where
    /// it was (or in the nearest ancestor left), opened with `flags` and removed.
    RemovedDir { path: String, flags: i32, mode: u32 },
    /// A character device reopened by path (/dev/null, /dev/zero, /dev/urandom...).
    Device { path: String, flags: i32 },
    /// A descriptor opened with O_PATH (`flags` hold O_PATH, and O_NOFOLLOW and
    /// O_DIRECTORY as given): it names a file without opening it (no offset, no
    /// locks, no I/O). Reopened with O_PATH at `path` (with O_NOFOLLOW a symbolic link
    /// is the link itself), and checked to be of type `file_type` (the S_IFMT bits of
    /// st_mode); a deleted file or memfd through its object `object` of
    /// `Checkpoint::shared_memory`; a removed directory (`removed_dir`, its mode) as a
    /// new directory made next to where it was, opened and removed, as for
    /// `RemovedDir`.
    Path {
        path: String,
        flags: i32,
        file_type: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        removed_dir: Option<u32>,
    },
    /// A memfd (an object of `Checkpoint::shared_memory`).
    SharedMemory { id: u64, flags: i32, pos: u64 },
    /// eventfd(2): counter value and EFD_SEMAPHORE.
    EventFd {
        count: u64,
        semaphore: bool,
        flags: i32,
    },
    /// timerfd_create(2): remaining time and interval (nanoseconds), expirations not
    /// yet read.
    TimerFd {
        clockid: i32,
        flags: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    /// signalfd(2): the signal mask it reads.
    SignalFd { mask: u64, flags: i32 },
    /// inotify_init(2) with its watches.
    Inotify {
        flags: i32,
        watches: Vec<InotifyWatch>,
    },
    /// epoll_create(2) with its registered fds (numbers in the owning process).
    Epoll { flags: i32, items: Vec<EpollItem> },
    /// A pidfd (pidfd_open(2), clone(2) with CLONE_PIDFD) of process `pid` of the
    /// checkpoint (PIDs are kept); `flags` hold O_NONBLOCK (PIDFD_NONBLOCK). Opened
    /// again by the restored process itself once `pid` exists; one description per
    /// process (fds of one process that shared it still share it).
    Pidfd { pid: i32, flags: i32 },
    /// A file under /proc/PID of a process of the checkpoint (its own /proc/self/...,
    /// a child's /proc/PID/stat, the directory /proc/PID...): reopened at the same
    /// path by the restored process itself once `pid` exists, and positioned at `pos`.
    /// One description per process, as for pidfds.
    ProcFile {
        path: String,
        pid: i32,
        flags: i32,
        pos: u64,
    },
    /// A pseudo-terminal end (of `Checkpoint::ptys`): the master (/dev/ptmx) or the
    /// slave (/dev/pts/N); with `dev_tty`, a slave opened as /dev/tty by a process
    /// whose controlling terminal it was (reopened as /dev/tty at restore).
    Pty {
        pty: u64,
        master: bool,
        flags: i32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dev_tty: bool,
    },
    /// A UNIX domain socket of `Checkpoint::sockets`.
    UnixSocket { sock: u64, flags: i32 },
    /// A TCP or UDP socket of `Checkpoint::inet_sockets`; `owner` is the fd's
    /// F_SETOWN_EX target (type, pid) and `signal` its F_SETSIG, when set.
    InetSocket {
        sock: u64,
        flags: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<(i32, i32)>,
        #[serde(default, skip_serializing_if = "is_zero_i32")]
        signal: i32,
    },
    /// A named pipe (FIFO) opened by path; its bytes in flight are in
    /// `Checkpoint::pipes` under `pipe`.
    Fifo { path: String, pipe: u64, flags: i32 },
    /// One end of a pipe of `Checkpoint::pipes`.
    Pipe {
        pipe: u64,
        /// The write end (else the read end).
        write: bool,
        flags: i32,
    },
    /// The application's connection to the stasis application interface (docs/API.md),
    /// whose other end was the supervising stasis: on restore a new connection to the
    /// restoring stasis, whose first line is the `restarted` event. Bytes queued in
    /// either direction are not saved.
    AppApi {
        /// File status flags (O_NONBLOCK...).
        #[serde(default)]
        flags: i32,
        /// The application had asked for `pre-checkpoint` events.
        #[serde(default)]
        pre_checkpoint: bool,
    },
}

/// One inotify watch: its number, event mask, and a path to the watched inode (or
/// the fd of the job holding it, for a deleted file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: String,
    /// [pid, fd] of an fd of the job that holds the watched inode, a deleted file
    /// (`path` is then empty): the watch is put on the recreated file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_fd: Option<[i32; 2]>,
}

/// One fd registered in an epoll instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollItem {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
    /// The open file description (`Fd::desc`) of the watched file when fd `fd` of the
    /// process no longer holds it (closed or reused since it was registered; the
    /// file is held by another fd of the checkpoint). None: fd `fd` holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<u64>,
}

/// Disposition of one signal (`struct sigaction` as the kernel keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signo: i32,
    /// Handler address, or 0 (SIG_DFL) / 1 (SIG_IGN).
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// Process-wide signal state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Signals {
    /// Dispositions that are not SIG_DFL.
    pub actions: Vec<SigAction>,
    /// Signals pending for the whole process, as raw siginfo (hex).
    pub shared_pending: Vec<String>,
}

/// One interval timer (getitimer(2)), microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Itimer {
    pub which: i32,
    pub interval_us: u64,
    pub value_us: u64,
}

/// rseq(2) registration of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub signature: u32,
}

/// sigaltstack(2) of a thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// One thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Thread {
    pub tid: i32,
    pub comm: String,
    /// General registers as stopped (syscall restart is applied at restore).
    pub regs: Regs,
    /// XSAVE area (NT_X86_XSTATE), hex.
    pub xstate: String,
    /// Blocked signals.
    pub sigmask: u64,
    /// Signals pending for this thread only, raw siginfo (hex).
    pub pending: Vec<String>,
    pub rseq: Option<Rseq>,
    /// set_tid_address(2) value (PR_GET_TID_ADDRESS).
    pub clear_child_tid: u64,
    /// set_robust_list(2) head and length.
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub altstack: AltStack,
    /// CPU affinity mask (sched_getaffinity(2)), 64 CPUs per word; empty: all.
    #[serde(default)]
    pub affinity: Vec<u64>,
    /// Scheduling policy (SCHED_OTHER = 0, ...), sched_getscheduler(2).
    #[serde(default)]
    pub policy: i32,
    /// Static priority of real-time policies, sched_getparam(2).
    #[serde(default)]
    pub rt_priority: i32,
    /// Nice value, getpriority(2).
    #[serde(default)]
    pub nice: i32,
    /// Signal this thread gets when its parent dies (PR_SET_PDEATHSIG; 0: none).
    #[serde(default)]
    pub pdeath_signal: i32,
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

/// Where a process's saved pages are: one logical page file (the `offset` of every
/// [`PageRun`]) stored as consecutive part files, so that each part can be written by
/// its own thread without contending for one file's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageFiles {
    /// Logical bytes in all.
    #[serde(default)]
    pub bytes: u64,
    /// Logical bytes each part holds; every part but the last is exactly this long.
    pub part_size: u64,
    /// Names of the part files, in logical order.
    pub parts: Vec<String>,
    /// How the parts are compressed (see [`crate::codec`]).
    #[serde(default)]
    pub compression: crate::Compression,
    /// Compressed parts only: for each part, the end offset of each of its frames
    /// (one frame per CHUNK_SIZE logical bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<Vec<u64>>,
}

impl PageFiles {
    /// Parts of `part_size` bytes covering `total` bytes, named `{stem}.{k}.img`.
    pub fn new(stem: &str, total: u64, part_size: u64) -> PageFiles {
        let part_size = part_size.max(1);
        let n = total.div_ceil(part_size).max(1);
        PageFiles {
            bytes: total,
            part_size,
            parts: (0..n).map(|k| format!("{stem}.{k}.img")).collect(),
            compression: crate::Compression::None,
            frames: Vec::new(),
        }
    }

    /// Logical range `[start, end)` of part `k`, for a logical file of `total` bytes.
    pub fn range(&self, k: usize, total: u64) -> (u64, u64) {
        let start = (k as u64 * self.part_size).min(total);
        (start, (start + self.part_size).min(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_round_trip_and_find_their_mappings() {
        let runs = vec![
            PageRun {
                addr: 0x1000,
                npages: 2,
                offset: 0,
                from: 0,
            },
            PageRun {
                addr: 0x5000,
                npages: 1,
                offset: 0x2000,
                from: 3,
            },
        ];
        let bytes = PageRun::encode_all(&runs);
        assert_eq!(bytes.len(), 2 * PageRun::SIZE);
        assert_eq!(PageRun::decode_all(&bytes), Some(runs.clone()));
        assert_eq!(PageRun::decode_all(&bytes[..40]), None);
        let map = |start: u64, end: u64| Mapping {
            start,
            end,
            prot: 3,
            shared: false,
            kind: MappingKind::Anonymous,
            name: String::new(),
            growsdown: false,
            advice: Vec::new(),
            pages: Vec::new(),
            content_file: None,
        };
        let mut p: Process = serde_json::from_value(serde_json::json!({
            "pid": 2, "ppid": 1, "comm": "t", "exe": FileId::default(), "cwd": "/",
            "umask": 0, "personality": 0, "rlimits": [], "mm": MmFields::default(),
            "mappings": [], "pages": PageFiles::default(), "fds": [],
            "signals": {"actions": [], "shared_pending": []}, "itimers": [], "threads": []
        }))
        .unwrap();
        p.mappings = vec![map(0x1000, 0x4000), map(0x4000, 0x8000)];
        p.attach_runs(runs.clone()).unwrap();
        assert_eq!(p.mappings[0].pages, runs[..1]);
        assert_eq!(p.mappings[1].pages, runs[1..]);
        // A run no mapping holds whole is refused.
        let mut stray = runs.clone();
        stray[1].npages = 4;
        p.mappings.iter_mut().for_each(|m| m.pages.clear());
        assert!(p.attach_runs(stray).is_err());
    }

    #[test]
    fn page_hashes_round_trip() {
        let hashes: Vec<u128> = (0..5u128).map(|i| (i << 100) | (i * 7)).collect();
        let bytes = PageHashes::encode(&hashes);
        assert_eq!(bytes.len(), hashes.len() * PageHashes::SIZE);
        assert_eq!(PageHashes::decode(&bytes), hashes);
        // A truncated file yields the whole records only.
        assert_eq!(PageHashes::decode(&bytes[..bytes.len() - 3]), hashes[..4]);
        let mut direct = Vec::new();
        PageHashes::encode_into(&hashes, &mut |b| direct.extend_from_slice(b));
        assert_eq!(direct, bytes);
    }

    /// Records of deleted files, memfds and cwds from images of older versions (without
    /// the fields added since) still load, meaning what they meant.
    #[test]
    fn older_deleted_file_records_load() {
        let fd: FdKind = serde_json::from_value(serde_json::json!({
            "type": "deleted", "path": "/tmp/x", "flags": 2, "pos": 5, "mode": 420,
            "data_file": "file-2-3.img", "size": 10
        }))
        .unwrap();
        assert!(
            matches!(fd, FdKind::Deleted { object: None, ref data_file, .. } if data_file == "file-2-3.img")
        );
        let o: SharedObject = serde_json::from_value(serde_json::json!({
            "id": 7, "name": "m", "size": 4096, "data_file": "shm-7.img"
        }))
        .unwrap();
        assert_eq!((o.mode, o.seals, o.deleted), (None, None, None));
        let p: Process = serde_json::from_value(serde_json::json!({
            "pid": 2, "ppid": 1, "comm": "t", "exe": FileId::default(), "cwd": "/",
            "umask": 0, "personality": 0, "rlimits": [], "mm": MmFields::default(),
            "mappings": [], "pages": PageFiles::default(), "fds": [],
            "signals": {"actions": [], "shared_pending": []}, "itimers": [], "threads": []
        }))
        .unwrap();
        assert!(!p.cwd_removed);
    }

    #[test]
    fn hex_roundtrip() {
        let v = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(&to_hex(&v)).unwrap(), v);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }
}
