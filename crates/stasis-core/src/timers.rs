//! POSIX interval timers (timer_create(2)).
//!
//! Dump: `/proc/PID/timers` lists each timer's ID, signal and signal value, how it
//! notifies (a signal to the process or to one thread, or nothing) and its clock; the
//! time left and the interval are asked with an injected `timer_gettime`.
//!
//! Restore, in the rebuild once the threads exist (a timer may signal one of them):
//! injected `timer_create` calls with PR_TIMER_CREATE_RESTORE_IDS on (Linux 6.15),
//! which gives each timer its saved ID; on older kernels the timers are created in ID
//! order and must get their IDs by themselves, else the restore fails naming the
//! timer. Armed ones are set again with the time they had left (relative). Timers on
//! another process's CPU clock are refused at checkpoint time.

use crate::error::{Error, Result};
use crate::inject::{u64_at, Injector, Scratch};
use crate::proc::ProcDir;
use stasis_image::PosixTimer;

const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const SIGEV_SIGNAL: u32 = 0;
const SIGEV_NONE: u32 = 1;
const SIGEV_THREAD_ID: u32 = 4;
/// sizeof(struct sigevent).
const SIGEVENT_SIZE: usize = 64;

/// One `/proc/PID/timers` record, before its times are known.
fn parse(pid: i32, text: &str) -> Result<Vec<PosixTimer>> {
    let bad = |what: &str| Error::Unsupported {
        pid,
        what: format!("an unreadable /proc/PID/timers ({what})"),
    };
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if key == "ID" {
            out.push(PosixTimer {
                id: value.parse().map_err(|_| bad(line))?,
                ..PosixTimer::default()
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| bad(line))?;
        match key {
            "signal" => {
                let (sig, val) = value.split_once('/').ok_or_else(|| bad(line))?;
                t.signal = sig.parse().map_err(|_| bad(line))?;
                t.value =
                    u64::from_str_radix(val.trim_start_matches("0x"), 16).map_err(|_| bad(line))?;
            }
            "notify" => {
                // "signal/pid.N", "none/pid.N", "signal/tid.N"
                let (how, target) = value.split_once('/').ok_or_else(|| bad(line))?;
                let (kind, id) = target.split_once('.').ok_or_else(|| bad(line))?;
                t.notify = match how {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    _ => {
                        return Err(Error::Unsupported {
                            pid,
                            what: format!("POSIX timer {} notifying by {how:?}", t.id),
                        })
                    }
                };
                if kind == "tid" {
                    t.notify |= SIGEV_THREAD_ID;
                    t.thread = id.parse().map_err(|_| bad(line))?;
                }
            }
            "ClockID" => t.clock = value.parse().map_err(|_| bad(line))?,
            _ => {}
        }
    }
    Ok(out)
}

/// The POSIX timers of stopped process `proc` (`inj` runs syscalls in it).
pub fn dump(proc: &ProcDir, inj: &Injector, scratch: &Scratch) -> Result<Vec<PosixTimer>> {
    let pid = proc.pid;
    let text = proc.read_string("timers")?;
    let mut timers = parse(pid, &text)?;
    for t in &mut timers {
        if t.clock < 0 {
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "POSIX timer {} on the CPU clock of another process or thread (clock {})",
                    t.id, t.clock
                ),
            });
        }
        inj.call(
            &format!("timer_gettime of timer {}", t.id),
            libc::SYS_timer_gettime,
            &[t.id as u64, scratch.addr],
        )?;
        let b = scratch.read(32)?;
        let ns = |off: usize| u64_at(&b, off) * 1_000_000_000 + u64_at(&b, off + 8);
        t.interval_ns = ns(0);
        t.value_ns = ns(16);
    }
    timers.sort_by_key(|t| t.id);
    Ok(timers)
}

/// Creates the saved timers again in new process `pid`, with their IDs, and arms them.
pub fn restore(inj: &Injector, pid: i32, timers: &[PosixTimer], scratch: &Scratch) -> Result<()> {
    if timers.is_empty() {
        return Ok(());
    }
    let by_id = inj.raw(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0])? == 0;
    let mut sorted: Vec<&PosixTimer> = timers.iter().collect();
    sorted.sort_by_key(|t| t.id);
    for t in sorted {
        let mut ev = [0u8; SIGEVENT_SIZE + 8];
        ev[0..8].copy_from_slice(&t.value.to_le_bytes());
        ev[8..12].copy_from_slice(&t.signal.to_le_bytes());
        ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
        ev[16..20].copy_from_slice(&t.thread.to_le_bytes());
        // The ID wanted, where the kernel writes the one it gave.
        ev[SIGEVENT_SIZE..SIGEVENT_SIZE + 4].copy_from_slice(&t.id.to_le_bytes());
        scratch.write(&ev)?;
        let r = inj.raw(
            libc::SYS_timer_create,
            &[
                t.clock as u64,
                scratch.addr,
                scratch.addr + SIGEVENT_SIZE as u64,
            ],
        )?;
        if r < 0 {
            return Err(Error::Restore {
                pid,
                msg: format!(
                    "creating POSIX timer {} (clock {}): {}",
                    t.id,
                    t.clock,
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            });
        }
        let got = i32::from_le_bytes(
            scratch.read(SIGEVENT_SIZE + 4)?[SIGEVENT_SIZE..]
                .try_into()
                .unwrap_or_default(),
        );
        if got != t.id {
            return Err(Error::Restore {
                pid,
                msg: format!(
                    "POSIX timer {} came back as timer {got} (this kernel cannot choose timer IDs: PR_TIMER_CREATE_RESTORE_IDS needs Linux 6.15)",
                    t.id
                ),
            });
        }
        if t.value_ns != 0 {
            let mut its = [0u8; 32];
            let put = |b: &mut [u8], off: usize, ns: u64| {
                b[off..off + 8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
                b[off + 8..off + 16].copy_from_slice(&(ns % 1_000_000_000).to_le_bytes());
            };
            put(&mut its, 0, t.interval_ns);
            put(&mut its, 16, t.value_ns);
            scratch.write(&its)?;
            inj.call(
                &format!("timer_settime of timer {}", t.id),
                libc::SYS_timer_settime,
                &[t.id as u64, 0, scratch.addr, 0],
            )?;
        }
    }
    if by_id {
        inj.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_timers() {
        let text = "ID: 0\nsignal: 10/0000000000001234\nnotify: signal/pid.7\nClockID: 1\n\
                    ID: 3\nsignal: 12/0000000000000000\nnotify: signal/tid.9\nClockID: 0\n\
                    ID: 4\nsignal: 0/0000000000000000\nnotify: none/pid.7\nClockID: 7\n";
        let t = parse(7, text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            (t[0].id, t[0].signal, t[0].value, t[0].notify, t[0].clock),
            (0, 10, 0x1234, 0, 1)
        );
        assert_eq!(
            (t[1].notify, t[1].thread),
            (SIGEV_SIGNAL | SIGEV_THREAD_ID, 9)
        );
        assert_eq!((t[2].notify, t[2].clock), (SIGEV_NONE, 7));
    }
}
