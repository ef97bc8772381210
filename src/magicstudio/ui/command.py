"""``magicstudio ui``: registered on the CLI's app from here, the top layer (the CLI layer may not import the UI);
``python -m magicstudio`` and the ``magicstudio`` script load it (see ``magicstudio.__main__``)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

import typer

from ..cli.main import app
from ..errors import UserError

LOCAL = {"127.0.0.1", "localhost", "::1"}
MAX_UPLOAD = "15mb"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASS (both non-empty)")
    return user, password


def check_host(host: str, auth) -> str | None:
    """The warning to print for ``host`` (None for a loopback address, or when --auth protects it)."""
    try:
        local = host in LOCAL or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if local or auth:
        return None
    return (f"warning: serving on {host} without --auth: anyone who can reach this machine can use the studio "
            "and read its runs; add --auth USER:PASS")


@app.command("ui")
def ui_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(7860, "--port", help="Port."),
    model: str = typer.Option("toyworld", "--model", help="Base model: toyworld (default: trains in minutes on a CPU), tiny, a hub id, a diffusers folder or a .safetensors file."),
    data: Path = typer.Option(Path("magicstudio-data"), "--data", help="Folder for jobs, runs, uploads and exports (made if missing)."),
    auth: Optional[str] = typer.Option(None, "--auth", help="USER:PASS required to open the page."),
) -> None:
    """The studio in a browser: upload photos, train (jobs survive reloads and restarts), generate, download."""
    credentials = parse_auth(auth)
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 1 and 65535")
    warning = check_host(host, credentials)
    if warning:
        typer.secho(warning, err=True, fg=typer.colors.YELLOW)
    serve(data, model, host, port, credentials)


def serve(data: Path, model: str, host: str = "127.0.0.1", port: int = 7860, auth=None, block: bool = True):
    """Start the server (``block=False``: return ``(studio, demo)`` with the server running, for tests)."""
    data = Path(data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(data / ".gradio")  # uploads land inside --data
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .app import build_app
    from .studio import Studio

    studio = Studio.open(data, model)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=4)
    try:
        _launch(demo, host, port, auth, data, block)
    except BaseException:
        studio.close()
        raise
    if block:
        studio.close()  # Ctrl-C: the running training stops too; the next server shows it interrupted (Resume)
        return None
    return studio, demo


def _launch(demo, host: str, port: int, auth, data: Path, block: bool, attempts: int = 3) -> None:
    """``demo.launch`` with the studio's settings. Gradio refuses to start when its own 3-second check of the local
    URL fails, which a heavily loaded machine can cause: try again, then say so in one line."""
    for attempt in range(attempts):
        try:
            demo.launch(server_name=host, server_port=port, auth=auth, share=False, allowed_paths=[str(data)],
                        max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, quiet=not block, show_error=True,
                        ssr_mode=False, footer_links=[])
            return
        except ValueError as exc:
            if "localhost is not accessible" not in str(exc):
                raise
            demo.close()
    raise UserError(f"the server on {host}:{port} did not answer its own check (a proxy setting for localhost, or a "
                    "machine too busy to answer in 3 s?)")
