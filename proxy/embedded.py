"""The embedded default upstream: SecantusDB run as a separate child process.

SecantusDB is GPL-2.0, so it is never imported here: it is found as an
executable and talked to over the wire like any other server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

log = logging.getLogger("mongobranch.embedded")


class EmbeddedUnavailable(Exception):
    pass


def find_executable() -> str:
    here = Path(sys.executable).parent / "secantusd-py"
    if here.exists():
        return str(here)
    found = shutil.which("secantusd-py")
    if found:
        return found
    raise EmbeddedUnavailable(
        "no --upstream given and the embedded server is not installed: "
        "pip install 'mongobranch[embedded]' or pass --upstream mongodb://..."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    def __init__(self, data_dir: Path | str, port: int | None = None, *, auth: bool = False,
                 extra_args: list[str] | None = None):
        self.data_dir = str(data_dir)
        self.port = port or free_port()
        self.auth = auth
        self.extra_args = extra_args or []
        self.process: asyncio.subprocess.Process | None = None
        self.log_path: Path | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def argv(self) -> list[str]:
        storage = self.data_dir
        if storage != ":memory:":
            Path(storage).mkdir(parents=True, exist_ok=True)
            storage = str(Path(storage) / "secantus")
        args = [find_executable(), "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", storage, "--log-level", "WARNING", *self.extra_args]
        if self.auth:
            args.append("--auth")
        return args

    async def start(self, timeout: float = 60.0) -> None:
        argv = self.argv()
        log.info("starting embedded server: %s", " ".join(argv))
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Its output goes to a file, never a pipe nobody drains.
        log_path = (Path(self.data_dir) / "secantus.log" if self.data_dir != ":memory:"
                    else Path(os.devnull))
        with open(log_path, "ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdout=log_file, stderr=log_file, env=env, start_new_session=True,
            )
        self.log_path = log_path
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise EmbeddedUnavailable(
                    f"embedded server exited with {self.process.returncode}; see {log_path}"
                )
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        await self.stop()
        raise EmbeddedUnavailable(f"embedded server did not answer within {timeout:.0f}s")

    async def stop(self, timeout: float = 15.0) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
