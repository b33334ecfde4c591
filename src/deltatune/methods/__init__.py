"""One module per method family; importing this package registers them all."""

from . import adapters, compacter, far, fusion, hybrids, hyper, ia3, krona, lora, prefix, prompt, selective, sparse_adapter  # noqa: F401
