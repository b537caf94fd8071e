"""Under attack and load: a seeded frame fuzzer, slow clients, many connections at once.

The fuzzer mutates valid messages (lengths, opcodes, flag bits, section kinds, BSON
bodies, compression headers) and sends them to the main port and a branch port, a few
per connection, then half-closes: the proxy must answer or close every such connection
(never hang on it), stay up, and keep serving a canary client throughout. Figures (frames,
connections, outcomes, memory) are printed for benchmarks/RESULTS.md "Robustness".
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from pymongo import MongoClient

from tests import rawwire
from tests.servers import BIN, ProxyProcess, Secantus, free_port, wait_port

SEED = int(os.environ.get("MONGOBRANCH_FUZZ_SEED", "20261130"))
FRAMES = int(os.environ.get("MONGOBRANCH_FUZZ_FRAMES", "100000"))
PER_CONNECTION = 8  # mutated frames sent on one connection before it half-closes
PARALLEL = 16
# Hang detector only: a connection the proxy neither answers nor closes in this long.
HANG = float(os.environ.get("MONGOBRANCH_FUZZ_HANG", "60"))
HEADER = struct.Struct("<iiii")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def target(upstream: Secantus) -> Iterator[tuple[ProxyProcess, int]]:
    proc = ProxyProcess(upstream.uri, meta_db="mongobranch_robust").start()
    with MongoClient(proc.uri) as c:
        c.fuzz.items.drop()
        c.fuzz.items.insert_many([{"_id": i, "v": i} for i in range(50)])
        c.fuzz.canary_docs.drop()
        c.fuzz.canary_docs.insert_one({"_id": 1, "v": 1})
        port = c.admin.command({"createBranch": "fuzz"})["port"]
    with MongoClient(f"mongodb://127.0.0.1:{port}/") as b:
        b.fuzz.items.insert_one({"_id": "branch"})
    yield proc, port
    proc.stop()


# -- frames ------------------------------------------------------------------------------


def _op_msg(body: dict[str, Any], *, flags: int = 0, sequence: list[dict[str, Any]] | None = None,
            ) -> bytes:
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(body)
    if sequence is not None:
        docs = b"".join(bson.encode(d) for d in sequence)
        ident = b"documents\x00"
        payload += b"\x01" + struct.pack("<i", 4 + len(ident) + len(docs)) + ident + docs
    return rawwire.frame(rawwire.OP_MSG, payload)


def templates() -> list[bytes]:
    hello = {"hello": 1, "$db": "admin", "client": {"driver": {"name": "fuzz", "version": "0"}}}
    return [
        _op_msg(hello),
        _op_msg({"ping": 1, "$db": "admin"}),
        _op_msg({"find": "items", "filter": {"v": {"$gte": 3}}, "batchSize": 5, "$db": "fuzz"}),
        _op_msg({"find": "items", "filter": {"_id": 7}, "$db": "fuzz"}),
        _op_msg({"insert": "items", "$db": "fuzz"}, sequence=[{"x": 1}, {"x": "two"}]),
        _op_msg({"update": "items", "updates": [{"q": {"_id": 1}, "u": {"$inc": {"n": 1}}}],
                 "$db": "fuzz"}),
        _op_msg({"aggregate": "items", "pipeline": [{"$match": {"v": 1}}], "cursor": {},
                 "$db": "fuzz"}),
        _op_msg({"getMore": 12345, "collection": "items", "$db": "fuzz"}),
        _op_msg({"insert": "items", "documents": [{"y": 1}], "$db": "fuzz"}, flags=2),
        rawwire.op_msg({"ping": 1, "$db": "admin"}, checksum=True),
        rawwire.op_query("admin.$cmd", {"isMaster": 1}),
        rawwire.compressed(_op_msg({"find": "items", "filter": {}, "$db": "fuzz"})),
        rawwire.compressed(_op_msg({"ping": 1, "$db": "admin"})),
    ]


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One or two mutations of a valid message."""
    raw = bytearray(frame)
    for _ in range(rng.choice((1, 1, 2))):
        if len(raw) < 32:  # a truncation made it too short for another field mutation
            break
        kind = rng.randrange(9)
        if kind == 0:  # the length field
            value = rng.choice((0, -1, 15, 16, len(raw) - 1, len(raw) + 1, len(raw) * 2,
                                2**31 - 1, 48_000_001, rng.randrange(-2**31, 2**31)))
            struct.pack_into("<i", raw, 0, value)
        elif kind == 1:  # the opcode
            struct.pack_into("<i", raw, 12, rng.choice((1, 2001, 2004, 2010, 2011, 2012,
                                                        2013, 0, -1, rng.randrange(2**31))))
        elif kind == 2 and len(raw) > 20:  # flag bits
            struct.pack_into("<I", raw, 16, struct.unpack_from("<I", raw, 16)[0]
                             ^ (1 << rng.choice((0, 1, 2, 16, 17, 31, rng.randrange(32)))))
        elif kind == 3 and len(raw) > 20:  # a section kind byte
            at = 20 if rng.random() < 0.7 else rng.randrange(20, len(raw))
            raw[at] = rng.choice((0, 1, 2, 3, 0x7F, 0xFF, rng.randrange(256)))
        elif kind == 4 and len(raw) > 21:  # bytes of a BSON body
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(21, len(raw))] = rng.randrange(256)
        elif kind == 5 and len(raw) > 25:  # a BSON length inside the body
            at = rng.randrange(21, len(raw) - 4)
            struct.pack_into("<i", raw, at, rng.choice((0, -1, 5, 2**31 - 1,
                                                        rng.randrange(-100, 5000))))
        elif kind == 6 and len(raw) > 25:  # compression header fields (or what is there)
            at = rng.choice((16, 20, 24))
            if at == 24:
                raw[at] = rng.choice((0, 1, 2, 3, 9, 255))
            else:
                struct.pack_into("<i", raw, at, rng.choice((0, -1, 2013, 2004, 2**31 - 1,
                                                            rng.randrange(-2**31, 2**31))))
        elif kind == 7:  # truncated, the length field left as it was or fixed up
            raw = raw[:rng.randrange(1, len(raw))]
            if rng.random() < 0.5 and len(raw) >= 4:
                struct.pack_into("<i", raw, 0, len(raw))
        else:  # trailing garbage
            raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            if rng.random() < 0.5:
                struct.pack_into("<i", raw, 0, len(raw))
    return bytes(raw)


# -- the client side ---------------------------------------------------------------------


async def _read_until_closed(reader: asyncio.StreamReader) -> int:
    """Bytes the proxy sent before it closed the connection."""
    total = 0
    try:
        while chunk := await reader.read(65536):
            total += len(chunk)
    except OSError:
        pass
    return total


HUNG: list[tuple[int, list[bytes]]] = []  # (port, frames) of connections that hung


async def fuzz_connection(port: int, frames: list[bytes], stats: Counter[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in frames:
            writer.write(data)
        try:
            await writer.drain()
            writer.write_eof()
        except OSError:  # reset, broken pipe, not connected: the proxy closed it already
            stats["closed while sending"] += 1
        try:
            got = await asyncio.wait_for(_read_until_closed(reader), HANG)
        except TimeoutError:
            stats["hung"] += 1
            HUNG.append((port, frames))
            return
        stats["answered, then closed" if got else "closed without a reply"] += 1
    finally:
        writer.close()


async def canary(port: int) -> None:
    """A well-behaved client on its own connection: hello, ping and a find answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, body in enumerate(({"hello": 1, "$db": "admin"}, {"ping": 1, "$db": "admin"},
                                  {"find": "canary_docs", "filter": {"_id": 1},
                                   "$db": "fuzz"}), 1):
            writer.write(rawwire.op_msg(body, request_id=i))
            head = await asyncio.wait_for(reader.readexactly(16), HANG)
            length, _rid, response_to, _op = HEADER.unpack(head)
            rest = await reader.readexactly(length - 16)
            reply = bson.decode(rest[5:])
            assert response_to == i and reply["ok"] == 1.0, reply
            if "find" in body:
                assert reply["cursor"]["firstBatch"] == [{"_id": 1, "v": 1}]
    finally:
        writer.close()


async def run_fuzzer(ports: list[int], total: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    bases = templates()
    stats: Counter[str] = Counter()
    sent = 0
    batch: list[asyncio.Task[None]] = []
    round_no = 0
    while sent < total:
        for _ in range(PARALLEL):
            n = min(rng.randint(1, PER_CONNECTION), total - sent)
            if n <= 0:
                break
            port = ports[rng.randrange(len(ports))]
            frames = [mutate(rng, rng.choice(bases)) for _ in range(n)]
            sent += n
            stats["frames"] += n
            stats["connections"] += 1
            batch.append(asyncio.create_task(fuzz_connection(port, frames, stats)))
        await asyncio.gather(*batch)
        batch.clear()
        round_no += 1
        if round_no % 50 == 0:
            await asyncio.gather(*(canary(p) for p in ports))
            stats["canary rounds"] += 1
    return stats


def test_fuzzer(target: tuple[ProxyProcess, int]) -> None:
    proc, branch_port = target
    assert proc.proc is not None
    before = rss_kib(proc.proc.pid)
    started = time.monotonic()
    stats = asyncio.run(run_fuzzer([proc.port, branch_port], FRAMES, SEED))
    elapsed = time.monotonic() - started
    after = rss_kib(proc.proc.pid)
    print(f"\nfuzzer seed {SEED}: {dict(stats)} in {elapsed:.0f} s; "
          f"proxy RSS {before} -> {after} KiB")
    assert stats["frames"] >= FRAMES
    assert stats["hung"] == 0, [(p == proc.port, [f.hex() for f in frames])
                                for p, frames in HUNG]
    assert proc.proc.poll() is None, "the proxy died"
    asyncio.run(canary(proc.port))
    asyncio.run(canary(branch_port))
    status, _ = proc.api("GET", "/healthz")
    assert status == 200
    # Nothing is kept per closed connection: memory settles near where it started.
    assert after - before < 64 * 1024, (before, after)


@pytest.mark.parametrize("size", [21, 22, 24])
def test_short_op_msg_after_a_request(target: tuple[ProxyProcess, int], size: int) -> None:
    """Found by the fuzzer (seed 20261130): an OP_MSG of 22 to 24 bytes queued behind a
    request was never answered nor closed (a struct.error escaped the queue)."""
    proc, branch_port = target
    short = rawwire.frame(rawwire.OP_MSG, b"\x00" * (size - 16))
    for port in (proc.port, branch_port):
        with rawwire.connect(port) as sock:
            sock.sendall(rawwire.op_msg({"ping": 1, "$db": "admin"}) + short)
            sock.shutdown(socket.SHUT_WR)
            _rid, _to, payload = rawwire.read_message(sock)
            assert rawwire.msg_reply(payload)["ok"] == 1.0
            assert rawwire.closed_by_peer(sock)


# -- slow clients -------------------------------------------------------------------------


def test_slow_clients_do_not_stall_others(target: tuple[ProxyProcess, int]) -> None:
    """A byte-at-a-time sender, a half-sent frame and a client that never reads its replies
    (of a big cursor) are held open while other clients are served; memory stays bounded."""
    proc, branch_port = target
    assert proc.proc is not None
    with MongoClient(proc.uri) as c:
        c.fuzz.big.drop()
        blob = "x" * 4096
        c.fuzz.big.insert_many([{"_id": i, "blob": blob} for i in range(2000)])
    before = rss_kib(proc.proc.pid)
    held: list[socket.socket] = []
    try:
        for port in (proc.port, branch_port):
            # a byte at a time: the first half of a ping, one byte per send
            s = rawwire.connect(port)
            for b in rawwire.op_msg({"ping": 1, "$db": "admin"})[:20]:
                s.send(bytes([b]))
            held.append(s)
            # half a frame, then nothing
            s = rawwire.connect(port)
            s.send(rawwire.op_msg({"find": "items", "$db": "fuzz"})[:30])
            held.append(s)
            # never reads: asks for ~8 MB of documents, many times, reading nothing
            s = rawwire.connect(port)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for i in range(20):
                s.send(rawwire.op_msg({"find": "big", "batchSize": 2000, "$db": "fuzz"},
                                      request_id=i + 1))
            held.append(s)
        for _ in range(20):
            asyncio.run(canary(proc.port))
            asyncio.run(canary(branch_port))
        after = rss_kib(proc.proc.pid)
        print(f"\nslow clients: proxy RSS {before} -> {after} KiB with {len(held)} held")
        # 20 replies of ~8 MB each are not buffered: the proxy stops reading the upstream
        # (and the non-reader's requests) when the client's socket is full.
        assert after - before < 64 * 1024, (before, after)
    finally:
        for s in held:
            s.close()
    asyncio.run(canary(proc.port))


# -- many connections at once ---------------------------------------------------------------

CONNECTIONS = int(os.environ.get("MONGOBRANCH_LOAD_CONNECTIONS", "1000"))


async def _open_and_use(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that did hello, ping and a find, left open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i, body in enumerate(({"hello": 1, "$db": "admin"}, {"ping": 1, "$db": "admin"},
                              {"find": "canary_docs", "filter": {"_id": 1}, "$db": "fuzz"}), 1):
        writer.write(rawwire.op_msg(body, request_id=i))
        head = await reader.readexactly(16)
        length, _rid, response_to, _op = HEADER.unpack(head)
        reply = rawwire.msg_reply(await reader.readexactly(length - 16))
        assert response_to == i and reply["ok"] == 1.0, reply
        if "find" in body:
            assert reply["cursor"]["firstBatch"] == [{"_id": 1, "v": 1}]
    return reader, writer


async def _hold(ports: list[int], n: int) -> dict[str, Any]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    limit = asyncio.Semaphore(100)  # connecting, not holding: all n stay open at once

    async def one(port: int) -> None:
        async with limit:
            conns.append(await _open_and_use(port))

    try:
        for port in ports:
            await asyncio.gather(*(one(port) for _ in range(n)))
        # every connection is still served while all are held
        await asyncio.gather(*(canary(p) for p in ports))
        return {"held": len(conns)}
    finally:
        for _, writer in conns:
            writer.close()


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def roomy() -> Iterator[tuple[ProxyProcess, int]]:
    """Its own upstream: every client connection has its own upstream connection, and
    SecantusDB refuses more than 1,000 connections (no option; mongod has no such default
    cap), so this one is started allowing enough for both ports and the proxy's own."""
    room = 2 * CONNECTIONS + 200
    server = Secantus(extra=["--session-max", str(room)], max_connections=room).start()
    proc = ProxyProcess(server.uri, meta_db="mongobranch_load").start()
    try:
        with MongoClient(proc.uri) as c:
            c.fuzz.canary_docs.insert_one({"_id": 1, "v": 1})
            port = c.admin.command({"createBranch": "load"})["port"]
        yield proc, port
    finally:
        proc.stop()
        server.stop()


def test_a_thousand_connections_per_port(roomy: tuple[ProxyProcess, int]) -> None:
    proc, branch_port = roomy
    assert proc.proc is not None
    pid = proc.proc.pid
    before, files_before = rss_kib(pid), _open_files(pid)
    peak: dict[str, int] = {}

    async def run() -> dict[str, Any]:
        async def sample() -> None:
            while True:
                peak["rss"] = max(peak.get("rss", 0), rss_kib(pid))
                peak["files"] = max(peak.get("files", 0), _open_files(pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        try:
            return await _hold([proc.port, branch_port], CONNECTIONS)
        finally:
            sampler.cancel()

    result = asyncio.run(run())
    assert result["held"] == 2 * CONNECTIONS
    per_conn = (peak["rss"] - before) / (2 * CONNECTIONS)
    print(f"\n{CONNECTIONS} connections on the main port and {CONNECTIONS} on a branch port "
          f"held at once: proxy RSS {before} -> peak {peak['rss']} KiB "
          f"({per_conn:.1f} KiB per client connection, its upstream connection included); "
          f"open files {files_before} -> peak {peak['files']}")
    assert peak["files"] >= 2 * CONNECTIONS  # really held at once (client sockets at least)
    asyncio.run(canary(proc.port))


# -- the open-file limit ----------------------------------------------------------------------


def _serve_limited(upstream: Secantus, soft: int, hard: int) -> tuple[subprocess.Popen[bytes],
                                                                       int, Path]:
    port, admin = free_port(), free_port()
    log = Path(tempfile.mktemp(prefix="mongobranch-nofile-", suffix=".log"))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mongobranch"), "serve", "--upstream", upstream.uri, "--listen",
             f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--meta-db",
             "mongobranch_nofile", "--branch-ports", "31900-31909"],
            stdout=out, stderr=out, preexec_fn=limit)
    wait_port(port, proc=proc)
    wait_port(admin, proc=proc)
    return proc, port, log


def test_raises_its_open_file_limit(upstream: Secantus) -> None:
    proc, _port, log = _serve_limited(upstream, 256, 2048)
    try:
        assert "open-file limit 2048: room for about 992 client connections" in log.read_text()
    finally:
        proc.terminate()
        proc.wait()


def test_says_when_it_cannot_accept_more(upstream: Secantus) -> None:
    """With a hard limit of 128 (room for 32 client connections) the proxy says so at
    start-up and when it is full; held clients keep being served, and once some leave,
    new ones are accepted again."""
    proc, port, log = _serve_limited(upstream, 128, 128)
    held: list[socket.socket] = []
    try:
        assert "open-file limit 128: room for about 32 client connections" in log.read_text()
        refused = 0
        for _ in range(48):
            try:
                s = rawwire.connect(port)
                assert rawwire.command(s, {"ping": 1, "$db": "admin"})["ok"] == 1.0
                held.append(s)
            except (OSError, AssertionError, ConnectionError):
                refused += 1
        assert "the open-file limit (128) is nearly used up" in log.read_text()
        assert len(held) >= 32 and refused + len(held) == 48
        for s in held[:8]:  # the first ones are still served
            assert rawwire.command(s, {"ping": 1, "$db": "admin"}, request_id=2)["ok"] == 1.0
        for s in held[:20]:
            s.close()
        del held[:20]
        for _ in range(100):  # the proxy notices the closes as it gets to them
            try:
                with rawwire.connect(port) as s:
                    assert rawwire.command(s, {"ping": 1, "$db": "admin"})["ok"] == 1.0
                    break
            except (OSError, AssertionError, ConnectionError):
                time.sleep(0.1)
        else:
            raise AssertionError("no connection accepted after clients left")
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait()
