"""The `mongobranch` command line."""

from __future__ import annotations

import logging
import sys

import click

from proxy.app import ServeOptions, parse_hostport, parse_range, serve


def _run(coro: object) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        import asyncio

        return int(asyncio.run(coro))  # type: ignore[arg-type]


@click.group()
@click.version_option(package_name="mongobranch")
def main() -> None:
    """Git-style branches for MongoDB."""


@main.command("serve")
@click.option("--upstream", envvar="MONGOBRANCH_UPSTREAM", default=None,
              help="Upstream MongoDB URI; without it an embedded server is started.")
@click.option("--listen", default="127.0.0.1:27018", show_default=True, help="Main port.")
@click.option("--admin", default="127.0.0.1:9090", show_default=True, help="Admin HTTP API.")
@click.option("--branch-ports", default="27100-27199", show_default=True,
              help="Range of ports handed to branches.")
@click.option("--meta-db", default="mongobranch", show_default=True,
              help="Database holding branch metadata and the WAL.")
@click.option("--data-dir", default=".mongobranch", show_default=True,
              help="Data directory of the embedded server.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def serve_cmd(upstream: str | None, listen: str, admin: str, branch_ports: str, meta_db: str,
              data_dir: str, log_level: str) -> None:
    """Run the proxy."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parse_hostport(listen)
        parse_hostport(admin)
        parse_range(branch_ports)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    options = ServeOptions(upstream=upstream, listen=listen, admin=admin,
                           branch_ports=branch_ports, meta_db=meta_db, data_dir=data_dir)
    sys.exit(_run(serve(options)))


if __name__ == "__main__":
    main()
