//! Local IPC across checkpoint/restart: UNIX sockets (socketpairs of every
//! type with data queued both ways, named and abstract listeners with
//! accepted, pending and half-closed connections, a listener bound to a
//! relative path, a parent/child pair, and the refusals: a peer outside the
//! checkpoint, fds in flight), an epoll loop over eventfd/timerfd/signalfd/
//! pipe and periodic timers caught expired, shared memory (MAP_SHARED
//! anonymous with a process-shared semaphore, memfd, POSIX shm, a sparse
//! region), System V shm/sem/msg, FIFOs, python's multiprocessing.Pool, and
//! the socketpair program as an unprivileged user.
//!
//! Every test takes checkpoints without --kill at random moments while the
//! application runs (seed printed; STASIS_TEST_SEED repeats it), then at least
//! two checkpoint --kill / restart cycles, checks each image with `inspect
//! --json`, and lets the program check its own state after `go`.
mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `key=A,B` of a line as numbers.
fn field_list(line: &str, key: &str) -> Vec<i64> {
    fields(line)
        .get(key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect()
}

fn unum(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no unsigned integer {key} in {v}"))
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array {key} in inspect --json: {v}"))
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

/// The `kind` object of fd `fd` of process `p`.
fn fd_kind<'a>(p: &'a Value, fd: i64, what: &str) -> &'a Value {
    arr(p, "fds")
        .iter()
        .find(|f| f["fd"].as_i64() == Some(fd))
        .map(|f| &f["kind"])
        .unwrap_or_else(|| panic!("{what}: fd {fd} missing from process {}", p["pid"]))
}

/// Every fd kind of process `p` of type `ty`.
fn fds_of_type<'a>(p: &'a Value, ty: &str) -> Vec<(i64, &'a Value)> {
    arr(p, "fds")
        .iter()
        .filter(|f| f["kind"]["type"] == ty)
        .map(|f| (f["fd"].as_i64().unwrap(), &f["kind"]))
        .collect()
}

/// id -> socket object of the image.
fn image_sockets(meta: &Value) -> BTreeMap<u64, &Value> {
    arr(meta, "sockets")
        .iter()
        .map(|s| (unum(s, "id"), s))
        .collect()
}

/// The socket behind fd `fd` of process `p`.
fn sock_of<'a>(
    socks: &BTreeMap<u64, &'a Value>,
    p: &Value,
    fd: i64,
    what: &str,
) -> (u64, &'a Value) {
    let k = fd_kind(p, fd, what);
    assert_eq!(
        k["type"], "unix_socket",
        "{what}: fd {fd} is not a UNIX socket: {k}"
    );
    let id = unum(k, "sock");
    let s = socks
        .get(&id)
        .unwrap_or_else(|| panic!("{what}: fd {fd} refers to socket {id} missing from `sockets`"));
    (id, s)
}

/// Lengths of the messages queued on socket `s`.
fn queued(s: &Value) -> Vec<u64> {
    s["messages"]
        .as_array()
        .map(|m| m.iter().map(|x| x.as_u64().unwrap()).collect())
        .unwrap_or_default()
}

/// First `s` such that `got` equals `f(s), f(s+1), ...` (a window of
/// consecutive messages), searching `s` in 0..limit.
fn find_window<T: PartialEq>(got: &[T], limit: u64, f: impl Fn(u64) -> T) -> Option<u64> {
    (0..limit).find(|&s| got.iter().enumerate().all(|(i, g)| *g == f(s + i as u64)))
}

/// The usual schedule: `plain` checkpoints without --kill while the program
/// runs, then `kills` checkpoint --kill / restart cycles, each at a random
/// moment. `check(meta, i, kill)` inspects each image; `after_kill(i)` runs
/// between a checkpoint --kill and its restart, `after_restart` once the
/// restored program ticks again; every restored phase must advance tick
/// field `key` (if not empty).
#[allow(clippy::too_many_arguments)]
fn schedule(
    s: &mut Session,
    rng: &mut Rng,
    plain: usize,
    kills: usize,
    key: &str,
    mut check: impl FnMut(&Value, usize, bool),
    mut after_kill: impl FnMut(usize),
    mut after_restart: impl FnMut(&mut Session),
) {
    let w = s.w;
    for i in 0..plain + kills {
        rng.sleep_ms(20, 400);
        let kill = i >= plain;
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        check(&w.inspect_json(), i, kill);
        if kill {
            after_kill(i);
            s.restart(Probe::Ticks);
            if !key.is_empty() {
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

// ---------------------------------------------------------------------------
// 1: UNIX socketpairs, parent/child pair
// ---------------------------------------------------------------------------

const SOCK_TYPES: [(&str, i64); 3] = [("stream", 1), ("dgram", 2), ("seqpacket", 5)];
/// Messages kept queued per direction by sockpair.c and unixlisten.c.
const QUEUED: usize = 5;

/// msg_len() of sockpair.c / unixlisten.c.
fn msg_len(ty: &str, s: u64) -> u64 {
    match ty {
        "stream" => 1 + (s * 37) % 300,
        "dgram" => {
            if s % 4 == 1 {
                0
            } else {
                1 + (s * 53) % 500
            }
        }
        _ => 1 + (s * 71) % 700,
    }
}

/// The queue of `sock` holds 4 or 5 consecutive messages of type `ty` (a
/// stream: as many bytes as 4 or 5 consecutive chunks), with their lengths
/// (boundaries); a datagram queue holds a zero-length datagram.
fn check_queue(sock: &Value, ty: &str, what: &str) {
    let q = queued(sock);
    if ty == "stream" {
        let total: u64 = q.iter().sum();
        let ok = [QUEUED - 1, QUEUED].iter().any(|&k| {
            (0..200_000u64).any(|s| (s..s + k as u64).map(|x| msg_len(ty, x)).sum::<u64>() == total)
        });
        assert!(
            ok,
            "{what}: {total} bytes queued ({q:?}) are not 4 or 5 whole chunks"
        );
    } else {
        assert!(
            q.len() == QUEUED || q.len() == QUEUED - 1,
            "{what}: {} messages queued ({q:?}), expected {} or {QUEUED}",
            q.len(),
            QUEUED - 1
        );
        assert!(
            find_window(&q, 200_000, |s| msg_len(ty, s)).is_some(),
            "{what}: the queued message lengths {q:?} are not consecutive messages of {ty}"
        );
        if ty == "dgram" {
            assert!(
                q.contains(&0),
                "{what}: no zero-length datagram queued: {q:?}"
            );
        }
    }
}

/// Checks an image of sockpair.c (ready line `ready`): the parent and the
/// child; each pair's two sockets are connected to each other, of the right
/// type, with 4-5 messages queued each way; the parent/child sockets are
/// peers with 2 or 3 16-byte records in flight.
fn check_sockpair_image(meta: &Value, ready: &str, child: i32, what: &str) {
    let (root, kids) = image_tree(meta, 2, what);
    assert_eq!(kids, [child], "{what}: children of {root}");
    let procs = image_procs(meta);
    let parent = procs[&root];
    let socks = image_sockets(meta);
    for (ty, code) in SOCK_TYPES {
        let fds = field_list(ready, ty);
        let (ia, a) = sock_of(&socks, parent, fds[0], what);
        let (ib, b) = sock_of(&socks, parent, fds[1], what);
        for (x, y, iy) in [(a, b, ib), (b, a, ia)] {
            assert_eq!(num(x, "sock_type"), code, "{what}: {ty} socket {x}");
            assert_eq!(x["state"], "connected", "{what}: {ty} socket {x}");
            assert_eq!(unum(x, "peer"), iy, "{what}: {ty} socket's peer: {x} / {y}");
        }
        // receive queue of B: A -> B (dir 0); of A: B -> A (dir 1)
        check_queue(b, ty, &format!("{what}: {ty} A->B"));
        check_queue(a, ty, &format!("{what}: {ty} B->A"));
    }
    let (ip, p) = sock_of(&socks, parent, field_list(ready, "pc")[0], what);
    let ic = unum(p, "peer");
    let c = procs[&child];
    let cs = fds_of_type(c, "unix_socket");
    assert_eq!(
        cs.len(),
        1,
        "{what}: the child must hold exactly one socket: {cs:?}"
    );
    assert_eq!(
        unum(cs[0].1, "sock"),
        ic,
        "{what}: the child's socket is not the parent's peer"
    );
    assert_eq!(unum(socks[&ic], "peer"), ip, "{what}: parent/child peers");
    let flight: u64 = queued(p).iter().chain(queued(socks[&ic]).iter()).sum();
    assert!(
        flight == 32 || flight == 48,
        "{what}: {flight} bytes in flight between parent and child, expected 2 or 3 records of 16"
    );
}

fn sockpair_cycles(w: &Work, exe: &Path, name: &str, as_user: Option<u32>) {
    let t0 = Instant::now();
    let mut rng = Rng::new(name);
    let mut s = Session::start(w, &[exe]);
    let ready = s.cur().lines()[0].clone();
    let child = field_num(&ready, "child") as i32;
    s.cur().wait_tick(3, T_READY);
    if let Some(uid) = as_user {
        assert_tree_runs_as(w, exe, 2, uid);
    }
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        "pc",
        |meta, i, kill| {
            check_sockpair_image(
                meta,
                &ready,
                child,
                &format!("checkpoint #{i} (kill={kill})"),
            )
        },
        |_| {},
        |s| {
            if let Some(uid) = as_user {
                assert_tree_runs_as(s.w, exe, 2, uid);
            }
        },
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["msgs", "pc"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    // the drain at the end receives the 5 messages still queued per direction
    assert_eq!(
        field_num(&ok, "msgs"),
        last["msgs"] + 6 * QUEUED as u64,
        "{ok}: messages received in total"
    );
    assert_eq!(field_num(&ok, "pc"), last["pc"] + 3, "{ok}: answers");
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (1a) Socketpairs of the three types (SOCK_STREAM, SOCK_DGRAM,
/// SOCK_SEQPACKET), each with 4-5 messages queued in BOTH directions at every
/// moment (datagrams including zero-length ones), and a parent/child pair with
/// requests and answers in flight; 2 checkpoints while running, 2 checkpoint
/// --kill/restart cycles. Proves: every image holds the pairs connected to
/// each other with the queued messages' lengths (boundaries) of consecutive
/// messages, and the parent/child sockets as peers across processes; after
/// each restore every message arrives exactly once, in order, with its length
/// and content (the program drains exactly the messages still expected and
/// then finds the queues empty), the child keeps answering in order, and is
/// reaped with exit 0.
#[test]
fn socketpairs_with_data_queued_both_ways() {
    let w = Work::new("sockpair");
    sockpair_cycles(&w, &prog("sockpair"), "sockpair", None);
}

/// (7) The socketpair program as an unprivileged user (`stasis-test` via
/// setpriv when the tests run as root): the same checks, plus every process
/// (run, restarts, parent and child) runs as that user.
#[test]
fn socketpairs_as_unprivileged_user() {
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new("sockpair_unpriv");
    let bin = w.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog("sockpair"), &bin, "sockpair");
    w.give_to(uid, gid);
    w.prefix = prefix;
    sockpair_cycles(&w, &exe, "sockpair_unpriv", Some(uid));
}

// ---------------------------------------------------------------------------
// 1: named and abstract listeners
// ---------------------------------------------------------------------------

/// Checks an image of unixlisten.c.
fn check_listen_image(meta: &Value, ready: &str, dir: &Path, abs: &str, what: &str) {
    let (root, _) = image_tree(meta, 1, what);
    let procs = image_procs(meta);
    let p = procs[&root];
    let socks = image_sockets(meta);
    let fd = |k: &str| field_num(ready, k) as i64;
    let get = |k: &str| sock_of(&socks, p, fd(k), &format!("{what}: {k}"));
    let path = format!("{}/lsock", dir.display());
    let (il1, l1) = get("l1");
    let (il2, l2) = get("l2");
    for (l, name) in [(l1, path.clone()), (l2, format!("@{abs}"))] {
        assert_eq!(l["state"], "listening", "{what}: listener {l}");
        assert_eq!(l["name"], name.as_str(), "{what}: listener's name");
        assert_eq!(num(l, "sock_type"), 1, "{what}: listener {l}");
    }
    for (a, c, name) in [("a1", "c1", "path"), ("a2", "c2", "abstract")] {
        let (ia, sa) = get(a);
        let (ic, sc) = get(c);
        assert_eq!(
            unum(sa, "peer"),
            ic,
            "{what}: {name}: accepted/client peers"
        );
        assert_eq!(
            unum(sc, "peer"),
            ia,
            "{what}: {name}: client/accepted peers"
        );
        check_queue(sa, "stream", &format!("{what}: {name} client->accepted"));
        check_queue(sc, "stream", &format!("{what}: {name} accepted->client"));
    }
    // the half-closed connection
    let (_, s) = get("s");
    let (_, sa) = get("sa");
    assert!(
        unum(s, "shutdown") & 2 != 0,
        "{what}: S did shutdown(SHUT_WR), the image says shutdown={}",
        s["shutdown"]
    );
    assert_eq!(
        queued(sa).iter().sum::<u64>(),
        500,
        "{what}: bytes queued for SA (written by S before SHUT_WR)"
    );
    assert_eq!(
        queued(s).iter().sum::<u64>(),
        300,
        "{what}: bytes queued for S (written by SA)"
    );
    // connections not accepted yet
    for (pk, il) in [("p1", il1), ("p2", il2)] {
        let (_, ps) = get(pk);
        assert_eq!(
            unum(ps, "pending_on"),
            il,
            "{what}: {pk} is a pending connection to listener {il}: {ps}"
        );
    }
    // the named datagram socket and its client
    let (id, d) = get("d");
    let (_, e) = get("e");
    assert_eq!(
        d["name"],
        format!("{}/dsock", dir.display()).as_str(),
        "{what}: D"
    );
    assert_eq!(num(d, "sock_type"), 2, "{what}: D");
    assert_eq!(unum(e, "peer"), id, "{what}: E is connected to D");
    check_queue(d, "dgram", &format!("{what}: E->D"));
}

fn abstract_name(w: &Work) -> String {
    format!(
        "stasis-test-{}",
        w.dir.file_name().unwrap().to_string_lossy()
    )
}

/// (1b) A SOCK_STREAM listener bound to a path in the work dir and one in the
/// abstract namespace, each with an accepted connection carrying 4-5 chunks
/// each way and a connection not accepted yet, a half-closed connection
/// (shutdown(SHUT_WR) after 500 bytes, 300 bytes queued the other way) and a
/// named SOCK_DGRAM socket with datagrams queued by a connected client; 2
/// checkpoints while running, 2 checkpoint --kill/restart cycles. Proves: the
/// images record names, peers, pending connections (pending_on), the
/// shutdown bit and the queues; after the restores every chunk arrives
/// exactly once, getsockname/getpeername of the listeners, accepted and
/// client sockets still give the path / abstract name, the pending
/// connections are accepted only now (an answer reaches the client, no other
/// connection is pending), the half-closed peer reads its data then EOF while
/// the other direction works and a send fails with EPIPE, and new clients can
/// connect to both listeners.
#[test]
fn named_and_abstract_listeners() {
    let t0 = Instant::now();
    let w = Work::new("unixlisten");
    let mut rng = Rng::new("unixlisten");
    let abs = abstract_name(&w);
    let mut s = Session::start(
        &w,
        &[prog("unixlisten").as_os_str(), abs.as_ref(), "0".as_ref()],
    );
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    let dir = w.dir.clone();
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        "msgs",
        |meta, i, kill| {
            check_listen_image(
                meta,
                &ready,
                &dir,
                &abs,
                &format!("checkpoint #{i} (kill={kill})"),
            )
        },
        |_| {},
        |_| {},
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["msgs"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    assert_eq!(
        field_num(&ok, "msgs"),
        last["msgs"] + 5 * QUEUED as u64,
        "{ok}: chunks received in total"
    );
    eprintln!("unixlisten: {ok}");
    elapsed(t0, "unixlisten");
}

/// (1b') Like (1b) with data in the pending connections: the client of each
/// connection not accepted yet has sent 1000 / 700 bytes into it before the
/// checkpoint. Either stasis saves them (a checkpoint and a checkpoint
/// --kill/restart cycle; when the program accepts the connections after the
/// restore exactly these bytes are there), or it refuses both checkpoint and
/// checkpoint --kill with an error naming a pending client's fd, publishes
/// nothing and the program runs on unharmed (its final checks pass).
#[test]
fn pending_connection_with_data_kept_or_refused() {
    let w = Work::new("unixlisten_pdata");
    let abs = abstract_name(&w);
    let mut s = Session::start(
        &w,
        &[
            prog("unixlisten").as_os_str(),
            abs.as_ref(),
            "1000".as_ref(),
        ],
    );
    let ready = s.cur().lines()[0].clone();
    let pending = [
        field_num(&ready, "p1") as i64,
        field_num(&ready, "p2") as i64,
    ];
    s.cur().wait_tick(3, T_READY);
    let r = w.checkpoint(false);
    if r.status.success() {
        eprintln!(
            "unixlisten_pdata: checkpoint supported: {}",
            r.stderr.trim()
        );
        s.cur().wait_more_ticks(3, T_READY);
        s.cycle(Probe::Ticks);
    } else {
        let mut first = Some(r);
        for kill in [false, true] {
            let r = first.take().unwrap_or_else(|| w.checkpoint(true));
            eprintln!(
                "unixlisten_pdata (kill={kill}): refused: {}",
                r.stderr.trim()
            );
            assert!(
                !r.status.success(),
                "only the first checkpoint was refused: {r}"
            );
            assert!(
                pending.iter().any(|fd| mentions_number(&r.stderr, *fd)),
                "the error does not name a pending client's fd ({pending:?}): {r}"
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
    }
    let ok = s.finish();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("unixlisten_pdata: {ok}");
}

/// (1b'') A listener bound to a relative path ("rel.sock" in the program's
/// cwd, the work dir) with an accepted connection; a checkpoint while running
/// and 2 checkpoint --kill/restart cycles (restart is run from another
/// directory, as always in these tests). Proves: after the restores the
/// listener keeps its name and is reachable at <work dir>/rel.sock (new
/// clients connecting by the absolute and the relative path are accepted),
/// and no socket file appears in the directory stasis restart ran in.
#[test]
fn listener_bound_to_relative_path() {
    let t0 = Instant::now();
    let w = Work::new("relsock");
    let mut rng = Rng::new("relsock");
    let mut s = Session::start(&w, &[prog("relsock")]);
    s.cur().wait_tick(3, T_READY);
    let stray = w.path("elsewhere/rel.sock");
    schedule(
        &mut s,
        &mut rng,
        1,
        2,
        "",
        |meta, i, _| {
            let l = arr(meta, "sockets")
                .iter()
                .find(|x| x["state"] == "listening")
                .unwrap_or_else(|| panic!("checkpoint #{i}: no listener in {meta}"));
            eprintln!(
                "relsock: checkpoint #{i}: the listener's name is {}",
                l["name"]
            );
        },
        |_| {},
        |_| {
            assert!(
                !stray.exists(),
                "the restore created {} (a relative socket name bound in the restart's cwd)",
                stray.display()
            )
        },
    );
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("relsock: {ok}");
    elapsed(t0, "relsock");
}

// ---------------------------------------------------------------------------
// 1: refusals
// ---------------------------------------------------------------------------

/// Read what is available on `s` within `timeout`.
fn read_some(s: &mut std::os::unix::net::UnixStream, timeout: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 65536];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(_) => vec![],
    }
}

/// sockrefuse.c `kind`: checkpoint and checkpoint --kill are refused with an
/// error containing `word` and naming the socket's fd, nothing is published,
/// the app keeps ticking (and `alive(t)` holds, `t` being the app's last
/// tick after the refusal); after `release` two checkpoint --kill/restart
/// cycles work with exact continuity.
fn refused(
    w: &Work,
    kind: &str,
    args: &[&str],
    word: &str,
    mut alive: impl FnMut(u64),
    after_release: impl FnOnce(),
) {
    let t0 = Instant::now();
    let mut argv = vec![prog("sockrefuse").into_os_string(), kind.into()];
    argv.extend(args.iter().map(|a| a.into()));
    let mut s = Session::start(w, &argv);
    let ready = s.cur().lines()[0].clone();
    let fds = field_list(&ready, "fds");
    let t = s.cur().wait_tick(3, T_READY);
    alive(t);
    for kill in [false, true] {
        let before = s.cur().last_tick().unwrap();
        let r = w.checkpoint(kill);
        eprintln!("{kind} (kill={kill}): {}", r.stderr.trim());
        assert!(!r.status.success(), "checkpoint succeeded: {r}");
        assert!(
            r.stderr.contains(word),
            "the error does not mention {word:?}: {r}"
        );
        assert!(
            fds.iter().any(|fd| mentions_number(&r.stderr, *fd)),
            "the error does not name the fd ({fds:?}): {r}"
        );
        assert!(
            w.checkpoints().is_empty(),
            "a checkpoint was published: {:?}",
            w.checkpoints()
        );
        let after = s.cur().wait_more_ticks(5, T_READY);
        assert!(after > before);
        assert!(
            s.cur().running(),
            "stasis run exited after a refused checkpoint\n{}",
            s.diag()
        );
        alive(after);
    }
    fs::write(w.path("release"), b"").unwrap();
    s.cur()
        .wait_line("`released`", T_READY, |l| l == "released");
    after_release();
    s.cur().wait_more_ticks(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(ok, format!("OK ticks={} released=1", t.last().unwrap() + 1));
    elapsed(t0, kind);
}

/// (1c) The app connects to a UNIX socket the test listens on (a peer outside
/// the checkpoint): checkpoint and checkpoint --kill fail with an error
/// saying "outside" and naming the fd; nothing is published; the app keeps
/// running and its connection keeps working (the test receives new `tick`
/// lines through it after each refusal); after the app closes it (the test
/// reads `bye` then EOF), two checkpoint --kill/restart cycles work.
#[test]
fn socket_connected_outside_is_refused() {
    let w = Work::new("sock_outside");
    let path = w.path("outside.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let conn: std::cell::RefCell<Option<std::os::unix::net::UnixStream>> = Default::default();
    let alive = |t: u64| {
        let mut c = conn.borrow_mut();
        if c.is_none() {
            let (st, _) = listener.accept().expect("the app did not connect");
            st.set_nonblocking(false).unwrap();
            *c = Some(st);
        }
        let st = c.as_mut().unwrap();
        // The app sends `tick N` through the connection before printing it:
        // a tick above `t` was sent after the refusal.
        let mut got = String::new();
        let t0 = Instant::now();
        while !ticks(&got).iter().any(|n| *n > t) {
            assert!(
                t0.elapsed() < T_READY,
                "no tick above {t} from the app through the outside connection: {:?}",
                &got[got.len().saturating_sub(200)..]
            );
            got.push_str(&String::from_utf8_lossy(&read_some(
                st,
                Duration::from_millis(200),
            )));
        }
    };
    refused(
        &w,
        "outside",
        &[path.to_str().unwrap()],
        "outside",
        alive,
        || {
            let mut c = conn.borrow_mut();
            let st = c.as_mut().unwrap();
            st.set_read_timeout(Some(T_READY)).unwrap();
            let mut rest = vec![];
            st.read_to_end(&mut rest).unwrap();
            let rest = String::from_utf8_lossy(&rest);
            assert!(
                rest.ends_with("bye\n"),
                "the app's last words through the connection: {:?}",
                &rest[rest.len().saturating_sub(40)..]
            );
        },
    );
}

/// (1d) The app listens on a path and the test connects to it without the app
/// accepting (a pending connection from outside the checkpoint): refused with
/// "outside", the app keeps running; on release the app accepts the very
/// connection (reads the test's `x`, answers `y`), then two checkpoint
/// --kill/restart cycles work.
#[test]
fn pending_connection_from_outside_is_refused() {
    let w = Work::new("sock_pending_out");
    let conn: std::cell::RefCell<Option<std::os::unix::net::UnixStream>> = Default::default();
    let alive = |_| {
        let mut c = conn.borrow_mut();
        if c.is_none() {
            let mut st = std::os::unix::net::UnixStream::connect(w.path("plisten")).unwrap();
            st.write_all(b"x").unwrap();
            *c = Some(st);
        }
    };
    refused(&w, "pending", &[], "outside", alive, || {
        let mut c = conn.borrow_mut();
        let st = c.as_mut().unwrap();
        assert_eq!(
            read_some(st, T_READY),
            b"y",
            "the app did not answer on the accepted connection"
        );
    });
}

/// (1e) A file descriptor of a kind stasis cannot save (a netlink socket) sent with
/// SCM_RIGHTS over a socketpair and not received yet: checkpoint and checkpoint
/// --kill fail with an error mentioning "SCM_RIGHTS" and naming the fd; the app keeps
/// running; on release it receives the fd and checks it is still the netlink socket;
/// then two checkpoint --kill/restart cycles work. (Descriptors in flight of kinds
/// stasis saves come back: unixsock.rs.)
#[test]
fn fd_in_flight_is_refused() {
    let w = Work::new("sock_scm");
    refused(&w, "scm", &[], "SCM_RIGHTS", |_| {}, || {});
}

// ---------------------------------------------------------------------------
// 2: epoll loop over eventfd, timerfd, signalfd and a pipe
// ---------------------------------------------------------------------------

const EPOLL_TAG: u64 = 0x5354000000000000;
const EPOLLET: u64 = 1 << 31;
const EPOLLERR: u64 = 0x8;
const EPOLLHUP: u64 = 0x10;

/// Checks an image of evloop.c; returns the eventfd's counter.
fn check_evloop_image(meta: &Value, ready: &str, what: &str) -> u64 {
    let (root, kids) = image_tree(meta, 2, what);
    assert_eq!(
        kids,
        [field_num(ready, "child") as i32],
        "{what}: children of {root}"
    );
    let procs = image_procs(meta);
    let p = procs[&root];
    let fd = |k: &str| field_num(ready, k) as i64;
    let efd = fd_kind(p, fd("efd"), what);
    assert_eq!(efd["type"], "event_fd", "{what}: efd {efd}");
    assert_eq!(efd["semaphore"], false, "{what}: efd {efd}");
    let tfd = fd_kind(p, fd("tfd"), what);
    assert_eq!(tfd["type"], "timer_fd", "{what}: tfd {tfd}");
    assert_eq!(
        num(tfd, "clockid"),
        1,
        "{what}: CLOCK_MONOTONIC timer {tfd}"
    );
    assert_eq!(
        unum(tfd, "interval_ns"),
        10_000_000,
        "{what}: the timer's interval {tfd}"
    );
    let sfd = fd_kind(p, fd("sfd"), what);
    assert_eq!(sfd["type"], "signal_fd", "{what}: sfd {sfd}");
    assert!(
        unum(sfd, "mask") & (1 << (libc::SIGUSR1 - 1)) != 0,
        "{what}: the signalfd's mask lacks SIGUSR1: {sfd}"
    );
    // the pipe: read end here, write end in the child, >= 3 records in flight
    let pk = fd_kind(p, fd("pipe"), what);
    assert_eq!(pk["type"], "pipe", "{what}: {pk}");
    assert_eq!(pk["write"], false, "{what}: {pk}");
    let pipe = unum(pk, "pipe");
    let c = procs[&kids[0]];
    assert!(
        fds_of_type(c, "pipe")
            .iter()
            .any(|(_, k)| unum(k, "pipe") == pipe && k["write"] == true),
        "{what}: the child does not hold the pipe's write end"
    );
    let len = arr(meta, "pipes")
        .iter()
        .find(|x| unum(x, "id") == pipe)
        .map(|x| unum(x, "len"))
        .unwrap_or_else(|| panic!("{what}: pipe {pipe} missing from `pipes`"));
    assert!(
        len >= 48 && len % 16 == 0,
        "{what}: {len} bytes in the pipe, expected 3 or more whole 16-byte records"
    );
    // epoll: registrations keyed by the program's fd numbers, with its data
    let ep = fd_kind(p, fd("ep"), what);
    assert_eq!(ep["type"], "epoll", "{what}: {ep}");
    let items: BTreeMap<i64, &Value> = arr(ep, "items")
        .iter()
        .map(|it| (num(it, "fd"), it))
        .collect();
    let mut want: Vec<(&str, u64)> = vec![("efd", 1), ("tfd", 2), ("pipe", 3)];
    // sfd is removed and added back now and then: it may be caught missing
    if items.contains_key(&fd("sfd")) {
        want.push(("sfd", 4));
    }
    assert_eq!(
        items.len(),
        want.len(),
        "{what}: epoll items {items:?}, expected fds of {want:?}"
    );
    for (k, kind) in want {
        let it = items
            .get(&fd(k))
            .unwrap_or_else(|| panic!("{what}: {k} (fd {}) not registered: {ep}", fd(k)));
        assert_eq!(
            unum(it, "data"),
            EPOLL_TAG | kind << 16 | fd(k) as u64,
            "{what}: data of the {k} registration"
        );
        // (the kernel adds EPOLLERR|EPOLLHUP to every registration)
        let ev = unum(it, "events") & !(EPOLLERR | EPOLLHUP);
        match k {
            "efd" => assert_eq!(ev, 1 | EPOLLET, "{what}: efd events (EPOLLIN|EPOLLET)"),
            "pipe" => assert!(ev & !1 == 0, "{what}: pipe events {ev:#x}"),
            _ => assert_eq!(ev, 1, "{what}: {k} events (EPOLLIN)"),
        }
    }
    unum(efd, "count")
}

/// (2) An epoll loop over an eventfd (edge-triggered, counter left non-zero
/// most of the time), a periodic 10 ms timerfd, the read end of a pipe fed by
/// a child (>= 3 records always in flight, switched on and off with
/// EPOLL_CTL_MOD) and a signalfd for SIGUSR1 sent by the child (removed and
/// added back with DEL/ADD); 2 checkpoints while running, 2 checkpoint
/// --kill/restart cycles. Proves: the images hold the eventfd, the timer
/// (clock, interval), the signalfd mask, the pipe's bytes and the epoll
/// registrations keyed by the program's fd numbers with their data and
/// events; after each restore the timer keeps firing, records, signals and
/// eventfd reads continue; epoll_wait never fails with EINTR (a failure in
/// the program); every eventfd read gives exactly the value written since the
/// last one; no record is lost or repeated; MOD/DEL/ADD keep working on the
/// restored fds (a second DEL fails with ENOENT, ADD of a registered fd with
/// EEXIST); the child is reaped with exit 0.
#[test]
fn epoll_loop_over_event_fds() {
    let t0 = Instant::now();
    let w = Work::new("evloop");
    let mut rng = Rng::new("evloop");
    let mut s = Session::start(&w, &[prog("evloop")]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    let mut counts = vec![];
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        "timer",
        |meta, i, kill| {
            counts.push(check_evloop_image(
                meta,
                &ready,
                &format!("checkpoint #{i} (kill={kill})"),
            ))
        },
        |_| {},
        |_| {},
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["timer", "efd", "recs", "sigs"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    for k in ["timer", "efd", "recs", "sigs"] {
        assert!(
            field_num(&ok, k) >= last[k],
            "{ok}: {k} below the last tick's"
        );
    }
    eprintln!("evloop: eventfd counter at the checkpoints: {counts:?}; {ok}");
    elapsed(t0, "evloop");
}

/// (2') A periodic 10 ms timerfd read only every ~25 ms (so at almost any
/// moment it has expired with expirations waiting to be read) and a one-shot
/// timerfd due in an hour; a checkpoint while running and 2 checkpoint
/// --kill/restart cycles. Proves: after each restore the periodic timer keeps
/// firing (the program fails if no expiration comes for 300 ms) and stays
/// armed with its interval; the one-shot timer keeps its remaining time (no
/// interval, not fired).
#[test]
fn periodic_timerfd_expired_at_checkpoint() {
    let t0 = Instant::now();
    let w = Work::new("timerfd");
    let mut rng = Rng::new("timerfd");
    let mut s = Session::start(&w, &[prog("timerfd")]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    let mut pending = vec![];
    schedule(
        &mut s,
        &mut rng,
        1,
        2,
        "exp",
        |meta, i, _| {
            let (root, _) = image_tree(meta, 1, "timerfd");
            let p = image_procs(meta)[&root];
            let t1 = fd_kind(p, field_num(&ready, "t1") as i64, "timerfd");
            assert_eq!(t1["type"], "timer_fd", "checkpoint #{i}: T1 {t1}");
            assert_eq!(
                unum(t1, "interval_ns"),
                10_000_000,
                "checkpoint #{i}: T1 {t1}"
            );
            let t2 = fd_kind(p, field_num(&ready, "t2") as i64, "timerfd");
            assert_eq!(unum(t2, "interval_ns"), 0, "checkpoint #{i}: T2 {t2}");
            assert!(
                unum(t2, "value_ns") > 3000 * 1_000_000_000,
                "checkpoint #{i}: T2 {t2}"
            );
            pending.push(format!(
                "value_ns={} ticks={}",
                unum(t1, "value_ns"),
                unum(t1, "ticks")
            ));
        },
        |_| {},
        |_| {},
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    assert_fields_progress(&out, &["exp"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    eprintln!("timerfd: T1 at the checkpoints: {pending:?}; {ok}");
    elapsed(t0, "timerfd");
}

// ---------------------------------------------------------------------------
// 3: shared memory
// ---------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

/// Checks an image of shmem.c.
fn check_shmem_image(meta: &Value, ready: &str, what: &str) {
    let (root, kids) = image_tree(meta, 2, what);
    assert_eq!(
        kids,
        [field_num(ready, "child") as i32],
        "{what}: children of {root}"
    );
    let procs = image_procs(meta);
    let objs: BTreeMap<u64, &Value> = arr(meta, "shared_memory")
        .iter()
        .map(|o| (unum(o, "id"), o))
        .collect();
    let mapped = |pid: i32| -> BTreeSet<u64> {
        arr(procs[&pid], "mappings")
            .iter()
            .filter(|m| m["kind"]["type"] == "shared_memory")
            .map(|m| unum(&m["kind"], "id"))
            .collect()
    };
    let (pm, cm) = (mapped(root), mapped(kids[0]));
    assert_eq!(
        pm.len(),
        4,
        "{what}: the parent maps {} shared memory objects, expected 4 (region, memfd, shm, sparse): {pm:?}",
        pm.len()
    );
    assert_eq!(pm, cm, "{what}: parent and child map other objects");
    for id in &pm {
        assert!(
            objs.contains_key(id),
            "{what}: mapped object {id} missing from shared_memory"
        );
    }
    let sizes: BTreeMap<u64, u64> = pm.iter().map(|id| (*id, unum(objs[id], "size"))).collect();
    assert!(
        sizes.values().any(|s| *s == 64 * MIB),
        "{what}: no 64 MiB object: {sizes:?}"
    );
    assert!(
        sizes.values().any(|s| *s == 4096),
        "{what}: no 4 KiB object (the semaphore's region): {sizes:?}"
    );
    let memfd: Vec<u64> = pm
        .iter()
        .copied()
        .filter(|id| {
            objs[id]["name"]
                .as_str()
                .unwrap_or("")
                .contains("stasis-memfd")
        })
        .collect();
    assert_eq!(
        memfd.len(),
        1,
        "{what}: objects named stasis-memfd: {memfd:?} of {objs:?}"
    );
    // the memfd's fd: same object, shared description and offset in both
    let mfd = field_num(ready, "memfd") as i64;
    let mut pos = vec![];
    for pid in [root, kids[0]] {
        let k = fd_kind(procs[&pid], mfd, what);
        assert_eq!(k["type"], "shared_memory", "{what}: memfd fd in {pid}: {k}");
        assert_eq!(unum(k, "id"), memfd[0], "{what}: memfd fd in {pid}: {k}");
        pos.push(unum(k, "pos"));
    }
    assert_eq!(pos[0], pos[1], "{what}: the memfd's offset differs");
    assert!(
        pos[0] >= 8192 && pos[0] % 8 == 0,
        "{what}: memfd offset {}, expected 8192 + 8 * records",
        pos[0]
    );
}

/// (3) A parent and a child sharing a MAP_SHARED|MAP_ANONYMOUS region with a
/// process-shared POSIX semaphore (sem_init pshared=1) guarding a counter both
/// increment, a memfd mapped by both and used through its fd (pread/pwrite
/// and appending write), an unlinked POSIX shm object, and a 64 MiB sparse
/// shared region with 4 pages touched; 2 checkpoints while running, 2
/// checkpoint --kill/restart cycles. Proves: each object is saved once and
/// mapped by both processes again (same objects in both images' mappings,
/// the memfd by name, sizes), the memfd fd keeps its object and offset; every
/// checkpoint stays small on disk (the sparse region is not written out);
/// after each restore both processes keep counting under the semaphore with
/// the invariants intact (counter = sum of the counts = the shm counter, the
/// child's count seen alike through the mapping and pread on the memfd, pwrite
/// through the fd visible in the mapping); at the end the memfd's offset,
/// size and records, the sparse region's pages and the semaphore are right.
#[test]
fn shared_memory_between_parent_and_child() {
    let t0 = Instant::now();
    let w = Work::new("shmem");
    let mut rng = Rng::new("shmem");
    let name = format!("/{}", abstract_name(&w));
    let mut s = Session::start(&w, &[prog("shmem").as_os_str(), name.as_ref()]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    let mut du = vec![];
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        "child",
        |meta, i, kill| {
            check_shmem_image(meta, &ready, &format!("checkpoint #{i} (kill={kill})"));
            let (d, _) = Work::usage(&w.newest_checkpoint());
            assert!(
                d < 16 * MIB,
                "checkpoint #{i} uses {} MiB on disk (the 64 MiB sparse region written out?)",
                d / MIB
            );
            du.push(d / 1024);
        },
        |_| {},
        |_| {},
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["counter", "parent", "child"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    assert_eq!(field_num(&ok, "records"), all.last().unwrap() + 1, "{ok}");
    assert!(field_num(&ok, "counter") >= last["counter"], "{ok}");
    assert!(
        !Path::new("/dev/shm").join(&name[1..]).exists(),
        "the unlinked shm object reappeared in /dev/shm"
    );
    eprintln!("shmem: checkpoint sizes on disk (KiB): {du:?}; {ok}");
    elapsed(t0, "shmem");
}

// ---------------------------------------------------------------------------
// 4: System V IPC
// ---------------------------------------------------------------------------

/// (type, length) of message s of sysv.c.
fn sysv_msg(s: u64) -> (i64, u64) {
    (1 + (s % 3) as i64, 8 + (s * 89) % 900)
}

fn check_sysv_image(meta: &Value, ready: &str, what: &str) {
    let (root, kids) = image_tree(meta, 2, what);
    assert_eq!(
        kids,
        [field_num(ready, "child") as i32],
        "{what}: children of {root}"
    );
    let procs = image_procs(meta);
    let sysv = &meta["sysv"];
    let (shmid, semid, msqid) = (
        field_num(ready, "shmid") as i64,
        field_num(ready, "semid") as i64,
        field_num(ready, "msqid") as i64,
    );
    let shm = arr(sysv, "shm");
    assert_eq!(shm.len(), 1, "{what}: sysv.shm {shm:?}");
    assert_eq!(num(&shm[0], "id"), shmid, "{what}: segment id");
    assert_eq!(unum(&shm[0], "size"), 3 * 4096, "{what}: segment size");
    let sem = arr(sysv, "sem");
    assert_eq!(sem.len(), 1, "{what}: sysv.sem {sem:?}");
    assert_eq!(num(&sem[0], "id"), semid, "{what}: semaphore set id");
    let vals: Vec<u64> = arr(&sem[0], "values")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        vals.len() == 3 && vals[0] <= 1 && vals[1] == 1234 && vals[2] == 7,
        "{what}: semaphore values {vals:?}, expected [0 or 1, 1234, 7]"
    );
    let msg = arr(sysv, "msg");
    assert_eq!(msg.len(), 1, "{what}: sysv.msg {msg:?}");
    // Each was created with mode 0600 (the job holds no capability that would let it
    // use them otherwise once they are recreated).
    for (o, kind) in [(&shm[0], "shm"), (&sem[0], "sem"), (&msg[0], "msg")] {
        assert_eq!(num(o, "mode"), 0o600, "{what}: {kind} mode {o}");
    }
    assert_eq!(num(&msg[0], "id"), msqid, "{what}: queue id");
    assert_eq!(num(&msg[0], "key"), 0x53540001, "{what}: queue key");
    let msgs: Vec<(i64, u64)> = arr(&msg[0], "messages")
        .iter()
        .map(|m| (m[0].as_i64().unwrap(), m[1].as_u64().unwrap()))
        .collect();
    // the child takes one whenever more than 6 are queued (polling every ms;
    // the parent adds one every ~20 ms)
    assert!(
        (6..=10).contains(&msgs.len()),
        "{what}: {} messages queued, expected 6 or 7: {msgs:?}",
        msgs.len()
    );
    assert!(
        find_window(&msgs, 100_000, sysv_msg).is_some(),
        "{what}: the queued (type, length) pairs {msgs:?} are not consecutive messages"
    );
    let attached = |pid: i32| -> Vec<i64> {
        arr(procs[&pid], "mappings")
            .iter()
            .filter(|m| m["kind"]["type"] == "sysv_shm")
            .map(|m| num(&m["kind"], "shmid"))
            .collect()
    };
    assert_eq!(attached(root), [shmid], "{what}: the parent's attachments");
    assert_eq!(
        attached(kids[0]),
        [shmid, shmid],
        "{what}: the child's attachments"
    );
}

/// (4) System V IPC between a parent and a child: a shared memory segment
/// (attached by the parent before fork and a second time by the child), a
/// semaphore set whose sem 0 is the mutex for the counter both increment
/// (sems 1, 2 hold 1234 and 7), and a message queue (fixed key) that always
/// holds 6-7 messages of types 1-3 and varying lengths; 2 checkpoints while
/// running, 2 checkpoint --kill/restart cycles. Proves: the images record the
/// segment (id, size), the semaphore values, the queue's key and its
/// messages' types and lengths in order, and every attachment (1 in the
/// parent, 2 in the child); after the restores the ids and key still work,
/// both processes keep counting under the semaphore, the child receives the
/// messages in order with types and content intact, shm_nattch is 3, a
/// type-selective msgrcv picks the oldest message of that type, nothing is
/// lost or duplicated, and a fresh shmat shows the same content.
#[test]
fn sysv_shm_sem_msg() {
    let t0 = Instant::now();
    let w = Work::new("sysv");
    let mut rng = Rng::new("sysv");
    let mut s = Session::start(&w, &[prog("sysv")]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        "counter",
        |meta, i, kill| check_sysv_image(meta, &ready, &format!("checkpoint #{i} (kill={kill})")),
        |_| {},
        |_| {},
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["counter", "sent", "recv"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    assert_eq!(field_num(&ok, "sent"), last["sent"], "{ok}");
    assert!(field_num(&ok, "recv") >= last["recv"], "{ok}");
    eprintln!("sysv: {ok}");
    elapsed(t0, "sysv");
}

// ---------------------------------------------------------------------------
// 5: FIFOs
// ---------------------------------------------------------------------------

fn check_fifo_image(meta: &Value, ready: &str, dir: &Path, what: &str) {
    let (root, kids) = image_tree(meta, 2, what);
    let child = field_num(ready, "child") as i32;
    assert_eq!(kids, [child], "{what}: children of {root}");
    let procs = image_procs(meta);
    let path = format!("{}/fifo", dir.display());
    let r = fd_kind(procs[&root], field_num(ready, "rfd") as i64, what);
    assert_eq!(r["type"], "fifo", "{what}: the reader's fd {r}");
    assert_eq!(r["path"], path.as_str(), "{what}: the reader's fd {r}");
    assert_eq!(
        num(r, "flags") & 3,
        0,
        "{what}: the reader's fd is O_RDONLY: {r}"
    );
    let pipe = unum(r, "pipe");
    let wfds = fds_of_type(procs[&child], "fifo");
    assert_eq!(wfds.len(), 1, "{what}: the child's FIFO fds {wfds:?}");
    let wk = wfds[0].1;
    assert_eq!(wk["path"], path.as_str(), "{what}: the writer's fd {wk}");
    assert_eq!(
        unum(wk, "pipe"),
        pipe,
        "{what}: reader and writer on one FIFO"
    );
    assert_eq!(
        num(wk, "flags") & 3,
        1,
        "{what}: the writer's fd is O_WRONLY: {wk}"
    );
    let len = arr(meta, "pipes")
        .iter()
        .find(|x| unum(x, "id") == pipe)
        .map(|x| unum(x, "len"))
        .unwrap_or_else(|| panic!("{what}: FIFO {pipe} missing from `pipes`"));
    assert!(
        len >= 48 && len % 16 == 0,
        "{what}: {len} bytes in the FIFO, expected 3 or more whole 16-byte records"
    );
}

fn assert_is_fifo(p: &Path, what: &str) {
    use std::os::unix::fs::FileTypeExt;
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{what}: {}: {e}", p.display()));
    assert!(
        m.file_type().is_fifo(),
        "{what}: {} is not a FIFO",
        p.display()
    );
}

/// (5) A named pipe (mkfifo in the work dir) opened by a writer child and a
/// reader parent that always leaves >= 3 records in it; 2 checkpoints while
/// running, 2 checkpoint --kill/restart cycles, the FIFO file deleted between
/// the second checkpoint --kill and its restart. Proves: the images record
/// both fds on one FIFO by path (read/write side) with its bytes in flight;
/// stasis recreates the deleted FIFO; after each restore no record is lost,
/// repeated or reordered, the writer's END arrives, and the path is the very
/// FIFO the restored fds use (same inode; a record written through a new open
/// of the path arrives on the old fd).
#[test]
fn fifo_with_data_in_flight_and_deleted() {
    let t0 = Instant::now();
    let w = Work::new("fifo");
    let mut rng = Rng::new("fifo");
    let mut s = Session::start(&w, &[prog("fifo")]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    let dir = w.dir.clone();
    let fifo = w.path("fifo");
    schedule(
        &mut s,
        &mut rng,
        2,
        2,
        "recs",
        |meta, i, kill| {
            check_fifo_image(
                meta,
                &ready,
                &dir,
                &format!("checkpoint #{i} (kill={kill})"),
            )
        },
        |i| {
            if i == 3 {
                fs::remove_file(&fifo).unwrap();
            }
        },
        |_| assert_is_fifo(&fifo, "after the restore"),
    );
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    let all = assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["recs"]);
    assert_eq!(field_num(&ok, "ticks"), all.last().unwrap() + 1, "{ok}");
    assert!(field_num(&ok, "recs") >= last["recs"], "{ok}");
    eprintln!("fifo: {ok}");
    elapsed(t0, "fifo");
}

// ---------------------------------------------------------------------------
// 6: python multiprocessing.Pool
// ---------------------------------------------------------------------------

const POOL_ITEMS: u64 = 400;

const POOL_SCRIPT: &str = r#"
import multiprocessing as mp, os, sys, time

N = int(sys.argv[1])

def work(x):
    time.sleep(0.02)
    return x, x * x + 7, os.getpid()

if __name__ == "__main__":
    mp.set_start_method("fork")
    pool = mp.Pool(3)
    workers = sorted(p.pid for p in pool._pool)
    print("ready workers=%s" % ",".join(map(str, workers)), flush=True)
    results = []
    for i, r in enumerate(pool.imap(work, range(N))):
        results.append(r)
        print("tick %d done=%d" % (i, i + 1), flush=True)
    pool.close()
    pool.join()
    while not os.path.exists("go"):
        time.sleep(0.01)
    bad = []
    if [r[0] for r in results] != list(range(N)):
        bad.append("results missing or out of order")
    wrong = [r[0] for r in results if r[1] != r[0] * r[0] + 7]
    if wrong:
        bad.append("wrong results for %r" % wrong[:10])
    used = sorted(set(r[2] for r in results))
    if used != workers:
        bad.append("results came from processes %r, the pool's workers are %r" % (used, workers))
    if bad:
        print("FAIL " + "; ".join(bad))
        sys.exit(1)
    print("OK n=%d sum=%d workers=%d" % (len(results), sum(r[1] for r in results), len(used)))
"#;

fn python() -> &'static str {
    // a real binary rather than a version-manager shim
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// (6) python3 `multiprocessing.Pool(3)` mapping (imap, 20 ms per item) over
/// 400 items: a checkpoint without --kill and two checkpoint --kill/restart
/// cycles mid-way. Proves: the pool (the main process with its handler
/// threads and the 3 workers, pipes and semaphores between them) is saved
/// (4 processes in each image) and resumes: the results keep arriving in
/// order without a gap or a repeat across the restores, the map completes
/// with every result right, the pool closes and joins, and every result came
/// from the 3 original workers (none died and was replaced).
#[test]
fn python_multiprocessing_pool() {
    let t0 = Instant::now();
    let w = Work::new("mp_pool");
    let mut rng = Rng::new("mp_pool");
    fs::write(w.path("pool.py"), POOL_SCRIPT).unwrap();
    let n = POOL_ITEMS.to_string();
    let mut s = Session::start(&w, &[python(), "-u", "pool.py", &n]);
    let ready = s.cur().lines()[0].clone();
    let workers: BTreeSet<i32> = field_list(&ready, "workers")
        .into_iter()
        .map(|p| p as i32)
        .collect();
    assert_eq!(workers.len(), 3, "{ready}");
    s.cur().wait_tick(10, T_READY);
    schedule(
        &mut s,
        &mut rng,
        1,
        2,
        "done",
        |meta, i, kill| {
            let what = format!("checkpoint #{i} (kill={kill})");
            let (root, kids) = image_tree(meta, 4, &what);
            assert_eq!(
                kids.iter().copied().collect::<BTreeSet<i32>>(),
                workers,
                "{what}: children of {root}"
            );
        },
        |_| {},
        |_| {},
    );
    let first_of_last = ticks(&s.cur().stdout())[0];
    assert!(
        first_of_last < POOL_ITEMS - 1,
        "the pool had finished before the last restore (tick {first_of_last})"
    );
    s.cur().wait_tick(POOL_ITEMS - 1, Duration::from_secs(30));
    let ok = s.finish();
    s.assert_no_rerun();
    let all = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(*all.last().unwrap(), POOL_ITEMS - 1);
    let sum: u64 = (0..POOL_ITEMS).map(|x| x * x + 7).sum();
    assert_eq!(ok, format!("OK n={POOL_ITEMS} sum={sum} workers=3"));
    elapsed(t0, "mp_pool");
}
