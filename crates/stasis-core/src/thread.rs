//! Threads: registers, extended state, signal mask and per-thread pending signals,
//! rseq, clear_child_tid, robust futex list, alternate signal stack, parent-death
//! signal.
//!
//! Restore creates the threads other than the leader with an injected `clone3`
//! (CLONE_THREAD and friends, `set_tid` = the saved TID) once the address space is
//! back; the tracer inherits them stopped (PTRACE_O_TRACECLONE) before they run an
//! instruction. Name, affinity and scheduling are set from outside.

use crate::error::{Error, Result, SysContext};
use crate::freeze::FrozenThread;
use crate::inject::{u64_at, Injector, Scratch};
use crate::proc::ProcDir;
use stasis_image::{from_hex, to_hex, AltStack, Rseq, Thread};
use stasis_sys::clone::{clone_args_bytes, CLONE_ARGS_SIZE};
use stasis_sys::{arch, ptrace};

const PR_GET_TID_ADDRESS: u64 = 40;
const PR_SET_PDEATHSIG: u64 = 1;
const PR_GET_PDEATHSIG: u64 = 2;
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// Bytes of scratch each thread needs for [`dump_all`].
pub const DUMP_SLOT: u64 = 40;

/// Saves every stopped thread of a process. The queries only a thread can answer
/// about itself (its clear_child_tid, sigaltstack and parent-death signal) are injected into many
/// threads at once, each writing into its own slot (`slots`: an injector for each
/// thread of `threads` and the address of its [`DUMP_SLOT`] bytes), so that the threads
/// run them side by side instead of one round trip after another.
pub fn dump_all(
    proc: &ProcDir,
    threads: &[FrozenThread],
    slots: &[(&Injector, u64)],
) -> Result<Vec<Thread>> {
    let mut out = Vec::with_capacity(threads.len());
    for (batch, injs) in threads.chunks(64).zip(slots.chunks(64)) {
        for (inj, slot) in injs {
            inj.start(libc::SYS_prctl, &[PR_GET_TID_ADDRESS, *slot])?;
        }
        for (inj, _) in injs {
            let r = inj.finish()?;
            inj.check("prctl(PR_GET_TID_ADDRESS)", r)?;
        }
        for (inj, slot) in injs {
            inj.start(libc::SYS_sigaltstack, &[0, slot + 8])?;
        }
        for (inj, _) in injs {
            let r = inj.finish()?;
            inj.check("sigaltstack query", r)?;
        }
        for (inj, slot) in injs {
            inj.start(libc::SYS_prctl, &[PR_GET_PDEATHSIG, slot + 32])?;
        }
        for (inj, _) in injs {
            let r = inj.finish()?;
            inj.check("prctl(PR_GET_PDEATHSIG)", r)?;
        }
        for (ft, (inj, slot)) in batch.iter().zip(injs) {
            let mut answers = [0u8; DUMP_SLOT as usize];
            stasis_sys::vm::read(inj.tid(), *slot, &mut answers)
                .ctx(ft.tid, || "reading what the thread answered".into())?;
            let clear_child_tid = u64_at(&answers, 0);
            let altstack = AltStack {
                sp: u64_at(&answers, 8),
                flags: u64_at(&answers, 16) as i32,
                size: u64_at(&answers, 24),
            };
            let mut t = dump(proc, ft, clear_child_tid, altstack)?;
            t.pdeath_signal = u64_at(&answers, 32) as i32;
            out.push(t);
        }
    }
    Ok(out)
}

/// Saves a stopped thread, given what it answered about itself. `regs`/`sigmask`
/// are as it stopped (before injection).
fn dump(
    proc: &ProcDir,
    ft: &FrozenThread,
    clear_child_tid: u64,
    altstack: AltStack,
) -> Result<Thread> {
    let (tid, regs, sigmask) = (ft.tid, &ft.regs, ft.sigmask);
    let comm = proc
        .read_string(&format!("task/{tid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_default();
    let (affinity, policy, rt_priority, nice) = sched_of(tid)?;
    let xstate = match &ft.xstate {
        Some(x) => x.clone(),
        None => ptrace::get_xstate(tid, arch::xstate_size())
            .ctx(tid, || "reading extended registers".into())?,
    };
    let pending = ptrace::peek_siginfo(tid, false)
        .ctx(tid, || "reading pending signals".into())?
        .iter()
        .map(|s| to_hex(s))
        .collect();
    let rseq = match ptrace::get_rseq(tid) {
        Ok(c) if c.rseq_abi_pointer != 0 => Some(Rseq {
            addr: c.rseq_abi_pointer,
            len: c.rseq_abi_size,
            signature: c.signature,
        }),
        Ok(_) => None,
        Err(e) if e.errno == libc::EIO || e.errno == libc::EINVAL => None,
        Err(e) => return Err(e).ctx(tid, || "reading the rseq registration".into()),
    };
    let (robust_list, robust_list_len) = robust_list_of(tid)?;
    Ok(Thread {
        tid,
        comm,
        regs: *regs,
        xstate: to_hex(&xstate),
        sigmask,
        pending,
        rseq,
        clear_child_tid,
        robust_list,
        robust_list_len,
        altstack,
        affinity,
        policy,
        rt_priority,
        nice,
        pdeath_signal: 0,
    })
}

fn sched_of(tid: i32) -> Result<(Vec<u64>, i32, i32, i32)> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls write into the values
    // passed, of the sizes passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(stasis_sys::SysError::last("sched_getaffinity", tid))
                .ctx(tid, || "reading the CPU affinity".into());
        }
        let words: &[u64] = std::slice::from_raw_parts(
            (&set as *const libc::cpu_set_t).cast::<u64>(),
            std::mem::size_of::<libc::cpu_set_t>() / 8,
        );
        let mut affinity = words.to_vec();
        while affinity.last() == Some(&0) {
            affinity.pop();
        }
        let policy = libc::sched_getscheduler(tid);
        let mut param: libc::sched_param = std::mem::zeroed();
        libc::sched_getparam(tid, &mut param);
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        Ok((affinity, policy.max(0), param.sched_priority, nice))
    }
}

/// Sets name-independent scheduling attributes of a restored thread from outside.
/// Raising priority needs privilege we may not have: failures are warnings.
pub fn restore_sched(t: &Thread) -> Vec<String> {
    let mut warnings = Vec::new();
    let tid = t.tid;
    // SAFETY: plain scheduling syscalls on a thread of ours with valid arguments.
    unsafe {
        if !t.affinity.is_empty() {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let words = std::slice::from_raw_parts_mut(
                (&mut set as *mut libc::cpu_set_t).cast::<u64>(),
                std::mem::size_of::<libc::cpu_set_t>() / 8,
            );
            for (w, v) in words.iter_mut().zip(&t.affinity) {
                *w = *v;
            }
            if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                warnings.push(format!(
                    "thread {tid}: CPU affinity not restored: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let param = libc::sched_param {
            sched_priority: t.rt_priority,
        };
        if t.policy != 0 && libc::sched_setscheduler(tid, t.policy, &param) != 0 {
            warnings.push(format!(
                "thread {tid}: scheduling policy {} not restored: {}",
                t.policy,
                std::io::Error::last_os_error()
            ));
        }
        if t.nice != 0 && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, t.nice) != 0 {
            warnings.push(format!(
                "thread {tid}: nice {} not restored: {}",
                t.nice,
                std::io::Error::last_os_error()
            ));
        }
    }
    warnings
}

/// clone3 flags of a thread of the calling thread's process.
pub const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// Creates thread `tid` of the restored process by an injected clone3 in the leader
/// (`inj`), and waits for its first stop; it has not run any instruction yet.
pub fn create(inj: &Injector, pid: i32, tid: i32, scratch: &Scratch) -> Result<()> {
    // struct clone_args followed by the set_tid array.
    let mut b = clone_args_bytes(THREAD_FLAGS, scratch.addr + CLONE_ARGS_SIZE, 1);
    b.extend_from_slice(&(tid as u32).to_le_bytes());
    scratch.write(&b)?;
    // A TID may still be held for a moment by an exiting worker thread of the
    // restorer: retry while it is released.
    let mut tries = 0;
    let got = loop {
        let r = inj.raw(libc::SYS_clone3, &[scratch.addr, CLONE_ARGS_SIZE])?;
        if r == -i64::from(libc::EEXIST) && tries < crate::restore::PID_RETRIES {
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        break inj.check(&format!("clone3 of thread {tid}"), r)?;
    };
    if got != tid as u64 {
        return Err(Error::Restore {
            pid,
            msg: format!("thread {tid} was created as {got}"),
        });
    }
    wait_created(tid)
}

/// Waits for a thread or process just created under PTRACE_O_TRACECLONE to stop
/// before its first instruction.
pub fn wait_created(tid: i32) -> Result<()> {
    // A traced thread's first stop comes before it runs anything.
    let deadline = std::time::Instant::now() + crate::freeze::STOP_TIMEOUT;
    loop {
        let stop =
            ptrace::wait_until(tid, deadline).ctx(tid, || "waiting for a new thread".into())?;
        match stop {
            None => {
                return Err(Error::Timeout {
                    pid: tid,
                    what: format!(
                        "the new thread did not report within {} s ({})",
                        crate::freeze::STOP_TIMEOUT.as_secs(),
                        crate::proc::thread_state(tid)
                    ),
                })
            }
            Some(ptrace::Stop::Event(ptrace::EVENT_STOP, _)) => return Ok(()),
            Some(ptrace::Stop::Exited(_) | ptrace::Stop::Killed(_)) => {
                return Err(Error::Gone { pid: tid })
            }
            Some(_) => ptrace::cont(tid, 0).ctx(tid, || "resuming a new thread".into())?,
        }
    }
}

fn robust_list_of(tid: i32) -> Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: get_robust_list writes one pointer and one size_t to the given addresses.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r != 0 {
        return Err(stasis_sys::SysError::last("get_robust_list", tid))
            .ctx(tid, || "reading the robust futex list".into());
    }
    Ok((head, len as u64))
}

/// Unregisters the rseq area the restorer's own libc registered in the new process,
/// before its memory goes away.
pub fn drop_own_rseq(inj: &Injector, pid: i32) -> Result<()> {
    if let Ok(c) = ptrace::get_rseq(pid) {
        if c.rseq_abi_pointer != 0 {
            inj.call(
                "rseq unregister",
                libc::SYS_rseq,
                &[
                    c.rseq_abi_pointer,
                    u64::from(c.rseq_abi_size),
                    RSEQ_FLAG_UNREGISTER,
                    u64::from(c.signature),
                ],
            )?;
        }
    }
    Ok(())
}

/// Gives every restored thread back what only it can set about itself: its
/// clear_child_tid (set_tid_address), robust list, rseq registration, sigaltstack,
/// name (PR_SET_NAME) and parent-death signal (PR_SET_PDEATHSIG), by injected syscalls. The threads run them side by side,
/// 64 at a time, each reading its own slot of the scratch page (`gadget` is the
/// address of a `syscall` instruction).
pub fn restore_all(gadget: u64, threads: &[Thread], scratch: &Scratch) -> Result<()> {
    const SLOT: usize = 64;
    let per = crate::inject::SCRATCH_LEN as usize / SLOT;
    for batch in threads.chunks(per) {
        // Slot of thread k: its stack_t at 0, its name (NUL-terminated) at 32.
        let mut data = vec![0u8; batch.len() * SLOT];
        let mut calls: Vec<Vec<(&str, i64, Vec<u64>)>> = Vec::with_capacity(batch.len());
        for (k, t) in batch.iter().enumerate() {
            let slot = &mut data[k * SLOT..(k + 1) * SLOT];
            let flags = if t.altstack.flags & libc::SS_DISABLE != 0 {
                libc::SS_DISABLE
            } else {
                0
            };
            slot[0..8].copy_from_slice(&t.altstack.sp.to_le_bytes());
            slot[8..16].copy_from_slice(&(flags as u64).to_le_bytes());
            slot[16..24].copy_from_slice(&t.altstack.size.to_le_bytes());
            let name: Vec<u8> = t.comm.bytes().take(15).collect();
            slot[32..32 + name.len()].copy_from_slice(&name);
            let at = scratch.addr + (k * SLOT) as u64;
            let mut c = vec![(
                "set_tid_address",
                libc::SYS_set_tid_address,
                vec![t.clear_child_tid],
            )];
            if t.robust_list != 0 {
                c.push((
                    "set_robust_list",
                    libc::SYS_set_robust_list,
                    vec![t.robust_list, t.robust_list_len],
                ));
            }
            if let Some(r) = t.rseq {
                c.push((
                    "rseq register",
                    libc::SYS_rseq,
                    vec![r.addr, u64::from(r.len), 0, u64::from(r.signature)],
                ));
            }
            c.push(("sigaltstack", libc::SYS_sigaltstack, vec![at, 0]));
            c.push((
                "prctl(PR_SET_NAME)",
                libc::SYS_prctl,
                vec![libc::PR_SET_NAME as u64, at + 32],
            ));
            if t.pdeath_signal != 0 {
                c.push((
                    "prctl(PR_SET_PDEATHSIG)",
                    libc::SYS_prctl,
                    vec![PR_SET_PDEATHSIG, t.pdeath_signal as u64],
                ));
            }
            calls.push(c);
        }
        scratch.write(&data)?;
        let injs = batch
            .iter()
            .map(|t| Injector::new(t.tid, gadget))
            .collect::<Result<Vec<_>>>()?;
        let rounds = calls.iter().map(Vec::len).max().unwrap_or(0);
        for r in 0..rounds {
            for (inj, c) in injs.iter().zip(&calls) {
                if let Some((_, nr, args)) = c.get(r) {
                    inj.start(*nr, args)?;
                }
            }
            for (inj, c) in injs.iter().zip(&calls) {
                if let Some((what, _, _)) = c.get(r) {
                    let ret = inj.finish()?;
                    inj.check(what, ret)?;
                }
            }
        }
    }
    Ok(())
}

/// Loads the saved registers, extended state and signal mask; the thread resumes where
/// it was (interrupted syscalls are re-executed, see `Regs::for_restore`).
pub fn restore_cpu(tid: i32, t: &Thread) -> Result<()> {
    let xstate = from_hex(&t.xstate).ok_or_else(|| Error::Restore {
        pid: tid,
        msg: "malformed xstate in the image".into(),
    })?;
    ptrace::set_regs(tid, &t.regs.for_restore()).ctx(tid, || "setting registers".into())?;
    ptrace::set_xstate(tid, &xstate).ctx(tid, || {
        "setting extended registers (is this CPU's feature set the image's?)".into()
    })?;
    ptrace::set_sigmask(tid, t.sigmask).ctx(tid, || "setting the signal mask".into())?;
    Ok(())
}
