//! Pipes and FIFOs: the bytes in flight saved without consuming them (dump), pipes
//! created and refilled, FIFOs reopened (restore).

use super::restore::open;
use super::Registry;
use crate::error::{Result, SysContext};
use stasis_image::{CheckpointReader, CheckpointWriter, Pipe};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

impl Registry {
    /// Saves the bytes in flight in a pipe, once per pipe, without consuming them.
    pub(super) fn save_pipe(
        &mut self,
        pid: i32,
        fd: i32,
        link: &std::path::Path,
        ino: u64,
        writer: &mut CheckpointWriter,
    ) -> Result<()> {
        if self.pipes.iter().any(|p| p.id == ino) {
            return Ok(());
        }
        let ctx = || format!("reading the pipe of fd {fd}");
        // A new read end of the same pipe.
        let rd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(link)
            .ctx(pid, ctx)?;
        // SAFETY: fcntl queries on a descriptor we own.
        let capacity = unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(4096) as u64;
        let mut p = [0i32; 2];
        // SAFETY: pipe2 fills the array with two new descriptors.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error()).ctx(pid, ctx);
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (mut tr, tw) =
            unsafe { (std::fs::File::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // SAFETY: resizing our own pipe.
        unsafe { libc::fcntl(tw.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as libc::c_int) };
        // SAFETY: tee between two pipes we hold; it copies without consuming.
        let n = unsafe {
            libc::tee(
                rd.as_raw_fd(),
                tw.as_raw_fd(),
                capacity as usize,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        let mut data = Vec::new();
        if n > 0 {
            drop(tw);
            tr.read_to_end(&mut data).ctx(pid, ctx)?;
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            return Err(std::io::Error::last_os_error()).ctx(pid, ctx);
        }
        let data_file = if data.is_empty() {
            None
        } else {
            let name = format!("pipe-{ino}.img");
            let mut w = writer.data_file(&name)?;
            w.write_all(&data)?;
            writer.finish_data(w)?;
            Some(name)
        };
        self.pipes.push(Pipe {
            id: ino,
            capacity,
            data_file,
            len: data.len() as u64,
        });
        Ok(())
    }
}

/// Opens a FIFO read-write (creating it if it is gone) and refills it.
pub(super) fn open_fifo(
    num: i32,
    path: &str,
    info: Option<&Pipe>,
    image: &CheckpointReader,
) -> std::result::Result<OwnedFd, String> {
    let c = CString::new(path).map_err(|_| format!("fd {num}: bad path {path:?}"))?;
    // SAFETY: mkfifo with a valid C string; EEXIST is fine.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0
        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
    {
        return Err(format!(
            "fd {num}: cannot recreate the FIFO {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let fd = open(num, path, libc::O_RDWR)?;
    // SAFETY: fd was just opened and is owned here.
    let keeper = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(info) = info {
        // SAFETY: resizing the FIFO's pipe.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, info.capacity as libc::c_int) };
        if let Some(name) = &info.data_file {
            let p = image.data_path(name).map_err(|e| e.to_string())?;
            let data = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let mut wf = std::fs::File::from(keeper.try_clone().map_err(|e| e.to_string())?);
            wf.write_all(&data)
                .map_err(|e| format!("refilling FIFO {path}: {e}"))?;
        }
    }
    Ok(keeper)
}

/// A new pipe with the saved capacity and contents: (read end, write end, neither
/// handed out yet).
pub(super) fn new_pipe(
    info: &Pipe,
    image: &CheckpointReader,
) -> std::result::Result<(OwnedFd, OwnedFd, bool, bool), String> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    // SAFETY: resizing our own pipe.
    unsafe {
        libc::fcntl(
            w.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            info.capacity as libc::c_int,
        )
    };
    if let Some(name) = &info.data_file {
        let path = image.data_path(name).map_err(|e| e.to_string())?;
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut wf = std::fs::File::from(w.try_clone().map_err(|e| e.to_string())?);
        wf.write_all(&data)
            .map_err(|e| format!("refilling pipe {}: {e}", info.id))?;
    }
    Ok((r, w, false, false))
}
