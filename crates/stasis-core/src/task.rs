//! Process attributes that are neither memory, files, signals nor threads: cwd (a
//! removed one comes back as a new directory, entered and removed again), umask,
//! personality, resource limits, interval timers, command name, the process-wide prctl
//! settings (child subreaper, THP disable, dumpable), oom_score_adj and membarrier
//! registrations, and the `mm` fields (code/data/brk/stack/arg/env boundaries, auxv,
//! exe link) that PR_SET_MM_MAP restores.

use crate::error::{Error, Result, SysContext};
use crate::inject::{u64_at, Injector, Scratch};
use crate::proc::{file_id, ProcDir};
use stasis_image::{Itimer, MmFields, ProcessSettings, Rlimit};

const PR_GET_DUMPABLE: u64 = 3;
const PR_SET_DUMPABLE: u64 = 4;
const PR_SET_CHILD_SUBREAPER: i32 = 36;
const PR_GET_CHILD_SUBREAPER: u64 = 37;
const PR_SET_THP_DISABLE: i32 = 41;
const PR_GET_THP_DISABLE: u64 = 42;
const PR_SET_MM: u64 = 35;
const MEMBARRIER_CMD_QUERY: u64 = 0;
const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;
/// (command that fails with EPERM unless registered, its registration command), for
/// kernels without MEMBARRIER_CMD_GET_REGISTRATIONS (before 6.3).
const MEMBARRIER_PROBES: [(u64, u64); 3] = [
    (1 << 3, 1 << 4), // PRIVATE_EXPEDITED
    (1 << 5, 1 << 6), // PRIVATE_EXPEDITED_SYNC_CORE
    (1 << 7, 1 << 8), // PRIVATE_EXPEDITED_RSEQ
];
/// The registration commands restore issues again (GLOBAL_EXPEDITED and the above).
const MEMBARRIER_REGISTRATIONS: [u32; 4] = [1 << 2, 1 << 4, 1 << 6, 1 << 8];
const PR_SET_MM_MAP: u64 = 14;
/// sizeof(struct prctl_mm_map).
const PRCTL_MM_MAP_SIZE: usize = 104;
const RLIMIT_COUNT: u32 = 16;

/// Everything this module saves, for the dump orchestration.
pub struct TaskState {
    pub comm: String,
    pub exe: stasis_image::FileId,
    pub cwd: String,
    /// The working directory was removed (see `Process::cwd_removed`).
    pub cwd_removed: bool,
    pub umask: u32,
    pub personality: u32,
    pub rlimits: Vec<Rlimit>,
    pub itimers: Vec<Itimer>,
    pub mm: MmFields,
    pub settings: ProcessSettings,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
}

/// Reads the attributes of a stopped process.
/// Refuses, before anything is injected, what a process may hold that stasis cannot
/// give back: a seccomp filter of its own (seccomp(2)) would be lost on restart, and
/// could kill the process for a syscall stasis injects. Filters it shares with stasis
/// (installed by a container runtime above both) are inherited again on restart.
pub fn check_supported(proc: &ProcDir) -> Result<()> {
    let pid = proc.pid;
    let text = std::fs::read_to_string(proc.file("status"))
        .ctx(pid, || "reading /proc/PID/status".into())?;
    let (mode, filters) = seccomp_of(&text);
    let (_, ours) = seccomp_of(&std::fs::read_to_string("/proc/self/status").unwrap_or_default());
    match mode {
        1 => Err(Error::Unsupported {
            pid,
            what: "seccomp strict mode".into(),
        }),
        // After a restart onto other nodes, every process has our filter redirecting
        // connects to old addresses (`sockets::inet::redirect`) on top.
        2 if filters > ours + u32::from(crate::sockets::inet::redirect::installed()) => {
            Err(Error::Unsupported {
            pid,
            what: format!(
                "a seccomp filter installed by the process ({filters} filter(s), stasis runs under {ours}; it could not be restored)"
            ),
        })
        }
        _ => Ok(()),
    }
}

/// (`Seccomp:` mode, `Seccomp_filters:` count) of a /proc/PID/status text.
fn seccomp_of(status: &str) -> (u32, u32) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

/// The resource limits of a process, from `/proc/PID/limits` (prlimit64 on another
/// process needs CAP_SYS_RESOURCE unless all its IDs are the caller's).
fn read_rlimits(proc: &ProcDir) -> Result<Vec<Rlimit>> {
    let pid = proc.pid;
    let text = proc.read_string("limits")?;
    parse_limits(&text).ok_or_else(|| Error::Unsupported {
        pid,
        what: "an unreadable /proc/PID/limits".into(),
    })
}

/// The `RLIMIT_COUNT` limits of a `/proc/PID/limits` text: after the header, one
/// line per resource in number order, the name in 25 columns, then the soft and hard
/// limits (a number or `unlimited`) and the unit.
fn parse_limits(text: &str) -> Option<Vec<Rlimit>> {
    let value = |w: &str| match w {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    let limits: Vec<Rlimit> = text
        .lines()
        .skip(1)
        .take(RLIMIT_COUNT as usize)
        .enumerate()
        .map(|(i, line)| {
            let mut w = line.get(25..)?.split_whitespace();
            Some(Rlimit {
                resource: i as u32,
                soft: value(w.next()?)?,
                hard: value(w.next()?)?,
            })
        })
        .collect::<Option<_>>()?;
    (limits.len() == RLIMIT_COUNT as usize).then_some(limits)
}

/// `dumpable`: the process's PR_GET_DUMPABLE from before [`make_readable`].
pub fn dump(proc: &ProcDir, inj: &Injector, scratch: &Scratch, dumpable: u32) -> Result<TaskState> {
    let pid = proc.pid;
    let p = proc.process()?;
    let stat = p
        .stat()
        .map_err(std::io::Error::other)
        .ctx(pid, || "reading /proc/PID/stat".into())?;
    let status = p
        .status()
        .map_err(std::io::Error::other)
        .ctx(pid, || "reading /proc/PID/status".into())?;
    let exe_path = proc.readlink("exe")?;
    if exe_path.ends_with(" (deleted)") {
        return Err(Error::Unsupported {
            pid,
            what: format!("an executable deleted while running ({exe_path})"),
        });
    }
    let exe_md =
        std::fs::metadata(&exe_path).ctx(pid, || format!("stat of the executable {exe_path}"))?;
    let personality = u32::from_str_radix(proc.read_string("personality")?.trim(), 16).unwrap_or(0);
    let rlimits = read_rlimits(proc)?;
    let mut itimers = Vec::new();
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        inj.call(
            "getitimer",
            libc::SYS_getitimer,
            &[which as u64, scratch.addr],
        )?;
        let b = scratch.read(32)?;
        let us = |off| u64_at(&b, off) * 1_000_000 + u64_at(&b, off + 8);
        itimers.push(Itimer {
            which,
            interval_us: us(0),
            value_us: us(16),
        });
    }
    let settings = dump_settings(proc, inj, scratch, dumpable)?;
    let brk = inj.call("brk(0)", libc::SYS_brk, &[0])?;
    let auxv_bytes = proc.read_bytes("auxv")?;
    let auxv = auxv_bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let mm = MmFields {
        start_code: stat.startcode,
        end_code: stat.endcode,
        start_data: stat.start_data.unwrap_or(0),
        end_data: stat.end_data.unwrap_or(0),
        start_brk: stat.start_brk.unwrap_or(0),
        brk,
        start_stack: stat.startstack,
        arg_start: stat.arg_start.unwrap_or(0),
        arg_end: stat.arg_end.unwrap_or(0),
        env_start: stat.env_start.unwrap_or(0),
        env_end: stat.env_end.unwrap_or(0),
        auxv,
    };
    Ok(TaskState {
        comm: stat.comm.clone(),
        exe: file_id(&exe_path, &exe_md),
        cwd: proc.readlink("cwd")?,
        // A removed directory has no links left.
        cwd_removed: std::fs::metadata(proc.file("cwd"))
            .map(|m| m.is_dir() && std::os::unix::fs::MetadataExt::nlink(&m) == 0)
            .unwrap_or(false),
        umask: status.umask.unwrap_or(0o022),
        personality,
        rlimits,
        itimers,
        mm,
        settings,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
    })
}

/// The process-wide prctl settings (injected PR_GET_* queries, which only the
/// process can answer) and oom_score_adj of a stopped process.
fn dump_settings(
    proc: &ProcDir,
    inj: &Injector,
    scratch: &Scratch,
    dumpable: u32,
) -> Result<ProcessSettings> {
    let pid = proc.pid;
    inj.call(
        "prctl(PR_GET_CHILD_SUBREAPER)",
        libc::SYS_prctl,
        &[PR_GET_CHILD_SUBREAPER, scratch.addr],
    )?;
    let subreaper = u64_at(&scratch.read(8)?, 0) as u32;
    let thp_disable = inj.call(
        "prctl(PR_GET_THP_DISABLE)",
        libc::SYS_prctl,
        &[PR_GET_THP_DISABLE, 0, 0, 0, 0],
    )? as u32;
    let membarrier = membarrier_registrations(inj)?;
    let adj = proc.read_string("oom_score_adj")?;
    let oom_score_adj = adj.trim().parse().map_err(|_| Error::Unsupported {
        pid,
        what: format!("an unreadable /proc/PID/oom_score_adj ({:?})", adj.trim()),
    })?;
    Ok(ProcessSettings {
        child_subreaper: subreaper != 0,
        thp_disable,
        dumpable,
        oom_score_adj,
        membarrier,
        // Read with the memory locks (memory::read_locks).
        mlockall: 0,
    })
}

/// The membarrier(2) registrations of the stopped process `inj` runs in (they belong
/// to its memory; /proc does not show them): asked with an injected
/// MEMBARRIER_CMD_GET_REGISTRATIONS, or, on kernels without it, probed by injecting
/// each private expedited command, which fails with EPERM unless registered (a memory
/// barrier on the frozen process's threads, otherwise without effect). A registration
/// for GLOBAL_EXPEDITED cannot be probed so: on such kernels it is not saved.
fn membarrier_registrations(inj: &Injector) -> Result<u32> {
    let supported = inj.raw(libc::SYS_membarrier, &[MEMBARRIER_CMD_QUERY, 0, 0])?;
    if supported < 0 {
        return Ok(0); // no membarrier in this kernel
    }
    let supported = supported as u64;
    if supported & MEMBARRIER_CMD_GET_REGISTRATIONS != 0 {
        let r = inj.call(
            "membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS)",
            libc::SYS_membarrier,
            &[MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0],
        )?;
        return Ok(r as u32);
    }
    let mut mask = 0;
    for (cmd, register) in MEMBARRIER_PROBES {
        if supported & cmd != 0 && inj.raw(libc::SYS_membarrier, &[cmd, 0, 0])? == 0 {
            mask |= register as u32;
        }
    }
    Ok(mask)
}

/// Registers the calling (new) process for the membarrier commands of `mask` again.
fn restore_membarrier(mask: u32, warnings: &mut Vec<String>) -> std::result::Result<(), String> {
    for register in MEMBARRIER_REGISTRATIONS
        .into_iter()
        .filter(|r| mask & r != 0)
    {
        // SAFETY: membarrier registration of our own memory; integer arguments only.
        if unsafe { libc::syscall(libc::SYS_membarrier, register, 0u32, 0i32) } != 0 {
            return Err(format!(
                "registering again for membarrier (MEMBARRIER_CMD_REGISTER_* {register}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let unknown = mask & !MEMBARRIER_REGISTRATIONS.iter().fold(0, |a, r| a | r);
    if unknown != 0 {
        warnings.push(format!(
            "membarrier registrations {unknown:#x} unknown to this stasis: not restored"
        ));
    }
    Ok(())
}

/// Gives the calling (new) process the saved child-subreaper and THP settings,
/// membarrier registrations and oom_score_adj. Lowering oom_score_adj below what the restorer has needs privilege
/// (CAP_SYS_RESOURCE): then it is left higher, with a warning. Dumpability is set
/// last of all, by [`restore_dumpable`].
fn restore_settings(
    s: &ProcessSettings,
    warnings: &mut Vec<String>,
) -> std::result::Result<(), String> {
    let prctl = |what: &str, op: i32, a: u64, b: u64| {
        // SAFETY: prctl on ourselves with integer arguments only.
        if unsafe { libc::prctl(op, a, b, 0u64, 0u64) } != 0 {
            return Err(format!("{what}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    prctl(
        "prctl(PR_SET_CHILD_SUBREAPER)",
        PR_SET_CHILD_SUBREAPER,
        u64::from(s.child_subreaper),
        0,
    )?;
    // 1: disabled; bit 1 (PR_THP_DISABLE_EXCEPT_ADVISED): except where advised.
    let (off, flags) = if s.thp_disable & 1 != 0 {
        (1, u64::from(s.thp_disable & 2))
    } else {
        (0, 0)
    };
    prctl("prctl(PR_SET_THP_DISABLE)", PR_SET_THP_DISABLE, off, flags)?;
    restore_membarrier(s.membarrier, warnings)?;
    let path = "/proc/self/oom_score_adj";
    let now: i32 = std::fs::read_to_string(path)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if now != s.oom_score_adj {
        if let Err(e) = std::fs::write(path, s.oom_score_adj.to_string()) {
            warnings.push(format!(
                "oom_score_adj {} not restored, left at {now} ({e}; lowering it needs privilege)",
                s.oom_score_adj
            ));
        }
    }
    Ok(())
}

/// Makes a stopped process dumpable for the time of its checkpoint when it is not
/// (PR_SET_DUMPABLE 0), and returns its PR_GET_DUMPABLE. The /proc files of a
/// process that is not dumpable belong to root of its memory's user namespace; under
/// `stasis run` that ID is not mapped (the job runs as the user's own ID), so even the
/// init, which holds every capability there, could not open the files of mode 0400
/// (pagemap, auxv, fdinfo, ...). [`restore_readable`] sets it back.
pub fn make_readable(inj: &Injector) -> Result<u32> {
    let dumpable = inj.call(
        "prctl(PR_GET_DUMPABLE)",
        libc::SYS_prctl,
        &[PR_GET_DUMPABLE, 0, 0, 0, 0],
    )? as u32;
    if dumpable == 0 {
        inj.call(
            "prctl(PR_SET_DUMPABLE, 1) for the checkpoint",
            libc::SYS_prctl,
            &[PR_SET_DUMPABLE, 1, 0, 0, 0],
        )?;
    }
    Ok(dumpable)
}

/// Makes the process non-dumpable again once its checkpoint no longer reads its /proc
/// files (see [`make_readable`]). A stasis killed in between leaves it dumpable: the
/// one setting a killed checkpoint does not put back.
pub fn restore_readable(inj: &Injector, dumpable: u32) -> Result<()> {
    if dumpable == 0 {
        inj.call(
            "prctl(PR_SET_DUMPABLE, 0) after the checkpoint",
            libc::SYS_prctl,
            &[PR_SET_DUMPABLE, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Gives a restored process its saved dumpable flag (PR_SET_DUMPABLE 0 or 1) by an
/// injected prctl, once nothing else of the restore needs to read it through /proc. (A tracer
/// then needs CAP_SYS_PTRACE in the user namespace of the process's memory: the
/// namespace init's, into which it was executed.)
pub fn restore_dumpable(inj: &Injector, s: &ProcessSettings) -> Result<()> {
    match s.dumpable {
        // Set also when dumpable: a change of IDs (creds) may have cleared it.
        d @ (0 | 1) => inj
            .call(
                &format!("prctl(PR_SET_DUMPABLE, {d})"),
                libc::SYS_prctl,
                &[PR_SET_DUMPABLE, d as u64, 0, 0, 0],
            )
            .map(drop),
        // SUID_DUMP_ROOT (2) cannot be set with prctl: dumpable for its owner instead.
        other => {
            tracing::warn!(
                "process {}: dumpable mode {other} cannot be set again; it stays dumpable",
                inj.tid()
            );
            Ok(())
        }
    }
}

/// Restores cwd, umask, personality, rlimits, timers, the child-subreaper and THP
/// settings, membarrier registrations and oom_score_adj in the calling (new) process. Hard limits above the
/// current ones cannot be raised without privilege; they are capped and reported in
/// the returned warnings.
pub fn restore_attrs(p: &stasis_image::Process) -> std::result::Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    if p.cwd_removed {
        let gone = p.cwd.strip_suffix(" (deleted)").unwrap_or(&p.cwd);
        let dir = crate::files::make_removed_dir(gone, 0o700)?;
        std::env::set_current_dir(&dir).map_err(|e| {
            format!(
                "cannot enter a directory in place of the removed working directory {gone}: {e}"
            )
        })?;
        std::fs::remove_dir(&dir).map_err(|e| {
            format!("cannot remove {dir} (in place of the removed working directory {gone}): {e}")
        })?;
    } else {
        std::env::set_current_dir(&p.cwd)
            .map_err(|e| format!("cannot enter the working directory {}: {e}", p.cwd))?;
    }
    // SAFETY: umask and personality have no memory-safety preconditions.
    unsafe {
        libc::umask(p.umask as libc::mode_t);
        libc::personality(p.personality as libc::c_ulong);
    }
    for r in &p.rlimits {
        let mut cur = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 on ourselves; pointers are valid.
        unsafe { libc::prlimit64(0, r.resource as _, std::ptr::null(), &mut cur) };
        let hard = if r.hard > cur.rlim_max {
            warnings.push(format!(
                "rlimit {} hard limit {} capped at {} (raising needs privilege)",
                r.resource, r.hard, cur.rlim_max
            ));
            cur.rlim_max
        } else {
            r.hard
        };
        let new = libc::rlimit64 {
            rlim_cur: r.soft.min(hard),
            rlim_max: hard,
        };
        // SAFETY: as above.
        if unsafe { libc::prlimit64(0, r.resource as _, &new, std::ptr::null_mut()) } != 0 {
            warnings.push(format!(
                "rlimit {}: {}",
                r.resource,
                std::io::Error::last_os_error()
            ));
        }
    }
    for t in &p.itimers {
        if t.value_us == 0 {
            continue;
        }
        let tv = |us: u64| libc::timeval {
            tv_sec: (us / 1_000_000) as _,
            tv_usec: (us % 1_000_000) as _,
        };
        let v = libc::itimerval {
            it_interval: tv(t.interval_us),
            it_value: tv(t.value_us),
        };
        // SAFETY: setitimer reads `v`; the old value is not requested.
        if unsafe { libc::setitimer(t.which as _, &v, std::ptr::null_mut()) } != 0 {
            return Err(format!(
                "setitimer({}): {}",
                t.which,
                std::io::Error::last_os_error()
            ));
        }
    }
    restore_settings(&p.settings, &mut warnings)?;
    // The name is set per thread by `thread::restore_all`, leader included.
    Ok(warnings)
}

/// Restores the mm fields and the exe link with PR_SET_MM_MAP, injected into the new
/// process once all its mappings exist. `exe_fd` is a descriptor of the executable in
/// that process.
pub fn restore_mm(
    inj: &Injector,
    pid: i32,
    mm: &MmFields,
    exe_fd: i32,
    scratch: &Scratch,
) -> Result<()> {
    let auxv_off = PRCTL_MM_MAP_SIZE as u64;
    let mut b = Vec::with_capacity(PRCTL_MM_MAP_SIZE + mm.auxv.len() * 8);
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        scratch.addr + auxv_off,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&((mm.auxv.len() * 8) as u32).to_le_bytes());
    b.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    for w in &mm.auxv {
        b.extend_from_slice(&w.to_le_bytes());
    }
    if b.len() > crate::inject::SCRATCH_LEN as usize {
        return Err(Error::Restore {
            pid,
            msg: "auxiliary vector too large".into(),
        });
    }
    scratch.write(&b)?;
    inj.call(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            PR_SET_MM,
            PR_SET_MM_MAP,
            scratch.addr,
            PRCTL_MM_MAP_SIZE as u64,
            0,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_of_this_process_match_getrlimit() {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let limits = parse_limits(&text).expect("parsing /proc/self/limits");
        for l in limits {
            let mut want = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit64 writes into `want`.
            assert_eq!(unsafe { libc::getrlimit64(l.resource as _, &mut want) }, 0);
            assert_eq!((l.soft, l.hard), (want.rlim_cur, want.rlim_max), "{l:?}");
        }
    }
}
