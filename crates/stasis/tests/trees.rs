//! Process trees and local IPC: whole trees under `stasis run` (ring of
//! processes, shell pipeline, `make -j2`), open file descriptions shared
//! between processes, unreaped zombies and SIGCHLD, process groups and
//! sessions (with an orphan reparented to the stasis init), pipe capacity and
//! bytes in flight. Every test takes checkpoints without --kill (the tree
//! keeps running) and at least two checkpoint --kill / restart cycles at
//! random moments (seed printed; STASIS_TEST_SEED repeats it), inspects the
//! images, and lets the programs check their own state after `go`.
mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn pid_list(s: &str) -> Vec<i32> {
    s.split(',').map(|p| p.parse().unwrap()).collect()
}

/// pid -> process object of the image.
fn image_procs(meta: &Value) -> BTreeMap<i32, &Value> {
    meta["processes"]
        .as_array()
        .expect("no processes array in inspect --json")
        .iter()
        .map(|p| (p["pid"].as_i64().expect("process without pid") as i32, p))
        .collect()
}

/// pid -> (ppid, pgid, sid) of every process of the image.
fn image_ids(meta: &Value) -> BTreeMap<i32, (i32, i32, i32)> {
    image_procs(meta)
        .into_iter()
        .map(|(pid, p)| {
            (
                pid,
                (
                    num(p, "ppid") as i32,
                    num(p, "pgid") as i32,
                    num(p, "sid") as i32,
                ),
            )
        })
        .collect()
}

/// Which processes hold which end of each pipe of the image.
#[derive(Debug, Default)]
struct PipeUse {
    capacity: u64,
    len: u64,
    readers: BTreeSet<i32>,
    writers: BTreeSet<i32>,
    /// open(2) flags of the write ends.
    write_flags: Vec<i64>,
}

fn pipe_uses(meta: &Value) -> BTreeMap<u64, PipeUse> {
    let mut m: BTreeMap<u64, PipeUse> = BTreeMap::new();
    for p in meta["pipes"]
        .as_array()
        .expect("no pipes array in inspect --json")
    {
        let e = m
            .entry(p["id"].as_u64().expect("pipe without id"))
            .or_default();
        e.capacity = p["capacity"].as_u64().expect("pipe without capacity");
        e.len = p["len"].as_u64().expect("pipe without len");
    }
    for (pid, p) in image_procs(meta) {
        for fd in p["fds"].as_array().expect("process without fds") {
            let k = &fd["kind"];
            if k["type"] != "pipe" {
                continue;
            }
            let id = k["pipe"].as_u64().expect("pipe fd without pipe id");
            let e = m.get_mut(&id).unwrap_or_else(|| {
                panic!(
                    "process {pid} fd {} refers to pipe {id} missing from `pipes`",
                    fd["fd"]
                )
            });
            if k["write"].as_bool().expect("pipe fd without write") {
                e.writers.insert(pid);
                e.write_flags.push(k["flags"].as_i64().unwrap_or(0));
            } else {
                e.readers.insert(pid);
            }
        }
    }
    m
}

fn comms(meta: &Value) -> Vec<String> {
    image_procs(meta)
        .values()
        .map(|p| p["comm"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Wait until `cond` holds (polling), panic with `what` and diagnostics on timeout.
fn wait_until(p: &mut Proc, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if !p.running() || t0.elapsed() > timeout {
            let d = p.diag();
            panic!(
                "waiting for {what}: {}\n{d}",
                if p.running() {
                    "timeout"
                } else {
                    "the run ended"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// 1 + 8: ring of processes
// ---------------------------------------------------------------------------

/// Check the image of a ring of `n` children of `parent`: exactly these
/// processes with the right parent, group and session; `n` ring pipes, each
/// read by one child and written by its predecessor, holding together at most
/// one token (16 bytes). Returns whether the token was in a pipe.
fn check_ring_image(meta: &Value, parent: i32, kids: &[i32], what: &str) -> bool {
    let ids = image_ids(meta);
    let want: BTreeSet<i32> = kids.iter().copied().chain([parent]).collect();
    let got: BTreeSet<i32> = ids.keys().copied().collect();
    assert_eq!(got, want, "{what}: processes in the image");
    assert_eq!(num(meta, "root_pid") as i32, parent, "{what}: root_pid");
    let (_, ppgid, psid) = ids[&parent];
    for k in kids {
        assert_eq!(
            ids[k],
            (parent, ppgid, psid),
            "{what}: child {k}'s (ppid, pgid, sid)"
        );
    }
    assert!(
        meta["zombies"]
            .as_array()
            .map(|z| z.is_empty())
            .unwrap_or(true),
        "{what}: unexpected zombies {}",
        meta["zombies"]
    );
    let n = kids.len();
    let pipes = pipe_uses(meta);
    let mut ring = 0;
    let mut tokens = 0;
    for (i, k) in kids.iter().enumerate() {
        let prev = kids[(i + n - 1) % n];
        let from_prev: Vec<&PipeUse> = pipes
            .values()
            .filter(|u| {
                u.readers.len() == 1
                    && u.readers.contains(k)
                    && u.writers.len() == 1
                    && u.writers.contains(&prev)
            })
            .collect();
        assert_eq!(
            from_prev.len(),
            1,
            "{what}: expected one pipe from child {prev} to child {k}"
        );
        let u = from_prev[0];
        assert!(
            u.len == 0 || u.len == 16,
            "{what}: ring pipe {prev}->{k} holds {} bytes (a token is 16)",
            u.len
        );
        ring += 1;
        tokens += u.len / 16;
    }
    assert_eq!(ring, n);
    assert!(
        tokens <= 1,
        "{what}: {tokens} tokens in the ring pipes (there is only one)"
    );
    tokens == 1
}

fn ring_cycles(w: &Work, exe: &Path, n: usize, name: &str, as_user: Option<u32>) {
    let t0 = Instant::now();
    let mut rng = Rng::new(name);
    let mut s = Session::start(w, &[exe.as_os_str(), n.to_string().as_ref()]);
    let ready = s.cur().lines()[0].clone();
    let f = fields(&ready);
    let parent: i32 = f["parent"].parse().unwrap();
    let kids = pid_list(&f["pids"]);
    assert_eq!(kids.len(), n, "{ready}");
    s.cur().wait_tick(3, T_READY);
    if let Some(uid) = as_user {
        assert_tree_runs_as(w, exe, n + 1, uid);
    }
    let mut in_flight = 0;
    for i in 0..2 {
        rng.sleep_ms(20, 400);
        w.checkpoint_ok(false, s.cur());
        in_flight += check_ring_image(
            &w.inspect_json(),
            parent,
            &kids,
            &format!("checkpoint #{i}"),
        ) as u32;
        s.cur().wait_more_ticks(3, T_READY);
    }
    for i in 0..2 {
        rng.sleep_ms(20, 400);
        s.checkpoint_kill();
        in_flight += check_ring_image(
            &w.inspect_json(),
            parent,
            &kids,
            &format!("checkpoint --kill #{i}"),
        ) as u32;
        s.restart(Probe::Ticks);
        wait_field_advance(s.cur(), "token", "the token does not go round (lost?)");
        if let Some(uid) = as_user {
            assert_tree_runs_as(w, exe, n + 1, uid);
        }
    }
    rng.sleep_ms(20, 300);
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["token"]);
    let hops = field_num(&ok, "hops");
    let value = field_num(&ok, "value");
    assert_eq!(value, hops * n as u64, "{ok}");
    assert!(
        value >= last["token"],
        "{ok}: below the last tick's token {}",
        last["token"]
    );
    eprintln!("{name}: {ok}; token caught in a pipe in {in_flight} of 4 checkpoints");
    elapsed(t0, name);
}

/// (1) A parent and 16 children in a ring of pipes passing a token without
/// pause; 2 checkpoints while running and 2 checkpoint --kill/restart cycles.
/// Proves: the whole tree is saved (same PIDs, parent links, group, session),
/// the token is never lost or doubled (each child checks every token it gets
/// is its previous value + 16; all hop counts equal; final value = hops), the
/// ring keeps going after each restore, and the restored parent reaps every
/// child with waitpid (exit status 10 + index).
#[test]
fn ring_of_16_processes() {
    let w = Work::new("ring16");
    ring_cycles(&w, &prog("ring"), 16, "ring16", None);
}

/// (8) The ring with 8 children as an unprivileged user (the `stasis-test`
/// user via setpriv when the tests run as root): the same checks, plus every
/// process (run, restarts, the 9 ring processes) runs as that user.
#[test]
fn ring_of_8_as_unprivileged_user() {
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new("ring8_unpriv");
    let bin = w.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog("ring"), &bin, "ring");
    w.give_to(uid, gid);
    w.prefix = prefix;
    ring_cycles(&w, &exe, 8, "ring8_unpriv", Some(uid));
}

// ---------------------------------------------------------------------------
// 2: shell pipeline with data in flight
// ---------------------------------------------------------------------------

/// (2) `bash -c 'set -o pipefail; produce M | filter | cat | consume M'` with a
/// slow consumer, so the producer runs ahead and the pipes are full; 2
/// checkpoints while running, 2 checkpoint --kill/restart cycles. Proves: the
/// five processes (bash waiting for its pipeline, three C stages, cat) are
/// saved and restored together, the bytes in flight in the pipes survive
/// exactly (the consumer sees every line exactly once, in order, with the
/// right content, and END after exactly M lines; bash's pipefail status is 0,
/// so no stage died), and at least one image holds data in a pipe.
#[test]
fn shell_pipeline_with_data_in_flight() {
    const M: u64 = 600_000;
    let t0 = Instant::now();
    let w = Work::new("pipeline");
    let mut rng = Rng::new("pipeline");
    let e = prog("pipeline");
    let e = e.display();
    let script =
        format!("set -o pipefail; '{e}' produce {M} | '{e}' filter | cat | '{e}' consume {M}");
    let mut s = Session::start(&w, &["bash", "-c", &script]);
    s.cur().wait_tick(3, T_READY);
    let mut in_pipes = vec![];
    for i in 0..4 {
        rng.sleep_ms(50, 500);
        let kill = i >= 2;
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let meta = w.inspect_json();
        // (the test programs' file names carry a hash: `pipeline-<hash>`)
        let mut c: Vec<String> = comms(&meta)
            .into_iter()
            .map(|c| {
                if c.starts_with("pipeline") {
                    "pipeline".into()
                } else {
                    c
                }
            })
            .collect();
        c.sort();
        assert_eq!(
            c,
            ["bash", "cat", "pipeline", "pipeline", "pipeline"],
            "checkpoint #{i}: processes of the image"
        );
        let pipes = pipe_uses(&meta);
        // bash holds no pipe end; every stage pipe has one reader and one writer
        let lens: Vec<u64> = pipes
            .values()
            .filter(|u| u.readers.len() == 1 && u.writers.len() == 1)
            .map(|u| u.len)
            .collect();
        assert_eq!(lens.len(), 3, "checkpoint #{i}: stage pipes {pipes:?}");
        in_pipes.push(lens);
        if kill {
            s.restart(Probe::Ticks);
            wait_field_advance(s.cur(), "lines", "no lines reach the consumer");
        } else {
            s.cur().wait_more_ticks(3, T_READY);
        }
    }
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    assert_ticks_consecutive(&out, Some(0));
    assert_fields_progress(&out, &["lines"]);
    assert_eq!(field_num(&ok, "lines"), M, "{ok}");
    eprintln!("pipeline: bytes in the 3 stage pipes at each checkpoint: {in_pipes:?}; {ok}");
    assert!(
        in_pipes.iter().flatten().any(|l| *l > 0),
        "no checkpoint caught data in a pipe: {in_pipes:?}"
    );
    elapsed(t0, "pipeline");
}

// ---------------------------------------------------------------------------
// 3: make -j2
// ---------------------------------------------------------------------------

const MAKE_FILES: u64 = 30;
const MAKE_FUNCS: u64 = 1000;

fn write_make_project(dir: &Path) -> u64 {
    fs::create_dir_all(dir).unwrap();
    let mut main = String::from("#include <stdio.h>\n");
    let mut sum = 0u64;
    for i in 0..MAKE_FILES {
        // ~1000 small functions: cc1 runs for a noticeable time (~0.1 s)
        let mut src = String::from("static volatile long v;\n");
        for j in 0..MAKE_FUNCS {
            src.push_str(&format!(
                "static long g{j}(long x) {{ v = x; return x * {j} + (x >> 3) - {}; }}\n",
                j % 7
            ));
        }
        src.push_str(&format!("long f{i:02}(void) {{\n    long s = 0;\n"));
        for j in 0..MAKE_FUNCS {
            src.push_str(&format!("    s += g{j}({j});\n"));
        }
        src.push_str(&format!("    return {i}L * {i}L + 3 + (s - s);\n}}\n"));
        fs::write(dir.join(format!("f{i:02}.c")), src).unwrap();
        main.push_str(&format!("long f{i:02}(void);\n"));
        sum += i * i + 3;
    }
    main.push_str("int main(void) {\n    long s = 0;\n");
    for i in 0..MAKE_FILES {
        main.push_str(&format!("    s += f{i:02}();\n"));
    }
    main.push_str("    printf(\"result %ld\\n\", s);\n    return 0;\n}\n");
    fs::write(dir.join("main.c"), main).unwrap();
    fs::write(
        dir.join("Makefile"),
        "OBJS := $(patsubst %.c,%.o,$(sort $(wildcard f*.c))) main.o\n\
         prog: $(OBJS)\n\
         \tcc -o $@ $(OBJS)\n\
         %.o: %.c\n\
         \tsleep 0.2\n\
         \tcc -O1 -pipe -c -o $@ $<\n",
    )
    .unwrap();
    sum
}

fn count_objs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".o"))
                .count()
        })
        .unwrap_or(0)
}

/// (3) `make -j2` under bash on a generated project of 31 C files (each
/// compile, `cc -pipe` of ~1000 small functions, preceded by `sleep 0.2`): a
/// checkpoint while building, then two checkpoint --kill/restart cycles
/// mid-build. Proves: a real-world tree (bash, make with its jobserver pipe,
/// sleep, cc with cc1 piping into as) is saved and restored mid-build; the
/// build finishes (exit 0) with every object compiled exactly once across the
/// runs (make neither redoes nor skips work), and the binary, run by the
/// restored bash and again by the test, prints the right sum.
#[test]
fn make_j2_build_interrupted() {
    let t0 = Instant::now();
    let w = Work::new("make_j2");
    let mut rng = Rng::new("make_j2");
    let proj = w.path("proj");
    let sum = write_make_project(&proj);
    let total = MAKE_FILES as usize + 1;
    let mut s = Session::start(
        &w,
        &[
            "bash",
            "-c",
            "echo ready; make --no-print-directory -C proj -j2 && proj/prog",
        ],
    );
    let mut at = vec![];
    let mut jobserver_seen = false;
    let mut make_children_seen = false;
    for (i, need) in [3usize, 8, 14].into_iter().enumerate() {
        let kill = i > 0;
        wait_until(
            s.cur(),
            &format!("{need} objects"),
            Duration::from_secs(30),
            || count_objs(&proj) >= need,
        );
        rng.sleep_ms(0, 300);
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let done = count_objs(&proj);
        assert!(
            done < total,
            "checkpoint #{i} came too late: the build had {done} of {total} objects"
        );
        let meta = w.inspect_json();
        let procs = image_procs(&meta);
        let make: Vec<i32> = procs
            .iter()
            .filter(|(_, p)| p["comm"] == "make")
            .map(|(pid, _)| *pid)
            .collect();
        assert_eq!(
            make.len(),
            1,
            "checkpoint #{i}: make processes in {:?}",
            comms(&meta)
        );
        let make = make[0];
        if procs.values().any(|p| num(p, "ppid") as i32 == make) {
            make_children_seen = true;
        }
        // make -j holds both ends of its jobserver pipe
        if pipe_uses(&meta)
            .values()
            .any(|u| u.readers.contains(&make) && u.writers.contains(&make))
        {
            jobserver_seen = true;
        }
        at.push(format!("#{i}: {done} objects, {:?}", comms(&meta)));
        if kill {
            s.restart(Probe::Sleep(100));
        }
    }
    s.cur().wait_line("`result`", Duration::from_secs(60), |l| {
        l.starts_with("result")
    });
    s.cur().expect_exit(0, T_CMD);
    s.assert_no_rerun();
    let out = s.outputs();
    let all: Vec<String> = out.iter().flat_map(|(_, t)| complete_lines(t)).collect();
    assert_eq!(
        all.iter()
            .filter(|l| l.starts_with("result"))
            .cloned()
            .collect::<Vec<_>>(),
        [format!("result {sum}")],
        "the program's output"
    );
    for i in 0..MAKE_FILES {
        let cmd = format!("cc -O1 -pipe -c -o f{i:02}.o f{i:02}.c");
        let n = all.iter().filter(|l| **l == cmd).count();
        assert_eq!(
            n,
            1,
            "`{cmd}` ran {n} times over the runs:\n{}",
            all.join("\n")
        );
    }
    assert!(
        jobserver_seen,
        "make held no jobserver pipe in any image: {at:?}"
    );
    assert!(make_children_seen, "make had no child in any image: {at:?}");
    let run = std::process::Command::new(proj.join("prog"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        format!("result {sum}\n")
    );
    eprintln!("make_j2: checkpoints at {at:?}");
    elapsed(t0, "make_j2");
}

// ---------------------------------------------------------------------------
// 4: shared open file description
// ---------------------------------------------------------------------------

/// The fds of each process referring to `name` (a regular file): (fd, desc, pos).
fn file_fds(meta: &Value, name: &str) -> BTreeMap<i32, Vec<(i64, u64, u64)>> {
    image_procs(meta)
        .into_iter()
        .map(|(pid, p)| {
            let v = p["fds"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|fd| {
                    fd["kind"]["type"] == "file"
                        && fd["kind"]["file"]["path"]
                            .as_str()
                            .map(|s| s.ends_with(name))
                            .unwrap_or(false)
                })
                .map(|fd| {
                    (
                        fd["fd"].as_i64().unwrap(),
                        fd["desc"].as_u64().unwrap_or(0),
                        fd["kind"]["pos"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .collect();
            (pid, v)
        })
        .collect()
}

/// (4) Parent and child write 16-byte records in turn to one file opened once
/// before fork (no O_APPEND), each alternating between the fd and a dup of
/// it; 2 checkpoints while running, 2 checkpoint --kill/restart cycles.
/// Proves: the open file description stays shared between the processes and
/// between dup'ed fds (the image gives all four fds one description; after
/// the restores the file holds P0 C0 P1 C1 ... with nothing lost, repeated or
/// overwritten, and every fd's offset equals the file size).
#[test]
fn shared_file_offset_between_parent_and_child() {
    let t0 = Instant::now();
    let w = Work::new("sharedfile");
    let mut rng = Rng::new("sharedfile");
    let mut s = Session::start(&w, &[prog("sharedfile")]);
    let ready = s.cur().lines()[0].clone();
    let parent = field_num(&ready, "parent") as i32;
    let child = field_num(&ready, "child") as i32;
    s.cur().wait_tick(3, T_READY);
    for i in 0..4 {
        rng.sleep_ms(20, 400);
        let kill = i >= 2;
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let meta = w.inspect_json();
        let fds = file_fds(&meta, "/records.dat");
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            {
                let mut v = vec![parent, child];
                v.sort();
                v
            },
            "checkpoint #{i}: processes"
        );
        let all: Vec<(i64, u64, u64)> = fds.values().flatten().copied().collect();
        assert_eq!(all.len(), 4, "checkpoint #{i}: fds on records.dat: {fds:?}");
        let descs: BTreeSet<u64> = all.iter().map(|f| f.1).collect();
        let poss: BTreeSet<u64> = all.iter().map(|f| f.2).collect();
        assert_eq!(
            descs.len(),
            1,
            "checkpoint #{i}: the four fds must share one description: {fds:?}"
        );
        assert_eq!(
            poss.len(),
            1,
            "checkpoint #{i}: one description, one offset: {fds:?}"
        );
        let pos = *poss.iter().next().unwrap();
        assert_eq!(pos % 16, 0, "checkpoint #{i}: offset {pos} inside a record");
        if kill {
            let size = fs::metadata(w.path("records.dat")).unwrap().len();
            assert_eq!(
                pos, size,
                "checkpoint --kill #{i}: saved offset vs file size"
            );
            s.restart(Probe::Ticks);
            wait_field_advance(s.cur(), "records", "parent and child stopped taking turns");
        } else {
            s.cur().wait_more_ticks(3, T_READY);
        }
    }
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    let out = s.outputs();
    assert_ticks_consecutive(&out, Some(0));
    let last = assert_fields_progress(&out, &["records"]);
    let records = field_num(&ok, "records");
    assert!(records >= last["records"], "{ok}");
    assert_eq!(
        fs::metadata(w.path("records.dat")).unwrap().len(),
        records * 16
    );
    eprintln!("sharedfile: {ok}");
    elapsed(t0, "sharedfile");
}

// ---------------------------------------------------------------------------
// 5: zombie and SIGCHLD
// ---------------------------------------------------------------------------

/// (5) A parent with an unreaped child that exited with 42 and a SIGCHLD
/// handler; a second child exits (status 7) only after the last restart.
/// 2 checkpoints while running, 2 checkpoint --kill/restart cycles. Proves:
/// the zombie is in every image (pid, parent, wait status 42 << 8) and is
/// recreated: after each restore it is still waitable (checked every tick
/// with waitid(WNOWAIT)), and at `go` waitpid returns its pid with exit
/// status 42; SIGCHLD is delivered to the restored handler with the right
/// pid and status; waitpid of the second child works; nothing else is left;
/// and the parent's handler saw exactly one SIGCHLD per child (restoring the
/// zombie does not notify the parent again).
#[test]
fn zombie_reaped_after_restart_and_sigchld() {
    let t0 = Instant::now();
    let w = Work::new("zombie");
    let mut rng = Rng::new("zombie");
    let mut s = Session::start(&w, &[prog("zombie")]);
    let ready = s.cur().lines()[0].clone();
    let parent = field_num(&ready, "parent") as i32;
    let zombie = field_num(&ready, "zombie") as i32;
    let long = field_num(&ready, "long") as i32;
    s.cur().wait_tick(3, T_READY);
    for i in 0..4 {
        rng.sleep_ms(20, 400);
        let kill = i >= 2;
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let meta = w.inspect_json();
        let ids = image_ids(&meta);
        assert_eq!(
            ids.keys().copied().collect::<BTreeSet<_>>(),
            [parent, long].into_iter().collect(),
            "checkpoint #{i}: live processes"
        );
        assert_eq!(ids[&long].0, parent, "checkpoint #{i}: parent of {long}");
        let z = meta["zombies"].as_array().expect("no zombies array");
        assert_eq!(z.len(), 1, "checkpoint #{i}: zombies {z:?}");
        assert_eq!(
            (
                num(&z[0], "pid") as i32,
                num(&z[0], "ppid") as i32,
                num(&z[0], "status")
            ),
            (zombie, parent, 42 << 8),
            "checkpoint #{i}: the zombie (pid, ppid, wait status)"
        );
        if kill {
            s.restart(Probe::Ticks);
        } else {
            s.cur().wait_more_ticks(3, T_READY);
        }
    }
    fs::write(w.path("release"), b"").unwrap();
    let want = format!("sigchld pid={long} status=7 code=1");
    s.cur()
        .wait_line(&want, T_READY, |l| l.starts_with("sigchld"));
    let got = s
        .cur()
        .lines()
        .into_iter()
        .find(|l| l.starts_with("sigchld"))
        .unwrap();
    assert_eq!(got, want, "SIGCHLD after the restore");
    s.cur().wait_more_ticks(2, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    for p in &s.phases[..s.phases.len() - 1] {
        assert!(
            !p.lines().iter().any(|l| l.starts_with("sigchld")),
            "{}: the second child exited before it was released",
            p.label
        );
    }
    eprintln!("zombie: {ok}");
    elapsed(t0, "zombie");
    // The zombie's exit was notified once, before the checkpoints; restoring
    // it must not notify the parent again (deliveries are pid:status:code).
    assert_eq!(
        field_num(&ok, "spurious"),
        0,
        "the restored parent got SIGCHLD more than once for the zombie {zombie} \
         (or for an unknown child): {ok}"
    );
}

// ---------------------------------------------------------------------------
// 6: process groups and sessions
// ---------------------------------------------------------------------------

/// `ready R=pid:ppid:pgid:sid A=...` -> name -> (pid, ppid, pgid, sid)
fn id_table(ready: &str) -> BTreeMap<String, (i32, i32, i32, i32)> {
    fields(ready)
        .into_iter()
        .map(|(k, v)| {
            let n: Vec<i32> = v.split(':').map(|x| x.parse().unwrap()).collect();
            assert_eq!(n.len(), 4, "{ready}");
            (k, (n[0], n[1], n[2], n[3]))
        })
        .collect()
}

/// (6) A tree with a second session (setsid in a child), process groups made
/// with setpgid (one joined by a process that is not its leader's child), and
/// an orphan (parent exited, reparented to the stasis init) that started its
/// own session; 2 checkpoints while running, 2 checkpoint --kill/restart
/// cycles. Proves: every image has exactly these 9 processes with the pid,
/// ppid, pgid and sid they had, and after the restores every process (each
/// checks itself after `go`) has the same pid, ppid, pgid and sid; the
/// restored parents reap their children.
#[test]
fn process_groups_and_sessions() {
    let t0 = Instant::now();
    let w = Work::new("sessions");
    let mut rng = Rng::new("sessions");
    let mut s = Session::start(&w, &[prog("sessions")]);
    let ready = s.cur().lines()[0].clone();
    let table = id_table(&ready);
    assert_eq!(table.len(), 9, "{ready}");
    let want: BTreeMap<i32, (i32, i32, i32)> = table
        .values()
        .map(|&(pid, ppid, pgid, sid)| (pid, (ppid, pgid, sid)))
        .collect();
    let rsid = table["R"].3;
    let h = table["H"];
    eprintln!("sessions: {ready}");
    assert_ne!(table["A"].3, rsid, "A has its own session");
    assert_eq!(h.1, 1, "the orphan H is a child of the namespace init");
    assert_ne!(h.3, rsid);
    s.cur().wait_tick(3, T_READY);
    for i in 0..4 {
        rng.sleep_ms(20, 400);
        let kill = i >= 2;
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let got = image_ids(&w.inspect_json());
        assert_eq!(
            got, want,
            "checkpoint #{i}: pid -> (ppid, pgid, sid) of the image"
        );
        if kill {
            s.restart(Probe::Ticks);
        } else {
            s.cur().wait_more_ticks(3, T_READY);
        }
    }
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("sessions: {ok}");
    elapsed(t0, "sessions");
}

// ---------------------------------------------------------------------------
// 7: pipe capacity
// ---------------------------------------------------------------------------

/// (7) A pipe resized to 1 MiB (or /proc/sys/fs/pipe-max-size if smaller)
/// holding ~700 KiB not yet read, and a default pipe filled to the brim;
/// 2 checkpoints while running, 2 checkpoint --kill/restart cycles. Proves:
/// the images record both capacities and byte counts; after the restores
/// F_GETPIPE_SZ (both ends) and FIONREAD are what they were, the big pipe
/// takes the remaining capacity without blocking, and the reader reads
/// exactly the same byte streams (every byte compared).
#[test]
fn pipe_capacity_and_content() {
    let t0 = Instant::now();
    let w = Work::new("pipecap");
    let mut rng = Rng::new("pipecap");
    let max: u64 = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let size = max.min(1 << 20);
    let fill = size * 700 / 1024 / 4096 * 4096;
    let mut s = Session::start(
        &w,
        &[
            prog("pipecap").into_os_string(),
            size.to_string().into(),
            fill.to_string().into(),
        ],
    );
    let ready = s.cur().lines()[0].clone();
    let qfill = field_num(&ready, "qfill");
    let qcap = field_num(&ready, "qcap");
    assert_eq!(qfill, qcap, "{ready}: the small pipe is full");
    s.cur().wait_tick(3, T_READY);
    for i in 0..4 {
        rng.sleep_ms(20, 400);
        let kill = i >= 2;
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        let meta = w.inspect_json();
        let pipes = pipe_uses(&meta);
        let mut caps: Vec<(u64, u64)> = pipes.values().map(|u| (u.capacity, u.len)).collect();
        caps.sort();
        let mut want = vec![(qcap, 0), (qcap, qfill), (size, fill)];
        want.sort();
        assert_eq!(caps, want, "checkpoint #{i}: (capacity, len) of the pipes");
        if kill {
            s.restart(Probe::Ticks);
        } else {
            s.cur().wait_more_ticks(3, T_READY);
        }
    }
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("pipecap: {ok}");
    elapsed(t0, "pipecap");
}

/// (8) A parent forking short-lived children as fast as it can (some leaving
/// orphans that the namespace init adopts): twelve checkpoints at random
/// moments while processes appear and exit, then two checkpoint --kill /
/// restart cycles. Proves: a process of the tree exiting while the tree is
/// being frozen neither fails the checkpoint nor leaves a process unsaved;
/// every checkpoint succeeds; the parent keeps reaping every child with the
/// right status after restart, and its ticks continue without a gap or a
/// repeat.
#[test]
fn fork_storm_checkpoints_succeed() {
    let t0 = Instant::now();
    let w = Work::new("forkstorm");
    let mut rng = Rng::new("forkstorm");
    let mut s = Session::start(&w, &[prog("forkstorm")]);
    s.cur().wait_tick(2, T_READY);
    for i in 0..14 {
        rng.sleep_ms(0, 150);
        if i >= 12 {
            s.cycle(Probe::Ticks);
        } else {
            w.checkpoint_ok(false, s.cur());
            s.cur().wait_more_ticks(1, T_READY);
        }
    }
    let ok = s.finish();
    s.assert_no_rerun();
    let ticks = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(
        field_num(&ok, "ticks"),
        ticks.len() as u64,
        "OK line {ok:?} vs {} ticks printed",
        ticks.len()
    );
    eprintln!("forkstorm: {} ticks in {:?}", ticks.len(), t0.elapsed());
}
