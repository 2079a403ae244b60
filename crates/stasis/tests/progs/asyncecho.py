"""asyncecho: an asyncio TCP echo server and its clients in one job.

    python3 asyncecho.py server N     (the job: starts N client processes)
    python3 asyncecho.py client PORT I

The server listens on 127.0.0.1 port 0 (asyncio.start_server) and starts N
clients (asyncio.create_subprocess_exec of this script). Client I connects,
says `hello I`, then keeps 4 messages `msg I SEQ PAYLOAD` outstanding
(pipelined; PAYLOAD a deterministic function of I and SEQ, 1-600 bytes); the
server checks that every client's SEQ goes 0, 1, 2, ... and answers each with
`echo I SEQ PAYLOAD`, which the client checks (order, sequence, payload). At
`go` each client collects its outstanding echoes, sends `bye I SENT` and
expects `bye I COUNT` (COUNT: what the server echoed for it) with COUNT ==
SENT, then exits 0. The server prints `ready port=P clients=PID,...`, then
`tick N served=S c0=.. c1=..` every ~30 ms; at `go` it waits for every
client (exit 0 each, and a bye from each with the count it echoed) and prints
`OK ticks=N served=S clients=N` or `FAIL ...`.
"""

import asyncio
import hashlib
import os
import sys


def payload(i, seq):
    n = 1 + (seq * 7919 + i * 104729) % 600
    h = hashlib.sha256(b"%d:%d" % (i, seq)).hexdigest().encode()
    return (h * (n // len(h) + 1))[:n]


def fail(msg):
    sys.stdout.write("FAIL %s\n" % msg)
    sys.stdout.flush()
    os._exit(1)


async def client(port, i):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello %d\n" % i)
    sent = 0
    got = 0

    async def receive_one():
        nonlocal got
        line = await asyncio.wait_for(reader.readline(), 10)
        want = b"echo %d %d %s\n" % (i, got, payload(i, got))
        if line != want:
            fail("client %d: echo %d is %r, want %r" % (i, got, line[:80], want[:80]))
        got += 1

    while not os.path.exists("go"):
        while sent < got + 4:
            writer.write(b"msg %d %d %s\n" % (i, sent, payload(i, sent)))
            sent += 1
        await writer.drain()
        await receive_one()
        await asyncio.sleep(0.005)
    while got < sent:
        await receive_one()
    writer.write(b"bye %d %d\n" % (i, sent))
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    if line != b"bye %d %d\n" % (i, sent):
        fail("client %d: the server answered bye with %r, %d sent" % (i, line[:80], sent))
    writer.close()
    await writer.wait_closed()


async def server(n):
    served = [0] * n
    byes = {}

    async def handle(reader, writer):
        line = await reader.readline()
        parts = line.split()
        if len(parts) != 2 or parts[0] != b"hello":
            fail("server: greeting %r" % line)
        i = int(parts[1])
        expect = 0
        while True:
            line = await reader.readline()
            if not line:
                fail("server: client %d closed without bye" % i)
            parts = line.rstrip(b"\n").split(b" ")
            if parts[0] == b"bye":
                byes[i] = int(parts[2])
                writer.write(b"bye %d %d\n" % (i, expect))
                await writer.drain()
                writer.close()
                return
            if parts[0] != b"msg" or int(parts[1]) != i or int(parts[2]) != expect:
                fail("server: client %d: message %d arrived as %r" % (i, expect, line[:80]))
            if parts[3] != payload(i, expect):
                fail("server: client %d: message %d has a wrong payload" % (i, expect))
            writer.write(b"echo %d %d %s\n" % (i, expect, parts[3]))
            await writer.drain()
            expect += 1
            served[i] += 1

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "client", str(port), str(i)
        )
        for i in range(n)
    ]
    print(
        "ready port=%d clients=%s" % (port, ",".join(str(p.pid) for p in procs)),
        flush=True,
    )
    ticks = 0
    while not os.path.exists("go"):
        print(
            "tick %d served=%d %s"
            % (ticks, sum(served), " ".join("c%d=%d" % (i, c) for i, c in enumerate(served))),
            flush=True,
        )
        ticks += 1
        await asyncio.sleep(0.03)
    codes = [await asyncio.wait_for(p.wait(), 20) for p in procs]
    bad = []
    if codes != [0] * n:
        bad.append("client exit codes %r" % codes)
    for i in range(n):
        if byes.get(i) != served[i]:
            bad.append("client %d sent %r messages, the server echoed %d" % (i, byes.get(i), served[i]))
    srv.close()
    await srv.wait_closed()
    if bad:
        fail("; ".join(bad))
    print("OK ticks=%d served=%d clients=%d" % (ticks, sum(served), n), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server(int(sys.argv[2])))
    else:
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3])))
