//! Shared harness for the stasis end-to-end tests.
//!
//! Every test gets a fresh work dir (`Work`) under /tmp that is the cwd of the
//! test program; the checkpoint dir is `<work>/ck`. Programs from
//! `tests/progs/*.c` are compiled on demand (`prog`). All processes started by
//! a test are killed when its `Proc`/`Work` guards are dropped (the `Work`
//! guard kills every process whose cwd lies inside the work dir, which covers
//! supervisors and the restored applications inside their namespaces).
//!
//! Protocol of the test programs: they print `ready ...` once in the state to
//! be checkpointed, then wait for a file `go` in their cwd, verify their state
//! and print `OK ...` (exit 0) or `FAIL ...` (exit 1). While waiting they
//! answer a file `ping` with a line `pong` (liveness probe for restored
//! processes that do not print anything by themselves).
#![allow(dead_code)]

pub mod cycles;
pub mod nodes;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The binary under test.
pub const STASIS: &str = env!("CARGO_BIN_EXE_stasis");
/// Exit status of `stasis run`/`stasis restart` after `checkpoint --kill`.
pub const EXIT_CHECKPOINTED: i32 = 75;
/// How long to wait for a program to report `ready`.
pub const T_READY: Duration = Duration::from_secs(20);
/// How long any single stasis command / state change may take.
pub const T_CMD: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Test programs
// ---------------------------------------------------------------------------

pub fn progs_src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs")
}

/// Compile `tests/progs/<name>.c` (once per test binary; the result is cached
/// on disk keyed by a hash of the sources and flags) and return the path of
/// the executable (rebuilt when the source or a header in tests/progs
/// changes). `avx` and `avx512` are both built from `avx.c`; `pthreads`,
/// `churn` and `forkthread` are linked with -pthread, `openmp` is built with -fopenmp,
/// `appapi` and `appfork` with the stasis application interface's C library
/// (include/, lib/).
pub fn prog(name: &str) -> PathBuf {
    static CACHE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(name) {
        return p.clone();
    }
    let (src, flags): (String, Vec<&str>) = match name {
        "avx" => ("avx.c".into(), vec!["-mavx2"]),
        "avx512" => ("avx.c".into(), vec!["-mavx2", "-mavx512f"]),
        "pthreads" | "churn" | "forkthread" | "faultapp" => (format!("{name}.c"), vec!["-pthread"]),
        "openmp" => ("openmp.c".into(), vec!["-fopenmp", "-pthread"]),
        "appapi" | "appfork" => (format!("{name}.c"), vec!["-pthread"]),
        other => (format!("{other}.c"), vec![]),
    };
    // Sources compiled in besides the program, and their headers' directories.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (extra, includes): (Vec<PathBuf>, Vec<PathBuf>) = match name {
        "appapi" | "appfork" => (vec![repo.join("lib/stasis.c")], vec![repo.join("include")]),
        _ => (vec![], vec![]),
    };
    let srcdir = progs_src_dir();
    let src_path = srcdir.join(&src);
    let mut hashed = vec![src_path.clone()];
    hashed.extend(extra.iter().cloned());
    for d in &includes {
        let mut headers: Vec<PathBuf> = fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        headers.sort();
        hashed.extend(headers);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in &hashed {
        fs::read(p)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
            .hash(&mut h);
    }
    // every header of the programs (util.h, inet.h, ...): a changed header
    // rebuilds the programs
    let mut headers: Vec<PathBuf> = fs::read_dir(&srcdir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    headers.sort();
    for p in headers {
        fs::read(&p).unwrap().hash(&mut h);
    }
    flags.hash(&mut h);
    let outdir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-progs");
    fs::create_dir_all(&outdir).unwrap();
    let exe = outdir.join(format!("{name}-{:016x}", h.finish()));
    if !exe.exists() {
        let tmp = outdir.join(format!(".{name}-{}.tmp", std::process::id()));
        let out = Command::new("cc")
            .args(["-O1", "-g", "-Wall", "-Wextra", "-D_GNU_SOURCE"])
            .args(&flags)
            .arg("-I")
            .arg(&srcdir)
            .args(
                includes
                    .iter()
                    .flat_map(|d| [OsStr::new("-I"), d.as_os_str()]),
            )
            .arg("-o")
            .arg(&tmp)
            .arg(&src_path)
            .args(&extra)
            .arg("-lm")
            .output()
            .expect("cannot run cc");
        assert!(
            out.status.success(),
            "compiling {} failed:\n{}",
            src_path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::rename(&tmp, &exe).unwrap();
    }
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    cache.insert(name.to_string(), exe.clone());
    exe
}

pub fn cpu_has(flag: &str) -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == flag))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// All pids (other than ours) whose cwd is `dir` or inside it, or whose
/// command line mentions a path inside `dir` (e.g. stasis's init, which may
/// have another cwd, `stasis run --dir <dir>/ck`).
pub fn procs_in(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = format!("{}/", dir.display());
    let mut v = vec![];
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let in_dir = fs::read_link(e.path().join("cwd"))
                .map(|c| c.starts_with(dir))
                .unwrap_or(false);
            let mentions = fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false);
            if in_dir || mentions {
                v.push(pid);
            }
        }
    }
    v
}

/// Kill (SIGKILL) every process of `procs_in(dir)`; these are all processes
/// started by the test owning `dir`.
pub fn kill_procs_in(dir: &Path) {
    for _ in 0..100 {
        let pids = procs_in(dir);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            // SAFETY: killing a process of the test's own work dir.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until no process has its cwd in `dir` (e.g. the application died).
pub fn wait_no_procs_in(dir: &Path, timeout: Duration) -> Result<(), Vec<i32>> {
    let t0 = Instant::now();
    loop {
        let p = procs_in(dir);
        if p.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn describe(pid: i32) -> String {
    let cmd = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    format!("{pid}: {}", cmd.trim())
}

/// Pids of processes (with cwd inside `dir`) executing `exe`.
pub fn pids_of_exe(dir: &Path, exe: &Path) -> Vec<i32> {
    procs_in(dir)
        .into_iter()
        .filter(|p| {
            fs::read_link(format!("/proc/{p}/exe"))
                .map(|e| e == exe)
                .unwrap_or(false)
        })
        .collect()
}

pub fn describe_procs(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| describe(*p))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut t = lines[start..].join("\n");
    if start > 0 {
        t = format!("[... {start} lines]\n{t}");
    }
    t
}

pub fn status_str(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s:?}"),
    }
}

/// A spawned process whose stdout/stderr go to files in the work dir. Killed
/// (with its process group) when dropped while still running.
pub struct Proc {
    pub child: Child,
    pub label: String,
    pub out: PathBuf,
    pub err: PathBuf,
    status: Option<ExitStatus>,
    /// With a piped stdout: says when everything the pipe held is in `out`.
    copied: Option<std::sync::mpsc::Receiver<()>>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn stdout(&self) -> String {
        read_lossy(&self.out)
    }
    pub fn stderr(&self) -> String {
        read_lossy(&self.err)
    }
    /// Complete (newline terminated) lines of stdout so far.
    pub fn lines(&self) -> Vec<String> {
        complete_lines(&self.stdout())
    }
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
            // Its last output may still be on its way from the pipe into `out` (a
            // process that inherited the pipe may hold it open: not forever).
            if self.status.is_some() {
                if let Some(rx) = self.copied.take() {
                    let _ = rx.recv_timeout(Duration::from_secs(2));
                }
            }
        }
        self.status
    }
    pub fn running(&mut self) -> bool {
        self.try_status().is_none()
    }
    pub fn diag(&mut self) -> String {
        let st = match self.try_status() {
            Some(s) => status_str(&s),
            None => "still running".into(),
        };
        format!(
            "--- {} (pid {}, {st}) stdout [{}]:\n{}\n--- {} stderr [{}]:\n{}\n",
            self.label,
            self.pid(),
            self.out.display(),
            tail(&self.stdout(), 25),
            self.label,
            self.err.display(),
            tail(&self.stderr(), 40)
        )
    }
    /// Wait for exit; on timeout kill it and panic with diagnostics.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if t0.elapsed() > timeout {
                let d = self.diag();
                self.kill();
                panic!("{} did not exit within {timeout:?}\n{d}", self.label);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// Wait for exit and assert the exit code.
    pub fn expect_exit(&mut self, code: i32, timeout: Duration) {
        let s = self.wait(timeout);
        if s.code() != Some(code) {
            let d = self.diag();
            panic!(
                "{} ended with {}, expected exit {code}\n{d}",
                self.label,
                status_str(&s)
            );
        }
    }
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            // SAFETY: killing the process group we spawned.
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
    /// Wait for a complete stdout line satisfying `pred`, return it. Panics
    /// with diagnostics on timeout or if the process exits without printing
    /// such a line.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let t0 = Instant::now();
        let mut exited_at: Option<Instant> = None;
        loop {
            let exited = self.try_status().is_some();
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            // With a pipe as stdout, a thread copies it into the file: give it a
            // moment after the exit.
            if exited
                && exited_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(500)
            {
                let d = self.diag();
                panic!("{} exited before printing {what}\n{d}", self.label);
            }
            if t0.elapsed() > timeout {
                let d = self.diag();
                panic!(
                    "timeout ({timeout:?}) waiting for {what} from {}\n{d}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    pub fn wait_ready(&mut self) -> String {
        self.wait_line("`ready`", T_READY, |l| l.starts_with("ready"))
    }
    /// Last tick number printed so far.
    pub fn last_tick(&self) -> Option<u64> {
        ticks(&self.stdout()).last().copied()
    }
    /// Wait until a tick >= n has been printed; return the last tick.
    pub fn wait_tick(&mut self, n: u64, timeout: Duration) -> u64 {
        self.wait_line(&format!("tick >= {n}"), timeout, |l| {
            parse_tick(l).map(|(t, _)| t >= n).unwrap_or(false)
        });
        self.last_tick().unwrap()
    }
    /// Wait until `n` more ticks than now have been printed.
    pub fn wait_more_ticks(&mut self, n: u64, timeout: Duration) -> u64 {
        let base = ticks(&self.stdout()).len();
        let t0 = Instant::now();
        loop {
            let t = ticks(&self.stdout());
            if t.len() >= base + n as usize {
                return *t.last().unwrap();
            }
            if self.try_status().is_some() || t0.elapsed() > timeout {
                let d = self.diag();
                panic!(
                    "{} did not print {n} more ticks (had {base})\n{d}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn complete_lines(s: &str) -> Vec<String> {
    let end = s.rfind('\n').map(|i| i + 1).unwrap_or(0);
    s[..end].lines().map(|l| l.to_string()).collect()
}

/// `tick N rest...` -> (N, rest)
pub fn parse_tick(line: &str) -> Option<(u64, String)> {
    let mut it = line.splitn(3, ' ');
    if it.next()? != "tick" {
        return None;
    }
    let n = it.next()?.parse().ok()?;
    Some((n, it.next().unwrap_or("").to_string()))
}

/// Tick numbers in complete lines of `text`.
pub fn ticks(text: &str) -> Vec<u64> {
    complete_lines(text)
        .iter()
        .filter_map(|l| parse_tick(l))
        .map(|(n, _)| n)
        .collect()
}

/// Check that the ticks of consecutive runs (outputs in order) are exactly
/// consecutive: `first` (if given) is the first tick, each next tick is the
/// previous + 1, also across run boundaries. Returns all ticks.
///
/// A line a run had begun when it was checkpointed ends in the next run (a program
/// may write a line in pieces, as Python's print does: the text, then the newline):
/// when a run's output ends without a newline and the next one's first line is not
/// a tick of its own, the two pieces are read as one line.
pub fn assert_ticks_consecutive(outputs: &[(String, String)], first: Option<u64>) -> Vec<u64> {
    let mut all: Vec<u64> = vec![];
    let mut report = String::new();
    let mut carry = String::new();
    for (label, text) in outputs {
        let first_line = text.split('\n').next().unwrap_or("");
        let joined = if !carry.is_empty() && parse_tick(first_line).is_none() {
            format!("{carry}{text}")
        } else {
            text.clone()
        };
        carry = joined[joined.rfind('\n').map_or(0, |i| i + 1)..].to_string();
        let t = ticks(&joined);
        report.push_str(&format!(
            "  {label}: {} ticks, first {:?}, last {:?}\n",
            t.len(),
            t.first(),
            t.last()
        ));
        all.extend(t);
    }
    assert!(!all.is_empty(), "no ticks at all\n{report}");
    if let Some(f) = first {
        assert_eq!(
            all[0], f,
            "first tick is {}, expected {f}\n{report}",
            all[0]
        );
    }
    for w in all.windows(2) {
        assert!(
            w[1] == w[0] + 1,
            "ticks not consecutive: {} followed by {} ({})\n{report}",
            w[0],
            w[1],
            if w[1] <= w[0] {
                "repeat/backwards"
            } else {
                "gap"
            }
        );
    }
    all
}

// ---------------------------------------------------------------------------
// Work dirs and stasis invocations
// ---------------------------------------------------------------------------

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Per-test work dir (cwd of the test program) with the checkpoint dir `ck`
/// inside. On drop all processes inside are killed; the dir is removed unless
/// the test failed (then it is kept for inspection).
pub struct Work {
    pub dir: PathBuf,
    pub ck: PathBuf,
    /// Path of the stasis binary to run.
    pub stasis: PathBuf,
    /// Command prefix (e.g. setpriv ... --) for running as another user.
    pub prefix: Vec<OsString>,
    /// Give `stasis run`/`restart` a pipe as stdout (instead of a file).
    pub pipe_stdout: bool,
    /// Options of `stasis run` before `--` (e.g. `--network private`).
    pub run_opts: Vec<String>,
    seq: AtomicUsize,
}

impl Work {
    pub fn new(name: &str) -> Work {
        Work::with_suffix(name, "")
    }

    /// Like `new`, with `suffix` appended to the directory name (e.g. to get
    /// spaces or non-ASCII characters into every path).
    pub fn with_suffix(name: &str, suffix: &str) -> Work {
        let short: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let dir = test_base().join(format!(
            "st-{short}-{}-{}{suffix}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let ck = dir.join("ck");
        fs::create_dir(&ck).unwrap();
        fs::create_dir(dir.join("elsewhere")).unwrap();
        Work {
            dir,
            ck,
            stasis: PathBuf::from(STASIS),
            prefix: vec![],
            pipe_stdout: false,
            run_opts: vec![],
            seq: AtomicUsize::new(0),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn go(&self) {
        fs::write(self.path("go"), b"").unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        read_lossy(&self.path(rel))
    }

    /// A Command running `stasis ARGS` (through the prefix), cwd = work dir.
    pub fn stasis_cmd(&self, args: &[&OsStr]) -> Command {
        let mut c = if self.prefix.is_empty() {
            Command::new(&self.stasis)
        } else {
            let mut c = Command::new(&self.prefix[0]);
            c.args(&self.prefix[1..]).arg(&self.stasis);
            c
        };
        // A marker that differs between run and each restart: restored
        // processes must keep their own environment (checked by procstate.c).
        let n = self.seq.load(Ordering::SeqCst);
        c.args(args)
            .current_dir(&self.dir)
            .env("STASIS_TEST_PHASE", format!("cmd{n}"));
        c
    }

    fn fresh_label(&self, label: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        format!("{n:02}-{label}")
    }

    /// Spawn `cmd` with stdout/stderr to `<label>.out/.err` in the work dir.
    pub fn spawn(&self, label: &str, cmd: Command, stdin: Stdio) -> Proc {
        self.spawn_io(label, cmd, stdin, false)
    }

    /// Like `spawn`; with `pipe_stdout` stdout is a pipe whose content a
    /// thread copies into `<label>.out`.
    pub fn spawn_io(&self, label: &str, mut cmd: Command, stdin: Stdio, pipe_stdout: bool) -> Proc {
        let label = self.fresh_label(label);
        let out = self.path(&format!("{label}.out"));
        let err = self.path(&format!("{label}.err"));
        let out_file = fs::File::create(&out).unwrap();
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(out_file.try_clone().unwrap());
        }
        cmd.stdin(stdin)
            .stderr(fs::File::create(&err).unwrap())
            .process_group(0);
        // Do not leak fds the test runner inherited (e.g. a pipe from the
        // shell that started cargo) into the processes under test.
        // SAFETY: close_range is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {label} ({cmd:?}): {e}"));
        let mut copied = None;
        if pipe_stdout {
            let mut from = child.stdout.take().unwrap();
            let mut to = out_file;
            let (done, rx) = std::sync::mpsc::channel();
            copied = Some(rx);
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = done.send(());
            });
        }
        Proc {
            child,
            label,
            out,
            err,
            status: None,
            copied,
        }
    }

    /// `stasis run --dir ck -- ARGV`
    pub fn run<S: AsRef<OsStr>>(&self, label: &str, argv: &[S]) -> Proc {
        self.run_with_stdin(label, argv, Stdio::null())
    }

    pub fn run_with_stdin<S: AsRef<OsStr>>(&self, label: &str, argv: &[S], stdin: Stdio) -> Proc {
        let mut args: Vec<&OsStr> = vec!["run".as_ref(), "--dir".as_ref(), self.ck.as_os_str()];
        args.extend(self.run_opts.iter().map(|o| OsStr::new(o.as_str())));
        args.push("--".as_ref());
        args.extend(argv.iter().map(|a| a.as_ref()));
        let cmd = self.stasis_cmd(&args);
        self.spawn_io(label, cmd, stdin, self.pipe_stdout)
    }

    /// `stasis restart ck`
    pub fn restart(&self, label: &str) -> Proc {
        self.restart_with_stdin(label, Stdio::null())
    }

    pub fn restart_with_stdin(&self, label: &str, stdin: Stdio) -> Proc {
        // from another directory, so that a restored process whose cwd was
        // not restored is caught
        let mut cmd = self.stasis_cmd(&["restart".as_ref(), self.ck.as_os_str()]);
        cmd.current_dir(self.path("elsewhere"));
        self.spawn_io(label, cmd, stdin, self.pipe_stdout)
    }

    /// Run a stasis command to completion (bounded by T_CMD).
    pub fn stasis(&self, label: &str, args: &[&OsStr]) -> CmdOut {
        let cmd = self.stasis_cmd(args);
        let mut p = self.spawn(label, cmd, Stdio::null());
        let status = p.wait(T_CMD);
        CmdOut {
            what: format!(
                "stasis {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            status,
            stdout: p.stdout(),
            stderr: p.stderr(),
        }
    }

    /// `stasis checkpoint [--kill] ck`
    pub fn checkpoint(&self, kill: bool) -> CmdOut {
        let mut args: Vec<&OsStr> = vec!["checkpoint".as_ref()];
        if kill {
            args.push("--kill".as_ref());
        }
        args.push(self.ck.as_os_str());
        self.stasis(if kill { "ckpt-kill" } else { "ckpt" }, &args)
    }

    /// Names of the published checkpoints (`checkpoint-NNNNNN`), sorted.
    pub fn checkpoints(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.ck)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| is_checkpoint_name(n))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn newest_checkpoint(&self) -> PathBuf {
        let c = self.checkpoints();
        self.ck.join(
            c.last()
                .unwrap_or_else(|| panic!("no checkpoint in {}", self.ck.display())),
        )
    }

    /// Checkpoint and assert success and that exactly one new checkpoint dir
    /// was published (with a higher number than all previous ones; older ones
    /// may have been pruned, oldest first).
    pub fn checkpoint_ok(&self, kill: bool, app: &mut Proc) -> PathBuf {
        let before = self.checkpoints();
        let r = self.checkpoint(kill);
        if !r.status.success() {
            let d = app.diag();
            panic!("{} failed: {r}\n{d}", r.what);
        }
        let after = self.checkpoints();
        let new = assert_one_new_checkpoint(&before, &after, &r.what);
        self.ck.join(new)
    }

    /// `stasis inspect --json ck`, parsed.
    pub fn inspect_json(&self) -> serde_json::Value {
        let r = self.stasis(
            "inspect",
            &["inspect".as_ref(), "--json".as_ref(), self.ck.as_os_str()],
        );
        assert!(r.status.success(), "{} failed: {r}", r.what);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{} printed invalid JSON ({e}): {r}", r.what))
    }

    /// Ask the program to answer with `pong` and wait for it.
    pub fn ping(&self, p: &mut Proc) {
        let n = p.lines().iter().filter(|l| *l == "pong").count();
        fs::write(self.path("ping"), b"").unwrap();
        let t0 = Instant::now();
        loop {
            if p.lines().iter().filter(|l| *l == "pong").count() > n {
                return;
            }
            if p.try_status().is_some() || t0.elapsed() > T_READY {
                let d = p.diag();
                panic!("{} did not answer ping\n{d}", p.label);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Disk usage (like du) and apparent size of everything under `p`.
    pub fn usage(p: &Path) -> (u64, u64) {
        let mut du = 0;
        let mut apparent = 0;
        let mut stack = vec![p.to_path_buf()];
        while let Some(d) = stack.pop() {
            let m = fs::symlink_metadata(&d).unwrap();
            du += m.blocks() * 512;
            if m.is_dir() {
                for e in fs::read_dir(&d).unwrap().flatten() {
                    stack.push(e.path());
                }
            } else {
                apparent += m.len();
            }
        }
        (du, apparent)
    }

    /// Make the work dir usable by `uid:gid` (chown dir + ck, chmod 755).
    pub fn give_to(&self, uid: u32, gid: u32) {
        for d in [&self.dir, &self.ck, &self.path("elsewhere")] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        kill_procs_in(&self.dir);
        if std::thread::panicking() {
            eprintln!("keeping work dir {} for inspection", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `after` must hold exactly one checkpoint not in `before`, numbered after
/// all of `before`; checkpoints of `before` missing from `after` must be older
/// than every remaining one (pruning). Returns the new name.
pub fn assert_one_new_checkpoint(before: &[String], after: &[String], what: &str) -> String {
    new_checkpoints(before, after, 1, what).pop().unwrap()
}

/// Like `assert_one_new_checkpoint` for `n` new checkpoints.
pub fn new_checkpoints(before: &[String], after: &[String], n: usize, what: &str) -> Vec<String> {
    let new: Vec<String> = after
        .iter()
        .filter(|a| !before.contains(a))
        .cloned()
        .collect();
    assert_eq!(
        new.len(),
        n,
        "{what}: checkpoint dirs went from {before:?} to {after:?}, expected {n} new"
    );
    if let (Some(prev), Some(first)) = (before.last(), new.first()) {
        assert!(
            first > prev,
            "{what}: new checkpoint {first} is not numbered after {prev}"
        );
    }
    let kept: Vec<&String> = before.iter().filter(|b| after.contains(b)).collect();
    for gone in before.iter().filter(|b| !after.contains(b)) {
        assert!(
            kept.iter().all(|k| *k > gone),
            "{what}: checkpoint {gone} was removed but older ones were kept: {before:?} -> {after:?}"
        );
    }
    new
}

pub fn is_checkpoint_name(n: &str) -> bool {
    n.strip_prefix("checkpoint-")
        .map(|d| d.len() == 6 && d.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or(false)
}

/// Result of a completed stasis command.
pub struct CmdOut {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for CmdOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\n  stdout: {}\n  stderr: {}",
            self.what,
            status_str(&self.status),
            tail(&self.stdout, 20),
            tail(&self.stderr, 20)
        )
    }
}

/// Does `text` contain `n` as a whole number (digit run)?
pub fn mentions_number(text: &str, n: i64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|t| t == n.to_string())
}

// ---------------------------------------------------------------------------
// Checkpoint/restart session
// ---------------------------------------------------------------------------

/// How to tell that a restored process is executing.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// Wait for 3 new `tick` lines in the restart's stdout.
    Ticks,
    /// Create `ping` and wait for `pong`.
    Ping,
    /// Only check the restart is still running after this many ms.
    Sleep(u64),
}

/// A program under stasis across run, checkpoint --kill and restarts. Keeps
/// every phase's process (for diagnostics and outputs).
pub struct Session<'a> {
    pub w: &'a Work,
    pub phases: Vec<Proc>,
}

impl<'a> Session<'a> {
    /// `stasis run` the program and wait for `ready`.
    pub fn start<S: AsRef<OsStr>>(w: &'a Work, argv: &[S]) -> Session<'a> {
        let mut p = w.run("run", argv);
        p.wait_ready();
        Session { w, phases: vec![p] }
    }

    pub fn from_proc(w: &'a Work, p: Proc) -> Session<'a> {
        Session { w, phases: vec![p] }
    }

    pub fn cur(&mut self) -> &mut Proc {
        self.phases.last_mut().unwrap()
    }

    pub fn diag(&mut self) -> String {
        self.phases.iter_mut().map(|p| p.diag()).collect()
    }

    /// `checkpoint --kill`, assert success, that the current phase exits with
    /// 75 and that the application is gone. Returns the new checkpoint dir.
    pub fn checkpoint_kill(&mut self) -> PathBuf {
        let w = self.w;
        let ck = w.checkpoint_ok(true, self.cur());
        self.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
        ck
    }

    /// `stasis restart` with stdout to a new file, then probe liveness.
    pub fn restart(&mut self, probe: Probe) -> &mut Proc {
        self.restart_with_stdin(probe, Stdio::null())
    }

    pub fn restart_with_stdin(&mut self, probe: Probe, stdin: Stdio) -> &mut Proc {
        let label = format!("restart{}", self.phases.len());
        let p = self.w.restart_with_stdin(&label, stdin);
        self.phases.push(p);
        let w = self.w;
        let p = self.cur();
        match probe {
            Probe::Ticks => {
                p.wait_more_ticks(3, T_READY);
            }
            Probe::Ping => w.ping(p),
            Probe::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                if !p.running() {
                    let d = p.diag();
                    panic!("{} exited right after restart\n{d}", p.label);
                }
            }
        }
        p
    }

    /// SIGKILL only the current `stasis run`/`restart` (not its process group), wait
    /// for it, and assert that the application died with it.
    pub fn kill_supervisor(&mut self) -> ExitStatus {
        // SAFETY: signalling the child we spawned.
        unsafe { libc::kill(self.cur().pid(), libc::SIGKILL) };
        let st = self.cur().wait(T_CMD);
        if let Err(p) = wait_no_procs_in(&self.w.dir, Duration::from_secs(10)) {
            panic!(
                "after SIGKILL of `stasis run` these processes survive (the app must die too):\n{}",
                describe_procs(&p)
            );
        }
        st
    }

    /// The value of `key=` in the program's `ready ...` line (the first such: a child
    /// may print before it).
    pub fn ready_field(&self, key: &str) -> String {
        let ready = self.phases[0]
            .lines()
            .into_iter()
            .find(|l| l.starts_with("ready"))
            .unwrap_or_default();
        fields(&ready)
            .remove(key)
            .unwrap_or_else(|| panic!("no {key}= in the ready line {ready:?}"))
    }

    /// checkpoint --kill + restart.
    pub fn cycle(&mut self, probe: Probe) {
        self.checkpoint_kill();
        self.restart(probe);
    }

    /// Create `go`, wait for exit, assert exit 0 and a final `OK` line.
    /// Returns the OK line.
    pub fn finish(&mut self) -> String {
        self.w.go();
        let st = self.cur().wait(T_CMD);
        let lines = self.cur().lines();
        let last = lines.last().cloned().unwrap_or_default();
        if st.code() != Some(0) || !last.starts_with("OK") {
            let d = self.diag();
            panic!(
                "program did not finish with OK and exit 0 ({}); last line: {last:?}\n{d}",
                status_str(&st)
            );
        }
        for p in &self.phases {
            if let Some(l) = p.lines().iter().find(|l| l.starts_with("FAIL")) {
                panic!("{} printed {l}", p.label);
            }
        }
        last
    }

    /// (label, stdout) of every phase.
    pub fn outputs(&self) -> Vec<(String, String)> {
        self.phases
            .iter()
            .map(|p| (p.label.clone(), p.stdout()))
            .collect()
    }

    /// Assert that only the first phase printed `ready` (restored processes
    /// continue, they do not start over).
    pub fn assert_no_rerun(&self) {
        for p in &self.phases[1..] {
            assert!(
                !p.lines().iter().any(|l| l.starts_with("ready")),
                "{} printed `ready` again: the program started over instead of continuing:\n{}",
                p.label,
                tail(&p.stdout(), 10)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// counter.c specifics
// ---------------------------------------------------------------------------

pub const FNV_OFFSET: u64 = 0xcbf29ce484222325;
pub const FNV_PRIME: u64 = 0x100000001b3;

/// Hash counter.c prints with tick n.
pub fn counter_hash(n: u64) -> u64 {
    let mut h = FNV_OFFSET;
    for i in 0..=n {
        h = (h ^ i).wrapping_mul(FNV_PRIME);
    }
    h
}

/// Verify the outputs of a counter.c session: ticks consecutive (from `first`),
/// every tick's hash right, final `OK ticks=K hash=H` consistent with the last
/// tick. Returns the ticks.
pub fn verify_counter(outputs: &[(String, String)], first: Option<u64>) -> Vec<u64> {
    let all = assert_ticks_consecutive(outputs, first);
    let mut h = None::<(u64, u64)>;
    for (label, text) in outputs {
        for l in complete_lines(text) {
            if let Some((n, rest)) = parse_tick(&l) {
                let want = match h {
                    Some((pn, ph)) if pn + 1 == n => (ph ^ n).wrapping_mul(FNV_PRIME),
                    _ => counter_hash(n),
                };
                let got = u64::from_str_radix(rest.trim(), 16)
                    .unwrap_or_else(|_| panic!("{label}: bad tick line {l:?}"));
                assert_eq!(
                    got, want,
                    "{label}: tick {n} has hash {got:016x}, want {want:016x}"
                );
                h = Some((n, want));
            }
        }
    }
    let (_, last_text) = outputs.last().unwrap();
    let ok = complete_lines(last_text)
        .last()
        .cloned()
        .unwrap_or_default();
    let (n, hh) = h.unwrap();
    let want = format!("OK ticks={} hash={hh:016x}", n + 1);
    assert_eq!(ok, want, "final line of the last run");
    all
}

// ---------------------------------------------------------------------------
// Unprivileged user
// ---------------------------------------------------------------------------

pub const TEST_USER: &str = "stasis-test";

/// Where work directories are made: not under /tmp, which a job under `stasis run`
/// sees as its own private one (`--tmp private`, the default). STASIS_TEST_DIR
/// overrides /var/tmp.
pub fn test_base() -> PathBuf {
    std::env::var_os("STASIS_TEST_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let f = fs::read_to_string("/etc/passwd").ok()?;
    for l in f.lines() {
        let v: Vec<&str> = l.split(':').collect();
        if v.len() > 3 && v[0] == name {
            return Some((v[2].parse().ok()?, v[3].parse().ok()?));
        }
    }
    None
}

/// (uid, gid, prefix) to run as an unprivileged user: when root, the
/// `stasis-test` system user (created if needed) via setpriv; otherwise the
/// current user with no prefix.
pub fn unprivileged_user() -> (u32, u32, Vec<OsString>) {
    static U: OnceLock<(u32, u32)> = OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        // SAFETY: getegid has no preconditions.
        return (euid, unsafe { libc::getegid() }, vec![]);
    }
    let (uid, gid) = *U.get_or_init(|| {
        if lookup_user(TEST_USER).is_none() {
            // Tolerate a concurrent creation (useradd exits 9 then).
            let out = Command::new("useradd")
                .args(["-M", "-r", "-s", "/usr/sbin/nologin", TEST_USER])
                .output()
                .expect("cannot run useradd");
            if !out.status.success() && lookup_user(TEST_USER).is_none() {
                panic!(
                    "useradd {TEST_USER} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        lookup_user(TEST_USER).expect("test user missing after useradd")
    });
    let prefix = vec![
        OsString::from("setpriv"),
        format!("--reuid={uid}").into(),
        format!("--regid={gid}").into(),
        "--clear-groups".into(),
        "--".into(),
    ];
    (uid, gid, prefix)
}

/// Copy `src` into `dir` (mode 755) and return the new path.
pub fn install(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
    wait_no_writer(&dst);
    dst
}

/// Waits (at most 5 s) until no process holds `path` open: a child another test thread
/// forked while `path` was being written holds our write descriptor until it execs,
/// and executing `path` meanwhile fails with ETXTBSY ("Text file busy").
fn wait_no_writer(path: &Path) {
    let t0 = Instant::now();
    let held = || {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|p| {
                fs::read_dir(p.path().join("fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == path))
            })
    };
    while held() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// Random-ish moments
// ---------------------------------------------------------------------------

/// A small xorshift generator for checkpoint moments. The seed comes from
/// `STASIS_TEST_SEED` or the clock, and is printed so that a failing run can
/// be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("STASIS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    ^ ((std::process::id() as u64) << 32)
            });
        eprintln!("{what}: random seed {seed} (set STASIS_TEST_SEED={seed} to repeat)");
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545f4914f6cdd1d)
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Sleep a random time in lo..=hi ms; returns it.
    pub fn sleep_ms(&mut self, lo: u64, hi: u64) -> u64 {
        let ms = self.range(lo, hi);
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

// ---------------------------------------------------------------------------
// Tick lines with `key=value` progress fields (threaded programs)
// ---------------------------------------------------------------------------

/// `key=value` fields of a tick line's rest with a decimal value.
pub fn tick_fields(rest: &str) -> HashMap<String, u64> {
    rest.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// For every key: its values in the tick lines of all phases (in order) never
/// decrease (the state continues, it does not start over or go back), and
/// within every phase after the first (i.e. every restored process) the value
/// of its last tick is higher than that of its first (the threads behind it
/// do run after the restore). Returns the values of the very last tick.
pub fn assert_fields_progress(outputs: &[(String, String)], keys: &[&str]) -> HashMap<String, u64> {
    let mut prev: HashMap<String, (u64, String)> = HashMap::new();
    let mut last = HashMap::new();
    for (pi, (label, text)) in outputs.iter().enumerate() {
        let mut first_of_phase: Option<HashMap<String, u64>> = None;
        for l in complete_lines(text) {
            let Some((n, rest)) = parse_tick(&l) else {
                continue;
            };
            let f = tick_fields(&rest);
            for k in keys {
                let v = *f
                    .get(*k)
                    .unwrap_or_else(|| panic!("{label}: tick {n} has no field {k}: {l:?}"));
                if let Some((pv, where_)) = prev.get(*k) {
                    assert!(
                        v >= *pv,
                        "{k} went back from {pv} ({where_}) to {v} ({label} tick {n})"
                    );
                }
                prev.insert(k.to_string(), (v, format!("{label} tick {n}")));
            }
            if first_of_phase.is_none() {
                first_of_phase = Some(f.clone());
            }
            last = f;
        }
        if pi > 0 {
            let first = first_of_phase.unwrap_or_else(|| panic!("{label} printed no tick"));
            for k in keys {
                assert!(
                    last[*k] > first[*k],
                    "{label}: {k} did not advance after the restore (stayed at {})",
                    first[*k]
                );
            }
        }
    }
    last
}

// ---------------------------------------------------------------------------
// pthreads.c specifics
// ---------------------------------------------------------------------------

/// Tids listed by pthreads.c's `ready threads=T tids=MAIN,...` line; asserts
/// there are `threads` distinct ones.
pub fn pthreads_ready_tids(ready: &str, threads: usize) -> Vec<i32> {
    let f: HashMap<&str, &str> = ready
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(
        f.get("threads").and_then(|t| t.parse::<usize>().ok()),
        Some(threads),
        "ready line {ready:?}"
    );
    let tids: Vec<i32> = f["tids"].split(',').map(|t| t.parse().unwrap()).collect();
    let set: std::collections::BTreeSet<i32> = tids.iter().copied().collect();
    assert_eq!(tids.len(), threads, "ready line lists {} tids", tids.len());
    assert_eq!(set.len(), threads, "ready line has duplicate tids");
    tids
}

/// Verify a pthreads.c session: main-thread ticks exactly consecutive from 0
/// across all phases, the shared counter, ping-pong count and barrier rounds
/// never go back and advance in every restored phase, and the final line is
/// `OK ticks=<last+1> threads=T joined=T-1 ...` with counters at least those
/// of the last tick.
pub fn verify_pthreads(outputs: &[(String, String)], threads: usize, ok: &str) {
    let all = assert_ticks_consecutive(outputs, Some(0));
    let last = assert_fields_progress(outputs, &["shared", "pp", "rounds"]);
    let f: HashMap<&str, &str> = ok
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let num = |k: &str| -> u64 {
        f.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {ok:?}"))
    };
    assert_eq!(num("ticks"), all.last().unwrap() + 1, "{ok}");
    assert_eq!(num("threads"), threads as u64, "{ok}");
    assert_eq!(
        num("joined"),
        threads as u64 - 1,
        "not every thread was joined: {ok}"
    );
    for k in ["shared", "pp", "rounds"] {
        assert!(
            num(k) >= last[k],
            "final {k} {} is below the last tick's {}",
            num(k),
            last[k]
        );
    }
}

/// Thread ids of `processes[0]` in `stasis inspect --json` output; asserts
/// they are distinct and that each thread has its own nonzero
/// clear_child_tid address (what pthread_join relies on).
pub fn inspect_tids(meta: &serde_json::Value) -> Vec<i32> {
    let threads = meta["processes"][0]["threads"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes[0].threads array in inspect --json"));
    let tids: Vec<i32> = threads
        .iter()
        .map(|t| t["tid"].as_i64().expect("thread without tid") as i32)
        .collect();
    let set: std::collections::BTreeSet<i32> = tids.iter().copied().collect();
    assert_eq!(
        set.len(),
        tids.len(),
        "duplicate tids in the image: {tids:?}"
    );
    let ctids: std::collections::BTreeSet<u64> = threads
        .iter()
        .map(|t| {
            t["clear_child_tid"]
                .as_u64()
                .expect("thread without clear_child_tid")
        })
        .collect();
    assert!(
        !ctids.contains(&0) && ctids.len() == tids.len(),
        "every thread must have its own clear_child_tid address: {} distinct for {} threads (0 among them: {})",
        ctids.len(),
        tids.len(),
        ctids.contains(&0)
    );
    tids
}

// Helpers shared by the process-tree and IPC suites.

/// Wait until a tick line of `p` shows `key` above its value in `p`'s first
/// tick line (the restored processes behind it make progress).
pub fn wait_field_advance(p: &mut Proc, key: &str, what: &str) {
    let vals = |p: &Proc| -> Vec<u64> {
        p.lines()
            .iter()
            .filter_map(|l| parse_tick(l))
            .filter_map(|(_, rest)| tick_fields(&rest).get(key).copied())
            .collect()
    };
    let t0 = Instant::now();
    loop {
        let v = vals(p);
        if let (Some(a), Some(b)) = (v.first(), v.last()) {
            if b > a {
                return;
            }
        }
        if !p.running() || t0.elapsed() > Duration::from_secs(5) {
            let d = p.diag();
            panic!(
                "{} made no progress after the restore ({key} stays at {:?}): {what}\n{d}",
                p.label,
                v.first()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn elapsed(t0: Instant, name: &str) {
    eprintln!("{name}: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Every process of the application (`count` of them, executing `exe`) and
/// every other process of the test runs as `uid`.
pub fn assert_tree_runs_as(w: &Work, exe: &Path, count: usize, uid: u32) {
    let app = pids_of_exe(&w.dir, exe);
    assert_eq!(app.len(), count, "application processes: {app:?}");
    for pid in procs_in(&w.dir) {
        if let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) {
            let line = st.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
            let ids: Vec<u32> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            assert!(
                ids.len() == 4 && ids.iter().all(|i| *i == uid),
                "process {pid} has {line:?}, expected all uids {uid}"
            );
        }
    }
}

pub fn num(v: &serde_json::Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {key} in {v}"))
}

pub fn field_num(line: &str, key: &str) -> u64 {
    fields(line)
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// `key=value` words of a line (e.g. a `ready` line).
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
