"""`pti studio [IDENTITY.pti ...]`: edit tuned people in the browser (needs pip install 'pti[studio]')."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import DeviceOption, console

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class StudioBackend(str, Enum):
    auto = "auto"        # onnx when ONNX Runtime is installed, else torch
    torch = "torch"
    onnx = "onnx"
    aoti = "aoti"


def studio(
    identities: Annotated[Optional[list[Path]], typer.Argument(metavar="[IDENTITY.pti]...", help="Identity files or folders of them (default: the .pti files here).", show_default=False)] = None,
    network: Annotated[Optional[str], typer.Option("--network", "-n", help="The base generator (default: the one each identity records).")] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but 127.0.0.1 exposes the studio, which has no authentication, to the network.")] = "127.0.0.1",
    backend: Annotated[StudioBackend, typer.Option("--backend", help="Render backend (auto: ONNX Runtime when installed, else torch).")] = StudioBackend.auto,
    components: Annotated[int, typer.Option("--components", min=0, max=20, help="GANSpace sliders per person.")] = 10,
    device: DeviceOption = "auto",
) -> None:
    """Edit tuned people in the browser: sliders per direction, live render, save and sweep."""
    from pti.studio import Studio, create_app, find_identities, need_server

    need_server()
    paths = find_identities(list(identities or []))
    app = create_app(Studio(paths, network=network, backend=backend.value, device=device, components=components))
    import uvicorn

    url_host = f"[{host}]" if ":" in host else host
    console.print(f"pti studio: {len(paths)} identit{'y' if len(paths) == 1 else 'ies'} ({', '.join(p.stem for p in paths[:5])}"
                  f"{' ...' if len(paths) > 5 else ''}); open http://{url_host}:{port}/  (Ctrl-C stops it)", markup=False)
    if host not in LOOPBACK:
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach this machine can use the studio; it has no authentication")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when it cannot bind
        from pti.errors import PTIError

        raise PTIError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); choose another --port or --host") from e
    if server.should_exit and not server.started:
        from pti.errors import PTIError

        raise PTIError(f"cannot listen on {host}:{port}; choose another --port or --host")


def register(app: typer.Typer) -> None:
    app.command("studio")(studio)
