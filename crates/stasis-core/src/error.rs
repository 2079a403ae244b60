//! Errors of the engine. Each carries the process (and the resource) it is about.

use stasis_image::ImageError;
use stasis_sys::SysError;

/// An engine error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A resource stasis cannot save yet; the checkpoint is refused before anything is
    /// written and the process resumes unharmed.
    #[error("cannot checkpoint process {pid}: {what} is not supported yet")]
    Unsupported { pid: i32, what: String },
    /// A passing state that cannot be saved (e.g. bytes waiting in a pseudo-terminal):
    /// the checkpoint is retried after letting the job run a moment.
    #[error("cannot checkpoint process {pid} right now: {what}")]
    Transient { pid: i32, what: String },
    /// The process went away (exited or was killed) while we worked on it.
    #[error("process {pid} exited during the checkpoint")]
    Gone { pid: i32 },
    /// A system call failed.
    #[error("process {pid}: {context}: {source}")]
    Sys {
        pid: i32,
        context: String,
        source: SysError,
    },
    /// Reading /proc or another file failed.
    #[error("process {pid}: {context}: {source}")]
    Io {
        pid: i32,
        context: String,
        source: std::io::Error,
    },
    /// The image store failed (corrupt image, disk full, lock held...).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Restore found the environment different from checkpoint time.
    #[error("cannot restore process {pid}: {msg}")]
    Restore { pid: i32, msg: String },
    /// Something the checkpoint waited for did not happen in time (a thread that does
    /// not stop, an injected syscall that does not return, a killed process that does
    /// not exit); `what` says which thread and what it is doing.
    #[error("process {pid}: {what}")]
    Timeout { pid: i32, what: String },
    /// A fault injected for a test (`STASIS_FAULT_AT`), or the checkpoint was abandoned
    /// (its requester went away).
    #[error(transparent)]
    Fault(#[from] stasis_sys::fault::Fault),
    /// A coordinated checkpoint was abandoned (by its coordinator, or because the
    /// agent speaking for it went away); the job runs on.
    #[error("checkpoint abandoned: {why}")]
    Abandoned { why: String },
    /// The process refused to be traced.
    #[error("cannot attach to process {pid}: {msg}")]
    Attach { pid: i32, msg: String },
}

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to syscall errors.
pub trait SysContext<T> {
    /// Wraps an error with the process and a description of what was being done.
    fn ctx(self, pid: i32, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SysContext<T> for std::result::Result<T, SysError> {
    fn ctx(self, pid: i32, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| {
            if source.is_gone() && source.call != "clone3(set_tid)" {
                Error::Gone { pid }
            } else {
                Error::Sys {
                    pid,
                    context: context(),
                    source,
                }
            }
        })
    }
}

impl<T> SysContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, pid: i32, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            pid,
            context: context(),
            source,
        })
    }
}
