"""`postroom run | serve | worker | send | keys | migrate`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import click

from postroom import __version__
from postroom.config import Settings, load_settings
from postroom.domain.errors import ConfigError, PostroomError

log = logging.getLogger("postroom")


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load_settings(
            ctx.obj.get("config"), **{k: v for k, v in overrides.items() if v is not None}
        )
    except ConfigError as e:
        raise click.ClickException(f"configuration error: {e}") from None


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group()
@click.version_option(__version__, prog_name="postroom")
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    help="postroom.toml (default: ./postroom.toml or $POSTROOM_CONFIG)",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """Postroom: a self-hosted email delivery service."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


async def _bootstrap_key(store: Any, url: str) -> None:
    """On first start, make an admin key and show it once."""
    if await store.count_keys() == 0:
        _, secret = await store.create_key("admin")
        click.echo(
            "\n  First start: created an admin API key (shown only this once; store it safely):\n\n"
            f"      {secret}\n\n"
            "  Try it:\n"
            f"      curl -H 'Authorization: Bearer {secret}' {url}/v1/stats\n"
            "  Make more with: postroom keys create --name NAME\n",
            err=True,
        )


def _serve(
    settings: Settings,
    *,
    with_worker: bool,
    worker_processes: int = 0,
    config_path: str | None = None,
) -> None:
    """Serve the API; with a worker in this process, or `worker_processes` worker processes
    beside it (they share the database; SIGTERM drains them with the API)."""
    import subprocess

    import uvicorn

    from postroom.api.app import create_app
    from postroom.app import build_router, build_store, build_worker

    store = build_store(settings)
    state: dict[str, Any] = {}

    async def start_worker() -> None:
        router = build_router(settings, store)
        worker = build_worker(settings, store, router)
        state["router"], state["worker"] = router, worker
        state["task"] = asyncio.create_task(worker.run(), name="worker")
        log.info("worker %s started (concurrency %d)", worker.name, worker.concurrency)

    def start_processes() -> None:
        cmd = [
            sys.executable,
            "-m",
            "postroom.cli",
            *(["--config", config_path] if config_path else []),
            "worker",
        ]
        state["children"] = [subprocess.Popen(cmd) for _ in range(worker_processes)]
        log.info(
            "started %d worker processes: %s",
            worker_processes,
            ", ".join(str(c.pid) for c in state["children"]),
        )

    async def stop_worker() -> None:
        for child in state.get("children", []):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in state.get("children", []):
            await asyncio.get_running_loop().run_in_executor(None, child.wait)
        if "worker" in state:
            worker = state["worker"]
            worker.stop()
            await state["task"]
            await state["router"].close()
            c = worker.counters
            log.info(
                "worker %s stopped: sent %d, failed %d, retried %d",
                worker.name,
                c.sent,
                c.failed,
                c.retried,
            )

    url = f"http://{settings.host}:{settings.port}"

    async def startup() -> None:
        await _bootstrap_key(store, url)
        if worker_processes:
            start_processes()
        elif with_worker:
            await start_worker()
        click.echo(
            f"  Postroom {__version__} on {url}\n"
            f"    dashboard: {url}/   API docs: {url}/docs   database: {settings.database_url}\n",
            err=True,
        )

    app = create_app(settings, store, on_startup=startup, on_shutdown=stop_worker)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning" if settings.log_level == "info" else settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.worker.drain_timeout_s) + 5,
    )
    uvicorn.Server(config).run()


@main.command()
@click.option("--host", help="address to listen on (default 127.0.0.1, or $POSTROOM_HOST)")
@click.option("--port", type=int, help="port (default 8080, or $POSTROOM_PORT)")
@click.option(
    "--worker-processes",
    type=click.IntRange(0, 64),
    default=0,
    help="run the worker in N processes of its own instead of inside the API process "
    "(uses more cores; default 0 = one process for everything)",
)
@click.pass_context
def run(ctx: click.Context, host: str | None, port: int | None, worker_processes: int) -> None:
    """API and worker together (the quick start)."""
    settings = _settings(ctx, host=host, port=port)
    _logging(settings)
    _check_schema(settings)
    _serve(
        settings,
        with_worker=True,
        worker_processes=worker_processes,
        config_path=ctx.obj.get("config"),
    )


@main.command()
@click.option("--host")
@click.option("--port", type=int)
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """The API alone (run workers with `postroom worker`)."""
    settings = _settings(ctx, host=host, port=port)
    _logging(settings)
    _check_schema(settings)
    _serve(settings, with_worker=False)


async def _run_worker(settings: Settings, name: str | None) -> None:
    from postroom.app import build_router, build_store, build_worker

    store = build_store(settings)
    await store.open()
    router = build_router(settings, store)
    worker = build_worker(settings, store, router, name=name)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info("worker %s started (concurrency %d)", worker.name, worker.concurrency)
    try:
        await worker.run()
    finally:
        await router.close()
        await store.close()
        c = worker.counters
        log.info(
            "worker %s stopped: sent %d, failed %d, retried %d",
            worker.name,
            c.sent,
            c.failed,
            c.retried,
        )


@main.command()
@click.option("--concurrency", type=int, help="sends in flight per process (default 64)")
@click.option(
    "--processes", type=int, help="worker processes to run (default 1; restarted if they die)"
)
@click.option("--name", help="worker name (default host:pid; with --processes N, NAME-1 … NAME-N)")
@click.pass_context
def worker(
    ctx: click.Context, concurrency: int | None, processes: int | None, name: str | None
) -> None:
    """Run a worker: claim queued messages and deliver them. SIGTERM drains."""
    settings = _settings(ctx)
    if concurrency:
        settings.worker.concurrency = concurrency
    _logging(settings)
    _check_schema(settings)
    n = processes or settings.worker.processes
    if n > 1:
        _run_processes(ctx, n, concurrency, name)
        return
    try:
        _uvloop_run(_run_worker(settings, name))
    except PostroomError as e:
        raise click.ClickException(str(e)) from None


def _run_processes(ctx: click.Context, n: int, concurrency: int | None, name: str | None) -> None:
    """Supervise `n` single-process workers: forward SIGTERM/SIGINT to them and wait for them to
    drain; one that dies unexpectedly (a crash, the OOM killer) is started again."""
    import subprocess
    import time

    base = [sys.executable, "-m", "postroom.cli"]
    if ctx.obj.get("config"):
        base += ["--config", ctx.obj["config"]]
    base += ["worker", "--processes", "1"]
    if concurrency:
        base += ["--concurrency", str(concurrency)]

    def start(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(base + (["--name", f"{name}-{i + 1}"] if name else []))

    children = [start(i) for i in range(n)]
    stopping = False

    def forward(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("started %d worker processes: %s", n, ", ".join(str(c.pid) for c in children))
    while True:
        if stopping:
            for c in children:
                c.wait()
            return
        for i, c in enumerate(children):
            rc = c.poll()
            if rc is not None and not stopping:
                log.warning("worker process %d exited with %s; starting another", c.pid, rc)
                time.sleep(0.5)
                if not stopping:
                    children[i] = start(i)
        time.sleep(0.2)


def _check_schema(settings: Settings) -> None:
    """Refuse to start on a database whose schema is not current (`postroom migrate` fixes it).
    A new SQLite file is created on the spot, so the embedded mode needs no step."""
    from postroom.app import build_store

    async def go() -> None:
        store = build_store(settings)
        await store.open()
        await store.close()

    try:
        asyncio.run(go())
    except ConfigError as e:
        raise click.ClickException(e.message) from None
    except PostroomError as e:
        raise click.ClickException(
            f"cannot use the database {settings.database_url}: {e}"
        ) from None


def _uvloop_run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


@main.command()
@click.option("--to", "to", multiple=True, required=True, help="recipient (repeat for more)")
@click.option("--subject", "-s", default="", help="subject")
@click.option("--text", help="plain text body ('-' reads standard input)")
@click.option("--html", help="html body")
@click.option("--from", "sender", default=None, help="sender (default: the default_from setting)")
@click.option("--cc", multiple=True)
@click.option("--bcc", multiple=True)
@click.option("--tag", "tags", multiple=True)
@click.option("--send-at", help="ISO 8601 time for a scheduled send")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal")
@click.option(
    "--server",
    envvar="POSTROOM_URL",
    help="send through a running server, e.g. http://127.0.0.1:8080 (else straight into the database)",
)
@click.option("--key", envvar="POSTROOM_API_KEY", help="API key for --server")
@click.pass_context
def send(
    ctx: click.Context,
    to: tuple[str, ...],
    subject: str,
    text: str | None,
    html: str | None,
    sender: str | None,
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    tags: tuple[str, ...],
    send_at: str | None,
    priority: str,
    server: str | None,
    key: str | None,
) -> None:
    """Queue one message and print its id."""
    if text == "-":
        text = sys.stdin.read()
    if text is None and html is None:
        raise click.UsageError("give --text or --html")
    settings = _settings(ctx)
    body: dict[str, Any] = {
        "from": sender or settings.default_from,
        "to": list(to),
        "subject": subject,
        "priority": priority,
    }
    for k, v in (("text", text), ("html", html), ("send_at", send_at)):
        if v is not None:
            body[k] = v
    for k, vs in (("cc", cc), ("bcc", bcc), ("tags", tags)):
        if vs:
            body[k] = list(vs)
    if server:
        import httpx

        if not key:
            raise click.UsageError("--server needs --key (or POSTROOM_API_KEY)")
        try:
            r = httpx.post(
                f"{server.rstrip('/')}/v1/messages",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
        except httpx.HTTPError as e:
            raise click.ClickException(f"cannot reach {server}: {e}") from None
        if r.status_code >= 400:
            err = r.json().get("error", {})
            where = f" ({err['field']})" if err.get("field") else ""
            raise click.ClickException(f"{r.status_code}: {err.get('message', r.text)}{where}")
        click.echo(f"{r.json()['id']} {r.json()['status']}")
        return

    async def direct() -> None:
        from postroom.app import build_store
        from postroom.domain.validate import validate_message

        msg = validate_message(body, limits=settings.limits.message_limits(), source="cli")
        store = build_store(settings)
        await store.open()
        try:
            (res,) = await store.enqueue([msg])
        finally:
            await store.close()
        if isinstance(res, PostroomError):
            raise res
        click.echo(f"{res.id} {res.status.value}")

    try:
        asyncio.run(direct())
    except PostroomError as e:
        raise click.ClickException(str(e)) from None


@main.group()
def keys() -> None:
    """Manage API keys (stored only as hashes)."""


def _with_store(ctx: click.Context, fn: Any) -> Any:
    settings = _settings(ctx)

    async def go() -> Any:
        from postroom.app import build_store

        store = build_store(settings)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except PostroomError as e:
        raise click.ClickException(str(e)) from None


@keys.command("create")
@click.option("--name", required=True, help="what the key is for")
@click.pass_context
def keys_create(ctx: click.Context, name: str) -> None:
    """Create a key and print it (the only time it is shown)."""
    key, secret = _with_store(ctx, lambda s: s.create_key(name))
    click.echo(secret)
    click.echo(f"created key {key.id} ({name}); it is shown only now", err=True)


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List keys (id, prefix, name, state)."""
    from postroom.api.views import iso

    for k in _with_store(ctx, lambda s: s.list_keys()):
        click.echo(
            f"{k.id}  {k.prefix}…  {k.name}  {iso(k.created_at)}  {'revoked' if k.revoked else 'active'}"
        )


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key by id."""
    _with_store(ctx, lambda s: s.revoke_key(key_id))
    click.echo(f"revoked {key_id}")


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the database schema (safe to run from several hosts at once)."""
    from postroom.store.migrations import upgrade

    settings = _settings(ctx)
    _logging(settings)
    try:
        before, after = upgrade(settings.database_url)
    except Exception as e:
        raise click.ClickException(f"migration failed on {settings.database_url}: {e}") from None
    if before == after:
        click.echo(f"schema is up to date at revision {after} ({settings.database_url})")
    else:
        click.echo(
            f"schema is up to date at revision {after}, upgraded from {before or 'an empty database'}"
            f" ({settings.database_url})"
        )


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        main(prog_name=os.path.basename(sys.argv[0]))
