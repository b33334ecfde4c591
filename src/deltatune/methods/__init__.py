"""One module per method family; importing this package registers them all."""

from . import adapters, compacter, far, ia3, krona, lora, prefix, selective, sparse_adapter  # noqa: F401
