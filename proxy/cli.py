"""The `mongobranch` command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

# proxy.app (pymongo, aiohttp, the engine) is imported by `serve` only, so the
# `branch` commands, thin HTTP clients, start quickly.


# Why the metadata cannot live elsewhere: the engine joins the WAL and the overlays
# server-side, and checks a client's right to manage branches on its own connection.
META_URI_REFUSED = (
    "--meta-uri is not supported: the WAL and branch metadata (--meta-db) must be on the "
    "--upstream deployment, beside the overlays: rebuilding an overlay is one aggregation "
    "of the WAL with $merge into the branch's database, and a client's right to manage "
    "branches is checked on its own upstream connection against --meta-db")


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
@click.option("--meta-uri", default=None, metavar="URI",
              help="Not supported: the metadata and the WAL live in --meta-db on the "
                   "upstream (see the README, Upstreams); any value is refused.")
@click.option("--data-dir", default=".mongobranch", show_default=True,
              help="Data directory of the embedded server.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--advertise-host", default=None, metavar="HOST",
              help="Host named in branch connection strings [default: the --listen host].")
@click.option("--log-format", envvar="MONGOBRANCH_LOG_FORMAT", default="text",
              show_default=True, type=click.Choice(["text", "json"]),
              help="json: one JSON object per line (time, level, logger, message) "
              "[env MONGOBRANCH_LOG_FORMAT].")
@click.option("--metrics-branch-limit", default=100, show_default=True,
              type=click.IntRange(0, 10_000),
              help="Branches with their own label in /metrics; the rest count as 'other'.")
@click.option("--metrics-size-interval", default=30.0, show_default=True,
              type=click.FloatRange(0), metavar="SECONDS",
              help="How old the branches' overlay and WAL sizes in /metrics may be before a "
                   "scrape measures them again on the upstream (0: every scrape).")
@click.option("--config", "config_path", default=None, metavar="PATH",
              help="TOML file of feature flags [env MONGOBRANCH_CONFIG].")
@click.option("--default-mode", type=click.Choice(["wal", "copy"]), default=None,
              help="Mode of new branches [env MONGOBRANCH_DEFAULT_MODE; default wal].")
@click.option("--allow-wal/--no-allow-wal", default=None,
              help="Whether WAL branches may be created [env MONGOBRANCH_ALLOW_WAL].")
@click.option("--legacy-op-query/--no-legacy-op-query", default=None,
              help="Translate legacy OP_QUERY commands of older drivers to OP_MSG; off: "
                   "refuse them as mongod 6.0+ does [env MONGOBRANCH_LEGACY_OP_QUERY; "
                   "default on].")
@click.option("--gc-retention", default=None, metavar="DURATION",
              help="Run gc periodically with this retention (e.g. 7d).")
@click.option("--gc-interval", default=3600.0, show_default=True, type=float,
              help="Seconds between periodic gc runs.")
@click.option("--deleted-retention", default="24h", show_default=True, metavar="DURATION",
              help="How long a dropped branch stays restorable (`branch restore`); 0: a "
                   "drop removes it at once.")
@click.option("--reap-interval", default=60.0, show_default=True,
              type=click.FloatRange(min=0.01),
              help="Seconds between passes of the reaper (expiry, purge of deleted "
                   "branches).")
@click.option("--transaction-lifetime", default=60.0, show_default=True,
              type=click.FloatRange(min=0.01), metavar="SECONDS",
              help="Seconds after which a multi-document transaction still open on a branch "
                   "port is aborted (mongod's transactionLifetimeLimitSeconds).")
@click.option("--protect-main/--no-protect-main", default=True, show_default=True,
              help="Whether main is protected (merging into it needs force) until "
                   "`branch unprotect main` says otherwise.")
@click.option("--admin-token-file", default=None, metavar="PATH",
              help="Bearer tokens of the admin API, one `admin:TOKEN` or `read:TOKEN` a line "
                   "[env MONGOBRANCH_ADMIN_TOKEN_FILE; also MONGOBRANCH_ADMIN_TOKEN(S)].")
@click.option("--tls-cert", default=None, metavar="PEM",
              help="Serve TLS on the main and branch ports and the admin API with this "
                   "certificate (and its key, unless --tls-key).")
@click.option("--tls-key", default=None, metavar="PEM", help="The certificate's private key.")
@click.option("--tls-ca", default=None, metavar="PEM",
              help="Require client certificates signed by this CA.")
@click.option("--anonymous-as-uri-user/--no-anonymous-as-uri-user", default=None,
              help="Whether clients that do not authenticate run with the --upstream URI's "
                   "credentials [default: only when --listen is a loopback address].")
@click.option("--capture/--no-capture", default=True, show_default=True,
              help="Capture main's changes from the upstream's change stream, so that writes "
                   "made without the proxy are preserved for branches too and main has a "
                   "history.")
@click.option("--pre-images/--no-pre-images", default=True, show_default=True,
              help="Let the capture turn on changeStreamPreAndPostImages for main's "
                   "collections; off: updates and deletes made without the proxy cannot be "
                   "preserved (branches report isolation proxy-writes-only).")
@click.option("--lease", default=0.0, type=click.FloatRange(min=0), metavar="SECONDS",
              envvar="MONGOBRANCH_LEASE", show_default=True,
              help="Scale-out: run with other `serve` processes over the same upstream and "
                   "metadata database; one holds the engine lease (renewed every third of "
                   "it) and serves every branch, the others relay to it and take over within "
                   "about this long after it dies. 0: this process alone [env "
                   "MONGOBRANCH_LEASE].")
@click.option("--relay-host", default=None, metavar="HOST", envvar="MONGOBRANCH_RELAY_HOST",
              help="Scale-out: the address other processes reach this one's ports on (its "
                   "pod IP) [default: the --listen host; env MONGOBRANCH_RELAY_HOST].")
@click.option("--workers", default="1", metavar="N|auto", envvar="MONGOBRANCH_WORKERS",
              show_default=True,
              help="Processes sharing the ports of this machine (auto: one per core); one "
                   "runs the branch engine, every one serves main's pass-through traffic "
                   "[env MONGOBRANCH_WORKERS].")
def serve_cmd(upstream: str | None, listen: str, admin: str, branch_ports: str, meta_db: str,
              meta_uri: str | None, data_dir: str, log_level: str,
              advertise_host: str | None, log_format: str,
              metrics_branch_limit: int, metrics_size_interval: float, config_path: str | None,
              default_mode: str | None, allow_wal: bool | None,
              legacy_op_query: bool | None, gc_retention: str | None,
              gc_interval: float, deleted_retention: str, reap_interval: float,
              transaction_lifetime: float, protect_main: bool,
              admin_token_file: str | None, tls_cert: str | None,
              tls_key: str | None, tls_ca: str | None,
              anonymous_as_uri_user: bool | None, capture: bool, pre_images: bool,
              lease: float, relay_host: str | None, workers: str) -> None:
    """Run the proxy."""
    from proxy.admin import auth
    from proxy.app import ServeOptions, parse_hostport, parse_range, retention, serve
    from proxy.branching.errors import BranchError
    from proxy.branching.requests import parse_retention
    from proxy.config import Config, ConfigError
    from proxy.logs import configure
    from proxy.net.tls import server_context
    from proxy.workers import supervise, this_worker

    configure(log_level, log_format)
    worker = this_worker()
    count = _worker_count(workers)
    if meta_uri is not None:
        raise click.UsageError(META_URI_REFUSED)
    try:
        parse_hostport(listen)
        admin_host, admin_port = parse_hostport(admin)
        auth.check_exposure(admin_host, admin_port,
                            auth.Tokens.load(admin_token_file))
        parse_range(branch_ports)
        Config.load(config_path, flags={"default_mode": default_mode, "allow_wal": allow_wal,
                                        "legacy_op_query": legacy_op_query})
        if gc_retention:
            parse_retention(gc_retention)
        retention(deleted_retention)
        if lease and tls_cert:
            raise click.UsageError("--lease (scale-out) does not support --tls-cert yet")
        if lease and not relay_host and parse_hostport(listen)[0] in ("", "0.0.0.0", "::"):
            raise click.UsageError("--lease with a wildcard --listen host needs --relay-host: "
                                   "the address other processes reach this one on (a pod's IP)")
        if count > 1 and not upstream:
            raise click.UsageError("--workers needs --upstream: the embedded server belongs "
                                   "to one process")
        if count > 1 and tls_cert:
            raise click.UsageError("--workers does not support --tls-cert yet")
        if count > 1 and lease:
            raise click.UsageError("--workers with --lease (scale-out across machines) is not "
                                   "supported yet: the workers of one machine share its ports "
                                   "and hand connections over locally; run one process per "
                                   "machine with --lease")
        if (tls_key or tls_ca) and not tls_cert:
            raise click.UsageError("--tls-key and --tls-ca need --tls-cert")
        if tls_cert:
            server_context(tls_cert, tls_key, tls_ca)
    except auth.TokenError as exc:
        raise click.UsageError(str(exc)) from exc
    except (ValueError, ConfigError, BranchError) as exc:
        raise click.BadParameter(str(exc)) from exc
    options = ServeOptions(upstream=upstream, listen=listen, admin=admin,
                           branch_ports=branch_ports, meta_db=meta_db, data_dir=data_dir,
                           config_path=config_path, default_mode=default_mode,
                           allow_wal=allow_wal, legacy_op_query=legacy_op_query,
                           gc_retention=gc_retention,
                           gc_interval=gc_interval, deleted_retention=deleted_retention,
                           reap_interval=reap_interval, protect_main=protect_main,
                           transaction_lifetime=transaction_lifetime,
                           metrics_branch_limit=metrics_branch_limit,
                           metrics_size_interval=metrics_size_interval,
                           advertise_host=advertise_host,
                           anonymous_as_uri_user=anonymous_as_uri_user,
                           admin_token_file=admin_token_file, tls_cert=tls_cert,
                           tls_key=tls_key, tls_ca=tls_ca, capture=capture,
                           pre_images=pre_images, lease=lease, relay_host=relay_host,
                           worker=worker)
    if count > 1 and worker is None:
        sys.exit(supervise(count, sys.argv[1:]))
    sys.exit(_run(serve(options)))


def _worker_count(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise click.BadParameter(f"{value!r}: give a number of processes (1 or more) or "
                                 "'auto'", param_hint="--workers")
    return count


@main.command("config")
@click.option("--admin", "admin_url", envvar="MONGOBRANCH_ADMIN", default=None, metavar="URL",
              help="Admin API base URL [env MONGOBRANCH_ADMIN].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config_cmd(admin_url: str | None, as_json: bool) -> None:
    """Show the server's effective feature flags and where each came from."""
    from rich.table import Table

    from proxy.admin.client import AdminClient

    config = _call(lambda: AdminClient(admin_url).config())
    if as_json:
        _print_json(config)
        return
    table = Table(title="effective configuration", title_justify="left")
    for col in ("setting", "value", "source"):
        table.add_column(col, no_wrap=True)
    for key, setting in config.items():
        table.add_row(key, _text(setting.get("value")), setting.get("source", ""))
    _console().print(table)


@main.command("gc")
@click.option("--retention", required=True, metavar="DURATION",
              help="Keep full history this long: 30s, 15m, 12h, 7d, 2w.")
@click.option("--admin", "admin_url", envvar="MONGOBRANCH_ADMIN", default=None, metavar="URL",
              help="Admin API base URL [env MONGOBRANCH_ADMIN].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gc_cmd(retention: str, admin_url: str | None, as_json: bool) -> None:
    """Compact WAL history older than the retention window (visible data never changes)."""
    from proxy.admin.client import AdminClient

    result = _call(lambda: AdminClient(admin_url).gc(retention))
    if as_json:
        _print_json(result)
        return
    before, after = result["before"], result["after"]
    click.echo(f"horizon LSN {result['horizon_lsn']}: WAL {before['entries']} entries / "
               f"{before['bytes']} bytes -> {after['entries']} entries / {after['bytes']} "
               f"bytes ({result['folded']} folded, {result['compressed']} compressed)")


@main.command("mcp")
@click.option("--admin", "admin_url", envvar="MONGOBRANCH_ADMIN", default=None, metavar="URL",
              help="Admin API base URL [env MONGOBRANCH_ADMIN].")
def mcp_cmd(admin_url: str | None) -> None:
    """Serve branch tools to AI agents: an MCP server on stdin/stdout."""
    try:
        from proxy import mcpserver
    except ImportError as exc:
        click.echo(f"error: mongobranch mcp needs the mcp package ({exc}): install "
                   "mongobranch with its mcp extra, e.g. pip install '.[mcp]' in a checkout",
                   err=True)
        sys.exit(EXIT_OTHER)
    mcpserver.run(admin_url)


# -- mongobranch branch ... : a thin client of the admin HTTP API ---------------------------

BRANCH_COLUMNS = ("name", "parent", "port", "uri", "created_at", "expires_at", "protected")
DELETED_COLUMNS = ("name", "parent", "port", "deleted_at", "restorable_until")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # piped: do not squeeze tables into 80 columns
        console = Console(stderr=stderr, highlight=False, width=max(console.width, 200))
    return console


def _client(ctx: click.Context, admin_url: str | None) -> Any:
    from proxy.admin.client import AdminClient

    return AdminClient(admin_url or ctx.obj)


# Exit codes, for scripts and CI (documented in the README). 2 is also click's own code
# for a usage error, so "bad input" means the same whether click or the API refused it.
EXIT_OTHER = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_CONFLICT = 4
EXIT_NOT_FOUND = 5
_EXIT_BY_STATUS = {400: EXIT_BAD_INPUT, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT}


def exit_code(status: int) -> int:
    """The exit code for an API error status."""
    return _EXIT_BY_STATUS.get(status, EXIT_OTHER)


def _call(fn: Callable[[], Any]) -> Any:
    """Runs one API call; an error goes to stderr as one line and exits with its code."""
    from proxy.admin.client import ApiError, Unreachable

    try:
        return fn()
    except Unreachable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except ApiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exit_code(exc.status))


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


def _branch_table(branches: list[dict[str, Any]], title: str | None = None,
                  columns: tuple[str, ...] = BRANCH_COLUMNS) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, no_wrap=True, justify="right" if col == "port" else "left")
    for b in branches:
        table.add_row(*(_text(b.get(col)) for col in columns))
    return table


def _detail_table(branch: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(show_header=False, title=f"branch {branch.get('name')}", title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", no_wrap=True)
    for key in ("name", "parent", "port", "uri", "mode", "fork_lsn", "created_at", "protected",
                "masked", "expires_at", "idle_ttl", "last_used", "children"):
        if key in branch:
            table.add_row(key, _text(branch[key]))
    return table


def _namespace_table(namespaces: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="changed namespaces", title_justify="left")
    table.add_column("namespace", no_wrap=True)
    for col in ("changed", "kept", "live", "dropped"):
        table.add_column(col, justify="right")
    for ns in sorted(namespaces):
        info = namespaces[ns] or {}
        table.add_row(ns, *(_text(info.get(col))
                            for col in ("changed", "kept", "live", "dropped")))
    return table


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
output_option = click.option(
    "--output", "-o", "output", type=click.Choice(["table", "json", "uri"]), default=None,
    help="table (default), json, or uri: only the branch's connection string, for scripts.")
# Also accepted after the subcommand: `mongobranch branch list --admin URL`.
admin_option = click.option("--admin", "admin_url", default=None, metavar="URL",
                            help="Admin API base URL (overrides the group option).")


@main.group("branch")
@click.option("--admin", "admin_url", envvar="MONGOBRANCH_ADMIN", default=None,
              metavar="URL", help="Admin API base URL [env MONGOBRANCH_ADMIN; "
              "default http://127.0.0.1:9090].")
@click.pass_context
def branch_group(ctx: click.Context, admin_url: str | None) -> None:
    """Create, list, show, delete, log, diff, merge and reset branches, and manage their
    lifecycle (expire, protect, refresh, restore, reap), through the admin API."""
    ctx.obj = admin_url


@branch_group.command("create")
@click.argument("name")
@click.option("--from", "parent", default=None, metavar="PARENT",
              help="Parent branch [default: main].")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port for the branch [default: the next free one].")
@click.option("--at", "at", default=None, metavar="LSN|ISO",
              help="Start from the parent's state at this LSN or ISO-8601 time "
              "(the parent must be a branch).")
@click.option("--mode", type=click.Choice(["wal", "copy"]), default=None,
              help="wal: copy-on-write over the parent; copy: a full copy "
              "[default: the server's default_mode flag].")
@click.option("--ttl", default=None, metavar="DURATION",
              help="Expire (drop) the branch this long from now: 30m, 2h, 7d, 1h30m.")
@click.option("--expires-at", default=None, metavar="ISO",
              help="Expire the branch at this ISO-8601 time.")
@click.option("--idle-ttl", default=None, metavar="DURATION",
              help="Expire the branch after this long without a client request on its port.")
@click.option("--protected", is_flag=True, default=None,
              help="Protect it: drop, reset, refresh and merging into it need --force.")
@click.option("--masked", is_flag=True, default=None,
              help="Show the fields the server's masking rules name masked on its port "
              "(children of a masked branch are masked too).")
@json_option
@output_option
@admin_option
@click.pass_context
def branch_create(ctx: click.Context, name: str, parent: str | None, port: int | None,
                  at: str | None, mode: str | None, ttl: str | None, expires_at: str | None,
                  idle_ttl: str | None, protected: bool | None, masked: bool | None,
                  as_json: bool, output: str | None, admin_url: str | None) -> None:
    """Create branch NAME. Exits 4 if it exists (see the README for every exit code)."""
    output = _output(as_json, output)
    api = _client(ctx, admin_url)

    def create() -> Any:
        return api.create_branch(name, parent, port, at, mode,
                                 ttl=ttl, expires_at=expires_at, idle_ttl=idle_ttl,
                                 protected=protected, masked=masked)

    if mode == "copy" and output == "table":
        branch = _call(lambda: _with_progress(api, name, create))
    else:
        branch = _call(create)
    _print_branch(branch, output)


def _output(as_json: bool, output: str | None) -> str:
    if as_json and output not in (None, "json"):
        raise click.UsageError(f"--json and --output {output} contradict each other")
    return "json" if as_json else output or "table"


def _print_branch(branch: dict[str, Any], output: str) -> None:
    if output == "uri":
        click.echo(branch["uri"])
    elif output == "json":
        _print_json(branch)
    else:
        _console().print(_detail_table(branch))


def _with_progress(api: Any, name: str, create: Callable[[], Any]) -> Any:
    """Runs a copy branch's creation while a progress bar follows the server's copy."""
    import threading

    from rich.progress import BarColumn, Progress, TextColumn

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = create()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    with Progress(TextColumn("copying {task.fields[ns]}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} collections"),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("copy", total=None, ns="")
        while thread.is_alive():
            thread.join(0.3)
            try:
                state = api.progress(name)
            except Exception:  # not started yet, or finished
                continue
            bar.update(task, total=state.get("total"), completed=state.get("done", 0),
                       ns=state.get("ns", ""))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@branch_group.command("migrate")
@click.argument("name")
@click.option("--to", "to", type=click.Choice(["wal", "copy"]), required=True,
              help="The mode to convert the branch to.")
@json_option
@admin_option
@click.pass_context
def branch_migrate(ctx: click.Context, name: str, to: str, as_json: bool,
                   admin_url: str | None) -> None:
    """Convert branch NAME to another mode in place (same data, same port)."""
    api = _client(ctx, admin_url)
    result = _call(lambda: api.migrate_branch(name, to))
    if as_json:
        _print_json(result)
    elif result.get("migrated"):
        click.echo(f"branch {name} is now a {to} branch "
                   f"({result.get('collections', 0)} collections converted)")
    else:
        click.echo(f"branch {name} already is a {to} branch")


@branch_group.command("list")
@click.option("--deleted", is_flag=True,
              help="List dropped branches still restorable (`branch restore NAME`).")
@json_option
@admin_option
@click.pass_context
def branch_list(ctx: click.Context, deleted: bool, as_json: bool,
                admin_url: str | None) -> None:
    """List branches."""
    api = _client(ctx, admin_url)
    branches = sorted(_call(api.deleted_branches if deleted else api.list_branches),
                      key=lambda b: str(b.get("name")))
    if as_json:
        _print_json(branches)
    elif not branches:
        click.echo("no deleted branches" if deleted else "no branches")
    else:
        _console().print(_branch_table(branches,
                                       columns=DELETED_COLUMNS if deleted else BRANCH_COLUMNS))


@branch_group.command("show")
@click.argument("name")
@json_option
@output_option
@admin_option
@click.pass_context
def branch_show(ctx: click.Context, name: str, as_json: bool, output: str | None,
                admin_url: str | None) -> None:
    """Show branch NAME, its changed namespaces and children. Exits 5 if there is none."""
    output = _output(as_json, output)
    api = _client(ctx, admin_url)
    branch = _call(lambda: api.get_branch(name))
    if output != "table":
        _print_branch(branch, output)
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
@click.option("--force", is_flag=True, help="Drop it even if it is protected.")
@click.option("--purge", is_flag=True,
              help="Remove it for good now, not restorable (also: a deleted one).")
@json_option
@admin_option
@click.pass_context
def branch_delete(ctx: click.Context, name: str, force: bool, purge: bool, as_json: bool,
                  admin_url: str | None) -> None:
    """Delete branch NAME; it stays restorable for the server's --deleted-retention
    (refused while it has child branches or is protected: exit 4; none: exit 5)."""
    api = _client(ctx, admin_url)
    result = _call(lambda: api.delete_branch(name, force=force, purge=purge))
    if as_json:
        _print_json(result)
    elif result.get("restorable_until"):
        click.echo(f"deleted branch {name} (restorable until {result['restorable_until']}: "
                   f"mongobranch branch restore {name})")
    else:
        click.echo(f"deleted branch {name}")


# -- lifecycle: expire, protect, refresh, restore, reap ----------------------------------

@branch_group.command("expire")
@click.argument("name")
@click.option("--ttl", default=None, metavar="DURATION", help="Expire this long from now.")
@click.option("--at", "at", default=None, metavar="ISO", help="Expire at this ISO-8601 time.")
@click.option("--never", is_flag=True, help="Clear its expiry (and its idle expiry).")
@click.option("--idle-ttl", default=None, metavar="DURATION",
              help="Expire after this long without a client request on its port.")
@click.option("--no-idle-ttl", is_flag=True, help="Clear its idle expiry.")
@json_option
@admin_option
@click.pass_context
def branch_expire(ctx: click.Context, name: str, ttl: str | None, at: str | None, never: bool,
                  idle_ttl: str | None, no_idle_ttl: bool, as_json: bool,
                  admin_url: str | None) -> None:
    """Set or clear when branch NAME expires."""
    if sum(x is not None for x in (ttl, at)) + never > 1:
        raise click.UsageError("give one of --ttl, --at and --never")
    if idle_ttl is not None and (no_idle_ttl or never):
        raise click.UsageError("--idle-ttl contradicts --no-idle-ttl and --never")
    changes: dict[str, Any] = {}
    if ttl is not None:
        changes["ttl"] = ttl
    if at is not None:
        changes["expires_at"] = at
    if never:
        changes["expires_at"] = None
    if idle_ttl is not None:
        changes["idle_ttl"] = idle_ttl
    if no_idle_ttl or never:
        changes["idle_ttl"] = None
    if not changes:
        raise click.UsageError("give --ttl, --at, --never, --idle-ttl or --no-idle-ttl")
    api = _client(ctx, admin_url)
    branch = _call(lambda: api.update_branch(name, changes))
    if as_json:
        _print_json(branch)
        return
    click.echo(f"branch {name}: expires at {_text(branch.get('expires_at'))}, idle expiry "
               f"{_text(branch.get('idle_ttl'))}" + ("" if branch.get("idle_ttl") is None
                                                     else " s"))


def _set_protected(ctx: click.Context, name: str, value: bool, as_json: bool,
                   admin_url: str | None) -> None:
    api = _client(ctx, admin_url)
    result = _call(lambda: api.update_branch(name, {"protected": value}))
    if as_json:
        _print_json(result)
    else:
        click.echo(f"branch {name} is {'protected' if value else 'unprotected'}")


@branch_group.command("protect")
@click.argument("name")
@json_option
@admin_option
@click.pass_context
def branch_protect(ctx: click.Context, name: str, as_json: bool, admin_url: str | None) -> None:
    """Protect branch NAME (or main): drop, reset, refresh and merging into it need --force."""
    _set_protected(ctx, name, True, as_json, admin_url)


@branch_group.command("unprotect")
@click.argument("name")
@json_option
@admin_option
@click.pass_context
def branch_unprotect(ctx: click.Context, name: str, as_json: bool,
                     admin_url: str | None) -> None:
    """Remove the protection of branch NAME (or main)."""
    _set_protected(ctx, name, False, as_json, admin_url)


@branch_group.command("refresh")
@click.argument("name")
@click.option("--force", is_flag=True, help="Refresh it even if it is protected.")
@json_option
@output_option
@admin_option
@click.pass_context
def branch_refresh(ctx: click.Context, name: str, force: bool, as_json: bool,
                   output: str | None, admin_url: str | None) -> None:
    """Re-fork branch NAME at its parent's current state, discarding its changes; same name
    and port (refused while it has child branches: exit 4)."""
    output = _output(as_json, output)
    api = _client(ctx, admin_url)
    _print_branch(_call(lambda: api.refresh_branch(name, force)), output)


@branch_group.command("restore")
@click.argument("name")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port for the branch [default: the one it had].")
@json_option
@output_option
@admin_option
@click.pass_context
def branch_restore(ctx: click.Context, name: str, port: int | None, as_json: bool,
                   output: str | None, admin_url: str | None) -> None:
    """Bring back deleted branch NAME with its data (see `branch list --deleted`)."""
    output = _output(as_json, output)
    api = _client(ctx, admin_url)
    _print_branch(_call(lambda: api.restore_branch(name, port)), output)


@branch_group.command("reap")
@click.option("--now", default=None, metavar="ISO",
              help="Act as if it were this time (e.g. what expires by tomorrow, with "
                   "--dry-run).")
@click.option("--dry-run", is_flag=True, help="Report what would go; change nothing.")
@json_option
@admin_option
@click.pass_context
def branch_reap(ctx: click.Context, now: str | None, dry_run: bool, as_json: bool,
                admin_url: str | None) -> None:
    """Run the reaper now: drop expired branches, purge deleted ones past retention."""
    api = _client(ctx, admin_url)
    result = _call(lambda: api.reap(now, dry_run))
    if as_json:
        _print_json(result)
        return
    verb = "would " if dry_run else ""
    for item in result.get("expired") or []:
        click.echo(f"{verb}expire {item['branch']} (due {item['due']})")
    for name in result.get("purged") or []:
        click.echo(f"{verb}purge {name}")
    for item in result.get("skipped") or []:
        click.echo(f"kept {item['branch']} (due {item['due']}): {item['reason']}")
    if not (result.get("expired") or result.get("purged") or result.get("skipped")):
        click.echo("nothing to reap")


# -- history: log, diff, merge, reset ---------------------------------------------------

def _titled(table_cls: Any, title: str, **kwargs: Any) -> Any:
    """A table whose title stays on one line however narrow its columns."""
    return table_cls(title=title, title_justify="left", min_width=len(title), **kwargs)


def _id_text(value: Any) -> str:
    """An _id as printed in tables: Extended JSON wrappers shown compactly."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _client_text(client: dict[str, Any] | None) -> str:
    if not client:
        return "-"
    parts = [f"{key}={client[key]}" for key in ("app", "user", "conn")
             if client.get(key) not in (None, "")]
    return " ".join(parts) or "-"


def _log_table(name: str, entries: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = _titled(Table, f"log of {name} (newest first)")
    for col in ("lsn", "time", "op", "ns", "_id", "client", "visible"):
        table.add_column(col, no_wrap=True, justify="right" if col == "lsn" else "left")
    for entry in entries:
        table.add_row(str(entry.get("lsn")), _text(entry.get("time")), _text(entry.get("op")),
                      _text(entry.get("ns")), _id_text(entry.get("_id")),
                      _client_text(entry.get("client")), _text(entry.get("visible")))
    return table


def _change_row(change: dict[str, Any]) -> tuple[str, str, str]:
    if "op" in change:
        return change["ns"], change["op"], _id_text(change.get("_id"))
    if "collection" in change:
        return change["ns"], f"collection {change['collection']}", "-"
    return change["ns"], f"index {change.get('index')}", _text(change.get("name"))


def _changes_table(changes: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = _titled(Table, title)
    table.add_column("ns", no_wrap=True)
    table.add_column("op", no_wrap=True)
    table.add_column("_id / index", no_wrap=True)
    for change in changes:
        table.add_row(*_change_row(change))
    return table


SUMMARY_COLUMNS = ("insert", "update", "delete", "collection", "indexes")


def _summary_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    table = _titled(Table, "summary")
    table.add_column("ns", no_wrap=True)
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col == "collection" else "right")
    for ns in sorted(summary):
        per = summary[ns] or {}
        table.add_row(ns, *(_text(per.get(col)) for col in SUMMARY_COLUMNS))
    return table


def _merge_tables(result: dict[str, Any], refused: bool = False) -> list[Any]:
    """Counts, collection changes and conflicts; counts are "to apply" for a dry run and
    for a merge refused for its conflicts (nothing was applied)."""
    from rich.table import Table

    pending = bool(result.get("dry_run")) or refused
    mode = " (dry run)" if result.get("dry_run") else " (aborted)" if refused else ""
    head = _titled(Table, f"merge {result.get('branch')} into {result.get('into')}{mode}",
                   show_header=False)
    head.add_column("field", style="bold", no_wrap=True)
    head.add_column("value", no_wrap=True, justify="right")
    applied = result.get("applied") or {}
    head.add_row("strategy", _text(result.get("strategy")))
    for op in ("insert", "update", "delete"):
        head.add_row(f"{op}s {'to apply' if pending else 'applied'}",
                     str(applied.get(op, 0)))
    conflicts = result.get("conflicts") or []
    head.add_row("conflicts", str(len(conflicts)))
    head.add_row("skipped conflicts", str(result.get("skipped_conflicts", 0)))
    tables = [head]
    collections = result.get("collections") or []
    if collections:
        tables.append(_changes_table(collections, "collections and indexes"))
    if conflicts:
        table = _titled(Table, "conflicts: the parent changed these after the branch did")
        for col in ("ns", "_id", "branch op", "parent now"):
            table.add_column(col, no_wrap=True)
        for c in conflicts:
            table.add_row(_text(c.get("ns")), _id_text(c.get("_id")), _text(c.get("op")),
                          "deleted" if c.get("parent") is None else "changed")
        tables.append(table)
    return tables


@branch_group.command("log")
@click.argument("name")
@click.option("--limit", type=int, default=None, help="At most N entries [default: 100].")
@click.option("--before-lsn", type=int, default=None, metavar="N",
              help="Only entries with an LSN below N (to page back).")
@json_option
@admin_option
@click.pass_context
def branch_log(ctx: click.Context, name: str, limit: int | None, before_lsn: int | None,
               as_json: bool, admin_url: str | None) -> None:
    """The WAL entries of branch NAME, newest first."""
    api = _client(ctx, admin_url)
    result = _call(lambda: api.branch_log(name, limit, before_lsn))
    if as_json:
        _print_json(result)
        return
    entries = result.get("entries") or []
    if not entries:
        click.echo(f"no log entries for branch {name}")
        return
    _console().print(_log_table(name, entries))


@branch_group.command("diff")
@click.argument("name")
@json_option
@admin_option
@click.pass_context
def branch_diff(ctx: click.Context, name: str, as_json: bool, admin_url: str | None) -> None:
    """The changes of branch NAME against its parent's current state."""
    api = _client(ctx, admin_url)
    if as_json:
        # The server streams the diff: pass it through without holding it.
        def relay() -> None:
            out = sys.stdout.buffer
            for chunk in api.diff_stream(name):
                out.write(chunk)
            out.flush()

        _call(relay)
        return
    result = _call(lambda: api.branch_diff(name))
    changes = result.get("changes") or []
    console = _console()
    if not changes:
        console.print(f"no changes: {name} matches {result.get('parent')}")
        return
    console.print(_changes_table(changes, f"changes of {name} against "
                                          f"{result.get('parent')}"))
    console.print(_summary_table(result.get("summary") or {}))


@branch_group.command("merge")
@click.argument("name")
@click.option("--into", default=None, metavar="PARENT",
              help="The branch's parent (checked) [default: the parent].")
@click.option("--strategy", type=click.Choice(["abort", "ours", "theirs"]), default="abort",
              show_default=True, help="On conflicts: abort the merge, take the branch's "
              "version (ours) or keep the parent's (theirs).")
@click.option("--dry-run", is_flag=True, help="Report what would be merged; change nothing.")
@click.option("--force", is_flag=True,
              help="Merge into a protected parent (main is protected by default).")
@json_option
@admin_option
@click.pass_context
def branch_merge(ctx: click.Context, name: str, into: str | None, strategy: str,
                 dry_run: bool, force: bool, as_json: bool, admin_url: str | None) -> None:
    """Merge branch NAME into its parent. Exits 4 when conflicts abort the merge, or the
    parent is protected and --force is missing."""
    api = _client(ctx, admin_url)
    result = _call(lambda: _refused_merge_passes(
        lambda: api.merge_branch(name, into, strategy, dry_run, force)))
    refused = isinstance(result, _Refused)
    body = result.body if refused else result
    if as_json:
        _print_json(body)
    else:
        console = _console()
        for table in _merge_tables(body, refused):
            console.print(table)
    if refused:
        count = len(body.get("conflicts") or [])
        click.echo(f"error: merge of {name} into {body.get('into')} aborted: {count} "
                   "conflict(s); nothing was changed. Re-run with --strategy ours or theirs.",
                   err=True)
        sys.exit(EXIT_CONFLICT)


class _Refused:
    """A merge the server refused for conflicts (409 with the result as its body)."""

    def __init__(self, body: dict[str, Any]):
        self.body = body


def _refused_merge_passes(fn: Callable[[], Any]) -> Any:
    from proxy.admin.client import ApiError

    try:
        return fn()
    except ApiError as exc:
        if exc.status == 409 and isinstance(exc.body, dict) and "conflicts" in exc.body:
            return _Refused(exc.body)
        raise


@branch_group.command("reset")
@click.argument("name")
@click.option("--to", "to", required=True, metavar="LSN|ISO",
              help="The LSN or ISO-8601 time to return the branch to.")
@click.option("--force", is_flag=True, help="Reset it even if it is protected.")
@json_option
@admin_option
@click.pass_context
def branch_reset(ctx: click.Context, name: str, to: str, force: bool, as_json: bool,
                 admin_url: str | None) -> None:
    """Return branch NAME to its state at an LSN or time; later entries are voided."""
    api = _client(ctx, admin_url)
    result = _call(lambda: api.reset_branch(name, to, force))
    if as_json:
        _print_json(result)
        return
    from rich.table import Table

    table = _titled(Table, f"reset {name}", show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", no_wrap=True, justify="right")
    for key in ("to_lsn", "voided_entries", "copied_into_children"):
        table.add_row(key, _text(result.get(key)))
    _console().print(table)


if __name__ == "__main__":
    main()
