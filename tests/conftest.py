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

