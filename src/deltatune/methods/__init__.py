"""One module per method family; importing this package registers them all."""

from . import adapters, lora  # noqa: F401
