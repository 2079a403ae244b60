//! Event descriptors: eventfd, timerfd, signalfd and epoll.
//!
//! Dump: their state is in `/proc/PID/fdinfo/FD` (eventfd counter, timer remaining
//! time and interval and pending expirations, signalfd mask, epoll registrations).
//! Restore: the restorer creates each description with that state (a timer restarts
//! its remaining time when the process is restored; pending expirations are set back
//! with TFD_IOC_SET_TICKS); epoll registrations are added by the process itself once
//! its fds are in place, so that they are keyed by the right fd numbers. A watched
//! file whose fd number was closed or reused since its registration (the dump finds it
//! in another fd of the checkpoint with kcmp KCMP_EPOLL_TFD) is put at that number
//! just for the registration. Nested sets (an epoll fd watching another) are
//! registered like any fd.

use stasis_image::{EpollItem, Fd, FdKind};
use std::collections::HashMap;

const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn timespec_ns(v: &str) -> u64 {
    // "(sec, nsec)"
    let v = v.trim_matches(|c| c == '(' || c == ')');
    let mut it = v.split(',').map(|x| x.trim().parse::<u64>().unwrap_or(0));
    let (s, n) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    s * 1_000_000_000 + n
}

/// Classifies an `anon_inode:[...]` fd of one of our kinds from its fdinfo text.
pub fn dump(kind: &str, flags: i32, info: &str) -> Option<FdKind> {
    match kind {
        "eventfd" => Some(FdKind::EventFd {
            count: u64::from_str_radix(field(info, "eventfd-count:")?, 16).ok()?,
            semaphore: field(info, "eventfd-semaphore:").is_some_and(|v| v == "1"),
            flags,
        }),
        "timerfd" => Some(FdKind::TimerFd {
            clockid: field(info, "clockid:")?.parse().ok()?,
            flags,
            value_ns: timespec_ns(field(info, "it_value:")?),
            interval_ns: timespec_ns(field(info, "it_interval:")?),
            ticks: field(info, "ticks:")?.parse().ok()?,
        }),
        "signalfd" => Some(FdKind::SignalFd {
            mask: u64::from_str_radix(field(info, "sigmask:")?, 16).ok()?,
            flags,
        }),
        "eventpoll" => {
            let items = info
                .lines()
                .filter_map(|l| {
                    let l = l.strip_prefix("tfd:")?;
                    let mut w = l.split_whitespace();
                    let fd = w.next()?.parse().ok()?;
                    w.next(); // "events:"
                    let events = u32::from_str_radix(w.next()?, 16).ok()?;
                    w.next(); // "data:"
                    let data = u64::from_str_radix(w.next()?, 16).ok()?;
                    Some(EpollItem {
                        fd,
                        events,
                        data,
                        desc: None,
                    })
                })
                .collect();
            Some(FdKind::Epoll { flags, items })
        }
        _ => None,
    }
}

/// Creates the description of an event fd in the restorer. Returns the new fd.
pub fn create(kind: &FdKind) -> std::result::Result<i32, String> {
    let nonblock = |flags: i32| flags & libc::O_NONBLOCK != 0;
    // SAFETY: plain syscalls creating new descriptors from plain values.
    unsafe {
        let fd = match kind {
            FdKind::EventFd {
                count,
                semaphore,
                flags,
            } => {
                let mut f = libc::EFD_CLOEXEC;
                if *semaphore {
                    f |= libc::EFD_SEMAPHORE;
                }
                if nonblock(*flags) {
                    f |= libc::EFD_NONBLOCK;
                }
                let fd = libc::eventfd(0, f);
                if fd >= 0 && *count > 0 {
                    let b = count.to_ne_bytes();
                    libc::write(fd, b.as_ptr().cast(), 8);
                }
                fd
            }
            FdKind::TimerFd {
                clockid,
                flags,
                value_ns,
                interval_ns,
                ticks,
            } => {
                let mut f = libc::TFD_CLOEXEC;
                if nonblock(*flags) {
                    f |= libc::TFD_NONBLOCK;
                }
                let fd = libc::timerfd_create(*clockid, f);
                if fd >= 0 {
                    let ts = |ns: u64| libc::timespec {
                        tv_sec: (ns / 1_000_000_000) as _,
                        tv_nsec: (ns % 1_000_000_000) as _,
                    };
                    // A periodic timer that expired and was not read yet shows no time
                    // left (it is re-armed on read): it goes on one interval later,
                    // its pending expirations set back below.
                    let value = if *value_ns == 0 {
                        *interval_ns
                    } else {
                        *value_ns
                    };
                    let spec = libc::itimerspec {
                        it_interval: ts(*interval_ns),
                        it_value: ts(value),
                    };
                    libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut());
                    if *ticks > 0 {
                        libc::ioctl(fd, TFD_IOC_SET_TICKS, ticks as *const u64);
                    }
                }
                fd
            }
            FdKind::SignalFd { mask, flags } => {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in 1..=64 {
                    if mask & (1u64 << (sig - 1)) != 0 {
                        libc::sigaddset(&mut set, sig);
                    }
                }
                let mut f = libc::SFD_CLOEXEC;
                if nonblock(*flags) {
                    f |= libc::SFD_NONBLOCK;
                }
                libc::signalfd(-1, &set, f)
            }
            FdKind::Epoll { .. } => libc::epoll_create1(libc::EPOLL_CLOEXEC),
            _ => return Err("not an event fd".into()),
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(fd)
    }
}

/// In the new process, once its fds are in place: re-registers the fds of its epoll
/// instances. An instance shared with other processes is registered by one of them
/// only: `registers(desc)` says whether this process does. A watched file that its
/// fd number no longer holds (see [`EpollItem::desc`]) is registered through that
/// number all the same: `temps` (by index in [`crate::files::epoll_temps`]) holds it,
/// it is put at that number for the registration, and what the number held is put
/// back (or the number closed). `hi` is above every fd of the process.
pub fn register_epoll(
    fds: &[Fd],
    registers: impl Fn(u64) -> bool,
    temps: &HashMap<usize, i32>,
    hi: i32,
) -> std::result::Result<(), String> {
    let order = crate::files::epoll_temps(fds);
    for f in fds {
        let FdKind::Epoll { items, .. } = &f.kind else {
            continue;
        };
        if !registers(f.desc) {
            continue;
        }
        for it in items {
            let mut ev = libc::epoll_event {
                events: it.events,
                u64: it.data,
            };
            let Some(desc) = it.desc else {
                // SAFETY: epoll_ctl on our own descriptors with a valid event.
                let r = unsafe { libc::epoll_ctl(f.fd, libc::EPOLL_CTL_ADD, it.fd, &mut ev) };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(format!("epoll fd {}: registering fd {}: {e}", f.fd, it.fd));
                    }
                }
                continue;
            };
            let temp = order
                .iter()
                .position(|d| *d == desc)
                .and_then(|k| temps.get(&k))
                .copied()
                .ok_or_else(|| {
                    format!(
                        "epoll fd {}: the file registered as fd {} was not received",
                        f.fd, it.fd
                    )
                })?;
            // SAFETY: fcntl, dup3, epoll_ctl and close on descriptors of our own
            // process; every number replaced is put back before the next item.
            unsafe {
                let ep = if it.fd == f.fd {
                    libc::fcntl(f.fd, libc::F_DUPFD_CLOEXEC, hi)
                } else {
                    f.fd
                };
                let prev = libc::fcntl(it.fd, libc::F_GETFD);
                let saved = if prev >= 0 {
                    libc::fcntl(it.fd, libc::F_DUPFD_CLOEXEC, hi)
                } else {
                    -1
                };
                let mut r = libc::dup3(temp, it.fd, libc::O_CLOEXEC);
                if r >= 0 {
                    r = libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, it.fd, &mut ev);
                }
                let e = std::io::Error::last_os_error();
                if saved >= 0 {
                    let cloexec = if prev & libc::FD_CLOEXEC != 0 {
                        libc::O_CLOEXEC
                    } else {
                        0
                    };
                    libc::dup3(saved, it.fd, cloexec);
                    libc::close(saved);
                } else {
                    libc::close(it.fd);
                }
                if ep != f.fd {
                    libc::close(ep);
                }
                if r < 0 {
                    return Err(format!(
                        "epoll fd {}: registering the file once at fd {}: {e}",
                        f.fd, it.fd
                    ));
                }
            }
        }
    }
    Ok(())
}
