"""One module per method family; importing this package registers them all."""

from . import lora  # noqa: F401
