//! python3 with threads: a producer thread feeds a queue.Queue drained by 4
//! consumer threads (threading.Thread, GIL, Condition/Lock futex waits)
//! through a checkpoint without --kill and two checkpoint --kill/restart
//! cycles at random moments. The main thread's ticks continue exactly, the
//! produced/consumed counts never go back and advance after every restore;
//! at the end every consumer is still alive and working, all threads join,
//! and every produced item was processed exactly once, with the right value.
mod common;
use common::*;

const SCRIPT: &str = r#"
import os, sys, time, threading, queue

NCONS = 4

def value(i):
    return (i * i * 2654435761 + 12345) % 1000003

q = queue.Queue(maxsize=64)
stop = threading.Event()
lock = threading.Lock()
produced = 0
done = {}          # item -> (consumer, value)
dups = []
per = [0] * NCONS  # items per consumer, under lock
ids = {}           # thread name -> native id at start
bad = []

def producer():
    global produced
    ids["producer"] = threading.get_native_id()
    i = 0
    while not stop.is_set():
        for _ in range(5):
            q.put(i)
            i += 1
            produced = i
        time.sleep(0.002)
    for _ in range(NCONS):
        q.put(None)
    if ids["producer"] != threading.get_native_id():
        bad.append("producer's native id changed")

def consumer(k):
    me = threading.get_native_id()
    ids["consumer%d" % k] = me
    n = 0
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            break
        v = value(item)
        with lock:
            if item in done:
                dups.append(item)
            done[item] = (k, v)
            per[k] += 1
        n += 1
        q.task_done()
    with lock:
        if per[k] != n:
            bad.append("consumer %d counted %d items, the shared table %d" % (k, n, per[k]))
    if me != threading.get_native_id():
        bad.append("consumer %d's native id changed" % k)

threads = [threading.Thread(target=consumer, args=(k,), name="consumer%d" % k) for k in range(NCONS)]
threads.append(threading.Thread(target=producer, name="producer"))
for t in threads:
    t.start()
while len(done) < 20:
    time.sleep(0.001)
main_id = threading.get_native_id()
sys.stdout.write("ready threads=%d\n" % threading.active_count())
sys.stdout.flush()

n = 0
while not os.path.exists("go"):
    with lock:
        c = len(done)
    sys.stdout.write("tick %d produced=%d consumed=%d\n" % (n, produced, c))
    sys.stdout.flush()
    n += 1
    time.sleep(0.02)

# every consumer still gets work (after the last restore)
with lock:
    before = list(per)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    with lock:
        if all(per[k] > before[k] for k in range(NCONS)):
            break
    time.sleep(0.01)
with lock:
    for k in range(NCONS):
        if per[k] <= before[k]:
            bad.append("consumer %d got no item after go (stuck at %d)" % (k, per[k]))

stop.set()
for t in threads:
    t.join(10)
    if t.is_alive():
        bad.append("%s did not end" % t.name)
if threading.active_count() != 1:
    bad.append("%d threads still active" % threading.active_count())
if dups:
    bad.append("items processed twice: %r" % dups[:10])
if len(done) != produced or set(done) != set(range(produced)):
    missing = sorted(set(range(produced)) - set(done))
    bad.append("%d items produced, %d processed (missing %r)" % (produced, len(done), missing[:10]))
wrong = [i for i, (k, v) in done.items() if v != value(i)]
if wrong:
    bad.append("wrong values for items %r" % wrong[:10])
if sum(per) != produced:
    bad.append("per-consumer counts %r do not add up to %d" % (per, produced))
if main_id != threading.get_native_id():
    bad.append("main thread's native id changed")
if bad:
    print("FAIL " + "; ".join(bad))
    sys.exit(1)
print("OK ticks=%d produced=%d per=%s" % (n, produced, ",".join(map(str, per))))
"#;

fn python() -> &'static str {
    // a real binary rather than a version-manager shim
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

#[test]
fn python_threads_queue_survives_restarts() {
    let w = Work::new("python_threads");
    let mut rng = Rng::new("python_threads");
    std::fs::write(w.path("script.py"), SCRIPT).unwrap();
    let mut s = Session::start(&w, &[python(), "-u", "script.py"]);
    assert_eq!(s.cur().lines()[0], "ready threads=6");
    s.cur().wait_tick(3, T_READY);
    rng.sleep_ms(20, 300);
    w.checkpoint_ok(false, s.cur());
    let n = inspect_tids(&w.inspect_json()).len();
    assert!(n >= 6, "the image has {n} threads, python runs 6");
    s.cur().wait_more_ticks(2, T_READY);
    for _ in 0..2 {
        rng.sleep_ms(20, 300);
        s.cycle(Probe::Ticks);
    }
    rng.sleep_ms(20, 300);
    let ok = s.finish();
    s.assert_no_rerun();
    let all = assert_ticks_consecutive(&s.outputs(), Some(0));
    let last = assert_fields_progress(&s.outputs(), &["produced", "consumed"]);
    let f = tick_fields(ok.strip_prefix("OK ").unwrap());
    assert_eq!(f["ticks"], all.last().unwrap() + 1, "{ok}");
    assert!(f["produced"] >= last["produced"], "{ok}");
    eprintln!("{ok}");
}
