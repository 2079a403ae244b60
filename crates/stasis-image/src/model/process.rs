//! A process of the image: its threads (registers, signal masks, rseq...), signal
//! dispositions, settings, credentials, POSIX and interval timers, resource limits, mm
//! fields, file locks and job-control stop.

use super::*;
use serde::{Deserialize, Serialize};

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
