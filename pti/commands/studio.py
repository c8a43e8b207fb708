"""`pti studio [IDENTITY.pti ...]`: edit tuned people in the browser (needs pip install 'pti[studio]')."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from pti.commands.common import DeviceOption, console


class StudioBackend(str, Enum):
    auto = "auto"  # onnx when ONNX Runtime is installed, else torch
    torch = "torch"
    onnx = "onnx"
    aoti = "aoti"


def studio(
    identities: Annotated[
        Optional[list[Path]],
        typer.Argument(
            metavar="[IDENTITY.pti]...",
            help="Identity files or folders of them (default: the .pti files here).",
            show_default=False,
        ),
    ] = None,
    network: Annotated[
        Optional[str],
        typer.Option("--network", "-n", help="The base generator (default: the one each identity records)."),
    ] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help=(
                "Address to listen on; anything but loopback lets whoever can reach this machine and has the "
                "printed token use the studio."
            ),
        ),
    ] = "127.0.0.1",
    no_token: Annotated[
        bool,
        typer.Option(
            "--no-token",
            help="Serve without the per-run token (loopback --host only; Host and Origin are still checked).",
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0.01,
            max=3600,
            help="Seconds a request may wait for its render, queue included; longer ones get 503.",
        ),
    ] = 30.0,
    backend: Annotated[
        StudioBackend, typer.Option("--backend", help="Render backend (auto: ONNX Runtime when installed, else torch).")
    ] = StudioBackend.auto,
    components: Annotated[int, typer.Option("--components", min=0, max=20, help="GANSpace sliders per person.")] = 10,
    device: DeviceOption = "auto",
) -> None:
    """Edit tuned people in the browser: sliders per direction, live render, save and sweep.

    It prints an address with a per-run token (?token=...): open it; the first visit sets a cookie, and
    nobody without the token gets an answer. Requests naming another Host, POSTs that are not JSON or come from
    another site, and oversized or malformed ones are refused with one line."""
    import secrets
    import signal

    from pti.studio.guard import is_loopback, url_host

    if no_token and not is_loopback(host):
        raise typer.BadParameter(
            f"--no-token is for a loopback --host only (127.0.0.1, localhost, ::1); on {host} "
            "anyone who can reach this machine could use the studio",
            param_hint="'--no-token'",
        )
    from pti.studio import Studio, find_identities, need_server

    need_server()
    from pti.studio.web import create_app, serve

    paths = find_identities(list(identities or []))
    studio = Studio(
        paths, network=network, backend=backend.value, device=device, components=components, timeout=timeout
    )
    token = None if no_token else secrets.token_urlsafe(32)
    app = create_app(studio, host=host, port=port, token=token)
    query = f"?token={token}" if token else ""

    def ready() -> None:  # printed once it listens: the address works when it appears
        console.print(
            f"pti studio: {len(paths)} identit{'y' if len(paths) == 1 else 'ies'} "
            f"({', '.join(s.name for s in studio.slots[:5])}"
            f"{' ...' if len(paths) > 5 else ''}); open this address (Ctrl-C stops it):",
            markup=False,
        )
        console.print(f"  http://{url_host(host)}:{port}/{query}", markup=False)
        if not is_loopback(host):
            console.print(
                f"[yellow]warning:[/] listening on {escape(host)}: anyone who can reach this machine and has the "
                "token can use the studio (see your people, write beside them); the token travels as plain "
                "HTTP, so use this on a network you trust"
            )

    try:
        listened = serve(app, studio, host, port, on_ready=ready)
    except KeyboardInterrupt:
        # Stopped: only the "interrupted" line and the exit are left. Python puts the default handlers back
        # while it finalizes, so a late Ctrl-C there would kill it mid-way; an ignored signal stays ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise
    if not listened:
        from pti.errors import PTIError

        raise PTIError(
            f"cannot listen on {host}:{port} (in use, or not an address of this machine); "
            "choose another --port or --host"
        )


def register(app: typer.Typer) -> None:
    app.command("studio")(studio)
