"""Which BSON decodes happen on the main port's passthrough path, per request.

Runs the proxy in-process (uvloop) in front of an in-memory SecantusDB, wraps
`bson.decode` / `bson.decode_all`, drives a sync pymongo client from another
thread and counts the decodes made on behalf of a client connection (a
`ClientConnection` frame on the stack), by command and by the proxy function that
asked for them. A message forwarded unchanged should need none. Never asserts.

    .venv/bin/python benchmarks/decode_audit.py
"""

from __future__ import annotations

import asyncio
import collections
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/
from tests.servers import Secantus, free_port

N = 200


class Audit:
    def __init__(self) -> None:
        self.loop_thread: int | None = None
        self.current = "setup"
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.bytes: collections.Counter[tuple[str, str]] = collections.Counter()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self.loop_thread:
                frame = sys._getframe(1)
                asker, on_client_path = "", False
                while frame is not None:
                    code = frame.f_code
                    if not asker and "/proxy/" in code.co_filename:
                        asker = f"{Path(code.co_filename).name}:{code.co_qualname}"
                    if code.co_qualname.startswith("ClientConnection."):
                        on_client_path = True
                        break
                    frame = frame.f_back  # type: ignore[assignment]
                if on_client_path:
                    key = (self.current, asker or "?")
                    self.calls[key] += 1
                    self.bytes[key] += len(data)
            return fn(data, *args, **kwargs)

        return wrapper


def main() -> int:
    import uvloop
    from pymongo import InsertOne, MongoClient

    from proxy.app import Proxy, ServeOptions

    audit = Audit()
    bson.decode = audit.wrap(bson.decode)  # type: ignore[assignment]
    bson.decode_all = audit.wrap(bson.decode_all)  # type: ignore[assignment]

    server = Secantus().start()
    rows: list[tuple[str, int]] = []
    try:
        port, admin, branch = free_port(), free_port(), free_port()
        options = ServeOptions(upstream=server.uri,
                               listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}",
                               branch_ports=f"{branch}-{branch}", meta_db="mongobranch_audit",
                               data_dir=tempfile.mkdtemp(prefix="mongobranch-audit-"))

        def client() -> None:
            c: Any
            with MongoClient(f"mongodb://127.0.0.1:{port}/") as c:
                coll = c.audit.points
                coll.drop()
                steps: list[tuple[str, int, Callable[[], Any]]] = [
                    ("ping", N, lambda: c.admin.command("ping")),
                    ("find (point, by _id)", N, lambda: coll.find_one({"_id": 1})),
                    ("insert (1000 docs, document sequence)", 1,
                     lambda: coll.bulk_write([InsertOne({"_id": i, "pad": "x" * 100})
                                              for i in range(2, 1002)])),
                    ("find + getMore (1000 docs, batchSize 100)", 1,
                     lambda: list(coll.find().batch_size(100))),
                ]
                coll.insert_one({"_id": 1, "n": 1})
                for _ in range(20):
                    c.admin.command("ping")
                for label, count, fn in steps:
                    audit.current = label
                    for _ in range(count):
                        fn()
                    rows.append((label, count))
                audit.current = "teardown"

        async def run() -> None:
            audit.loop_thread = threading.get_ident()
            proxy = Proxy(options)
            await proxy.start()
            try:
                await asyncio.get_running_loop().run_in_executor(None, client)
            finally:
                await proxy.stop()

        uvloop.run(run())
    finally:
        server.stop()

    print("Full BSON decodes made by the proxy on behalf of client connections:\n")
    print("| workload | requests | decodes | per request | decoded bytes | asked by |")
    print("|---|---|---|---|---|---|")
    for label, count in rows:
        keys = [k for k in audit.calls if k[0] == label]
        calls = sum(audit.calls[k] for k in keys)
        size = sum(audit.bytes[k] for k in keys)
        askers = ", ".join(sorted({k[1] for k in keys})) or "-"
        print(f"| {label} | {count} | {calls} | {calls / count:.2f} | {size} | {askers} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
