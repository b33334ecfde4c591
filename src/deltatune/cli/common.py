"""What every ``deltatune`` command shares: the app, the consoles, the error wrapper and the
``--model`` option. The command modules (:mod:`.main`, :mod:`.analysis_commands`) register on
``app``; :mod:`.main` imports them all."""

from __future__ import annotations

import functools
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DeltatuneError, Interrupted

app = typer.Typer(
    help="deltatune: parameter-efficient fine-tuning for any transformer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def friendly_errors(name: str) -> Callable[[Callable], Callable]:
    """For the command ``deltatune <name>``: bad input ends in one clear line and exit code 2,
    never a traceback; Ctrl-C (also while the command's imports load) in a line saying so and
    exit code 130, as a shell reports SIGINT."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except DeltatuneError as exc:
                # the message is text, not markup: a file called "[x].csv" or "deltatune[analysis]" stays whole
                errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt as exc:
                if not isinstance(exc, Interrupted):  # an interrupted run has said what it saved
                    errors.print(f"interrupted before deltatune {name} finished", highlight=False)
                raise typer.Exit(130) from None

        return wrapper

    return decorate


ModelOpt = typer.Option(None, "--model", "-m", help="HF model id or local directory (default: bundled SmolLM2-135M-Instruct)")
