"""One module per method family; importing this package registers them all."""

from . import (  # noqa: F401
    adamix, adapters, compacter, far, fusion, hybrids, hyper, ia3, intrinsic, krona, ladder, lora, prefix, prompt, selective,
    sparse_adapter, sparse_diff,
)
