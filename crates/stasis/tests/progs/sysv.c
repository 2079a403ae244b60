/* sysv: System V IPC shared by a parent and a child.
 *   seg  shmget(IPC_PRIVATE, 3 pages), attached by the parent before fork
 *        (so the child inherits it) and once more by the child at another
 *        address: a counter and each process's count;
 *   sem  semget(IPC_PRIVATE, 3): sem 0 is a mutex (semop -1/+1, no
 *        SEM_UNDO) guarding the counter; sems 1 and 2 hold 1234 and 7;
 *   msq  msgget(0x53540001): message s has type 1 + s % 3, length
 *        msg_len(s) and content msg_byte(s, i). The parent sends K = 6 at
 *        start and one per tick; the child receives (type 0, IPC_NOWAIT, in
 *        order) only while more than K are queued, so 6 or 7 messages are
 *        always queued, and checks each.
 * Both processes increment the counter under the semaphore (child every
 * ~1 ms, parent 5 times per tick) and check through the child's second
 * attachment that both addresses show the same memory.
 * Prints `ready shmid=I semid=I msqid=I child=PID`, then `tick N counter=C
 * sent=S recv=R` every ~20 ms. At `go`: shm_nattch == 3 (parent 1, child 2);
 * the parent stops the child and reaps it (exit 0); checks counter == sum of
 * the counts; GETALL == {1, 1234, 7}; msgget(key) gives the same id; the
 * first type-3 message (msgrcv type 3) is the oldest queued one of that type;
 * the others come in order (type 0), then ENOMSG; a fresh shmat of the id
 * shows the same content; nattch == 1. Output: `OK ticks=N counter=C
 * sent=S recv=R` / `FAIL ...`. */
#include "util.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define PAGE 4096
#define K 6
#define MSGKEY 0x53540001

struct seg {
    uint64_t counter, pcount, ccount, crecv, stop;
    char child_fail[512];
    uint8_t pattern[2 * PAGE];
};

struct msg {
    long mtype;
    char text[1024];
};

static size_t msg_len(uint64_t s) { return 8 + (s * 89) % 900; }
static long msg_type(uint64_t s) { return 1 + (long)(s % 3); }
static uint8_t msg_byte(uint64_t s, size_t i) { return (uint8_t)(s * 17 + i * 3 + (i >> 5)); }

static int semid, msqid, shmid;
static struct seg *seg;

static int semop1(int delta) {
    struct sembuf op = {0, (short)delta, 0};
    if (semop(semid, &op, 1)) return errno == EINTR ? -2 : -1;
    return 0;
}

static void msg_fill(struct msg *m, uint64_t s) {
    m->mtype = msg_type(s);
    memcpy(m->text, &s, 8);
    for (size_t i = 8; i < msg_len(s); i++) m->text[i] = (char)msg_byte(s, i);
}

/* Check a received message of length n against message s; 0 if right. */
static int msg_check(const struct msg *m, ssize_t n, uint64_t s, char *err, size_t cap) {
    uint64_t got;
    memcpy(&got, m->text, 8);
    if (n != (ssize_t)msg_len(s) || m->mtype != msg_type(s) || got != s) {
        snprintf(err, cap, "message %llu arrived as seq %llu type %ld length %zd (want type %ld length %zu)",
                 (unsigned long long)s, (unsigned long long)got, m->mtype, n, msg_type(s), msg_len(s));
        return -1;
    }
    for (size_t i = 8; i < (size_t)n; i++)
        if ((uint8_t)m->text[i] != msg_byte(s, i)) {
            snprintf(err, cap, "message %llu differs at byte %zu", (unsigned long long)s, i);
            return -1;
        }
    return 0;
}

static void child_main(void) {
    struct seg *seg2 = shmat(shmid, NULL, 0);
    if (seg2 == (void *)-1 || seg2 == seg) {
        snprintf(seg->child_fail, sizeof seg->child_fail, "child: second shmat: %s", strerror(errno));
        _exit(1);
    }
    for (;;) {
        int r = semop1(-1);
        if (r) {
            snprintf(seg->child_fail, sizeof seg->child_fail, "child: semop: %s",
                     r == -2 ? "EINTR" : strerror(errno));
            _exit(1);
        }
        if (seg->stop) {
            semop1(1);
            _exit(0);
        }
        seg->counter++;
        seg->ccount++;
        if (seg2->counter != seg->counter || seg2->ccount != seg->ccount) {
            snprintf(seg->child_fail, sizeof seg->child_fail,
                     "child: the two attachments differ (counter %llu vs %llu)",
                     (unsigned long long)seg->counter, (unsigned long long)seg2->counter);
            semop1(1);
            _exit(1);
        }
        semop1(1);
        struct msqid_ds ds;
        if (msgctl(msqid, IPC_STAT, &ds)) {
            snprintf(seg->child_fail, sizeof seg->child_fail, "child: IPC_STAT: %s", strerror(errno));
            _exit(1);
        }
        if (ds.msg_qnum > K) {
            struct msg m;
            ssize_t n = msgrcv(msqid, &m, sizeof m.text, 0, IPC_NOWAIT);
            if (n < 0 || msg_check(&m, n, seg->crecv, seg->child_fail, sizeof seg->child_fail)) {
                if (n < 0)
                    snprintf(seg->child_fail, sizeof seg->child_fail,
                             "child: msgrcv of message %llu: %s", (unsigned long long)seg->crecv,
                             strerror(errno));
                _exit(1);
            }
            seg->crecv++;
        }
        struct timespec ts = {0, 700000};
        nanosleep(&ts, NULL);
    }
}

static uint64_t sent;

static void send_msg(void) {
    struct msg m;
    msg_fill(&m, sent);
    if (msgsnd(msqid, &m, msg_len(sent), IPC_NOWAIT)) {
        out("FAIL msgsnd of message %llu: %s\n", (unsigned long long)sent, strerror(errno));
        exit(1);
    }
    sent++;
}

int main(void) {
    setup();
    shmid = shmget(IPC_PRIVATE, 3 * PAGE, IPC_CREAT | 0600);
    semid = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);
    msqid = msgget(MSGKEY, IPC_CREAT | IPC_EXCL | 0600);
    if (shmid < 0 || semid < 0 || msqid < 0) die("shmget/semget/msgget");
    seg = shmat(shmid, NULL, 0);
    if (seg == (void *)-1) die("shmat");
    for (size_t i = 0; i < sizeof seg->pattern; i++) seg->pattern[i] = (uint8_t)(i * 7 + 3);
    unsigned short init[3] = {1, 1234, 7};
    if (semctl(semid, 0, SETALL, init)) die("SETALL");
    for (int k = 0; k < K; k++) send_msg();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) child_main();
    out("ready shmid=%d semid=%d msqid=%d child=%d\n", shmid, semid, msqid, (int)child);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        for (int round = 0; round < 5; round++) {
            int r = semop1(-1);
            if (r) {
                out("FAIL parent: semop: %s\n", r == -2 ? "EINTR" : strerror(errno));
                exit(1);
            }
            seg->counter++;
            seg->pcount++;
            if (seg->counter != seg->pcount + seg->ccount) {
                out("FAIL counter %llu != parent %llu + child %llu\n", (unsigned long long)seg->counter,
                    (unsigned long long)seg->pcount, (unsigned long long)seg->ccount);
                exit(1);
            }
            semop1(1);
            sleep_ms(4);
        }
        send_msg();
        out("tick %u counter=%llu sent=%llu recv=%llu\n", n, (unsigned long long)seg->counter,
            (unsigned long long)sent, (unsigned long long)seg->crecv);
    }
    struct shmid_ds sds;
    CHECK(shmctl(shmid, IPC_STAT, &sds) == 0 && sds.shm_nattch == 3 && sds.shm_segsz == 3 * PAGE,
          "segment: %lu attachments (want 3), size %zu", (unsigned long)sds.shm_nattch, sds.shm_segsz);
    if (semop1(-1)) die("semop");
    seg->stop = 1;
    semop1(1);
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "child ended with status %#x (%s)", st, seg->child_fail);
    CHECK(seg->counter == seg->pcount + seg->ccount, "final counter %llu != %llu + %llu",
          (unsigned long long)seg->counter, (unsigned long long)seg->pcount,
          (unsigned long long)seg->ccount);
    unsigned short vals[3] = {0, 0, 0};
    CHECK(semctl(semid, 0, GETALL, vals) == 0 && vals[0] == 1 && vals[1] == 1234 && vals[2] == 7,
          "semaphore values %u %u %u, want 1 1234 7", vals[0], vals[1], vals[2]);
    CHECK(msgget(MSGKEY, 0) == msqid, "msgget(key) gives %d, want %d", msgget(MSGKEY, 0), msqid);
    /* the queue: sent - crecv messages; the oldest type-3 one first */
    uint64_t first3 = seg->crecv;
    while (msg_type(first3) != 3) first3++;
    char err[512];
    struct msg m;
    if (first3 < sent) {
        ssize_t r = msgrcv(msqid, &m, sizeof m.text, 3, IPC_NOWAIT);
        if (r < 0) fail("msgrcv type 3: %s", strerror(errno));
        else if (msg_check(&m, r, first3, err, sizeof err)) fail("type 3: %s", err);
    }
    for (uint64_t s = seg->crecv; s < sent; s++) {
        if (s == first3) continue;
        ssize_t r = msgrcv(msqid, &m, sizeof m.text, 0, IPC_NOWAIT);
        if (r < 0) {
            fail("msgrcv of message %llu: %s", (unsigned long long)s, strerror(errno));
            break;
        }
        if (msg_check(&m, r, s, err, sizeof err)) {
            fail("%s", err);
            break;
        }
    }
    CHECK(msgrcv(msqid, &m, sizeof m.text, 0, IPC_NOWAIT) < 0 && errno == ENOMSG,
          "more messages queued than sent");
    struct seg *again = shmat(shmid, NULL, SHM_RDONLY);
    CHECK(again != (void *)-1 && again->counter == seg->counter &&
              memcmp(again->pattern, seg->pattern, sizeof seg->pattern) == 0,
          "a new attachment of segment %d shows other content", shmid);
    for (size_t i = 0; i < sizeof seg->pattern; i++)
        if (seg->pattern[i] != (uint8_t)(i * 7 + 3)) {
            fail("segment pattern differs at %zu", i);
            break;
        }
    if (again != (void *)-1) shmdt(again);
    CHECK(shmctl(shmid, IPC_STAT, &sds) == 0 && sds.shm_nattch == 1,
          "segment: %lu attachments at the end, want 1", (unsigned long)sds.shm_nattch);
    shmctl(shmid, IPC_RMID, NULL);
    semctl(semid, 0, IPC_RMID);
    msgctl(msqid, IPC_RMID, NULL);
    finish("ticks=%u counter=%llu sent=%llu recv=%llu", n, (unsigned long long)seg->counter,
           (unsigned long long)sent, (unsigned long long)seg->crecv);
}
