"""One module per method family; importing this package registers them all."""

from . import adapters, ia3, krona, lora, selective  # noqa: F401
