import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

# tests never reach a model hub; everything is built locally or shipped in packages
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as a transformers model directory (with a tokenizer), for CLI tests."""
    from tiny_hub import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """Twelve instruction records: upper-case a word."""
    path = tmp_path_factory.mktemp("data") / "upper.jsonl"
    words = ["cat", "dog", "sun", "map", "box", "pen", "cup", "hat", "bus", "egg", "fox", "jam"]
    path.write_text("".join(json.dumps({"instruction": "Upper-case:", "input": w, "output": w.upper()}) + "\n" for w in words))
    return path


@pytest.fixture(autouse=True, scope="session")
def cpu_packed_product_on_any_cpu():
    """Tests force bitsandbytes' CPU-packed 4-bit layout on (``zoo.cpu_packing``). A CPU without
    AVX512-BF16 has no kernel for that layout, so there the packed product is computed by
    ``zoo.reference_packed_product`` (in bf16, as the kernel does) and everything deltatune reads
    from the packed storage is still exercised; where the CPU has the kernel, it runs."""
    if importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    import bitsandbytes.functional as functional

    if functional.has_avx512bf16():
        yield
        return
    from zoo import reference_packed_product

    standard = functional.gemv_4bit

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return standard(A, B, out, transposed_A, transposed_B, state)
        result = reference_packed_product(A, B, state)
        return result if out is None else out.copy_(result)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(functional, "gemv_4bit", gemv_4bit)
        yield


@pytest.fixture(autouse=True, scope="session")
def fp32_by_default_on_every_cpu():
    """``precision="auto"`` is bf16 on a CPU with native bf16 products and fp32 elsewhere, so a
    test of a default run would compute differently from one machine to the next. The suite runs
    as on a CPU without native bf16 (auto = fp32, the numerics the tests state); the precision
    tests (test_precision.py) choose each CPU path themselves."""
    import deltatune.precision as precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "native_bf16", lambda device: False)
        yield


@pytest.fixture(autouse=True, scope="session")
def the_models_own_attention_by_default():
    """``attention="auto"`` keeps whichever implementation a timing measures faster, which can
    differ between two runs of one test on a busy machine; the suite trains with the model's
    own, and test_precision.py times the candidates itself."""
    import deltatune.train.attention_choice as attention_choice

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_choice, "CANDIDATES", ())
        yield
