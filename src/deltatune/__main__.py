"""``python -m deltatune`` (and ``accelerate launch -m deltatune``) runs the CLI."""

from .cli.main import main

main()
