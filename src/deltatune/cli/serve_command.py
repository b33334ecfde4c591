"""``deltatune serve``: one base model, many deltas, an OpenAI-compatible HTTP API
(:mod:`deltatune.serving`). Registered on the main app by an import at the bottom of :mod:`.main`."""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import time
from typing import List, Optional

import typer

from .common import ModelOpt, app, console, friendly_errors


def parse_deltas(items: List[str]) -> dict[str, str]:
    """``NAME=DIR`` options as {name: directory}; a repeated name or a missing ``=`` is an error."""
    from ..errors import ConfigError

    found: dict[str, str] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ConfigError(f"--delta expects NAME=DIR, got {item!r}")
        if name.strip() in found:
            raise ConfigError(f"--delta names {name.strip()!r} twice; give each delta its own name")
        found[name.strip()] = directory.strip()
    return found


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves only to loopback addresses."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


@app.command()
@friendly_errors("serve")
def serve(
    model: Optional[str] = ModelOpt,
    delta: List[str] = typer.Option([], "--delta", help="NAME=DIR: serve a saved delta under NAME (repeatable); a request's model field picks it"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback needs --api-key"),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DELTATUNE_API_KEY", help="require 'Authorization: Bearer KEY' on every request"),
    allow_admin: bool = typer.Option(False, "--allow-admin", help="enable POST/DELETE /v1/admin/deltas to load and unload deltas while serving"),
    max_batch: int = typer.Option(32, min=1, help="sequences decoded together in one step"),
    max_waiting: int = typer.Option(256, min=0, help="requests queued beyond the running batch; more get 503 with Retry-After"),
    max_deltas: int = typer.Option(64, min=0, help="most deltas loaded at once"),
    max_delta_mib: float = typer.Option(2048.0, min=0, help="most MiB of delta parameters loaded at once"),
    mixed: bool = typer.Option(True, "--mixed/--one-delta-at-a-time", help="decode requests for different deltas in one batch (default), or one delta's requests at a time"),
    gather_ms: float = typer.Option(0.0, min=0, help="when idle, wait this long after a request for others, to start a burst as one batch"),
    join_wait_steps: int = typer.Option(2, min=0, help="while the batch is at least half full, requests wait up to this many decode steps to join it together"),
    prefix_cache_mib: float = typer.Option(512.0, min=0, help="MiB of prompt prefixes' keys and values kept per delta for later prompts that start the same (0: off)"),
    chat_max_tokens: int = typer.Option(256, min=1, help="a chat answer's length when the request sets no max_tokens"),
    dtype: Optional[str] = typer.Option(None, help="the base's dtype: float32 (default) | bfloat16 | float16 | auto"),
):
    """Serve the base model and saved deltas over OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/models), decoding requests for different deltas in one continuous batch."""
    from ..errors import ConfigError
    from ..models import DEFAULT_MODEL, load_model_and_tokenizer

    chosen = parse_deltas(delta)
    if api_key is None and not is_loopback(host):
        raise ConfigError(f"--host {host!r} is reachable from other machines; give --api-key (or bind 127.0.0.1)")
    if len(chosen) > max_deltas:
        raise ConfigError(f"{len(chosen)} deltas given but --max-deltas is {max_deltas}")
    try:
        import uvicorn

        from ..serving.app import create_app
        from ..serving.engine import Engine, RequestError
        from ..serving.memory import keep_freed_memory
    except ImportError as exc:
        raise ConfigError(f"deltatune serve needs FastAPI and uvicorn: pip install 'deltatune[serve]' ({exc})") from None

    keep_freed_memory()  # before the model's tensors: every later allocation can reuse freed memory
    base, tokenizer = load_model_and_tokenizer(model, dtype=dtype)
    engine = Engine(base, tokenizer, base_name=model or DEFAULT_MODEL, mixed=mixed, max_batch=max_batch,
                    max_waiting=max_waiting, max_deltas=max_deltas, max_delta_bytes=int(max_delta_mib * 2**20),
                    gather_ms=gather_ms, prefix_cache_bytes=int(prefix_cache_mib * 2**20),
                    join_wait_steps=join_wait_steps)
    futures = {name: engine.load_delta(name, directory) for name, directory in chosen.items()}
    engine.step()  # nothing runs the engine yet: load them now
    for name, future in futures.items():
        try:
            future.result()
        except RequestError as exc:
            raise ConfigError(f"--delta {name}={chosen[name]}: {exc}") from None
    # HTTP on a thread, the engine on this, the main thread: torch runs its products from the main
    # thread about a third faster on CPU (its OpenMP workers belong to the first thread that used them)
    http_app = create_app(engine, api_key=api_key, allow_admin=allow_admin, chat_max_tokens=chat_max_tokens, run_engine=False)
    server = uvicorn.Server(uvicorn.Config(http_app, host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, name="deltatune-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise ConfigError(f"could not listen on {host}:{port}; is another server using the port?")
        time.sleep(0.05)
    console.print(f"serving {', '.join(engine.models())} on http://{host}:{port}/v1 "
                  f"({'mixed batches' if mixed else 'one delta at a time'}; admin routes {'on' if allow_admin else 'off'})",
                  highlight=False)
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # finish the step, answer what is left, then stop
        signal.signal(stop_signal, lambda *_: engine.stop())
    try:
        engine.run()
    finally:
        server.should_exit = True
        http.join(timeout=30)
