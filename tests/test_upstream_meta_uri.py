"""`--meta-uri`: the metadata and the WAL cannot live on another deployment than the
upstream (README, Upstreams: the engine folds the WAL into overlays server-side, and
checks a client's right to manage branches on its own upstream connection), so the
option is refused at start-up, before anything is written anywhere."""

from __future__ import annotations

import subprocess

from pymongo import MongoClient

from tests.servers import BIN, Secantus, free_port


def test_meta_uri_on_another_deployment_is_refused_before_anything_is_written() -> None:
    upstream, meta = Secantus().start(), Secantus().start()
    try:
        done = subprocess.run(
            [str(BIN / "mongobranch"), "serve", "--upstream", upstream.uri,
             "--meta-uri", meta.uri, "--meta-db", "mb_meta_uri",
             "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60)
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert "--meta-uri is not supported" in out
        assert "must be on the --upstream deployment" in out
        assert "Traceback" not in out
        for server in (upstream, meta):
            with MongoClient(server.uri, directConnection=True) as client:
                assert "mb_meta_uri" not in client.list_database_names()
    finally:
        upstream.stop()
        meta.stop()
