//! The application interface of stasis, for Rust programs: ask for a checkpoint now,
//! run code just before a checkpoint (flush buffers) and just after a restart (reopen
//! connections, read the new environment).
//!
//! ```no_run
//! // Flush our output before every checkpoint, reconnect after every restart.
//! stasis_app::set_hooks(
//!     Some(Box::new(|| { /* flush buffered files */ })),
//!     Some(Box::new(|| { /* reopen connections */ })),
//! ).ok();
//! // ... at a good moment:
//! match stasis_app::checkpoint() {
//!     Ok(stasis_app::Resumed::Continued) => { /* the checkpoint is on disk */ }
//!     Ok(stasis_app::Resumed::Restarted) => { /* we are a restart of it */ }
//!     Err(e) => eprintln!("no checkpoint: {e}"),
//! }
//! ```
//!
//! A program under `stasis run` or `stasis restart` finds the interface's socket in
//! the environment variable `STASIS_API`; elsewhere every call fails with
//! `ErrorKind::NotFound` and [`available`] says false, so the same program runs with
//! and without stasis. Nothing happens until the first call: a program that does not
//! use the interface has no connection and no thread.
//!
//! The first call connects (one connection per process) and starts one thread that
//! reads it and runs the hooks, with every signal blocked. Calls may come from any
//! thread and wait for their answer. A hook may call [`getenv`] (a post-restart hook
//! reads the new environment), not [`checkpoint`] or [`set_hooks`] (refused with
//! `ErrorKind::WouldBlock`). A child process made by `fork` gets a connection of its
//! own at its first call (not from a thread that forked while another held the
//! interface's lock). The protocol is in [`protocol`] and docs/API.md; the C
//! library (`include/stasis.h`) speaks the same.

pub mod protocol;

use protocol::{Reply, Request, ENV, VERSION};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Where [`checkpoint`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// The checkpoint was taken and the job continues.
    Continued,
    /// The job was restarted from that checkpoint (or a later one).
    Restarted,
}

/// A hook: code run by the interface's thread.
pub type Hook = Box<dyn Fn() + Send + Sync + 'static>;

/// Whether the program runs under stasis with the interface reachable (connects on
/// the first call).
pub fn available() -> bool {
    client().is_ok()
}

/// Asks stasis for a checkpoint of the whole job now and waits until it is taken (the
/// pre-checkpoint hooks of every process that set one run first). Returns
/// [`Resumed::Continued`] once the checkpoint is on disk, or [`Resumed::Restarted`]
/// when the job is a restart of a checkpoint taken while this call waited.
pub fn checkpoint() -> io::Result<Resumed> {
    match client()?.request(Request::Checkpoint)? {
        Answer::Checkpoint(r) => r.map_err(io::Error::other),
        a => Err(io::Error::other(format!("unexpected answer {a:?}"))),
    }
}

/// Sets the hooks: `pre_checkpoint` runs before every checkpoint of the job (stasis
/// waits for it, up to `stasis run --hook-timeout`, 10 s by default, before it takes
/// the checkpoint anyway with a warning); `post_restart` runs once after every restart.
/// Replaces the hooks set before; `None` removes one.
pub fn set_hooks(pre_checkpoint: Option<Hook>, post_restart: Option<Hook>) -> io::Result<()> {
    let c = client()?;
    let pre_wanted = pre_checkpoint.is_some();
    {
        let mut st = lock(&c.state);
        st.pre = pre_checkpoint.map(Arc::from);
        st.post = post_restart.map(Arc::from);
        st.pre_wanted = pre_wanted;
    }
    match c.request(hello(pre_wanted))? {
        Answer::Hello(r) => r.map_err(io::Error::other),
        a => Err(io::Error::other(format!("unexpected answer {a:?}"))),
    }
}

/// The value of `name` in the environment of the `stasis run` or `stasis restart`
/// supervising the job now: after a restart, the new one's (its batch job id, its
/// node's settings), where the program's own environment is the one it started with.
/// `Ok(None)` when it is not set there.
pub fn getenv(name: &str) -> io::Result<Option<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStringExt;
    match client()?.request(Request::Getenv(name.as_bytes().to_vec()))? {
        Answer::Getenv(Ok(v)) => Ok(Some(std::ffi::OsString::from_vec(v))),
        Answer::Getenv(Err(_)) => Ok(None),
        a => Err(io::Error::other(format!("unexpected answer {a:?}"))),
    }
}

fn hello(pre_checkpoint: bool) -> Request {
    Request::Hello {
        version: VERSION,
        pre_checkpoint,
    }
}

/// What a request waits for. One request of each kind may wait at a time: stasis
/// answers each kind in order (a checkpoint long after a getenv sent later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello = 0,
    Checkpoint = 1,
    Getenv = 2,
}

/// The answer to a request.
#[derive(Debug)]
enum Answer {
    Hello(Result<(), String>),
    Checkpoint(Result<Resumed, String>),
    Getenv(Result<Vec<u8>, String>),
}

/// A request waiting for its answer.
#[derive(Default)]
struct Slot {
    req: Option<Request>,
    /// Written (on whichever connection the process had then).
    sent: bool,
    /// After a restart: the `sync` that tells whether it was lost.
    sync: Option<u64>,
    answer: Option<Answer>,
}

#[derive(Default)]
struct State {
    slots: [Option<Slot>; 3],
    /// Why the connection ended.
    broken: Option<String>,
    pre: Option<Arc<dyn Fn() + Send + Sync>>,
    post: Option<Arc<dyn Fn() + Send + Sync>>,
    pre_wanted: bool,
    syncs: u64,
}

/// What has been read, not yet handled: the interface's thread's alone (also while
/// it runs a hook that asks something).
struct Input {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The connection of this process.
struct Client {
    /// The process that made it (a forked child makes its own).
    owner: u32,
    /// Writes, one line at a time. Taken before `state` when both are held.
    out: Mutex<UnixStream>,
    input: Mutex<Input>,
    state: Mutex<State>,
    cond: Condvar,
}

/// The connection, made on first use.
static CLIENT: Mutex<Option<Arc<Client>>> = Mutex::new(None);

thread_local! {
    /// Set while a hook runs on the interface's thread.
    static IN_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// While the post-restart hook runs on the interface's thread: whether a
    /// checkpoint request was found lost meanwhile (answered once the hook returned).
    static RESTARTING: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

fn in_hook() -> bool {
    IN_HOOK.with(|h| h.get())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn client() -> io::Result<Arc<Client>> {
    let mut g = lock(&CLIENT);
    if let Some(c) = g.as_ref() {
        if c.owner == std::process::id() && lock(&c.state).broken.is_none() {
            return Ok(c.clone());
        }
    }
    *g = None;
    let addr = std::env::var_os(ENV).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("not running under stasis ({ENV} is not set)"),
        )
    })?;
    let stream = connect(&addr)?;
    let c = Arc::new(Client {
        owner: std::process::id(),
        input: Mutex::new(Input {
            stream: stream.try_clone()?,
            buf: Vec::new(),
        }),
        out: Mutex::new(stream),
        state: Mutex::new(State::default()),
        cond: Condvar::new(),
    });
    let for_thread = c.clone();
    spawn_unsignalled(move || for_thread.read_loop())?;
    let said = match c.request(hello(false)) {
        Ok(Answer::Hello(Ok(()))) => Ok(()),
        Ok(Answer::Hello(Err(e))) => Err(io::Error::other(e)),
        Ok(a) => Err(io::Error::other(format!("unexpected answer {a:?}"))),
        Err(e) => Err(e),
    };
    if let Err(e) = said {
        // The thread sees the end of the connection and exits.
        let _ = lock(&c.out).shutdown(std::net::Shutdown::Both);
        return Err(e);
    }
    *g = Some(c.clone());
    Ok(c)
}

fn connect(addr: &std::ffi::OsStr) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = addr.as_bytes();
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "connecting to the stasis interface {}: {e}",
                addr.to_string_lossy()
            ),
        )
    };
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(named)?;
            UnixStream::connect_addr(&a).map_err(named)
        }
        None => UnixStream::connect(addr).map_err(named),
    }
}

/// Starts `f` on a new thread with every signal blocked (signals meant for the
/// application go to its own threads).
fn spawn_unsignalled(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let all = sigmask::SigSet::full();
    let old = sigmask::set(&all);
    let r = std::thread::Builder::new()
        .name("stasis-api".into())
        .spawn(f);
    sigmask::set(&old);
    r.map(|_| ())
}

fn broken_pipe(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, why.to_string())
}

impl Client {
    /// Sends `req` and waits for its answer.
    fn request(&self, req: Request) -> io::Result<Answer> {
        let kind = match req {
            Request::Hello { .. } => Kind::Hello,
            Request::Checkpoint => Kind::Checkpoint,
            Request::Getenv(_) => Kind::Getenv,
            _ => return Err(io::Error::other("not a request")),
        };
        if in_hook() && kind != Kind::Getenv {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "called from a stasis hook (only getenv may be)",
            ));
        }
        let k = kind as usize;
        let mut st = lock(&self.state);
        loop {
            // Free, or answered (its owner takes the answer without needing us).
            st = self.wait_for(st, |st| {
                st.slots[k].as_ref().is_none_or(|s| s.answer.is_some())
            });
            if st.broken.is_some() || st.slots[k].is_none() {
                break;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(e) = &st.broken {
            return Err(broken_pipe(e));
        }
        st.slots[k] = Some(Slot {
            req: Some(req.clone()),
            ..Slot::default()
        });
        drop(st);
        let sent = {
            // `sent` changes with `out` held: a restart seen meanwhile by the reading
            // thread knows whether this line went before its `sync` or not at all yet.
            let mut out = lock(&self.out);
            let r = out.write_all(req.line().as_bytes());
            if let Some(s) = lock(&self.state).slots[k].as_mut() {
                s.sent = true;
            }
            r
        };
        let mut st = lock(&self.state);
        if sent.is_ok() {
            st = self.wait_for(st, |st| {
                st.slots[k].as_ref().is_some_and(|s| s.answer.is_some())
            });
        }
        let answer = st.slots[k].take().and_then(|s| s.answer);
        self.cond.notify_all();
        let broken = st.broken.clone();
        drop(st);
        match (sent, answer, broken) {
            (Err(e), _, _) => Err(e),
            (Ok(()), Some(a), _) => Ok(a),
            (Ok(()), None, why) => Err(broken_pipe(why.as_deref().unwrap_or("no answer"))),
        }
    }

    /// Waits until `done` or the connection ends: on the interface's thread (a hook
    /// asking something) by reading and handling lines itself, elsewhere by waiting
    /// for that thread.
    fn wait_for<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        done: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while !done(&st) && st.broken.is_none() {
            if !in_hook() {
                st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(st);
            let r = self.step();
            st = lock(&self.state);
            if let Err(why) = r {
                st.broken = Some(why);
                self.cond.notify_all();
            }
        }
        st
    }

    fn send(&self, req: &Request) -> io::Result<()> {
        lock(&self.out).write_all(req.line().as_bytes())
    }

    /// Handles the next line read, or reads more. Err once the connection ended.
    fn step(&self) -> Result<(), String> {
        let line = {
            let mut input = lock(&self.input);
            match protocol::take_line(&mut input.buf) {
                Some(l) => Some(l),
                None => {
                    let mut chunk = [0u8; 16384];
                    let n = loop {
                        match input.stream.read(&mut chunk) {
                            Ok(0) => return Err("stasis closed the interface's connection".into()),
                            Ok(n) => break n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(format!("reading the stasis interface: {e}")),
                        }
                    };
                    input.buf.extend_from_slice(&chunk[..n]);
                    None
                }
            }
        };
        if let Some(l) = line {
            self.handle(Reply::parse(&l));
        }
        Ok(())
    }

    /// The interface's thread: reads every line from stasis until the connection ends.
    fn read_loop(&self) {
        let why = loop {
            if let Err(why) = self.step() {
                break why;
            }
        };
        lock(&self.state).broken = Some(why);
        self.cond.notify_all();
    }

    /// Gives the answer of the pending request of `kind`, if one waits.
    fn answer(&self, kind: Kind, a: Answer) {
        let mut st = lock(&self.state);
        if let Some(s) = st.slots[kind as usize].as_mut() {
            if s.answer.is_none() {
                s.answer = Some(a);
                self.cond.notify_all();
            }
        }
    }

    fn handle(&self, reply: Reply) {
        match reply {
            Reply::Hello { .. } => self.answer(Kind::Hello, Answer::Hello(Ok(()))),
            Reply::Checkpointed { .. } => {
                self.answer(Kind::Checkpoint, Answer::Checkpoint(Ok(Resumed::Continued)))
            }
            Reply::Value(v) => self.answer(Kind::Getenv, Answer::Getenv(Ok(v))),
            Reply::Error { verb, message } => match verb.as_str() {
                "hello" => self.answer(Kind::Hello, Answer::Hello(Err(message))),
                "checkpoint" => self.answer(Kind::Checkpoint, Answer::Checkpoint(Err(message))),
                "getenv" => self.answer(Kind::Getenv, Answer::Getenv(Err(message))),
                _ => {}
            },
            Reply::PreCheckpoint(seq) => {
                let hook = lock(&self.state).pre.clone();
                run_hook(hook);
                // An ack that cannot be sent: the connection is ending, which the
                // reading sees.
                let _ = self.send(&Request::Ack(seq));
            }
            Reply::Restarted { .. } => {
                // A request sent and not answered went either to the previous stasis
                // (lost) or, since the restart, to the new one: a `sync` tells which.
                {
                    let mut out = lock(&self.out);
                    let mut st = lock(&self.state);
                    st.syncs += 1;
                    let seq = st.syncs;
                    let mut any = false;
                    for s in st.slots.iter_mut().flatten() {
                        if s.sent && s.answer.is_none() {
                            s.sync = Some(seq);
                            any = true;
                        }
                    }
                    drop(st);
                    if any {
                        let _ = out.write_all(Request::Sync(seq).line().as_bytes());
                    }
                }
                // A waiting `checkpoint` returns `Restarted` after the hook.
                let hook = lock(&self.state).post.clone();
                RESTARTING.with(|r| r.set(Some(false)));
                run_hook(hook);
                let lost = RESTARTING.with(|r| r.take()) == Some(true);
                if lost {
                    self.answer(Kind::Checkpoint, Answer::Checkpoint(Ok(Resumed::Restarted)));
                }
            }
            Reply::Synced(seq) => {
                let mut again = Vec::new();
                let mut lost_checkpoint = false;
                {
                    let mut st = lock(&self.state);
                    for (k, slot) in st.slots.iter_mut().enumerate() {
                        let Some(s) = slot.as_mut() else { continue };
                        if s.answer.is_some() || s.sync != Some(seq) {
                            continue;
                        }
                        s.sync = None;
                        if k == Kind::Checkpoint as usize {
                            lost_checkpoint = true;
                        } else if let Some(r) = &s.req {
                            // Asked again, of the new stasis.
                            again.push(r.clone());
                        }
                    }
                }
                for r in again {
                    let _ = self.send(&r);
                }
                // Lost with the previous stasis: it was taken, and this is the restart
                // of it (or of a later one); answered now, or after the post-restart
                // hook that is running.
                if lost_checkpoint && RESTARTING.with(|r| r.get()).is_some() {
                    RESTARTING.with(|r| r.set(Some(true)));
                } else if lost_checkpoint {
                    self.answer(Kind::Checkpoint, Answer::Checkpoint(Ok(Resumed::Restarted)));
                }
            }
            Reply::Unknown(_) => {}
        }
    }
}

fn run_hook(hook: Option<Arc<dyn Fn() + Send + Sync>>) {
    let Some(h) = hook else { return };
    let was = IN_HOOK.with(|f| f.replace(true));
    // A panicking hook is reported by the panic hook; the interface goes on.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h()));
    IN_HOOK.with(|f| f.set(was));
}

/// The calling thread's signal mask, through the C library (std has no interface to it).
mod sigmask {
    /// A kernel-sized signal set as the C library lays it out (1024 bits).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct SigSet([u64; 16]);

    impl SigSet {
        /// Every signal (the C library keeps its own internal ones out).
        pub fn full() -> SigSet {
            SigSet([u64::MAX; 16])
        }
    }

    extern "C" {
        fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    }

    /// SIG_SETMASK on Linux.
    const SIG_SETMASK: i32 = 2;

    /// Sets the calling thread's mask to `set`; returns the one it replaces.
    pub fn set(set: &SigSet) -> SigSet {
        let mut old = SigSet([0; 16]);
        // SAFETY: both pointers are to live 128-byte sets, the size of the C library's
        // sigset_t on Linux; pthread_sigmask only reads `set` and writes `old`.
        unsafe { pthread_sigmask(SIG_SETMASK, set, &mut old) };
        old
    }
}
