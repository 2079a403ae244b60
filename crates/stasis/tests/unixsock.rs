//! UNIX sockets, the rest (issue #11, "IPC"), each kind set up by a small program that
//! checks its own state after `go`:
//! - unixdgram.c: datagram sockets with datagrams queued from several senders (bound
//!   to a path, to an abstract name, unbound, one closed since), connected and not,
//!   named socketpairs, datagram, stream and seqpacket sockets whose peer was closed
//!   with data still queued for them (after the restarts every datagram arrives once,
//!   in order, with its sender; the stream and seqpacket readers get the data, then
//!   end-of-file; the datagram sockets' sends fail with ECONNREFUSED).
//! - scmrights.c: descriptors in flight (SCM_RIGHTS) in a stream and a datagram
//!   socketpair: a pipe's ends, a file at its offset, eventfds (one also held by the
//!   process: one description), a memfd, and a socket in flight that holds a pipe in
//!   flight itself; after the restarts each message comes with its descriptors.
//!   sockrefuse.c `scm`: a netlink socket in flight is refused, the job running on.
//! - unixext.c: a stream and a datagram socket connected to servers outside the job
//!   (run by the test): refused by default, the job running on; saved with
//!   `--unix-external=reconnect` (of `stasis checkpoint`, or of `stasis run`) they
//!   connect again to the same paths at restart (the server sees a new client), and a
//!   restart when nothing listens there fails with an error naming the path.
//!
//! Every program runs under `stasis run` through a checkpoint it survives, two
//! `checkpoint --kill` / restart cycles at random moments (seed printed;
//! STASIS_TEST_SEED repeats it) and a checkpoint of the restored job, as root and as a
//! plain user; and started outside stasis through `checkpoint --pid P --dir D`,
//! `--kill`, `stasis restart D` and a supervised cycle. The images are inspected for
//! the saved state.
mod common;
use common::cycles::*;
use common::*;
use serde_json::Value;
use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `stasis checkpoint [--kill] --unix-external reconnect ck`.
fn checkpoint_reconnect(w: &Work, kill: bool) -> CmdOut {
    let mut args: Vec<&OsStr> = vec![
        "checkpoint".as_ref(),
        "--unix-external".as_ref(),
        "reconnect".as_ref(),
    ];
    if kill {
        args.push("--kill".as_ref());
    }
    args.push(w.ck.as_os_str());
    w.stasis(if kill { "ckpt-rc-kill" } else { "ckpt-rc" }, &args)
}

/// The socket object behind fd `fd` of process `p`.
fn sock_of<'a>(meta: &'a Value, p: &Value, fd: i64, what: &str) -> &'a Value {
    let k = p["fds"]
        .as_array()
        .and_then(|fds| fds.iter().find(|f| f["fd"].as_i64() == Some(fd)))
        .map(|f| &f["kind"])
        .unwrap_or_else(|| panic!("{what}: fd {fd} missing from process {}", p["pid"]));
    assert_eq!(k["type"], "unix_socket", "{what}: fd {fd}: {k}");
    let id = k["sock"].as_u64().unwrap();
    meta["sockets"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"].as_u64() == Some(id)))
        .unwrap_or_else(|| panic!("{what}: socket {id} of fd {fd} missing from the image"))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// unixdgram.c: datagrams from several senders, peers closed with data queued
// ---------------------------------------------------------------------------

/// S's six datagrams with their senders, B0/D/Q0/R0/A saved with their closed peer
/// and their data, T0 and T1 a named pair.
fn check_unixdgram(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let fd = |k: &str| -> i64 { f[k].parse().unwrap() };
    let pid = fd("pid");
    let p = image_proc(meta, pid);
    let tag = &f["tag"];
    let c1 = format!("@ux-c1-{tag}");
    let c4 = format!("@ux-c4-{tag}");
    let e = format!("@ux-e-{tag}");
    let s = sock_of(meta, p, fd("S"), what);
    assert_eq!(s["name"], "srv.sock", "{what}: S {s}");
    assert_eq!(u64s(&s["messages"]), vec![4; 6], "{what}: S's queue {s}");
    assert_eq!(
        strs(&s["senders"]),
        vec![
            c1.as_str(),
            "c2.sock",
            "",
            c4.as_str(),
            c1.as_str(),
            "c2.sock"
        ],
        "{what}: the senders of S's datagrams {s}"
    );
    let c1s = sock_of(meta, p, fd("C1"), what);
    assert_eq!(strs(&c1s["senders"]), vec!["srv.sock"], "{what}: C1 {c1s}");
    let c2 = sock_of(meta, p, fd("C2"), what);
    assert_eq!(c2["peer"], s["id"], "{what}: C2 {c2}");
    for (k, msgs) in [("B0", vec![3, 3, 3]), ("D", vec![3, 3]), ("R0", vec![3, 4])] {
        let x = sock_of(meta, p, fd(k), what);
        assert_eq!(x["peer_gone"], true, "{what}: {k} {x}");
        assert_eq!(u64s(&x["messages"]), msgs, "{what}: {k}'s queue {x}");
    }
    let d = sock_of(meta, p, fd("D"), what);
    assert_eq!(strs(&d["senders"]), vec![e.as_str(); 2], "{what}: D {d}");
    let q = sock_of(meta, p, fd("Q0"), what);
    assert_eq!(q["peer_gone"], true, "{what}: Q0 {q}");
    assert_eq!(u64s(&q["messages"]), vec![12], "{what}: Q0 {q}");
    let a = sock_of(meta, p, fd("A"), what);
    assert_eq!(a["peer_gone"], true, "{what}: A {a}");
    assert_eq!(a["name"], "seq.sock", "{what}: A {a}");
    assert_eq!(u64s(&a["messages"]), vec![3, 3], "{what}: A {a}");
    let t0 = sock_of(meta, p, fd("T0"), what);
    let t1 = sock_of(meta, p, fd("T1"), what);
    assert_eq!(t0["peer"], t1["id"], "{what}: T0 {t0}");
    assert_eq!(t0["name"], format!("@ux-t0-{tag}"), "{what}: T0 {t0}");
    assert_eq!(t1["name"], "t1.sock", "{what}: T1 {t1}");
}

#[test]
fn datagrams_and_closed_peers_under_run() {
    run_cycles("ux_dgram", "unixdgram", &[], false, check_unixdgram);
}

#[test]
fn datagrams_and_closed_peers_under_run_as_unprivileged_user() {
    run_cycles("ux_dgram_user", "unixdgram", &[], true, check_unixdgram);
}

#[test]
fn datagrams_and_closed_peers_by_pid() {
    pid_cycles("ux_dgram_pid", "unixdgram", &[], false, check_unixdgram);
}

#[test]
fn datagrams_and_closed_peers_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ux_dgram_pid_user", "unixdgram", &[], true, check_unixdgram);
}

// ---------------------------------------------------------------------------
// scmrights.c: descriptors in flight, two levels deep
// ---------------------------------------------------------------------------

/// The types of the descriptors in flight with message `message` of socket `s`.
fn in_flight_types(s: &Value, message: u64) -> Vec<String> {
    s["in_flight"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["message"].as_u64() == Some(message)))
        .and_then(|m| m["fds"].as_array())
        .map(|fds| {
            fds.iter()
                .map(|f| f["kind"]["type"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// P0 holds "de" (a pipe, a file, an eventfd in flight), "fghij" (a pipe); D0 holds m0,
/// m1 (X0 in flight, itself holding a pipe in flight), m2 (a pipe in flight), m3 (a
/// memfd, and G's description, which the process holds too).
fn check_scmrights(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let p = image_procs(meta).into_values().next().unwrap();
    let p0 = sock_of(meta, p, f["P0"].parse().unwrap(), what);
    assert_eq!(u64s(&p0["messages"]), vec![2, 5], "{what}: P0 {p0}");
    assert_eq!(
        in_flight_types(p0, 0),
        vec!["pipe", "file", "event_fd"],
        "{what}: P0 {p0}"
    );
    assert_eq!(in_flight_types(p0, 1), vec!["pipe"], "{what}: P0 {p0}");
    let d0 = sock_of(meta, p, f["D0"].parse().unwrap(), what);
    assert_eq!(u64s(&d0["messages"]), vec![2, 2, 2, 2], "{what}: D0 {d0}");
    assert_eq!(
        in_flight_types(d0, 1),
        vec!["unix_socket"],
        "{what}: D0 {d0}"
    );
    assert_eq!(in_flight_types(d0, 2), vec!["pipe"], "{what}: D0 {d0}");
    assert_eq!(
        in_flight_types(d0, 3),
        vec!["shared_memory", "event_fd"],
        "{what}: D0 {d0}"
    );
    // G is held by the process too: the same description.
    let g_desc = d0["in_flight"][2]["fds"][1]["desc"].as_u64();
    let g = f["G"].parse::<i64>().unwrap();
    let held = p["fds"]
        .as_array()
        .and_then(|fds| fds.iter().find(|x| x["fd"].as_i64() == Some(g)))
        .map(|x| x["desc"].as_u64());
    assert_eq!(
        held,
        Some(g_desc),
        "{what}: G's description in flight and held"
    );
    let x0_id = d0["in_flight"][0]["fds"][0]["kind"]["sock"]
        .as_u64()
        .unwrap();
    let x0 = meta["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_u64() == Some(x0_id))
        .unwrap_or_else(|| panic!("{what}: X0 ({x0_id}) is not in the image"));
    assert_eq!(u64s(&x0["messages"]), vec![5], "{what}: X0 {x0}");
    assert_eq!(in_flight_types(x0, 0), vec!["pipe"], "{what}: X0 {x0}");
}

#[test]
fn fds_in_flight_under_run() {
    run_cycles("ux_scm", "scmrights", &[], false, check_scmrights);
}

#[test]
fn fds_in_flight_under_run_as_unprivileged_user() {
    run_cycles("ux_scm_user", "scmrights", &[], true, check_scmrights);
}

#[test]
fn fds_in_flight_by_pid() {
    pid_cycles("ux_scm_pid", "scmrights", &[], false, check_scmrights);
}

#[test]
fn fds_in_flight_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ux_scm_pid_user", "scmrights", &[], true, check_scmrights);
}

/// A descriptor stasis cannot save (a netlink socket, sockrefuse.c `scm`) in flight:
/// `checkpoint` and `checkpoint --kill` are refused with an error naming SCM_RIGHTS,
/// the fd and the kind; nothing is published, the job runs on, and
/// once it received the descriptor (`release`) it is checkpointed and restarted.
fn unsavable_in_flight(name: &str, as_user: bool) {
    let (w, exe) = work_for(name, "sockrefuse", as_user);
    let mut s = Session::start(&w, &[exe.as_os_str(), OsStr::new("scm")]);
    let ready = s.cur().lines()[0].clone();
    let fds = ready
        .split("fds=")
        .nth(1)
        .unwrap_or("")
        .split(',')
        .filter_map(|x| x.trim().parse::<i64>().ok())
        .collect::<Vec<_>>();
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let r = w.checkpoint(kill);
        assert!(!r.status.success(), "the checkpoint should fail: {r}");
        assert!(
            r.stderr.contains("SCM_RIGHTS")
                && r.stderr.contains("netlink")
                && fds.iter().any(|fd| mentions_number(&r.stderr, *fd)),
            "the error should say SCM_RIGHTS, netlink and name the fd ({fds:?}): {r}"
        );
        assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
        s.cur().wait_more_ticks(3, T_READY);
    }
    std::fs::write(w.path("release"), b"").unwrap();
    s.cur()
        .wait_line("`released`", T_READY, |l| l == "released");
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    assert!(ok.ends_with("released=1"), "{ok}");
}

#[test]
fn unsavable_fd_in_flight_is_refused() {
    unsavable_in_flight("ux_scm_refuse", false);
}

#[test]
fn unsavable_fd_in_flight_is_refused_as_unprivileged_user() {
    unsavable_in_flight("ux_scm_refuse_user", true);
}

// ---------------------------------------------------------------------------
// unixext.c: sockets connected to servers outside the job
// ---------------------------------------------------------------------------

/// What the outside servers saw.
#[derive(Default)]
struct Seen {
    /// Stream connections accepted.
    conns: usize,
    /// Lines read, over every connection.
    lines: Vec<String>,
    /// Datagrams received.
    datagrams: Vec<String>,
}

/// A stream server listening at `ext.sock` (answers `bye` with `ok`) and a datagram
/// server bound at `extd.sock` in the work dir, outside any job.
struct Servers {
    stream: PathBuf,
    dgram: PathBuf,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(w: &Work, seen: Arc<Mutex<Seen>>) -> Servers {
        use std::os::unix::fs::PermissionsExt;
        let stream = w.path("ext.sock");
        let dgram = w.path("extd.sock");
        let _ = std::fs::remove_file(&stream);
        let _ = std::fs::remove_file(&dgram);
        let listener = std::os::unix::net::UnixListener::bind(&stream).unwrap();
        let dsock = std::os::unix::net::UnixDatagram::bind(&dgram).unwrap();
        // The test user connects too.
        for p in [&stream, &dgram] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        listener.set_nonblocking(true).unwrap();
        dsock
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((c, _)) => {
                            seen.lock().unwrap().conns += 1;
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                            let (stop, seen) = (stop.clone(), seen.clone());
                            conns.push(std::thread::spawn(move || {
                                let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                                let mut c = c;
                                let mut line = String::new();
                                while !stop.load(Ordering::SeqCst) {
                                    match r.read_line(&mut line) {
                                        Ok(0) => break,
                                        Ok(_) if line.ends_with('\n') => {
                                            let l = line.trim_end().to_string();
                                            if l == "bye" {
                                                let _ = c.write_all(b"ok\n");
                                            }
                                            seen.lock().unwrap().lines.push(l);
                                            line.clear();
                                        }
                                        Ok(_) => {}
                                        Err(e)
                                            if e.kind() == std::io::ErrorKind::WouldBlock
                                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                                        Err(_) => break,
                                    }
                                }
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        {
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = dsock.recv(&mut buf) {
                        let d = String::from_utf8_lossy(&buf[..n]).into_owned();
                        seen.lock().unwrap().datagrams.push(d);
                    }
                }
            }));
        }
        Servers {
            stream,
            dgram,
            seen,
            stop,
            threads,
        }
    }

    /// Stops both servers and removes their socket files: nothing listens there.
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.stream);
        let _ = std::fs::remove_file(&self.dgram);
    }

    fn conns(&self) -> usize {
        self.seen.lock().unwrap().conns
    }

    /// Waits until the stream server has accepted `n` connections.
    fn wait_conns(&self, n: usize, what: &str) {
        let t0 = Instant::now();
        while self.conns() < n {
            assert!(
                t0.elapsed() < T_READY,
                "{what}: the outside server saw {} connections, want {n}",
                self.conns()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The stream and datagram sockets are saved to reconnect to the servers' paths.
fn check_reconnect_image(meta: &Value, pid: i64, ready: &str, srv: (&Path, &Path), what: &str) {
    let f = fields(ready);
    let p = image_proc(meta, pid);
    let st = sock_of(meta, p, f["stream"].parse().unwrap(), what);
    assert_eq!(st["reconnect"], srv.0.to_str().unwrap(), "{what}: {st}");
    assert_eq!(st["peer"], 0, "{what}: {st}");
    let dg = sock_of(meta, p, f["dgram"].parse().unwrap(), what);
    assert_eq!(dg["reconnect"], srv.1.to_str().unwrap(), "{what}: {dg}");
}

/// A checkpoint without the option is refused, naming the fd and the option, and
/// the job runs on.
fn assert_refused(w: &Work, r: &CmdOut, fds: &[i64], app: &mut Proc) {
    assert!(!r.status.success(), "the checkpoint should fail: {r}");
    assert!(
        r.stderr.contains("outside the checkpoint")
            && r.stderr.contains("--unix-external=reconnect")
            && fds.iter().any(|fd| mentions_number(&r.stderr, *fd)),
        "the error should name the fd, say `outside` and the option: {r}"
    );
    assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
    app.wait_more_ticks(3, T_READY);
}

/// After `go`: OK, and the servers got `bye` (answered) and `dbye`.
fn assert_ext_done(seen: &Arc<Mutex<Seen>>) {
    let t0 = Instant::now();
    loop {
        let s = seen.lock().unwrap();
        if s.lines.iter().any(|l| l == "bye") && s.datagrams.iter().any(|d| d == "dbye") {
            return;
        }
        assert!(
            t0.elapsed() < T_READY,
            "the servers did not get bye/dbye: {:?} {:?}",
            &s.lines[s.lines.len().saturating_sub(5)..],
            &s.datagrams[s.datagrams.len().saturating_sub(5)..]
        );
        drop(s);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restart while nothing listens at the servers' paths fails with an error
/// naming the path; nothing runs.
fn assert_restart_fails(w: &Work, stream: &Path) {
    let mut p = w.restart("restart-nolisten");
    let st = p.wait(T_CMD);
    let err = p.stderr();
    assert!(
        !st.success()
            && err.contains("reconnecting")
            && (err.contains(stream.to_str().unwrap()) || err.contains("extd.sock")),
        "the restart should fail naming the path it cannot reconnect to ({}): {err}",
        status_str(&st)
    );
}

/// Under `stasis run`: refused by default; `checkpoint --unix-external reconnect`
/// saves the sockets; after --kill and restart they are connected again (a new
/// client for the server); with the server gone the restart fails clearly; with it
/// back the job runs on and ends well. With `run_opt`, the option is given to
/// `stasis run` instead and plain checkpoints reconnect.
fn ext_under_run(name: &str, as_user: bool, run_opt: bool) {
    let t0 = Instant::now();
    let (mut w, exe) = work_for(name, "unixext", as_user);
    if run_opt {
        w.run_opts = vec!["--unix-external".into(), "reconnect".into()];
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let srv = Servers::start(&w, seen.clone());
    let (sp, dp) = (srv.stream.clone(), srv.dgram.clone());
    let argv: Vec<&OsStr> = vec![exe.as_os_str(), sp.as_os_str(), dp.as_os_str()];
    let mut s = Session::start(&w, &argv);
    let ready = s.cur().lines()[0].clone();
    let fds: Vec<i64> = ["stream", "dgram"]
        .iter()
        .map(|k| field_num(&ready, k) as i64)
        .collect();
    s.cur().wait_tick(3, T_READY);
    let ck = |kill| {
        if run_opt {
            w.checkpoint(kill)
        } else {
            checkpoint_reconnect(&w, kill)
        }
    };
    if !run_opt {
        for kill in [false, true] {
            let r = w.checkpoint(kill);
            assert_refused(&w, &r, &fds, s.cur());
        }
    }
    let r = ck(false);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    let pid = image_procs(&w.inspect_json())
        .keys()
        .copied()
        .min()
        .unwrap();
    check_reconnect_image(&w.inspect_json(), pid, &ready, (&sp, &dp), "checkpoint");
    s.cur().wait_more_ticks(3, T_READY);
    let r = ck(true);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    check_reconnect_image(
        &w.inspect_json(),
        pid,
        &ready,
        (&sp, &dp),
        "checkpoint --kill",
    );
    s.restart(Probe::Ticks);
    srv.wait_conns(2, "after the restart");
    // Checkpointed again (the restart's `stasis restart` has no --unix-external of
    // its own: ask for it), killed, and restarted while nothing listens.
    let r = checkpoint_reconnect(&w, true);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    srv.stop();
    assert_restart_fails(&w, &sp);
    let srv = Servers::start(&w, seen.clone());
    s.restart(Probe::Ticks);
    srv.wait_conns(3, "after the restart with the server back");
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_ext_done(&seen);
    srv.stop();
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

#[test]
fn external_reconnect_under_run() {
    ext_under_run("ux_ext", false, false);
}

#[test]
fn external_reconnect_under_run_as_unprivileged_user() {
    ext_under_run("ux_ext_user", true, false);
}

#[test]
fn external_reconnect_as_run_option() {
    ext_under_run("ux_ext_runopt", false, true);
}

/// Started outside stasis: `checkpoint --pid` is refused by default (the app runs
/// on), works with `--unix-external reconnect` (also with --kill), and the restarted
/// process is connected to the servers again and ends well.
fn ext_by_pid(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exe) = work_for(name, "unixext", as_user);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let srv = Servers::start(&w, seen.clone());
    let (sp, dp) = (srv.stream.clone(), srv.dgram.clone());
    let mut app = spawn_direct(&w, &exe, &[sp.to_str().unwrap(), dp.to_str().unwrap()]);
    let ready = app.lines()[0].clone();
    let fds: Vec<i64> = ["stream", "dgram"]
        .iter()
        .map(|k| field_num(&ready, k) as i64)
        .collect();
    app.wait_tick(3, T_READY);
    let r = checkpoint_pid(&w, app.pid(), false);
    assert_refused(&w, &r, &fds, &mut app);
    let opt = ["--unix-external", "reconnect"];
    let r = checkpoint_pid_with(&w, app.pid(), false, &opt);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    check_reconnect_image(
        &w.inspect_json(),
        app.pid() as i64,
        &ready,
        (&sp, &dp),
        "checkpoint --pid",
    );
    app.wait_more_ticks(2, T_READY);
    let r = checkpoint_pid_with(&w, app.pid(), true, &opt);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    let st = app.wait(T_CMD);
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{}", status_str(&st));
    let mut s = Session::from_proc(&w, app);
    s.restart(Probe::Ticks);
    srv.wait_conns(2, "after the restart");
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_ext_done(&seen);
    srv.stop();
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

#[test]
fn external_reconnect_by_pid() {
    ext_by_pid("ux_ext_pid", false);
}

#[test]
fn external_reconnect_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    ext_by_pid("ux_ext_pid_user", true);
}
