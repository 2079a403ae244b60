//! Pseudo-terminals inside the job (a program run under `script`, a pty library, a
//! program that makes its own pair and session).
//!
//! Dump: the master's index comes from TIOCGPTN on a borrowed (pidfd_getfd) fd; the
//! terminal's settings (termios, window size) from either end; a /dev/tty fd is
//! traced to the terminal it refers to with TIOCGDEV. While the job is frozen, the
//! bytes waiting in the pair are read out through the master and a slave opened with
//! TIOCGPTPEER (what the slave would read: at once, by switching canonical mode off
//! for a moment; what the master would read) and put back at once, in order, with
//! settings that leave them as they were (no echo, no output or input translation,
//! line-editing characters moved to a byte the data does not hold). Which process has
//! which pty as controlling terminal, and the foreground group, come from
//! /proc/PID/stat (`dump.rs`). A pty whose master is not held in the job is refused.
//!
//! Restore: a new pair is opened (/dev/ptmx, unlocked); its index, and so the slave's
//! name, may differ. The saved bytes are written into it the same way (so its reader
//! gets exactly those bytes, once), then the saved settings are set. The restorer
//! keeps a slave of each pair open while the processes are forked: a session leader
//! makes it its controlling terminal (TIOCSCTTY) right after setsid, before it forks
//! the members of its session, which so inherit it; the foreground group is set back
//! once every process exists. A /dev/tty description is opened by a short-lived
//! helper process that takes the terminal as its own controlling terminal, opens
//! /dev/tty and is killed (so the terminal is free again for its session).

use crate::error::{Error, Result};
use stasis_image::{from_hex, to_hex, Pty};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Major device number of /dev/ptmx (minor 2) and /dev/tty (minor 0), and the first
/// of the slaves.
const TTYAUX_MAJOR: u32 = 5;
const UNIX98_PTY_SLAVE_MAJOR: u32 = 136;

/// (is master, pty index) of a character device, if it is a Unix98 pty end.
pub fn classify(maj: u32, min: u32) -> Option<(bool, u64)> {
    if maj == TTYAUX_MAJOR && min == 2 {
        return Some((true, 0));
    }
    (UNIX98_PTY_SLAVE_MAJOR..UNIX98_PTY_SLAVE_MAJOR + 8)
        .contains(&maj)
        .then(|| (false, u64::from((maj - UNIX98_PTY_SLAVE_MAJOR) * 256 + min)))
}

/// Whether a character device is /dev/tty.
pub fn is_dev_tty(maj: u32, min: u32) -> bool {
    maj == TTYAUX_MAJOR && min == 0
}

/// The pty index of the terminal that fd `fd` of `pid`, an opening of /dev/tty,
/// refers to (TIOCGDEV gives the real terminal's device number).
pub fn dev_tty_index(pid: i32, fd: i32) -> Result<u64> {
    let ours = crate::proc::borrow_fd(pid, fd)?;
    let mut dev: libc::c_uint = 0;
    // SAFETY: TIOCGDEV writes the device number into an unsigned int.
    let r = unsafe { libc::ioctl(ours.as_raw_fd(), libc::TIOCGDEV, &mut dev) };
    let found = (r == 0)
        .then(|| classify(libc::major(dev.into()), libc::minor(dev.into())))
        .flatten();
    match found {
        Some((false, index)) => Ok(index),
        _ => Err(Error::Unsupported {
            pid,
            what: format!(
                "fd {fd}, /dev/tty of a terminal that is not a pseudo-terminal (device {}:{})",
                libc::major(dev.into()),
                libc::minor(dev.into())
            ),
        }),
    }
}

/// What the dump of the job's pty ends found so far.
#[derive(Default)]
pub struct Collector {
    /// The pairs, with their settings and saved bytes.
    pub ptys: Vec<Pty>,
    /// Pairs whose master was found (and whose bytes were saved).
    masters: Vec<u64>,
    /// (pair, pid, fd) of the first slave end found of each pair.
    slaves: Vec<(u64, i32, i32)>,
}

impl Collector {
    /// Saves a pty end held as fd `fd` of `pid`; returns the pty id. The pair is
    /// recorded the first time; its waiting bytes are saved (and put back) the first
    /// time its master is found.
    pub fn dump_fd(&mut self, pid: i32, fd: i32, master: bool, slave_index: u64) -> Result<u64> {
        let ours = crate::proc::borrow_fd(pid, fd)?;
        let f = ours.as_raw_fd();
        let id = if master {
            let mut n: libc::c_uint = 0;
            // SAFETY: TIOCGPTN writes the pty index into `n`.
            if unsafe { libc::ioctl(f, libc::TIOCGPTN, &mut n) } != 0 {
                return Err(Error::Io {
                    pid,
                    context: format!("reading the pty index of fd {fd}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            u64::from(n)
        } else {
            slave_index
        };
        if !self.ptys.iter().any(|p| p.id == id) {
            let (t, w) = settings(f).map_err(|e| Error::Io {
                pid,
                context: format!("reading the settings of fd {fd}, a pseudo-terminal"),
                source: e,
            })?;
            self.ptys.push(Pty {
                id,
                termios: to_hex(termios_bytes(&t)),
                winsize: [w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel],
                session: 0,
                foreground: 0,
                input: String::new(),
                output: String::new(),
            });
        }
        if master && !self.masters.contains(&id) {
            let (input, output) = drain(f).map_err(|e| Error::Unsupported {
                pid,
                what: format!("fd {fd}, the master of pseudo-terminal {id}: {e}"),
            })?;
            self.masters.push(id);
            if let Some(p) = self.ptys.iter_mut().find(|p| p.id == id) {
                p.input = to_hex(&input);
                p.output = to_hex(&output);
            }
        }
        if !master && !self.slaves.iter().any(|s| s.0 == id) {
            self.slaves.push((id, pid, fd));
        }
        Ok(id)
    }

    /// The pairs, once every process was seen: each must have its master in the job
    /// (a terminal from outside cannot be made again).
    pub fn finish(self) -> Result<Vec<Pty>> {
        if let Some(&(id, pid, fd)) = self.slaves.iter().find(|s| !self.masters.contains(&s.0)) {
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "fd {fd}, pseudo-terminal /dev/pts/{id}, whose master is not held by the job (a terminal from outside)"
                ),
            });
        }
        Ok(self.ptys)
    }
}

/// The termios and window size of a terminal (either end of a pty gives the slave's).
fn settings(f: RawFd) -> std::io::Result<(libc::termios, libc::winsize)> {
    // SAFETY: termios/winsize are plain data filled by the calls.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        let mut w: libc::winsize = std::mem::zeroed();
        if libc::tcgetattr(f, &mut t) != 0 || libc::ioctl(f, libc::TIOCGWINSZ, &mut w) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((t, w))
    }
}

fn termios_bytes(t: &libc::termios) -> &[u8] {
    // SAFETY: viewing the plain-data termios struct as bytes.
    unsafe {
        std::slice::from_raw_parts(
            (t as *const libc::termios).cast::<u8>(),
            std::mem::size_of::<libc::termios>(),
        )
    }
}

fn set_termios(f: RawFd, t: &libc::termios) -> std::result::Result<(), String> {
    // SAFETY: tcsetattr reads the termios struct.
    if unsafe { libc::tcsetattr(f, libc::TCSANOW, t) } != 0 {
        return Err(format!(
            "setting the terminal's settings: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Bytes still on their way inside a pty sit in its flip buffers until a kernel worker
/// hands them to the reading side's line discipline. No wait is needed for them: when
/// nothing is readable, the line discipline's poll (n_tty_poll) runs that work itself
/// and looks again, so a poll that does not wait sees every byte written before the
/// job was frozen. (Waiting 20 ms per direction instead cost an OpenMPI job, whose
/// mpirun holds a pty per rank, 170 ms of pause per checkpoint.)
const SETTLE_MS: i32 = 0;

/// Reads everything `f` has to read (see [`SETTLE_MS`]).
fn read_out(f: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut p = libc::pollfd {
            fd: f,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut p, 1, SETTLE_MS) };
        if r <= 0 || p.revents & libc::POLLIN == 0 {
            break;
        }
        // SAFETY: read into our buffer; poll said it will not block.
        let n = unsafe { libc::read(f, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    out
}

/// Writes all of `data` to `f`, waiting for room.
fn write_out(f: RawFd, data: &[u8]) -> std::result::Result<(), String> {
    let mut done = 0;
    let mut stuck = 0;
    while done < data.len() {
        // SAFETY: write from our buffer.
        let n = unsafe { libc::write(f, data[done..].as_ptr().cast(), data.len() - done) };
        if n > 0 {
            done += n as usize;
            stuck = 0;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR)
        {
            return Err(format!("writing the saved bytes back: {e}"));
        }
        stuck += 1;
        if stuck > 100 {
            return Err("the terminal takes no more bytes (stopped by flow control?)".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Makes the kernel hand what was written into `f`'s terminal to its line discipline
/// now (poll flushes the terminal's pending input when none is readable yet).
fn settle(f: RawFd) {
    for _ in 0..2 {
        let mut p = libc::pollfd {
            fd: f,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, without waiting.
        unsafe { libc::poll(&mut p, 1, 0) };
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Settings under which bytes written to the master land in the slave's input
/// queue as they are, and bytes written to the slave reach the master as they are:
/// `orig`'s canonical mode and flow control, without echo, signals, translation or
/// output processing; the characters that would edit or end input moved to a byte
/// `input` does not hold.
fn injecting(orig: &libc::termios, input: &[u8]) -> std::result::Result<libc::termios, String> {
    let mut t = *orig;
    t.c_iflag &= libc::IXON;
    t.c_oflag &= !libc::OPOST;
    t.c_lflag &= libc::ICANON;
    let canon = t.c_lflag & libc::ICANON != 0;
    if canon || t.c_iflag & libc::IXON != 0 {
        let eol = orig.c_cc[libc::VEOL];
        let free = (1u8..=255)
            .find(|b| *b != b'\n' && *b != eol && !input.contains(b))
            .ok_or("the waiting input uses every byte value")?;
        for i in [
            libc::VERASE,
            libc::VKILL,
            libc::VEOF,
            libc::VSTART,
            libc::VSTOP,
        ] {
            t.c_cc[i] = free;
        }
    }
    Ok(t)
}

/// Puts `input` (for the slave to read) and `output` (for the master to read) into
/// the pty of master `m` and slave `s`, and sets `orig`'s settings.
fn put_back(
    m: RawFd,
    s: RawFd,
    orig: &libc::termios,
    input: &[u8],
    output: &[u8],
) -> std::result::Result<(), String> {
    if !input.is_empty() || !output.is_empty() {
        let tmp = injecting(orig, input)?;
        set_termios(s, &tmp)?;
        let wrote = write_out(s, output).and_then(|()| write_out(m, input));
        settle(s);
        settle(m);
        let set = set_termios(s, orig);
        wrote?;
        set?;
    } else {
        set_termios(s, orig)?;
    }
    Ok(())
}

/// Reads out the bytes waiting in both directions of the pty whose master is `m`
/// (the job frozen), and puts them back. Returns (input, output).
fn drain(m: RawFd) -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    // SAFETY: TIOCGPTPEER opens the slave of the master `m` as a new description.
    let s = unsafe {
        libc::ioctl(
            m,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(format!(
            "opening its slave (TIOCGPTPEER): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: s was just opened and is owned here.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    let (orig, _) = settings(s).map_err(|e| format!("reading its settings: {e}"))?;
    let output = read_out(m);
    // Everything the slave holds becomes readable at once out of canonical mode.
    let mut raw = orig;
    raw.c_lflag &= !libc::ICANON;
    raw.c_cc[libc::VMIN] = 0;
    raw.c_cc[libc::VTIME] = 0;
    set_termios(s, &raw)?;
    let input = read_out(s);
    put_back(m, slave.as_raw_fd(), &orig, &input, &output)?;
    Ok((input, output))
}

/// A new pty pair with the saved settings and waiting bytes: (master, a slave, slave
/// path).
pub fn create(p: &Pty) -> std::result::Result<(OwnedFd, OwnedFd, String), String> {
    // SAFETY: open/ioctl on descriptors we own, with plain data.
    let (master, slave, path) = unsafe {
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
        (master, OwnedFd::from_raw_fd(s), path)
    };
    let s = slave.as_raw_fd();
    let (mut t, _) = settings(s).map_err(|e| format!("{path}: {e}"))?;
    if let Some(raw) =
        from_hex(&p.termios).filter(|r| r.len() == std::mem::size_of::<libc::termios>())
    {
        // SAFETY: copying the saved bytes of a plain-data struct of the same size.
        unsafe {
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                (&mut t as *mut libc::termios).cast::<u8>(),
                raw.len(),
            )
        };
    }
    let input = from_hex(&p.input).ok_or("bad saved input bytes")?;
    let output = from_hex(&p.output).ok_or("bad saved output bytes")?;
    put_back(master.as_raw_fd(), s, &t, &input, &output).map_err(|e| format!("{path}: {e}"))?;
    let w = libc::winsize {
        ws_row: p.winsize[0],
        ws_col: p.winsize[1],
        ws_xpixel: p.winsize[2],
        ws_ypixel: p.winsize[3],
    };
    // SAFETY: TIOCSWINSZ reads the winsize struct.
    unsafe { libc::ioctl(s, libc::TIOCSWINSZ, &w) };
    Ok((master, slave, path))
}

/// Opens /dev/tty as a process whose controlling terminal is the slave `slave`
/// would: a helper child takes it as its controlling terminal (it is no session's
/// yet), opens /dev/tty with `flags`, and is killed once we took the descriptor (its
/// death frees the terminal for the session it belongs to).
pub fn open_dev_tty(slave: RawFd, flags: i32) -> std::result::Result<OwnedFd, String> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let flags = flags | libc::O_CLOEXEC;
    // SAFETY: the child only makes async-signal-safe calls and never returns.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: plain system calls in the forked child, which stays in pause().
        unsafe {
            let mut got: libc::c_int = -1;
            if libc::setsid() >= 0 && libc::ioctl(slave, libc::TIOCSCTTY, 0) == 0 {
                got = libc::open(c"/dev/tty".as_ptr(), flags);
            }
            if got < 0 {
                got = -*libc::__errno_location();
            }
            libc::write(w.as_raw_fd(), (&got as *const libc::c_int).cast(), 4);
            loop {
                libc::pause();
            }
        }
    }
    drop(w);
    let mut got: libc::c_int = 0;
    // SAFETY: reading an int from our pipe.
    let n = unsafe { libc::read(r.as_raw_fd(), (&mut got as *mut libc::c_int).cast(), 4) };
    let result = if n != 4 {
        Err("the helper opening /dev/tty died".to_string())
    } else if got < 0 {
        Err(format!(
            "opening /dev/tty with the terminal as controlling terminal: {}",
            std::io::Error::from_raw_os_error(-got)
        ))
    } else {
        // SAFETY: pidfd_open/pidfd_getfd return new descriptors or -1.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, child, 0) as i32;
            let fd = if pidfd >= 0 {
                let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, got, 0) as i32;
                libc::close(pidfd);
                fd
            } else {
                -1
            };
            if fd < 0 {
                Err(format!(
                    "taking /dev/tty from the helper: {}",
                    std::io::Error::last_os_error()
                ))
            } else {
                Ok(OwnedFd::from_raw_fd(fd))
            }
        }
    };
    // SAFETY: killing and reaping our own helper child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(child, &mut st, 0);
    }
    result
}

/// Device number of slave `id` (as /proc/PID/stat's tty_nr shows it).
pub fn slave_dev(id: u64) -> u64 {
    libc::makedev(
        UNIX98_PTY_SLAVE_MAJOR + (id / 256) as u32,
        (id % 256) as u32,
    )
}
