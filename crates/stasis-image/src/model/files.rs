//! Fds in the image: each fd and its open file description's kind (files, devices,
//! pipes, pidfds, eventfds, epoll, inotify...), pipes' contents, pseudo-terminal pairs.

use super::*;
use serde::{Deserialize, Serialize};

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

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
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
