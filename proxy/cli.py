"""The `mongobranch` command line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

# proxy.app (pymongo, aiohttp, the engine) is imported by `serve` only, so the
# `branch` commands, thin HTTP clients, start quickly.


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
    from proxy.app import ServeOptions, parse_hostport, parse_range, serve

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


# -- mongobranch branch ... : a thin client of the admin HTTP API ---------------------------

BRANCH_COLUMNS = ("name", "parent", "port", "uri", "created_at")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # piped: do not squeeze tables into 80 columns
        console = Console(stderr=stderr, highlight=False, width=max(console.width, 200))
    return console


def _client(ctx: click.Context, admin_url: str | None) -> Any:
    from proxy.admin.client import AdminClient

    return AdminClient(admin_url or ctx.obj)


def _call(fn: Callable[[], Any]) -> Any:
    """Runs one API call; errors go to stderr: 1 for an API error, 2 when unreachable."""
    from proxy.admin.client import ApiError, Unreachable

    try:
        return fn()
    except Unreachable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ApiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _branch_table(branches: list[dict[str, Any]], title: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in BRANCH_COLUMNS:
        table.add_column(col, no_wrap=True, justify="right" if col == "port" else "left")
    for b in branches:
        table.add_row(*(_text(b.get(col)) for col in BRANCH_COLUMNS))
    return table


def _detail_table(branch: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(show_header=False, title=f"branch {branch.get('name')}", title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", no_wrap=True)
    for key in ("name", "parent", "port", "uri", "mode", "fork_lsn", "created_at", "children"):
        if key in branch:
            table.add_row(key, _text(branch[key]))
    return table


def _namespace_table(namespaces: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="changed namespaces", title_justify="left")
    table.add_column("namespace", no_wrap=True)
    for col in ("changed", "live", "dropped"):
        table.add_column(col, justify="right")
    for ns in sorted(namespaces):
        info = namespaces[ns] or {}
        table.add_row(ns, *(_text(info.get(col)) for col in ("changed", "live", "dropped")))
    return table


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
# Also accepted after the subcommand: `mongobranch branch list --admin URL`.
admin_option = click.option("--admin", "admin_url", default=None, metavar="URL",
                            help="Admin API base URL (overrides the group option).")


@main.group("branch")
@click.option("--admin", "admin_url", envvar="MONGOBRANCH_ADMIN", default=None,
              metavar="URL", help="Admin API base URL [env MONGOBRANCH_ADMIN; "
              "default http://127.0.0.1:9090].")
@click.pass_context
def branch_group(ctx: click.Context, admin_url: str | None) -> None:
    """Create, list, show and delete branches through the admin API."""
    ctx.obj = admin_url


@branch_group.command("create")
@click.argument("name")
@click.option("--from", "parent", default=None, metavar="PARENT",
              help="Parent branch [default: main].")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port for the branch [default: the next free one].")
@json_option
@admin_option
@click.pass_context
def branch_create(ctx: click.Context, name: str, parent: str | None, port: int | None,
                  as_json: bool, admin_url: str | None) -> None:
    """Create branch NAME."""
    api = _client(ctx, admin_url)
    branch = _call(lambda: api.create_branch(name, parent, port))
    if as_json:
        _print_json(branch)
    else:
        _console().print(_detail_table(branch))


@branch_group.command("list")
@json_option
@admin_option
@click.pass_context
def branch_list(ctx: click.Context, as_json: bool, admin_url: str | None) -> None:
    """List branches."""
    api = _client(ctx, admin_url)
    branches = sorted(_call(api.list_branches), key=lambda b: str(b.get("name")))
    if as_json:
        _print_json(branches)
    elif not branches:
        click.echo("no branches")
    else:
        _console().print(_branch_table(branches))


@branch_group.command("show")
@click.argument("name")
@json_option
@admin_option
@click.pass_context
def branch_show(ctx: click.Context, name: str, as_json: bool, admin_url: str | None) -> None:
    """Show branch NAME, its changed namespaces and children."""
    api = _client(ctx, admin_url)
    branch = _call(lambda: api.get_branch(name))
    if as_json:
        _print_json(branch)
        return
    console = _console()
    console.print(_detail_table(branch))
    namespaces = branch.get("namespaces") or {}
    if namespaces:
        console.print(_namespace_table(namespaces))
    else:
        console.print("no changed namespaces")


@branch_group.command("delete")
@click.argument("name")
@json_option
@admin_option
@click.pass_context
def branch_delete(ctx: click.Context, name: str, as_json: bool, admin_url: str | None) -> None:
    """Delete branch NAME (refused while it has child branches)."""
    api = _client(ctx, admin_url)
    result = _call(lambda: api.delete_branch(name))
    if as_json:
        _print_json(result)
    else:
        click.echo(f"deleted branch {name}")


if __name__ == "__main__":
    main()
