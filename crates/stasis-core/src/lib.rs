//! The checkpoint and restore engine of stasis.
//!
//! It works from outside the process: it seizes it with ptrace, reads what `/proc` and
//! ptrace show, copies memory with `process_vm_readv`, and injects the few syscalls whose
//! answer only the process itself can give. Restore forks a process with the saved PID
//! (`clone3` + `set_tid`), lets it recreate its kernel objects in ordinary Rust, then
//! rebuilds its address space and registers through injected syscalls.
//!
//! One module per kind of kernel object, each with its dump side and its restore side:
//! [`memory`], [`shm`], [`sysv`], [`files`], [`locks`], [`sockets`], [`tty`], [`eventfds`], [`inotify`], [`signals`], [`jobctl`], [`thread`], [`task`] (everything else that belongs
//! to a process: cwd, umask, rlimits, personality, timers, prctl settings, the mm fields). The
//! orchestration is in [`dump`] and [`restore`]; [`inject`] runs syscalls inside a
//! stopped tracee; [`proc`] reads `/proc`.

pub mod creds;
pub mod dirty;
pub mod dump;
pub mod error;
pub mod eventfds;
pub mod fdowner;
pub mod files;
pub mod freeze;
pub mod inject;
pub mod inotify;
pub mod jobctl;
pub mod locks;
pub mod memory;
pub mod proc;
pub mod restore;
pub mod shm;
pub mod signals;
pub mod snapshot;
pub mod sockets;
pub mod sysv;
pub mod task;
pub mod thread;
pub mod timers;
pub mod tmpdirs;
pub mod tty;

pub use error::{Error, Result};
