//! Pseudo-terminals inside the job (a program run under `script`, a pty library).
//!
//! Dump: the master's index comes from TIOCGPTN on a borrowed (pidfd_getfd) fd; the
//! terminal's settings (termios, window size) from a slave; which session has it as
//! controlling terminal and its foreground group from /proc/PID/stat. Bytes waiting in
//! a pty cannot be read without consuming them: a checkpoint finding some is refused.
//!
//! Restore: a new pair is opened (/dev/ptmx, unlocked) with the saved settings; its
//! index, and so the slave's name, may differ. The session leader makes it its
//! controlling terminal again (TIOCSCTTY) and the foreground group is set back.

use crate::error::{Error, Result, SysContext};
use stasis_image::{from_hex, to_hex, Pty};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

/// Major device number of /dev/ptmx (minor 2) and the first of the slaves.
const TTYAUX_MAJOR: u32 = 5;
const UNIX98_PTY_SLAVE_MAJOR: u32 = 136;

/// (pty index, is master) of a character device, if it is a Unix98 pty end.
pub fn classify(maj: u32, min: u32) -> Option<(bool, u64)> {
    if maj == TTYAUX_MAJOR && min == 2 {
        return Some((true, 0));
    }
    (UNIX98_PTY_SLAVE_MAJOR..UNIX98_PTY_SLAVE_MAJOR + 8)
        .contains(&maj)
        .then(|| (false, u64::from((maj - UNIX98_PTY_SLAVE_MAJOR) * 256 + min)))
}

/// Saves a pty end held as fd `fd`; returns (pty id, is master). The pair is recorded
/// in `ptys` the first time.
pub fn dump_fd(
    pid: i32,
    fd: i32,
    master: bool,
    slave_index: u64,
    ptys: &mut Vec<Pty>,
) -> Result<u64> {
    let ours = crate::proc::borrow_fd(pid, fd)?;
    let f = ours.as_raw_fd();
    let id = if master {
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes the pty index into `n`.
        if unsafe { libc::ioctl(f, libc::TIOCGPTN, &mut n) } != 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(pid, || format!("reading the pty index of fd {fd}"));
        }
        u64::from(n)
    } else {
        slave_index
    };
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    unsafe { libc::ioctl(f, libc::FIONREAD, &mut pending) };
    if pending > 0 {
        return Err(Error::Transient {
            pid,
            what: format!("fd {fd}, a pseudo-terminal, holds {pending} unread bytes"),
        });
    }
    if !ptys.iter().any(|p| p.id == id) || !master {
        // SAFETY: termios/winsize are plain data filled by the ioctls.
        let (t, w) = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            let mut w: libc::winsize = std::mem::zeroed();
            libc::tcgetattr(f, &mut t);
            libc::ioctl(f, libc::TIOCGWINSZ, &mut w);
            (t, w)
        };
        // SAFETY: viewing the plain-data termios struct as bytes.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&t as *const libc::termios).cast::<u8>(),
                std::mem::size_of::<libc::termios>(),
            )
        };
        let rec = Pty {
            id,
            termios: to_hex(raw),
            winsize: [w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel],
            session: 0,
            foreground: 0,
        };
        match ptys.iter_mut().find(|p| p.id == id) {
            // The slave's view of the settings is the one to keep.
            Some(p) => {
                *p = Pty {
                    session: p.session,
                    foreground: p.foreground,
                    ..rec
                }
            }
            None => ptys.push(rec),
        }
    }
    Ok(id)
}

/// Device number of slave `id` (as /proc/PID/stat's tty_nr shows it).
pub fn slave_dev(id: u64) -> u64 {
    libc::makedev(
        UNIX98_PTY_SLAVE_MAJOR + (id / 256) as u32,
        (id % 256) as u32,
    )
}

/// A new pty pair with the saved settings: (master, slave path).
pub fn create(p: &Pty) -> std::result::Result<(OwnedFd, String), String> {
    // SAFETY: open/ioctl/tcsetattr on descriptors we own, with plain data.
    unsafe {
        let m = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if m < 0 {
            return Err(format!(
                "opening /dev/ptmx: {}",
                std::io::Error::last_os_error()
            ));
        }
        let master = OwnedFd::from_raw_fd(m);
        let unlock: libc::c_int = 0;
        libc::ioctl(m, libc::TIOCSPTLCK, &unlock);
        let mut n: libc::c_uint = 0;
        if libc::ioctl(m, libc::TIOCGPTN, &mut n) != 0 {
            return Err(format!("TIOCGPTN: {}", std::io::Error::last_os_error()));
        }
        let path = format!("/dev/pts/{n}");
        let cpath = std::ffi::CString::new(path.clone()).map_err(|e| e.to_string())?;
        let s = libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(format!(
                "opening {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let slave = OwnedFd::from_raw_fd(s);
        if let Some(raw) =
            from_hex(&p.termios).filter(|r| r.len() == std::mem::size_of::<libc::termios>())
        {
            let mut t: libc::termios = std::mem::zeroed();
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                (&mut t as *mut libc::termios).cast::<u8>(),
                raw.len(),
            );
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
        let w = libc::winsize {
            ws_row: p.winsize[0],
            ws_col: p.winsize[1],
            ws_xpixel: p.winsize[2],
            ws_ypixel: p.winsize[3],
        };
        libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &w);
        drop(slave);
        Ok((master, path))
    }
}
