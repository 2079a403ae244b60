//! The JVM (OpenJDK 17, default options but a 64 MiB heap): six worker
//! threads update an AtomicLong, a synchronized counter and per-thread
//! counters while allocating (GC, JIT compilation, safepoints, the JVM's own
//! ~20 threads, signal handlers, mapped jars/CDS archive, the hsperfdata
//! shared file). It survives a checkpoint without --kill and three
//! checkpoint --kill/restart cycles at random moments: the main thread's
//! ticks continue exactly, the counters continue and advance after every
//! restore, and at the end (after a System.gc()) every worker is still
//! running, all join, and atomic == synchronized == sum of per-thread ==
//! sum of the workers' own local counts.
mod common;
use common::*;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const CLASS: &str = "StasisThreads";

const SOURCE: &str = r#"
import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicLong;

public class StasisThreads {
    static final int N = 6;
    static final AtomicLong atomic = new AtomicLong();
    static final Object lock = new Object();
    static long syncCount;                          // guarded by lock
    static final long[] perThread = new long[N];    // guarded by lock
    static final long[] local = new long[N];        // written by each worker at its end
    static final long[] nativeIds = new long[N];
    static volatile boolean stop;
    static final List<String> bad = new ArrayList<>();

    static void pause(long ms) {
        try { Thread.sleep(ms); } catch (InterruptedException e) { throw new RuntimeException(e); }
    }

    static void out(String s) {
        System.out.println(s);
        System.out.flush();
    }

    static long[] snapshot() {
        synchronized (lock) { return perThread.clone(); }
    }

    public static void main(String[] args) throws Exception {
        Thread[] ts = new Thread[N];
        for (int i = 0; i < N; i++) {
            final int k = i;
            ts[i] = new Thread(() -> {
                long mine = 0;
                List<long[]> garbage = new ArrayList<>();
                while (!stop) {
                    atomic.incrementAndGet();
                    synchronized (lock) {
                        syncCount++;
                        perThread[k]++;
                        if (perThread[k] != mine + 1) {
                            bad.add("worker " + k + ": shared count " + perThread[k] + ", own " + (mine + 1));
                        }
                    }
                    mine++;
                    garbage.add(new long[32 + (int) (mine % 64)]);
                    if (garbage.size() > 2000) garbage.clear();
                    if (mine % 20 == 0) pause(1);
                }
                local[k] = mine;
            }, "worker-" + i);
            ts[i].start();
        }
        while (atomic.get() < 1000) pause(1);
        out("ready threads=" + Thread.activeCount());

        int n = 0;
        File go = new File("go");
        for (; !go.exists(); n++) {
            long s;
            synchronized (lock) { s = syncCount; }
            out("tick " + n + " atomic=" + atomic.get() + " sync=" + s);
            pause(20);
        }

        // the GC still works after the restore
        System.gc();
        // every worker still makes progress
        long[] before = snapshot();
        long deadline = System.nanoTime() + 5_000_000_000L;
        boolean all = false;
        while (!all && System.nanoTime() < deadline) {
            pause(10);
            long[] now = snapshot();
            all = true;
            for (int k = 0; k < N; k++) all &= now[k] > before[k];
        }
        long[] now = snapshot();
        for (int k = 0; k < N; k++) {
            if (now[k] <= before[k]) bad.add("worker " + k + " makes no progress");
        }

        stop = true;
        long sumLocal = 0, sumPer = 0;
        for (int k = 0; k < N; k++) {
            ts[k].join(10_000);
            if (ts[k].isAlive()) bad.add("worker " + k + " did not end");
        }
        synchronized (lock) {
            for (int k = 0; k < N; k++) {
                sumLocal += local[k];
                sumPer += perThread[k];
                if (local[k] != perThread[k]) bad.add("worker " + k + ": local " + local[k] + " != shared " + perThread[k]);
            }
            if (atomic.get() != syncCount) bad.add("atomic " + atomic.get() + " != synchronized " + syncCount);
            if (sumPer != syncCount) bad.add("sum of per-thread " + sumPer + " != synchronized " + syncCount);
            if (sumLocal != syncCount) bad.add("sum of local " + sumLocal + " != synchronized " + syncCount);
        }
        if (!bad.isEmpty()) {
            out("FAIL " + String.join("; ", bad.subList(0, Math.min(10, bad.size()))));
            System.exit(1);
        }
        out("OK ticks=" + n + " atomic=" + atomic.get() + " sync=" + syncCount);
    }
}
"#;

/// A JDK tool (`java`, `javac`) as a canonical path: from JAVA_HOME, else
/// from PATH (resolving /usr/bin/java -> /usr/lib/jvm/...).
fn jdk_tool(name: &str) -> Option<PathBuf> {
    let mut cands = vec![];
    if let Some(h) = std::env::var_os("JAVA_HOME") {
        cands.push(Path::new(&h).join("bin").join(name));
    }
    if let Some(p) = std::env::var_os("PATH") {
        cands.extend(std::env::split_paths(&p).map(|d| d.join(name)));
    }
    cands
        .into_iter()
        .find(|c| c.is_file())
        .map(|c| std::fs::canonicalize(&c).unwrap_or(c))
}

/// Compile SOURCE (once, cached by content hash) and return the classes dir.
fn compile(javac: &Path) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    SOURCE.hash(&mut h);
    javac.hash(&mut h);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("stasis-java-{:016x}", h.finish()));
    if dir.join(format!("{CLASS}.class")).exists() {
        return dir;
    }
    let tmp = PathBuf::from(format!("{}.{}.tmp", dir.display(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let src = tmp.join(format!("{CLASS}.java"));
    std::fs::write(&src, SOURCE).unwrap();
    let out = Command::new(javac)
        .arg("-d")
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("cannot run javac");
    assert!(
        out.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&tmp, &dir).is_err() {
        // compiled concurrently by another test binary
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// Every JVM under stasis is pid 2 in its PID namespace, so all of them use
/// the same perf-data file /tmp/hsperfdata_<user>/2 (a MAP_SHARED mapping),
/// and a JVM starting deletes a file of "its" pid left by a killed one. The
/// JVM tests of this binary must therefore not run concurrently.
fn jvm_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// `java -Xmx64m -cp CLASSES StasisThreads`, or None without a JDK.
fn jvm_argv() -> Option<Vec<std::ffi::OsString>> {
    // scripts/test.sh installs a JDK where none is found: its absence is a failure.
    let (Some(java), Some(javac)) = (jdk_tool("java"), jdk_tool("javac")) else {
        panic!("no JDK (java and javac) found: install one (scripts/test.sh does)");
    };
    let classes = compile(&javac);
    // Default JVM options; only the heap is bounded to keep the images small.
    Some(vec![
        java.into_os_string(),
        "-Xmx64m".into(),
        "-cp".into(),
        classes.into_os_string(),
        CLASS.into(),
    ])
}

/// Final checks of a StasisThreads session.
fn verify_jvm(s: &Session, ok: &str) {
    let all = assert_ticks_consecutive(&s.outputs(), Some(0));
    let last = assert_fields_progress(&s.outputs(), &["atomic", "sync"]);
    let f = tick_fields(ok.strip_prefix("OK ").unwrap());
    assert_eq!(f["ticks"], all.last().unwrap() + 1, "{ok}");
    assert!(
        f["atomic"] >= last["atomic"] && f["sync"] == f["atomic"],
        "{ok}"
    );
}

#[test]
fn java_threads_survive_restarts() {
    let Some(argv) = jvm_argv() else { return };
    let _l = jvm_lock();
    let w = Work::new("java");
    let mut rng = Rng::new("java");
    let mut s = Session::start(&w, &argv);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(5, T_READY);
    rng.sleep_ms(20, 500);
    w.checkpoint_ok(false, s.cur());
    let jvm_threads = inspect_tids(&w.inspect_json()).len();
    assert!(
        jvm_threads > 7,
        "the image has {jvm_threads} threads; the JVM runs main, 6 workers and its own"
    );
    s.cur().wait_more_ticks(3, T_READY);
    for _ in 0..3 {
        rng.sleep_ms(20, 500);
        s.cycle(Probe::Ticks);
    }
    rng.sleep_ms(20, 300);
    let ok = s.finish();
    s.assert_no_rerun();
    verify_jvm(&s, &ok);
    eprintln!("{ready}, {jvm_threads} threads in the image; {ok}");
}

/// Restart on another node (the batch-job case), simulated: node-local state
/// outside the checkpoint, i.e. the JVM's perf-data file
/// /tmp/hsperfdata_<user>/<pid> (mapped MAP_SHARED by every JVM with default
/// options), is gone when the restart happens. The same happens on the same
/// node when any other JVM under stasis (also pid 2) starts and ends between
/// the checkpoint and the restart: it removes the "stale" file of its pid.
/// The JVM must still restart and finish its work. (Workarounds on the user
/// side would be -XX:-UsePerfData or -XX:+PerfDisableSharedMem; the point
/// here is that default options work.)
#[test]
fn java_restarts_without_its_perfdata_file() {
    let Some(argv) = jvm_argv() else { return };
    let _l = jvm_lock();
    let w = Work::new("java_perfdata");
    let mut rng = Rng::new("java_perfdata");
    let mut s = Session::start(&w, &argv);
    s.cur().wait_tick(5, T_READY);
    rng.sleep_ms(20, 300);
    s.checkpoint_kill();
    let meta = w.inspect_json();
    let perf: Vec<String> = meta["processes"][0]["mappings"]
        .as_array()
        .expect("no mappings in inspect --json")
        .iter()
        .filter(|m| m["shared"].as_bool() == Some(true))
        .filter_map(|m| m["name"].as_str())
        .filter(|n| n.contains("/hsperfdata_"))
        .map(String::from)
        .collect();
    eprintln!("perf-data mappings in the image: {perf:?}");
    for f in &perf {
        let _ = std::fs::remove_file(f);
    }
    s.restart(Probe::Ticks);
    rng.sleep_ms(20, 300);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    verify_jvm(&s, &ok);
}
