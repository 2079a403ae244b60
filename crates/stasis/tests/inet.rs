//! IP (TCP and UDP, IPv4 and IPv6) sockets across checkpoint/restart: TCP
//! pairs streaming megabytes both ways and an echo pair (parent/child over
//! 127.0.0.1 and ::1), listeners of every kind with connections not accepted
//! yet, a half-closed connection and sockets with non-default options, UDP
//! sockets (ping-pong, datagrams queued from two senders, connected and
//! unbound ones), a connection to a server outside the job (refused by
//! default, `--tcp-external=reset` resets it and the client reconnects), a
//! restart whose port was taken meanwhile, raw and packet sockets (refused),
//! a redis server with its client, and a python asyncio server with client
//! processes.
//!
//! Every workload takes checkpoints without --kill at random moments while it
//! runs (seed printed; STASIS_TEST_SEED repeats it), then two or more
//! checkpoint --kill / restart cycles, checks each image's `inet_sockets`
//! with `inspect --json`, and lets the program check its own state after
//! `go`. Most run both as the user running the tests and as the unprivileged
//! `stasis-test` user (through setpriv when the tests run as root).
//!
//! Only loopback addresses are connected to, and only loopback or wildcard
//! addresses are bound; every port is chosen by the kernel (port 0) or found
//! free at run time.
mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Work dirs, as root or as the unprivileged user
// ---------------------------------------------------------------------------

/// A work dir for test `name` and the paths of the programs `progs` (names
/// of tests/progs/*.c). With `as_user`, the dir belongs to the unprivileged
/// test user, stasis and the programs are copied into it and every stasis
/// command runs as that user; returns the user's uid then.
fn work(name: &str, as_user: bool, progs: &[&str]) -> (Work, Vec<PathBuf>, Option<u32>) {
    if !as_user {
        let w = Work::new(name);
        return (w, progs.iter().map(|p| prog(p)).collect(), None);
    }
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new(name);
    let bin = w.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exes = progs.iter().map(|p| install(&prog(p), &bin, p)).collect();
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, exes, Some(uid))
}

/// Every process of the test runs as `uid` (when given).
fn assert_user(w: &Work, uid: Option<u32>) {
    let Some(uid) = uid else { return };
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

fn python() -> &'static str {
    // a real binary rather than a version-manager shim
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A TCP port of 127.0.0.1 free right now (bound to port 0, then released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// `stasis checkpoint ARGS... ck`.
fn checkpoint_with(w: &Work, label: &str, args: &[&str]) -> CmdOut {
    let mut a: Vec<&OsStr> = vec!["checkpoint".as_ref()];
    a.extend(args.iter().map(|x| OsStr::new(*x)));
    a.push(w.ck.as_os_str());
    w.stasis(label, &a)
}

// ---------------------------------------------------------------------------
// Reading images
// ---------------------------------------------------------------------------

fn arr<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array {key} in inspect --json: {v}"))
}

fn unum(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no unsigned integer {key} in {v}"))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// pid -> process object of the image.
fn image_procs(meta: &Value) -> BTreeMap<i32, &Value> {
    arr(meta, "processes")
        .iter()
        .map(|p| (num(p, "pid") as i32, p))
        .collect()
}

/// The root process and its children in the image; asserts there are exactly
/// `n` processes.
fn image_tree(meta: &Value, n: usize, what: &str) -> (i32, Vec<i32>) {
    let procs = image_procs(meta);
    assert_eq!(
        procs.len(),
        n,
        "{what}: {} processes in the image, expected {n}: {:?}",
        procs.len(),
        procs.keys().collect::<Vec<_>>()
    );
    let root = num(meta, "root_pid") as i32;
    assert!(procs.contains_key(&root), "{what}: no root process {root}");
    let kids = procs
        .iter()
        .filter(|(_, p)| num(p, "ppid") as i32 == root)
        .map(|(pid, _)| *pid)
        .collect();
    (root, kids)
}

/// The socket id an fd kind refers to, if it is an IP socket. The kind is
/// `{"type": "inet_socket", "sock": ID, "flags": N}` like the other fd
/// kinds (`unix_socket`...); `{"InetSocket": {"sock": ID, ...}}` is accepted
/// too.
fn inet_id(kind: &Value) -> Option<u64> {
    if kind["type"] == "inet_socket" {
        return kind["sock"].as_u64();
    }
    kind.get("InetSocket").and_then(|x| x["sock"].as_u64())
}

/// The `flags` of an IP socket's fd kind.
fn inet_flags(kind: &Value) -> i64 {
    kind.get("InetSocket")
        .unwrap_or(kind)
        .get("flags")
        .and_then(|f| f.as_i64())
        .unwrap_or_else(|| panic!("no flags in the fd kind {kind}"))
}

/// id -> entry of the image's top-level `inet_sockets`.
fn inet_sockets(meta: &Value) -> BTreeMap<u64, &Value> {
    arr(meta, "inet_sockets")
        .iter()
        .map(|s| (unum(s, "id"), s))
        .collect()
}

/// The fd kind of fd `fd` of process `p`.
fn fd_kind<'a>(p: &'a Value, fd: i64, what: &str) -> &'a Value {
    arr(p, "fds")
        .iter()
        .find(|f| f["fd"].as_i64() == Some(fd))
        .map(|f| &f["kind"])
        .unwrap_or_else(|| panic!("{what}: fd {fd} missing from process {}", p["pid"]))
}

/// The IP socket behind fd `fd` of process `p`: (id, entry).
fn inet_of<'a>(meta: &'a Value, p: &Value, fd: i64, what: &str) -> (u64, &'a Value) {
    let k = fd_kind(p, fd, what);
    let id = inet_id(k).unwrap_or_else(|| panic!("{what}: fd {fd} is not an IP socket: {k}"));
    let s = arr(meta, "inet_sockets")
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .unwrap_or_else(|| {
            panic!("{what}: fd {fd} refers to socket {id}, missing from inet_sockets")
        });
    (id, s)
}

/// (fd, socket id) of every IP socket fd of process `p`.
fn inet_fds(p: &Value) -> Vec<(i64, u64)> {
    arr(p, "fds")
        .iter()
        .filter_map(|f| Some((f["fd"].as_i64()?, inet_id(&f["kind"])?)))
        .collect()
}

/// Socket `s` is a `family`/`protocol` socket in `state`, bound to `local`
/// (unless None).
fn assert_sock(
    s: &Value,
    family: &str,
    protocol: &str,
    state: &str,
    local: Option<&str>,
    what: &str,
) {
    assert_eq!(text(s, "family"), family, "{what}: family of {s}");
    assert_eq!(text(s, "protocol"), protocol, "{what}: protocol of {s}");
    assert_eq!(text(s, "state"), state, "{what}: state of {s}");
    if let Some(l) = local {
        assert_eq!(text(s, "local"), l, "{what}: local address of {s}");
    }
}

/// An address as the other end sees it: an IPv4 peer of a dual-stack
/// socket appears as [::ffff:a.b.c.d]:p there.
fn norm(addr: &str) -> String {
    match addr
        .strip_prefix("[::ffff:")
        .and_then(|r| r.split_once("]:"))
    {
        Some((v4, port)) if v4.contains('.') => format!("{v4}:{port}"),
        _ => addr.to_string(),
    }
}

/// `a` and `b` are the two ends of one TCP connection in the image: each
/// other's peer, local and remote addresses crossed.
fn assert_tcp_peers(a: (u64, &Value), b: (u64, &Value), what: &str) {
    for (x, y, iy) in [(a.1, b.1, b.0), (b.1, a.1, a.0)] {
        assert_eq!(text(x, "state"), "connected", "{what}: {x}");
        assert_eq!(text(x, "protocol"), "tcp", "{what}: {x}");
        assert_eq!(
            unum(x, "peer"),
            iy,
            "{what}: peer of {x} (the other end: {y})"
        );
        assert_eq!(
            norm(text(x, "remote")),
            norm(text(y, "local")),
            "{what}: remote of {x} is not the local address of its peer {y}"
        );
    }
}

/// Consistency of every IP socket of an image: ids unique, family, protocol
/// and state known, a listener or bound/unbound socket has no remote, every
/// `peer` exists and points back with crossed addresses, every fd refers to
/// an entry.
fn check_inet_image(meta: &Value, what: &str) {
    let list = arr(meta, "inet_sockets");
    let socks = inet_sockets(meta);
    assert_eq!(
        socks.len(),
        list.len(),
        "{what}: duplicate ids in inet_sockets"
    );
    for s in list {
        assert!(
            ["ipv4", "ipv6"].contains(&text(s, "family")),
            "{what}: family of {s}"
        );
        assert!(
            ["tcp", "udp"].contains(&text(s, "protocol")),
            "{what}: protocol of {s}"
        );
        let state = text(s, "state");
        assert!(
            ["listening", "connected", "bound", "unbound", "reset"].contains(&state),
            "{what}: state of {s}"
        );
        let remote = text(s, "remote");
        match state {
            "listening" | "bound" | "unbound" => {
                assert_eq!(remote, "", "{what}: a {state} socket with a remote: {s}")
            }
            _ => assert_ne!(remote, "", "{what}: a {state} socket without remote: {s}"),
        }
        let peer = unum(s, "peer");
        if peer != 0 {
            let p = socks.get(&peer).unwrap_or_else(|| {
                panic!("{what}: peer {peer} of {s} is missing from inet_sockets")
            });
            assert_eq!(unum(p, "peer"), unum(s, "id"), "{what}: {s} / {p}");
            assert_eq!(
                norm(text(s, "remote")),
                norm(text(p, "local")),
                "{what}: {s} / {p}"
            );
        }
    }
    for p in arr(meta, "processes") {
        for (fd, id) in inet_fds(p) {
            assert!(
                socks.contains_key(&id),
                "{what}: fd {fd} of process {} refers to socket {id}, missing from inet_sockets",
                p["pid"]
            );
        }
    }
}

/// "127.0.0.1:P" / "[::1]:P".
fn loopback(fam: u32, port: u64) -> String {
    if fam == 6 {
        format!("[::1]:{port}")
    } else {
        format!("127.0.0.1:{port}")
    }
}

fn family(fam: u32) -> &'static str {
    if fam == 6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

// ---------------------------------------------------------------------------
// The schedule
// ---------------------------------------------------------------------------

/// `plain` checkpoints without --kill while the program runs, then `kills`
/// checkpoint --kill / restart cycles, each at a random moment.
/// `before(s, i)` runs just before checkpoint i, `check(meta, i, kill)`
/// inspects each image, `after_restart` runs once the restored program ticks
/// again; every restored phase must advance tick fields `keys` (each is waited for
/// before the next checkpoint: a sender may be blocked for a while after a restore,
/// until its peer has read the queues that came back full).
#[allow(clippy::too_many_arguments)]
fn schedule(
    s: &mut Session,
    rng: &mut Rng,
    plain: usize,
    kills: usize,
    keys: &[&str],
    mut before: impl FnMut(&mut Session, usize),
    mut check: impl FnMut(&Value, usize, bool),
    mut after_restart: impl FnMut(&mut Session),
) {
    let w = s.w;
    for i in 0..plain + kills {
        rng.sleep_ms(20, 400);
        let kill = i >= plain;
        before(s, i);
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let meta = w.inspect_json();
        let what = format!("checkpoint #{i} (kill={kill})");
        check_inet_image(&meta, &what);
        check(&meta, i, kill);
        if kill {
            s.restart(Probe::Ticks);
            for key in keys {
                wait_field_advance(s.cur(), key, "after the restore");
            }
            after_restart(s);
        } else {
            s.cur().wait_more_ticks(3, T_READY);
            assert!(
                s.cur().running(),
                "the run ended after a checkpoint without --kill\n{}",
                s.diag()
            );
        }
    }
    rng.sleep_ms(20, 200);
    s.cur().wait_more_ticks(2, T_READY);
}

/// The usual end: `go`, OK, no rerun, ticks consecutive from 0, fields
/// `keys` never going back and advancing in every restored phase. Returns
/// the OK line and the last tick's fields.
fn finish_checked(
    s: &mut Session,
    keys: &[&str],
) -> (String, std::collections::HashMap<String, u64>) {
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, keys);
    assert_eq!(
        field_num(&ok, "ticks"),
        all.last().unwrap() + 1,
        "{ok}: ticks"
    );
    (ok, last)
}

// ---------------------------------------------------------------------------
// 1: TCP pairs (tcppair.c)
// ---------------------------------------------------------------------------

/// Checks an image of `tcppair stream|echo FAM`.
fn check_tcppair_image(meta: &Value, ready: &str, what: &str) {
    let mode = fields(ready)["mode"].clone();
    let fam = field_num(ready, "fam") as u32;
    let port = field_num(ready, "port");
    let child = field_num(ready, "child") as i32;
    let (root, kids) = image_tree(meta, 2, what);
    assert_eq!(kids, [child], "{what}: children of {root}");
    let procs = image_procs(meta);
    let (parent, child) = (procs[&root], procs[&child]);
    let laddr = loopback(fam, port);
    let sock = field_num(ready, "sock") as i64;
    let ps = inet_of(meta, parent, sock, what);
    let cfds = inet_fds(child);
    let socks = inet_sockets(meta);
    if mode == "stream" {
        // the parent: the listener and the accepted end; the child: its client
        let l = inet_of(meta, parent, field_num(ready, "listener") as i64, what);
        assert_sock(l.1, family(fam), "tcp", "listening", Some(&laddr), what);
        assert_sock(ps.1, family(fam), "tcp", "connected", Some(&laddr), what);
        assert_eq!(inet_fds(parent).len(), 2, "{what}: the parent's IP sockets");
        assert_eq!(cfds.len(), 1, "{what}: the child's IP sockets {cfds:?}");
        let c = (cfds[0].1, socks[&cfds[0].1]);
        assert_eq!(
            text(c.1, "remote"),
            laddr,
            "{what}: the child's socket {}",
            c.1
        );
        assert_tcp_peers(ps, c, &format!("{what}: parent/child connection"));
    } else {
        // the parent: the client; the child: the listener and the accepted end
        assert_sock(ps.1, family(fam), "tcp", "connected", None, what);
        assert_eq!(text(ps.1, "remote"), laddr, "{what}: the client {}", ps.1);
        assert_eq!(inet_fds(parent).len(), 1, "{what}: the parent's IP sockets");
        assert_eq!(cfds.len(), 2, "{what}: the child's IP sockets {cfds:?}");
        let l: Vec<&Value> = cfds
            .iter()
            .map(|(_, id)| socks[id])
            .filter(|s| s["state"] == "listening")
            .collect();
        assert_eq!(l.len(), 1, "{what}: the child's listener: {cfds:?}");
        assert_sock(l[0], family(fam), "tcp", "listening", Some(&laddr), what);
        let a = cfds
            .iter()
            .find(|(_, id)| socks[id]["state"] != "listening")
            .map(|(_, id)| (*id, socks[id]))
            .unwrap();
        assert_sock(a.1, family(fam), "tcp", "connected", Some(&laddr), what);
        assert_tcp_peers(ps, a, &format!("{what}: client/server connection"));
    }
}

/// The image is of a job with a private network (`private`) and its connected TCP
/// sockets carry TCP_REPAIR state (sequence numbers, queue lengths matching the
/// bytes saved), or neither.
fn check_repair(meta: &Value, private: bool, what: &str) {
    assert_eq!(
        meta["private_network"].as_bool(),
        Some(private),
        "{what}: private_network"
    );
    let connected: Vec<&Value> = arr(meta, "inet_sockets")
        .iter()
        .filter(|s| s["protocol"] == "tcp" && s["state"] == "connected")
        .collect();
    assert!(!connected.is_empty(), "{what}: no connected TCP socket");
    for s in connected {
        let r = &s["repair"];
        if !private {
            assert!(
                r.is_null(),
                "{what}: repair state without a private network: {s}"
            );
            continue;
        }
        assert!(r.is_object(), "{what}: no repair state: {s}");
        let queued: u64 = s["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|x| x.as_u64()).sum())
            .unwrap_or(0);
        assert_eq!(
            unum(r, "inq_len") + unum(r, "outq_len"),
            queued,
            "{what}: repair queue lengths against the bytes saved: {s}"
        );
    }
}

/// (inq, outq) of the last tick line printed so far.
fn last_queues(p: &Proc) -> Option<(u64, u64)> {
    let l = p
        .lines()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("tick "))?;
    Some((field_num(&l, "inq"), field_num(&l, "outq")))
}

fn tcp_stream_cycles(name: &str, fam: u32, as_user: bool) {
    tcp_stream_cycles_on(name, fam, as_user, false)
}

/// With `private`, under `stasis run --network private`: every image says so and
/// holds both ends of the connection with their TCP_REPAIR state.
fn tcp_stream_cycles_on(name: &str, fam: u32, as_user: bool, private: bool) {
    let t0 = Instant::now();
    let (mut w, exes, uid) = work(name, as_user, &["tcppair"]);
    if private {
        w.run_opts = vec!["--network".into(), "private".into()];
    }
    let mut rng = Rng::new(name);
    let f = fam.to_string();
    let mut s = Session::start(&w, &[exes[0].as_os_str(), "stream".as_ref(), f.as_ref()]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(10, T_READY);
    assert_user(&w, uid);
    let mut queues = vec![];
    schedule(
        &mut s,
        &mut rng,
        3,
        2,
        &["sent", "rcvd"],
        |s, i| {
            let (inq, outq) = last_queues(s.cur()).unwrap();
            queues.push(format!("#{i}: inq {inq} outq {outq}"));
            // megabytes in flight while it runs as started (after a restore
            // the buffers may take a moment to grow again)
            if s.phases.len() == 1 {
                assert!(
                    inq + outq >= 1 << 20,
                    "checkpoint #{i}: only {inq} + {outq} bytes queued at the parent's end just before"
                );
            }
        },
        |meta, i, kill| {
            let what = format!("checkpoint #{i} (kill={kill})");
            check_tcppair_image(meta, &ready, &what);
            check_repair(meta, private, &what);
        },
        |s| assert_user(s.w, uid),
    );
    let (ok, last) = finish_checked(&mut s, &["sent", "rcvd"]);
    // the end: every word sent was received (the trailer counts are checked
    // by the program), at least what the last tick showed
    assert!(field_num(&ok, "sent") >= last["sent"], "{ok}");
    assert!(field_num(&ok, "rcvd") >= last["rcvd"], "{ok}");
    eprintln!("{name}: queues at the parent's end before each checkpoint: {queues:?}; {ok}");
    elapsed(t0, name);
}

/// (1'') The stream pair under `stasis run --network private`: the connection is
/// saved and restored exactly with TCP_REPAIR (every image says so), with the
/// same guarantees, over IPv4 and IPv6, as root and as the unprivileged user.
#[test]
fn tcp_stream_pair_private_network_repair() {
    tcp_stream_cycles_on("tcp_stream_repair4", 4, false, true);
    tcp_stream_cycles_on("tcp_stream_repair6", 6, false, true);
}

#[test]
fn tcp_stream_pair_private_network_as_unprivileged_user() {
    tcp_stream_cycles_on("tcp_stream_repair_unpriv", 4, true, true);
}

/// (1) A TCP connection over 127.0.0.1 between a parent (listener kept open,
/// accepted end) and its child (client), both O_NONBLOCK in a poll loop,
/// each streaming 64-bit sequence words as fast as the other end reads while
/// reading only 16 KiB every 2 ms, so megabytes sit in the queues both ways
/// (>= 1 MiB at the parent's end before every checkpoint of the first run);
/// 3 checkpoints without --kill and 2 checkpoint --kill/restart cycles at
/// random moments. Proves: every image holds the listener (listening on
/// 127.0.0.1:PORT) and the two ends as each other's peers with crossed
/// addresses; after each restore every word arrives exactly once and in
/// order in both directions (each receiver checks every byte, and at `go`
/// the END trailer's count of words sent against the words received, then
/// EOF after SHUT_WR), getsockname/getpeername of both ends and the
/// listener are unchanged, the listener accepts a new connection, and the
/// child exits 0.
#[test]
fn tcp_stream_pair_ipv4() {
    tcp_stream_cycles("tcp_stream4", 4, false);
}

/// (1) The same over ::1.
#[test]
fn tcp_stream_pair_ipv6() {
    tcp_stream_cycles("tcp_stream6", 6, false);
}

/// (1) The IPv4 stream pair as the unprivileged user: same checks, and every
/// process runs as that user.
#[test]
fn tcp_stream_pair_as_unprivileged_user() {
    tcp_stream_cycles("tcp_stream_unpriv", 4, true);
}

fn tcp_echo_cycles(name: &str, fam: u32, as_user: bool) {
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["tcppair"]);
    let mut rng = Rng::new(name);
    let f = fam.to_string();
    let mut s = Session::start(&w, &[exes[0].as_os_str(), "echo".as_ref(), f.as_ref()]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    assert_user(&w, uid);
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        &["msgs", "bytes"],
        |_, _| {},
        |meta, i, kill| {
            check_tcppair_image(meta, &ready, &format!("checkpoint #{i} (kill={kill})"))
        },
        |s| assert_user(s.w, uid),
    );
    let (ok, last) = finish_checked(&mut s, &["msgs", "bytes"]);
    // the 3 echoes outstanding at `go` are collected at the end
    assert_eq!(
        field_num(&ok, "msgs"),
        last["msgs"] + 3,
        "{ok}: messages echoed"
    );
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (1') An echo pair over 127.0.0.1: the child holds the listener and the
/// accepted connection and echoes (blocking), the parent sends messages of
/// pseudo-random length (1-16000 bytes) keeping 3 outstanding and checks
/// every echo; 2 checkpoints without --kill, 2 checkpoint --kill/restart
/// cycles. Proves: the images hold the child's listener and the connection
/// (peers, addresses); after each restore no message or byte is lost,
/// repeated or reordered, the names are unchanged, and the child's count of
/// messages at the end equals the parent's.
#[test]
fn tcp_echo_pair_ipv4() {
    tcp_echo_cycles("tcp_echo4", 4, false);
}

/// (1') The echo pair over ::1.
#[test]
fn tcp_echo_pair_ipv6() {
    tcp_echo_cycles("tcp_echo6", 6, false);
}

/// (1') The IPv6 echo pair as the unprivileged user.
#[test]
fn tcp_echo_pair_as_unprivileged_user() {
    tcp_echo_cycles("tcp_echo_unpriv", 6, true);
}

// ---------------------------------------------------------------------------
// 2: TCP states and options (tcpstate.c)
// ---------------------------------------------------------------------------

fn check_tcpstate_image(meta: &Value, ready: &str, what: &str) {
    let (root, _) = image_tree(meta, 1, what);
    let p = image_procs(meta)[&root];
    let fd = |k: &str| field_num(ready, k) as i64;
    let get = |k: &str| inet_of(meta, p, fd(k), &format!("{what}: {k}"));
    let port = |k: &str| field_num(ready, k);
    // listeners
    let l4 = loopback(4, port("port4"));
    let l6 = loopback(6, port("port6"));
    for (k, fam, local) in [
        ("l4", "ipv4", l4.clone()),
        ("l6", "ipv6", l6.clone()),
        ("ld", "ipv6", format!("[::]:{}", port("portd"))),
        ("la", "ipv4", format!("0.0.0.0:{}", port("porta"))),
    ] {
        assert_sock(
            get(k).1,
            fam,
            "tcp",
            "listening",
            Some(&local),
            &format!("{what}: {k}"),
        );
    }
    // established connections to L4
    for (c, a) in [("h", "ha"), ("o", "oa")] {
        let (cs, as_) = (get(c), get(a));
        assert_sock(cs.1, "ipv4", "tcp", "connected", None, what);
        assert_eq!(text(cs.1, "remote"), l4, "{what}: {c} is connected to L4");
        assert_sock(as_.1, "ipv4", "tcp", "connected", Some(&l4), what);
        assert_tcp_peers(cs, as_, &format!("{what}: {c}/{a}"));
    }
    // connections not accepted yet
    for (k, fam, remote) in [
        ("p1", "ipv4", l4.clone()),
        ("p2", "ipv4", l4.clone()),
        ("p3", "ipv6", l6.clone()),
        ("p4", "ipv4", loopback(4, port("portd"))),
    ] {
        let s = get(k).1;
        assert_sock(
            s,
            fam,
            "tcp",
            "connected",
            None,
            &format!("{what}: pending {k}"),
        );
        assert_eq!(text(s, "remote"), remote, "{what}: pending {k}: {s}");
    }
    // file status flags: O is O_NONBLOCK, OA is not
    let nb = libc::O_NONBLOCK as i64;
    assert_ne!(
        inet_flags(fd_kind(p, fd("o"), what)) & nb,
        0,
        "{what}: O's fd lost O_NONBLOCK"
    );
    assert_eq!(
        inet_flags(fd_kind(p, fd("oa"), what)) & nb,
        0,
        "{what}: OA's fd got O_NONBLOCK"
    );
}

fn tcp_state_cycles(name: &str, as_user: bool) {
    tcp_state_cycles_on(name, as_user, false)
}

/// With `private`, under `stasis run --network private`: the established
/// connections are saved with TCP_REPAIR (the half-closed one, not established, by
/// reading and re-sending its bytes), every image says so.
fn tcp_state_cycles_on(name: &str, as_user: bool, private: bool) {
    let t0 = Instant::now();
    let (mut w, exes, uid) = work(name, as_user, &["tcpstate"]);
    if private {
        w.run_opts = vec!["--network".into(), "private".into()];
    }
    let mut rng = Rng::new(name);
    let mut s = Session::start(&w, &[&exes[0]]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    assert_user(&w, uid);
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        &["recs"],
        |_, _| {},
        |meta, i, kill| {
            let what = format!("checkpoint #{i} (kill={kill})");
            check_tcpstate_image(meta, &ready, &what);
            assert_eq!(meta["private_network"].as_bool(), Some(private), "{what}");
            if private {
                // O/OA (established, SO_REUSEADDR inherited from their listener's
                // port) are repaired; H/HA (half-closed) are not
                let repaired = arr(meta, "inet_sockets")
                    .iter()
                    .filter(|s| s["repair"].is_object())
                    .count();
                assert_eq!(repaired, 2, "{what}: repaired sockets");
            }
        },
        |s| assert_user(s.w, uid),
    );
    let (ok, last) = finish_checked(&mut s, &["recs"]);
    // the record still queued at `go` is read at the end
    assert_eq!(field_num(&ok, "recs"), last["recs"] + 1, "{ok}: records");
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (2'') The same under `stasis run --network private`: the established
/// connection with options goes the TCP_REPAIR way while the half-closed one and
/// the pending ones are made again as on the host network; all come back the same.
#[test]
fn tcp_listeners_pending_half_closed_and_options_private_network() {
    tcp_state_cycles_on("tcp_state_private", false, true);
}

/// (2) One process holding: a listener on 127.0.0.1 with two connections
/// not accepted yet (300 and 500 bytes sent), one on [::1] (IPV6_V6ONLY)
/// with one pending, a dual-stack one on [::] (IPV6_V6ONLY=0) with an IPv4
/// client pending, one on 0.0.0.0; a half-closed connection (1000 bytes then
/// SHUT_WR one way, 700 bytes the other, all unread); a connection whose
/// ends carry TCP_NODELAY, TCP_CORK, SO_SNDBUF, SO_RCVBUF, SO_KEEPALIVE with
/// TCP_KEEPIDLE/KEEPINTVL/KEEPCNT, SO_LINGER, SO_REUSEADDR, SO_REUSEPORT,
/// O_NONBLOCK, F_SETOWN, F_SETSIG, with a record always queued; 2
/// checkpoints without --kill, 2 checkpoint --kill/restart cycles. Proves:
/// the images hold every listener (family, address and port), the
/// established connections as peers, the pending clients connected to
/// their listener's address, the fds' O_NONBLOCK; after the restores every
/// option reads back as before, every name is unchanged, the pending
/// connections are accepted only now, in order, from the right clients and
/// with exactly their bytes, the half-closed connection gives its 1000 bytes
/// then EOF, the 700 bytes the other way, EPIPE on the shut side and still
/// carries data the other way, and every listener (the dual-stack one over
/// IPv4 and IPv6) accepts new connections.
#[test]
fn tcp_listeners_pending_half_closed_and_options() {
    tcp_state_cycles("tcp_state", false);
}

/// (2) The same as the unprivileged user.
#[test]
fn tcp_listeners_pending_half_closed_and_options_as_unprivileged_user() {
    tcp_state_cycles("tcp_state_unpriv", true);
}

/// (2') A connection not accepted yet whose client (in the job) has already
/// sent 1000 bytes into it (tcppending.c). Either stasis saves it (a
/// checkpoint and two checkpoint --kill/restart cycles; the image holds the
/// client connected to the listener's address; when the program accepts the
/// connection after the restores exactly these bytes are there), or it
/// refuses both checkpoint and checkpoint --kill with an error naming the
/// client's fd, publishes nothing, and the program runs on unharmed; once
/// the program has accepted the connection (`release`: it reads the bytes,
/// answers and closes its end), two checkpoint --kill/restart cycles work
/// with the client's connection closed by its peer.
#[test]
fn tcp_pending_connection_with_data_kept_or_refused() {
    let w = Work::new("tcp_pending_data");
    let mut s = Session::start(&w, &[prog("tcppending")]);
    let ready = s.cur().lines()[0].clone();
    let pfd = field_num(&ready, "p") as i64;
    let laddr = loopback(4, field_num(&ready, "port"));
    s.cur().wait_tick(3, T_READY);
    let r = w.checkpoint(false);
    let released = if r.status.success() {
        eprintln!(
            "tcp_pending_data: checkpoint supported: {}",
            r.stderr.trim()
        );
        for i in 0..3 {
            if i > 0 {
                s.checkpoint_kill();
            }
            let meta = w.inspect_json();
            let what = format!("checkpoint #{i}");
            check_inet_image(&meta, &what);
            let (root, _) = image_tree(&meta, 1, &what);
            let (_, p) = inet_of(&meta, image_procs(&meta)[&root], pfd, &what);
            assert_sock(p, "ipv4", "tcp", "connected", None, &what);
            assert_eq!(text(p, "remote"), laddr, "{what}: the pending client {p}");
            if i > 0 {
                s.restart(Probe::Ticks);
            } else {
                s.cur().wait_more_ticks(3, T_READY);
            }
        }
        0
    } else {
        let mut first = Some(r);
        for kill in [false, true] {
            let r = first.take().unwrap_or_else(|| w.checkpoint(true));
            eprintln!(
                "tcp_pending_data (kill={kill}): refused: {}",
                r.stderr.trim()
            );
            assert!(
                !r.status.success(),
                "only the first checkpoint was refused: {r}"
            );
            assert!(
                mentions_number(&r.stderr, pfd),
                "the error does not name the pending client's fd {pfd}: {r}"
            );
            assert!(
                w.checkpoints().is_empty(),
                "a checkpoint was published: {:?}",
                w.checkpoints()
            );
            s.cur().wait_more_ticks(5, T_READY);
            assert!(
                s.cur().running(),
                "the app died after a refused checkpoint\n{}",
                s.diag()
            );
        }
        // accepted now: nothing stands in the way any more
        fs::write(w.path("release"), b"").unwrap();
        s.cur()
            .wait_line("`released`", T_READY, |l| l == "released");
        s.cur().wait_more_ticks(3, T_READY);
        s.cycle(Probe::Ticks);
        s.cycle(Probe::Ticks);
        1
    };
    let (ok, _) = finish_checked(&mut s, &[]);
    assert_eq!(field_num(&ok, "released"), released, "{ok}");
    eprintln!("tcp_pending_data: {ok}");
}

// ---------------------------------------------------------------------------
// 3: UDP (udp.c)
// ---------------------------------------------------------------------------

/// `key=FD@ADDR` of udp.c's ready line.
fn fd_addr(ready: &str, key: &str) -> (i64, String) {
    let v = fields(ready)
        .remove(key)
        .unwrap_or_else(|| panic!("no {key}= in {ready:?}"));
    let (fd, addr) = v.split_once('@').unwrap();
    (fd.parse().unwrap(), addr.to_string())
}

fn check_udp_image(meta: &Value, ready: &str, what: &str) {
    let child = field_num(ready, "child") as i32;
    let (root, kids) = image_tree(meta, 2, what);
    assert_eq!(kids, [child], "{what}: children of {root}");
    let procs = image_procs(meta);
    let (p, c) = (procs[&root], procs[&child]);
    let get = |proc_: &Value, k: &str| {
        let (fd, addr) = fd_addr(ready, k);
        let (id, s) = inet_of(meta, proc_, fd, &format!("{what}: {k}"));
        (id, s, addr)
    };
    for k in ["a4", "a6", "q4", "q6", "s1", "s2", "s3", "s4", "d"] {
        let (_, s, addr) = get(p, k);
        let fam = if addr.starts_with('[') {
            "ipv6"
        } else {
            "ipv4"
        };
        assert_sock(s, fam, "udp", "bound", Some(&addr), &format!("{what}: {k}"));
    }
    for k in ["b4", "b6"] {
        let (_, s, addr) = get(c, k);
        let fam = if addr.starts_with('[') {
            "ipv6"
        } else {
            "ipv4"
        };
        assert_sock(
            s,
            fam,
            "udp",
            "bound",
            Some(&addr),
            &format!("{what}: the child's {k}"),
        );
    }
    assert_eq!(inet_fds(c).len(), 2, "{what}: the child's IP sockets");
    let (_, cs, caddr) = get(p, "c");
    assert_sock(
        cs,
        "ipv4",
        "udp",
        "connected",
        Some(&caddr),
        &format!("{what}: C"),
    );
    assert_eq!(
        text(cs, "remote"),
        fd_addr(ready, "d").1,
        "{what}: C is connected to D: {cs}"
    );
    for (k, fam) in [("u4", "ipv4"), ("u6", "ipv6")] {
        let (_, s, _) = get(p, k);
        assert_sock(s, fam, "udp", "unbound", None, &format!("{what}: {k}"));
    }
}

fn udp_cycles(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["udp"]);
    let mut rng = Rng::new(name);
    let mut s = Session::start(&w, &[&exes[0]]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    assert_user(&w, uid);
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        &["pp", "msgs"],
        |_, _| {},
        |meta, i, kill| check_udp_image(meta, &ready, &format!("checkpoint #{i} (kill={kill})")),
        |s| assert_user(s.w, uid),
    );
    let (ok, last) = finish_checked(&mut s, &["pp", "msgs"]);
    // at `go`: 3 answers outstanding per family; 5 datagrams queued on Q4
    // and Q6, one each way between C and D
    assert_eq!(field_num(&ok, "pp"), last["pp"] + 6, "{ok}: answers");
    assert_eq!(field_num(&ok, "msgs"), last["msgs"] + 12, "{ok}: datagrams");
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (3) UDP: a ping-pong between a parent and its child over 127.0.0.1 and
/// ::1 (3 requests outstanding each), sockets on 127.0.0.1 and ::1 that
/// always hold 4-5 datagrams (zero-length ones included) from two senders
/// each, a socket connect()ed to another with a datagram queued each way
/// (SO_BROADCAST set), unbound IPv4/IPv6 sockets (one with SO_BROADCAST); 2
/// checkpoints without --kill, 2 checkpoint --kill/restart cycles. Proves:
/// the images hold every socket bound to its address (family, protocol),
/// the connected one with its remote, the unbound ones unbound; after the
/// restores every datagram arrives exactly once, in order, with its length
/// (boundaries), content and source address:port, the names and
/// SO_BROADCAST are unchanged, the connected socket still filters out other
/// senders, the unbound ones are still unbound and bind themselves on their
/// first sendto, and the child answers every request and exits 0.
#[test]
fn udp_pingpong_queued_connected_unbound() {
    udp_cycles("udp", false);
}

/// (3) The same as the unprivileged user.
#[test]
fn udp_as_unprivileged_user() {
    udp_cycles("udp_unpriv", true);
}

// ---------------------------------------------------------------------------
// 4: a peer outside the job (tcpclient.c + an echo server in this process)
// ---------------------------------------------------------------------------

/// An echo server on 127.0.0.1 (threads of the test process, outside the
/// job) for tcpclient.c's messages ([u32 len][u32 conn][u64 seq][len bytes]).
struct EchoServer {
    port: u16,
    conns: Arc<AtomicU64>,
    msgs: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    fn start() -> EchoServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let conns = Arc::new(AtomicU64::new(0));
        let msgs = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, m, st) = (conns.clone(), msgs.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((conn, _)) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        let m = m.clone();
                        std::thread::spawn(move || Self::serve(conn, m));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        EchoServer {
            port,
            conns,
            msgs,
            stop,
        }
    }

    fn serve(mut conn: TcpStream, msgs: Arc<AtomicU64>) {
        conn.set_nonblocking(false).unwrap();
        let _ = conn.set_nodelay(true);
        let mut buf = vec![0u8; 16 + 4096];
        loop {
            if conn.read_exact(&mut buf[..16]).is_err() {
                return;
            }
            let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
            if len > 4096 || conn.read_exact(&mut buf[16..16 + len]).is_err() {
                return;
            }
            if conn.write_all(&buf[..16 + len]).is_err() {
                return;
            }
            msgs.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }

    fn msgs(&self) -> u64 {
        self.msgs.load(Ordering::SeqCst)
    }

    /// Wait until the server has echoed more than `n` messages.
    fn wait_msgs_above(&self, n: u64, what: &str) {
        let t0 = Instant::now();
        while self.msgs() <= n {
            assert!(
                t0.elapsed() < T_READY,
                "{what}: the echo server got no message after {n}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `reconnect conn=C err=E at=S` lines of `p`.
fn reconnects(p: &Proc) -> Vec<String> {
    p.lines()
        .into_iter()
        .filter(|l| l.starts_with("reconnect "))
        .collect()
}

/// A checkpoint (plain or --kill, by `args`) of the job holding a connection
/// to the echo server is refused: the error names the fd and the server's
/// address, nothing is published, the client keeps ticking and exchanging
/// with the server over the same connection.
fn assert_external_refused(
    w: &Work,
    p: &mut Proc,
    srv: &EchoServer,
    fd: i64,
    args: &[&str],
    what: &str,
) {
    let before = srv.msgs();
    let conns = srv.conns();
    let published = w.checkpoints();
    let r = checkpoint_with(w, "ckpt-refused", args);
    eprintln!("{what}: {}", r.stderr.trim());
    assert!(!r.status.success(), "{what}: checkpoint succeeded: {r}");
    let remote = format!("127.0.0.1:{}", srv.port);
    assert!(
        r.stderr.contains(&remote),
        "{what}: the error does not name the remote address {remote}: {r}"
    );
    assert!(
        mentions_number(&r.stderr, fd),
        "{what}: the error does not name the fd {fd}: {r}"
    );
    assert_eq!(
        w.checkpoints(),
        published,
        "{what}: a checkpoint was published"
    );
    p.wait_more_ticks(5, T_READY);
    assert!(
        p.running(),
        "{what}: the app died after a refused checkpoint\n{}",
        p.diag()
    );
    srv.wait_msgs_above(before + 3, what);
    assert_eq!(srv.conns(), conns, "{what}: the client connected again");
    assert!(
        reconnects(p).is_empty(),
        "{what}: the client saw its connection fail: {:?}",
        reconnects(p)
    );
}

/// The image of a checkpoint with --tcp-external=reset: the client's socket
/// is saved `reset`, with its addresses and no peer.
fn check_reset_image(w: &Work, ready: &str, local: &str, port: u16, what: &str) {
    let meta = w.inspect_json();
    check_inet_image(&meta, what);
    let procs = image_procs(&meta);
    assert_eq!(procs.len(), 1, "{what}: processes {:?}", procs.keys());
    let p = procs.values().next().unwrap();
    let (_, s) = inet_of(&meta, p, field_num(ready, "fd") as i64, what);
    assert_sock(s, "ipv4", "tcp", "reset", Some(local), what);
    assert_eq!(
        text(s, "remote"),
        format!("127.0.0.1:{port}"),
        "{what}: {s}"
    );
    assert_eq!(unum(s, "peer"), 0, "{what}: {s}");
}

/// After a restore with the connection reset: the client reports the reset
/// (ECONNRESET, or EPIPE on a write) on connection `conn`, connects again
/// and goes on.
fn assert_reset_seen(p: &mut Proc, srv: &EchoServer, conn: u64, what: &str) {
    let pre = format!("reconnect conn={conn} ");
    let l = p.wait_line(&format!("`{pre}...`"), T_READY, |l| l.starts_with(&pre));
    let err = fields(&l)["err"].clone();
    assert!(
        err == "ECONNRESET" || err == "EPIPE",
        "{what}: the restored connection failed with {err}, want ECONNRESET or EPIPE: {l}"
    );
    p.wait_more_ticks(3, T_READY);
    assert_eq!(
        srv.conns(),
        conn + 1,
        "{what}: connections to the echo server"
    );
    let before = srv.msgs();
    srv.wait_msgs_above(before + 2, what);
}

fn external_cycles(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["tcpclient"]);
    let mut rng = Rng::new(name);
    let srv = EchoServer::start();
    let port = srv.port.to_string();
    let mut s = Session::start(&w, &[exes[0].as_os_str(), port.as_ref()]);
    let ready = s.cur().lines()[0].clone();
    let fd = field_num(&ready, "fd") as i64;
    s.cur().wait_tick(3, T_READY);
    assert_user(&w, uid);
    // refused by default, plain and with --kill
    assert_external_refused(&w, s.cur(), &srv, fd, &[], "default checkpoint");
    assert_external_refused(
        &w,
        s.cur(),
        &srv,
        fd,
        &["--kill"],
        "default checkpoint --kill",
    );
    // --tcp-external=reset without --kill: saved as reset, the live
    // connection is not disturbed
    rng.sleep_ms(20, 300);
    let before = srv.msgs();
    let r = checkpoint_with(&w, "ckpt-reset", &["--tcp-external=reset"]);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    assert_eq!(w.checkpoints().len(), 1, "{r}");
    // The connection's local address (a new one after each reconnection).
    let mut local = fields(&ready)["local"].clone();
    check_reset_image(
        &w,
        &ready,
        &local,
        srv.port,
        "checkpoint --tcp-external=reset",
    );
    s.cur().wait_more_ticks(5, T_READY);
    srv.wait_msgs_above(before + 3, "after checkpoint --tcp-external=reset");
    assert_eq!(
        srv.conns(),
        1,
        "a checkpoint without --kill disturbed the connection"
    );
    assert!(reconnects(s.cur()).is_empty(), "{:?}", reconnects(s.cur()));
    // checkpoint --kill --tcp-external=reset, restart: reset, reconnect
    for conn in 1..=2u64 {
        rng.sleep_ms(20, 300);
        let r = checkpoint_with(&w, "ckpt-kill-reset", &["--kill", "--tcp-external=reset"]);
        assert!(r.status.success(), "{r}\n{}", s.diag());
        s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
        check_reset_image(
            &w,
            &ready,
            &local,
            srv.port,
            &format!("checkpoint --kill #{conn}"),
        );
        s.restart(Probe::Ticks);
        assert_user(&w, uid);
        assert_reset_seen(s.cur(), &srv, conn, &format!("restart #{conn}"));
        let pre = format!("connected conn={} ", conn + 1);
        let l = s
            .cur()
            .wait_line(&format!("`{pre}...`"), T_READY, |l| l.starts_with(&pre));
        local = fields(&l)["local"].clone();
    }
    let (ok, last) = finish_checked(&mut s, &["msgs"]);
    assert_eq!(field_num(&ok, "msgs"), last["msgs"], "{ok}");
    assert_eq!(field_num(&ok, "conns"), 3, "{ok}");
    assert_eq!(field_num(&ok, "resets"), 2, "{ok}");
    eprintln!(
        "{name}: {ok}; the echo server saw {} connections, {} messages",
        srv.conns(),
        srv.msgs()
    );
    elapsed(t0, name);
}

/// (4) A client in the job connected to an echo server outside it (threads
/// of the test process on 127.0.0.1), exchanging a message every ~20 ms.
/// Proves: `checkpoint` and `checkpoint --kill` are refused by default with
/// an error naming the fd and 127.0.0.1:PORT, nothing is published, and the
/// client keeps exchanging over the same connection; `checkpoint
/// --tcp-external=reset` succeeds, saves the socket as `reset` (local and
/// remote address, no peer) and does not disturb the running connection;
/// after each of 2 `checkpoint --kill --tcp-external=reset` / restart cycles
/// the client's next operation on the connection fails with ECONNRESET (or
/// EPIPE), it connects again and goes on (ticks consecutive, 3 connections,
/// 2 resets in all).
#[test]
fn external_peer_refused_then_reset() {
    external_cycles("tcp_external", false);
}

/// (4) The same as the unprivileged user.
#[test]
fn external_peer_as_unprivileged_user() {
    external_cycles("tcp_external_unpriv", true);
}

/// (4') The client started outside stasis and checkpointed with `checkpoint
/// --pid P --dir D`: refused by default (fd and address named, the client
/// unharmed), accepted with --tcp-external=reset (the client unharmed), and
/// with --kill --tcp-external=reset it is killed; `stasis restart D`
/// brings it back, it sees the reset and reconnects; one more cycle through
/// the restarted supervisor.
#[test]
fn external_peer_checkpoint_by_pid() {
    let w = Work::new("tcp_external_pid");
    let srv = EchoServer::start();
    let mut cmd = Command::new(prog("tcpclient"));
    cmd.arg(srv.port.to_string())
        .current_dir(&w.dir)
        .process_group(0);
    let mut app = w.spawn_io("direct", cmd, Stdio::null(), true);
    let ready = app.wait_ready();
    let fd = field_num(&ready, "fd") as i64;
    app.wait_tick(3, T_READY);
    let pid = app.pid().to_string();
    let ck = w.ck.to_str().unwrap().to_string();
    let by_pid = |label: &str, extra: &[&str]| {
        let mut a: Vec<&OsStr> = vec![
            "checkpoint".as_ref(),
            "--pid".as_ref(),
            pid.as_ref(),
            "--dir".as_ref(),
            ck.as_ref(),
        ];
        a.extend(extra.iter().map(|x| OsStr::new(*x)));
        w.stasis(label, &a)
    };
    let before = srv.msgs();
    let r = by_pid("ckpt-pid", &[]);
    eprintln!("checkpoint --pid: {}", r.stderr.trim());
    assert!(!r.status.success(), "checkpoint --pid succeeded: {r}");
    assert!(
        r.stderr.contains(&format!("127.0.0.1:{}", srv.port)) && mentions_number(&r.stderr, fd),
        "the error does not name the fd {fd} and 127.0.0.1:{}: {r}",
        srv.port
    );
    assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
    app.wait_more_ticks(5, T_READY);
    srv.wait_msgs_above(before + 3, "after the refused checkpoint --pid");
    let r = by_pid("ckpt-pid-reset", &["--tcp-external=reset"]);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    check_reset_image(
        &w,
        &ready,
        &fields(&ready)["local"],
        srv.port,
        "checkpoint --pid --tcp-external=reset",
    );
    let before = srv.msgs();
    app.wait_more_ticks(5, T_READY);
    srv.wait_msgs_above(before + 3, "after checkpoint --pid --tcp-external=reset");
    assert_eq!(
        srv.conns(),
        1,
        "a checkpoint without --kill disturbed the connection"
    );
    let r = by_pid("ckpt-pid-kill", &["--kill", "--tcp-external=reset"]);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    let st = app.wait(T_CMD);
    assert!(
        st.signal().is_some(),
        "the client should have been killed by checkpoint --kill, got {}",
        status_str(&st)
    );
    let mut s = Session::from_proc(&w, app);
    s.restart(Probe::Ticks);
    assert_reset_seen(s.cur(), &srv, 1, "restart after checkpoint --pid --kill");
    let r = checkpoint_with(&w, "ckpt-kill-reset", &["--kill", "--tcp-external=reset"]);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    s.restart(Probe::Ticks);
    assert_reset_seen(s.cur(), &srv, 2, "second restart");
    let (ok, _) = finish_checked(&mut s, &["msgs"]);
    assert_eq!(field_num(&ok, "resets"), 2, "{ok}");
}

// ---------------------------------------------------------------------------
// 5: the port is taken at restart
// ---------------------------------------------------------------------------

/// Bind 127.0.0.1:port (SO_REUSEADDR, as std does: connections of the killed
/// job in TIME_WAIT do not prevent it) and listen.
fn take_port(port: u16) -> TcpListener {
    let t0 = Instant::now();
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return l,
            Err(e) => assert!(
                t0.elapsed() < T_CMD,
                "cannot take 127.0.0.1:{port} after the checkpoint --kill: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_taken_cycles(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["tcppair"]);
    let mut rng = Rng::new(name);
    let mut s = Session::start(&w, &[exes[0].as_os_str(), "echo".as_ref(), "4".as_ref()]);
    let ready = s.cur().lines()[0].clone();
    let port = field_num(&ready, "port") as u16;
    s.cur().wait_tick(3, T_READY);
    rng.sleep_ms(20, 300);
    w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(3, T_READY);
    rng.sleep_ms(20, 300);
    s.checkpoint_kill();
    // another program takes the listener's port
    let blocker = take_port(port);
    let mut p = w.restart("restart-taken");
    let st = p.wait(T_CMD);
    let err = p.stderr();
    eprintln!(
        "{name}: restart with 127.0.0.1:{port} taken: {}",
        err.trim()
    );
    assert!(
        !st.success() && st.code() != Some(EXIT_CHECKPOINTED),
        "restart with the port taken ended with {}\n{}",
        status_str(&st),
        p.diag()
    );
    assert!(
        mentions_number(&err, port as i64),
        "the error does not name the port {port}\n{}",
        p.diag()
    );
    assert!(
        ticks(&p.stdout()).is_empty(),
        "the program ran during the failed restart\n{}",
        p.diag()
    );
    if let Err(pids) = wait_no_procs_in(&w.dir, T_CMD) {
        panic!(
            "processes left after the failed restart:\n{}",
            describe_procs(&pids)
        );
    }
    // the checkpoint is intact: with the port free again, restart works
    drop(blocker);
    s.restart(Probe::Ticks);
    assert_user(&w, uid);
    wait_field_advance(s.cur(), "msgs", "after the restore");
    rng.sleep_ms(20, 300);
    s.cycle(Probe::Ticks);
    let (ok, last) = finish_checked(&mut s, &["msgs"]);
    assert_eq!(field_num(&ok, "msgs"), last["msgs"] + 3, "{ok}");
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (5) The echo pair (listener on 127.0.0.1:PORT in the child): after a
/// checkpoint and a checkpoint --kill the test listens on 127.0.0.1:PORT
/// itself. Proves: `stasis restart` then fails (non-zero, not 75) with an
/// error naming the port, before the program runs, and leaves no process
/// behind; once the port is free again the same checkpoint restarts, the
/// pair goes on through another cycle with every message echoed exactly.
#[test]
fn restart_fails_cleanly_when_port_is_taken() {
    port_taken_cycles("tcp_port_taken", false);
}

/// (5) The same as the unprivileged user.
#[test]
fn restart_port_taken_as_unprivileged_user() {
    port_taken_cycles("tcp_port_taken_unpriv", true);
}

// ---------------------------------------------------------------------------
// Raw and packet sockets: refused
// ---------------------------------------------------------------------------

/// A checkpoint (by `args`) is refused with an error naming `fd`, nothing is
/// published, and `p` keeps ticking.
fn assert_refused_fd(w: &Work, p: &mut Proc, r: CmdOut, fd: i64, what: &str) {
    eprintln!("{what}: {}", r.stderr.trim());
    assert!(!r.status.success(), "{what}: checkpoint succeeded: {r}");
    assert!(
        mentions_number(&r.stderr, fd),
        "{what}: the error does not name the fd {fd}: {r}"
    );
    assert!(w.checkpoints().is_empty(), "{what}: {:?}", w.checkpoints());
    p.wait_more_ticks(5, T_READY);
    assert!(p.running(), "{what}: the program died\n{}", p.diag());
}

/// (6) Raw IPv4 and IPv6 sockets and a packet socket (they need CAP_NET_RAW
/// in the host network namespace: held by a root process started outside
/// stasis, checkpointed with `checkpoint --pid`), and an ICMP datagram socket
/// where net.ipv4.ping_group_range allows one; each kind also under `stasis
/// run` where the job can create it. Proves: checkpoint and checkpoint --kill
/// are refused with an error naming the fd, nothing is published, and the
/// program keeps running and finishes with the socket intact.
#[test]
fn raw_and_packet_sockets_are_refused() {
    for kind in ["raw", "raw6", "packet", "icmp"] {
        // outside stasis, by pid
        let w = Work::new(&format!("rawsock_{kind}"));
        let mut cmd = Command::new(prog("rawsock"));
        cmd.arg(kind).current_dir(&w.dir).process_group(0);
        let mut app = w.spawn("direct", cmd, Stdio::null());
        let first = app.wait_line("`ready` or `unavailable`", T_READY, |l| {
            l.starts_with("ready") || l.starts_with("unavailable")
        });
        if first.starts_with("unavailable") {
            eprintln!("rawsock {kind}: cannot be created outside stasis here: {first}");
        } else {
            let fd = field_num(&first, "fd") as i64;
            app.wait_tick(3, T_READY);
            for kill in [false, true] {
                let r = common::cycles::checkpoint_pid(&w, app.pid(), kill);
                assert_refused_fd(&w, &mut app, r, fd, &format!("{kind} --pid (kill={kill})"));
            }
            w.go();
            app.expect_exit(0, T_CMD);
            let last = app.lines().last().cloned().unwrap_or_default();
            assert!(last.starts_with("OK"), "{kind}: {last}");
        }
        drop(app);
        drop(w);
        // under stasis run
        let w = Work::new(&format!("rawsock_run_{kind}"));
        let mut p = w.run("run", &[prog("rawsock").as_os_str(), kind.as_ref()]);
        let first = p.wait_line("`ready` or `unavailable`", T_READY, |l| {
            l.starts_with("ready") || l.starts_with("unavailable")
        });
        if first.starts_with("unavailable") {
            eprintln!("rawsock {kind}: cannot be created under stasis run: {first}");
            p.expect_exit(0, T_CMD);
            continue;
        }
        let fd = field_num(&first, "fd") as i64;
        p.wait_tick(3, T_READY);
        for kill in [false, true] {
            let r = w.checkpoint(kill);
            assert_refused_fd(
                &w,
                &mut p,
                r,
                fd,
                &format!("{kind} under run (kill={kill})"),
            );
        }
        let mut s = Session::from_proc(&w, p);
        s.finish();
    }
}

// ---------------------------------------------------------------------------
// 7: redis (redis-server + redisclient.c in one job)
// ---------------------------------------------------------------------------

fn redis_server() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    })
}

/// Minimal RESP client: send a command, read one reply line (a bulk reply's
/// content for `$`).
fn resp(c: &mut TcpStream, rd: &mut std::io::BufReader<TcpStream>, args: &[&str]) -> String {
    use std::io::BufRead;
    let mut m = format!("*{}\r\n", args.len());
    for a in args {
        m.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    c.write_all(m.as_bytes()).unwrap();
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    let line = line.trim_end().to_string();
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.parse().unwrap();
        if n < 0 {
            return "(nil)".into();
        }
        let mut b = vec![0u8; n as usize + 2];
        rd.read_exact(&mut b).unwrap();
        return String::from_utf8_lossy(&b[..n as usize]).into_owned();
    }
    line
}

/// From outside the job: every key listed in `acked` (written by the client
/// once redis acknowledged it) is readable with its value; then QUIT and
/// wait for redis to close the connection (no connection from outside may
/// be open at the next checkpoint).
fn check_acked_from_outside(w: &Work, port: u16, what: &str) -> usize {
    let acked: Vec<u64> = complete_lines(&w.read("acked"))
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("{what}: cannot connect to redis on 127.0.0.1:{port}: {e}"));
    c.set_read_timeout(Some(T_CMD)).unwrap();
    let mut rd = std::io::BufReader::new(c.try_clone().unwrap());
    for (i, k) in acked.iter().enumerate() {
        assert_eq!(*k, i as u64, "{what}: line {i} of `acked` is {k}");
        let v = resp(&mut c, &mut rd, &["GET", &format!("key:{k}")]);
        assert!(
            v.starts_with(&format!("v{k}-")),
            "{what}: acknowledged key:{k} reads {v:?}"
        );
    }
    assert_eq!(resp(&mut c, &mut rd, &["QUIT"]), "+OK", "{what}: QUIT");
    let mut rest = vec![];
    let _ = rd.read_to_end(&mut rest);
    acked.len()
}

fn redis_cycles(name: &str, as_user: bool) {
    let Some(server) = redis_server() else {
        // CI installs it (scripts/test.sh): there a missing server is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "{name}: no redis-server in PATH under CI (scripts/test.sh installs it)"
        );
        eprintln!("{name}: SKIPPED: no redis-server in PATH (scripts/test.sh installs it)");
        return;
    };
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["redisclient"]);
    let mut rng = Rng::new(name);
    let port = free_port();
    let ps = port.to_string();
    let dir = w.dir.to_str().unwrap().to_string();
    let log = w.path("redis.log").to_str().unwrap().to_string();
    let args = [
        exes[0].to_str().unwrap(),
        &ps,
        server.to_str().unwrap(),
        "--port",
        &ps,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir,
        "--logfile",
        &log,
    ];
    let argv: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let mut s = Session::start(&w, &argv);
    let ready = s.cur().lines()[0].clone();
    let redis = field_num(&ready, "redis") as i32;
    let cfd = field_num(&ready, "fd") as i64;
    s.cur().wait_tick(3, T_READY);
    assert_user(&w, uid);
    let mut seen = vec![];
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        &["acked"],
        |_, _| {},
        |meta, i, kill| {
            let what = format!("checkpoint #{i} (kill={kill})");
            let (root, kids) = image_tree(meta, 2, &what);
            assert_eq!(kids, [redis], "{what}: children of {root}");
            let procs = image_procs(meta);
            let socks = inet_sockets(meta);
            let laddr = loopback(4, port as u64);
            let listeners: Vec<&Value> = inet_fds(procs[&redis])
                .iter()
                .map(|(_, id)| socks[id])
                .filter(|s| s["state"] == "listening")
                .collect();
            assert_eq!(
                listeners.len(),
                1,
                "{what}: redis's listeners {listeners:?}"
            );
            assert_sock(
                listeners[0],
                "ipv4",
                "tcp",
                "listening",
                Some(&laddr),
                &what,
            );
            let c = inet_of(meta, procs[&root], cfd, &what);
            assert_eq!(
                text(c.1, "remote"),
                laddr,
                "{what}: the client's socket {}",
                c.1
            );
            let peer = unum(c.1, "peer");
            assert!(
                inet_fds(procs[&redis]).iter().any(|(_, id)| *id == peer),
                "{what}: the client's peer {peer} is not a socket of redis"
            );
            assert_tcp_peers(c, (peer, socks[&peer]), &what);
        },
        |s| {
            assert_user(s.w, uid);
            seen.push(check_acked_from_outside(s.w, port, "after the restore"));
        },
    );
    let (ok, last) = finish_checked(&mut s, &["acked"]);
    assert_eq!(field_num(&ok, "acked"), last["acked"], "{ok}");
    assert_eq!(
        complete_lines(&w.read("acked")).len() as u64,
        last["acked"],
        "lines in `acked`"
    );
    eprintln!(
        "{name}: acknowledged writes checked from outside after the restores: {seen:?}; {ok}"
    );
    elapsed(t0, name);
}

/// (7) redis-server on a free 127.0.0.1 port (no persistence: --save "",
/// --appendonly no) and a client in the same job (redisclient.c: the server
/// is its child) writing 10 keys and an INCR per tick and recording each
/// acknowledged write in a file; 2 checkpoints without --kill, 2 checkpoint
/// --kill/restart cycles. Proves: the images hold redis's listener and the
/// client's connection with redis's end as its peer; after each restore
/// every acknowledged write is readable from outside the job (a fresh
/// connection from the test), the client goes on with the counter exact
/// (INCR replies follow the writes one by one), and at the end every key,
/// the counter and DBSIZE are right and redis shuts down cleanly. Skipped
/// when redis-server is not installed.
#[test]
fn redis_server_and_client() {
    redis_cycles("redis", false);
}

/// (7) The same as the unprivileged user.
#[test]
fn redis_as_unprivileged_user() {
    redis_cycles("redis_unpriv", true);
}

// ---------------------------------------------------------------------------
// 8: python asyncio server and clients (asyncecho.py)
// ---------------------------------------------------------------------------

const ASYNC_CLIENTS: usize = 3;

fn asyncio_cycles(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, _, uid) = work(name, as_user, &[]);
    let mut rng = Rng::new(name);
    let script = w.path("asyncecho.py");
    fs::write(&script, include_str!("progs/asyncecho.py")).unwrap();
    let n = ASYNC_CLIENTS.to_string();
    let mut s = Session::start(
        &w,
        &[python(), "-u", script.to_str().unwrap(), "server", &n],
    );
    let ready = s.cur().lines()[0].clone();
    let port = field_num(&ready, "port");
    let clients: Vec<i32> = fields(&ready)["clients"]
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(clients.len(), ASYNC_CLIENTS, "{ready}");
    // every client has started (python takes a while) and been served
    s.cur()
        .wait_line("a tick with every client served", T_READY, |l| {
            parse_tick(l).is_some_and(|(_, rest)| {
                let f = tick_fields(&rest);
                (0..ASYNC_CLIENTS).all(|i| f.get(&format!("c{i}")).is_some_and(|c| *c > 0))
            })
        });
    assert_user(&w, uid);
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        &["served"],
        |_, _| {},
        |meta, i, kill| {
            let what = format!("checkpoint #{i} (kill={kill})");
            let (root, mut kids) = image_tree(meta, 1 + ASYNC_CLIENTS, &what);
            kids.sort();
            let mut want = clients.clone();
            want.sort();
            assert_eq!(kids, want, "{what}: children of {root}");
            let procs = image_procs(meta);
            let socks = inet_sockets(meta);
            let laddr = loopback(4, port);
            let server: Vec<(u64, &Value)> = inet_fds(procs[&root])
                .iter()
                .map(|(_, id)| (*id, socks[id]))
                .collect();
            let listeners = server
                .iter()
                .filter(|(_, s)| s["state"] == "listening")
                .count();
            assert_eq!(listeners, 1, "{what}: the server's listeners: {server:?}");
            for (_, s) in &server {
                if s["state"] == "listening" {
                    assert_sock(s, "ipv4", "tcp", "listening", Some(&laddr), &what);
                }
            }
            for c in &clients {
                let cs = inet_fds(procs[c]);
                assert_eq!(cs.len(), 1, "{what}: client {c}'s IP sockets {cs:?}");
                let x = (cs[0].1, socks[&cs[0].1]);
                assert_eq!(text(x.1, "remote"), laddr, "{what}: client {c}: {}", x.1);
                let peer = unum(x.1, "peer");
                assert!(
                    server.iter().any(|(id, _)| *id == peer),
                    "{what}: client {c}'s peer {peer} is not a socket of the server"
                );
                assert_tcp_peers(x, (peer, socks[&peer]), &format!("{what}: client {c}"));
            }
        },
        |s| assert_user(s.w, uid),
    );
    let (ok, last) = finish_checked(&mut s, &["served"]);
    assert!(field_num(&ok, "served") >= last["served"], "{ok}");
    assert_eq!(field_num(&ok, "clients"), ASYNC_CLIENTS as u64, "{ok}");
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (8) A python3 asyncio echo server (asyncio.start_server on 127.0.0.1)
/// that starts 3 client processes (asyncio subprocesses), each pipelining 4
/// messages with sequence numbers; 2 checkpoints without --kill, 2
/// checkpoint --kill/restart cycles. Proves: the images hold the 4
/// processes, the listener and each client's connection with its peer in
/// the server; after each restore every client goes on (the server's count
/// advances), the server sees every client's sequence numbers without a gap
/// or a repeat, every echo is checked by its client, and at the end each
/// client's count of messages sent equals the server's count for it and
/// every client exits 0.
#[test]
fn python_asyncio_server_and_clients() {
    asyncio_cycles("asyncio", false);
}

/// (8) The same as the unprivileged user.
#[test]
fn python_asyncio_as_unprivileged_user() {
    asyncio_cycles("asyncio_unpriv", true);
}
