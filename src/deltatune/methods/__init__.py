"""One module per method family; importing this package registers them all."""

from . import (  # noqa: F401
    adamix, adapters, compacter, far, fusion, hybrids, hyper, ia3, intrinsic, ipt, krona, ladder, lora, prefix, prompt, s4,
    selective,
    sparse_adapter, sparse_diff,
)
