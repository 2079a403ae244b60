//! Capability sets of the calling process (capget/capset, ambient capabilities).
//!
//! The namespace init is the creator of the job's user namespace and holds every
//! capability there, but runs as the invoking user's own ID: executing stasis again
//! would clear them (a non-root `execve`), so they are made ambient first
//! ([`keep_across_exec`]); the application is executed without them
//! ([`drop_inheritable`]).

use std::io;

const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_RAISE: libc::c_ulong = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;
/// `_LINUX_CAPABILITY_VERSION_3`.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// (effective, permitted, inheritable) of the calling thread.
fn get() -> io::Result<(u64, u64, u64)> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes two Data structs (version 3) into `d`.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&Data) -> u32| f(&d[0]) as u64 | (f(&d[1]) as u64) << 32;
    Ok((
        join(|x| x.effective),
        join(|x| x.permitted),
        join(|x| x.inheritable),
    ))
}

fn set(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let half = |v: u64, i: u32| (v >> (32 * i)) as u32;
    let d = [0, 1].map(|i| Data {
        effective: half(effective, i),
        permitted: half(permitted, i),
        inheritable: half(inheritable, i),
    });
    // SAFETY: capset reads two Data structs (version 3) from `d`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes every permitted capability inheritable and ambient, so that it survives the
/// execution of a program that is neither setuid nor has file capabilities.
pub fn keep_across_exec() -> io::Result<()> {
    let (e, p, _) = get()?;
    set(e, p, p)?;
    for cap in 0..64u32 {
        if p & (1u64 << cap) == 0 {
            continue;
        }
        // SAFETY: prctl(PR_CAP_AMBIENT) has no memory-safety preconditions.
        let r = unsafe {
            libc::prctl(
                PR_CAP_AMBIENT,
                PR_CAP_AMBIENT_RAISE,
                cap as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Clears the ambient and inheritable sets, so that an `execve` by a non-root user
/// gives the program no capability. Only syscalls: safe between fork and exec.
pub fn drop_inheritable() -> io::Result<()> {
    // SAFETY: prctl(PR_CAP_AMBIENT) has no memory-safety preconditions.
    let r = unsafe {
        libc::prctl(
            PR_CAP_AMBIENT,
            PR_CAP_AMBIENT_CLEAR_ALL,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let (e, p, _) = get()?;
    set(e, p, 0)
}
