"""Hugging Face PEFT adapter directories, read and written by deltatune, checked against PEFT itself.

Every round trip compares logits on the zoo's tiny models. Both libraries compute the same
function in fp32 with differently ordered operations, so outputs agree to float rounding: most
cases to ~1e-7 (often exactly), the largest difference seen being 2.2e-6 on T5's logits of
magnitude ~4 (DoRA, PiSSA). They are compared with ``atol=ATOL, rtol=RTOL`` (1e-5 each), far below
the change each adapter makes to the logits (asserted > 1e-3; 4e-3 for BERT's (IA)³, 0.1 to 5
elsewhere), so that an adapter silently dropped cannot pass.

* PEFT -> deltatune -> PEFT: for each architecture, a matrix of PEFT configs is built with
  ``get_peft_model``, every trainable tensor is given random values, and the directory PEFT
  writes is loaded with ``dt.load``; ``dt.save(format="peft")`` must then give a directory that
  ``PeftModel.from_pretrained`` turns into the same model, with the tensor keys PEFT itself
  writes for that adapter.
* deltatune -> PEFT: deltatune's own LoRA variants (DoRA, rsLoRA, rank patterns, PiSSA, bias
  deltas, modules_to_save) and (IA)³, perturbed at random, saved as PEFT and loaded by PEFT.
* Golden files (``tests/golden/peft``, written by ``scripts/make_peft_golden.py``): adapters as
  PEFT wrote them, with PEFT's logits. These tests do not need peft installed.
* Edge cases: module names containing ``weight``/``lora``/``default``, the legacy pickled
  ``adapter_model.bin``, config fields deltatune cannot honour or does not know, stray keys, and
  ten adapters on one base.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.errors import CheckpointError
from deltatune.layer import Delta, delta_layers
from deltatune.peft_format import PeftFormatNote

try:
    import peft
    from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
except ImportError:  # the golden-file tests still run
    peft = None

needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")

ATOL = RTOL = 1e-5
#: an adapter must move the logits by more than this, or the test would not show anything
MIN_EFFECT = 1e-3
GOLDEN = Path(__file__).parent / "golden" / "peft"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread is the fastest, and on a busy machine
    (two cores shared with other jobs) torch's thread barriers make each op up to ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# models -------------------------------------------------------------------------------------------

_BASES: dict[str, nn.Module] = {}


def fresh(arch: str) -> nn.Module:
    """A new copy of the zoo's tiny model (built once per architecture; copies keep tied weights tied)."""
    if arch not in _BASES:
        _BASES[arch] = tiny_model(arch)
    return copy.deepcopy(_BASES[arch])


_INPUTS: dict[str, dict[str, torch.Tensor]] = {}


def inputs(arch: str) -> dict[str, torch.Tensor]:
    if arch not in _INPUTS:
        _INPUTS[arch] = tiny_inputs(arch, fresh(arch))
    return _INPUTS[arch]


@torch.no_grad()
def logits(model: nn.Module, arch: str) -> torch.Tensor:
    return model(**inputs(arch)).logits


_BASE_LOGITS: dict[str, torch.Tensor] = {}


def base_logits(arch: str) -> torch.Tensor:
    if arch not in _BASE_LOGITS:
        _BASE_LOGITS[arch] = logits(fresh(arch), arch)
    return _BASE_LOGITS[arch]


def assert_same(got: torch.Tensor, expected: torch.Tensor, arch: str | None = None) -> None:
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    if arch is not None:  # the adapter must do something, or equality proves nothing
        effect = (expected - base_logits(arch)).abs().max().item()
        assert effect > MIN_EFFECT, f"the adapter barely changes the logits ({effect:.2g}): the test shows nothing"


@torch.no_grad()
def perturb(parameters, seed: int, std: float = 0.1) -> None:
    """Move every tensor away from its initial value (LoRA's B starts at zero: the identity).
    (IA)³ vectors get ``std=0.5``: a few scales near 1 barely move BERT's post-norm logits."""
    generator = torch.Generator().manual_seed(seed)
    for p in parameters:
        p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def peft_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def keys(directory: Path) -> set[str]:
    return set(load_file(str(directory / WEIGHTS)))


# the PEFT matrix ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """Module names PEFT users write for one architecture."""

    attn: list[str]
    mlp: list[str]
    embedding: str
    head: str
    modules_to_save: list[str]
    ia3_targets: list[str] | str
    ia3_feedforward: list[str] | str
    has_bias: bool
    conv1d: bool = False  # GPT-2's Conv1D: PEFT needs fan_in_fan_out=True


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        attn=["q_proj", "k_proj", "v_proj", "o_proj"], mlp=["gate_proj", "up_proj", "down_proj"],
        embedding="embed_tokens", head="lm_head", modules_to_save=["lm_head"],
        ia3_targets=["k_proj", "v_proj", "down_proj"], ia3_feedforward=["down_proj"], has_bias=False,
    ),
    "gpt2": Arch(
        attn=["c_attn", "c_proj"], mlp=["c_fc"], embedding="wte", head="lm_head", modules_to_save=["ln_f"],
        ia3_targets=["c_attn", "mlp.c_proj"], ia3_feedforward=["mlp.c_proj"], has_bias=True, conv1d=True,
    ),
    "opt": Arch(
        attn=["q_proj", "k_proj", "v_proj", "out_proj"], mlp=["fc1", "fc2"], embedding="embed_tokens", head="lm_head",
        # matches the decoder's final norm and every block's: several modules from one name
        modules_to_save=["final_layer_norm"],
        ia3_targets=["k_proj", "v_proj", "fc2"], ia3_feedforward=["fc2"], has_bias=True,
    ),
    "bert": Arch(
        attn=["query", "key", "value"], mlp=["dense"], embedding="word_embeddings", head="decoder",
        # the whole MLM head: a module tree, with a bias tied inside it and a decoder tied to the embeddings
        modules_to_save=["cls"],
        # "output.dense" would also select attention.output.dense: PEFT's regex form, matched in full
        ia3_targets=r".*\.(key|value)|.*\.layer\.\d+\.output\.dense",
        ia3_feedforward=r".*\.layer\.\d+\.output\.dense", has_bias=True,
    ),
    "t5": Arch(
        attn=["q", "k", "v", "o"], mlp=["wi_0", "wi_1", "wo"], embedding="embed_tokens", head="lm_head",
        modules_to_save=["lm_head"], ia3_targets=["k", "v", "wo"], ia3_feedforward=["wo"], has_bias=False,
    ),
}


def _lora(a: Arch, **kwargs) -> LoraConfig:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": a.attn + a.mlp, "fan_in_fan_out": a.conv1d, **kwargs}
    return LoraConfig(**kwargs)


# name -> (applies to the architecture, PEFT config)
PEFT_CONFIGS: dict[str, tuple[Callable[[Arch], bool], Callable[[Arch], Any]]] = {
    # PEFT users nearly always train with dropout; it must be off in an eval-mode model
    "lora": (lambda a: True, lambda a: _lora(a, lora_dropout=0.1)),
    "rslora-dora": (lambda a: True, lambda a: _lora(a, lora_alpha=6, use_rslora=True, use_dora=True)),
    # PEFT's pattern keys are regexes matched against a dotted suffix of the module path
    "rank-alpha-pattern": (lambda a: True, lambda a: _lora(
        a,
        rank_pattern={a.mlp[0]: 2, rf"1\..*{a.attn[0]}": 6},
        alpha_pattern={a.attn[1]: 3, rf"0\..*{a.mlp[-1]}": 12},
    )),
    # the output heads of gpt2, opt, bert and t5 share their weight with the input embedding
    "embedding-and-head": (lambda a: True, lambda a: _lora(a, target_modules=[a.embedding, a.head, a.attn[0]])),
    "bias-lora-only": (lambda a: a.has_bias, lambda a: _lora(a, bias="lora_only")),
    "modules-to-save": (lambda a: True, lambda a: _lora(a, target_modules=a.attn, modules_to_save=a.modules_to_save)),
    "ia3": (lambda a: True, lambda a: IA3Config(
        target_modules=a.ia3_targets, feedforward_modules=a.ia3_feedforward, fan_in_fan_out=a.conv1d,
    )),
}

def cases(configs: dict) -> list:
    """(architecture, config name) for every config that applies to the architecture."""
    return [
        pytest.param(arch, name, id=f"{arch}-{name}")
        for arch, a in ARCHS.items()
        for name, (applies, _) in configs.items()
        if applies(a)
    ]


PEFT_CASES = cases(PEFT_CONFIGS)


@dataclass
class PeftSaved:
    """An adapter built and saved by PEFT, with PEFT's logits."""

    directory: Path
    logits: torch.Tensor


_SAVED: dict[tuple[str, str], PeftSaved] = {}


def peft_saved(arch: str, name: str, root: Path) -> PeftSaved:
    """PEFT's adapter for (arch, config name), random and non-trivial, saved once per session."""
    if (arch, name) not in _SAVED:
        config = PEFT_CONFIGS[name][1](ARCHS[arch])
        model = get_peft_model(fresh(arch), config)
        perturb(peft_trainable(model), seed=sum(map(ord, f"{arch}-{name}")), std=0.5 if name == "ia3" else 0.1)
        model.eval()
        directory = root / f"{arch}-{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes about saving embeddings
            model.save_pretrained(directory)
        _SAVED[arch, name] = PeftSaved(directory, logits(model, arch))
    return _SAVED[arch, name]


@pytest.fixture(scope="module")
def peft_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peft")


def load_peft_into_deltatune(arch: str, directory: Path, name: str | None = None) -> tuple[nn.Module, list[str]]:
    model = fresh(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.load(model, directory, name)
    notes = [str(w.message) for w in caught if issubclass(w.category, PeftFormatNote)]
    return model, notes


def embedding_base_keys(directory: Path) -> set[str]:
    """The copies of the input / output embedding layers PEFT stores next to a LoRA on them
    (``save_embedding_layers="auto"``); deltatune's export leaves them out, PEFT not needing them."""
    return {k for k in keys(directory) if k.endswith(".base_layer.weight")}


def peft_rewrite(arch: str, directory: Path, out: Path) -> tuple[nn.Module, Path]:
    """Load ``directory`` with PEFT and have PEFT write it again: the keys PEFT writes for it."""
    model = PeftModel.from_pretrained(fresh(arch), directory).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return model, out


@needs_peft
@pytest.mark.parametrize("arch, name", PEFT_CASES)
def test_peft_adapter_loads_into_deltatune_with_peft_logits(arch, name, peft_root):
    saved = peft_saved(arch, name, peft_root)
    model, notes = load_peft_into_deltatune(arch, saved.directory)
    assert not any(m.training for m in model.modules())  # the model was in eval mode: so is the delta
    assert_same(logits(model, arch), saved.logits, arch)
    # every field the current PEFT writes is known: nothing is ignored without a reason
    assert not [n for n in notes if "unknown field" in n], notes


@needs_peft
@pytest.mark.parametrize("arch, name", PEFT_CASES)
def test_deltatune_export_of_a_peft_adapter_loads_back_into_peft(arch, name, peft_root, tmp_path):
    saved = peft_saved(arch, name, peft_root)
    model, _ = load_peft_into_deltatune(arch, saved.directory)
    dt.save(model, tmp_path / "dt", format="peft")
    back, rewritten = peft_rewrite(arch, tmp_path / "dt", tmp_path / "rewritten")
    assert_same(logits(back, arch), saved.logits, arch)
    # the keys PEFT wrote in the first place, and those PEFT writes for what it loaded from deltatune
    # (which include the embedding matrices PEFT adds on its own)
    written = keys(tmp_path / "dt")
    assert written == keys(saved.directory) - embedding_base_keys(saved.directory)
    assert written == keys(rewritten) - embedding_base_keys(rewritten)


# deltatune-native adapters, written for PEFT ------------------------------------------------------

# name -> (applies to the architecture, deltatune config)
NATIVE_CONFIGS: dict[str, tuple[Callable[[Arch], bool], Callable[[Arch], dt.DeltaConfig]]] = {
    "lora-dora-rslora-rank-pattern": (lambda a: True, lambda a: dt.LoRAConfig(
        targets=("attn", "ffn"), r=4, alpha=6, dora=True, rslora=True,
        rank_pattern={"ffn.down": 2, "attn.q": 6}, alpha_pattern={"attn.v": 3},
    )),
    "lora-pissa": (lambda a: True, lambda a: dt.LoRAConfig(
        targets=("attn", "ffn"), r=3, alpha=4, init="pissa", rank_pattern={"ffn.down": 2},
    )),
    "lora-bias-targets": (lambda a: a.has_bias, lambda a: dt.LoRAConfig(targets=("attn",), r=4, bias="targets")),
    "lora-embedding-modules-to-save": (lambda a: True, lambda a: dt.LoRAConfig(
        targets=("embed", "attn"), r=4, modules_to_save=tuple(a.modules_to_save),
    )),
    # exported as lora_dropout; a delta attached to a model in eval mode runs in eval mode
    "lora-dropout": (lambda a: True, lambda a: dt.LoRAConfig(targets=("attn",), r=4, dropout=0.1)),
    "ia3": (lambda a: True, lambda a: dt.IA3Config()),
}

NATIVE_CASES = cases(NATIVE_CONFIGS)


@needs_peft
@pytest.mark.parametrize("arch, name", NATIVE_CASES)
def test_deltatune_adapter_saved_as_peft_gives_the_same_logits_in_peft(arch, name, tmp_path):
    model = dt.attach(fresh(arch), NATIVE_CONFIGS[name][1](ARCHS[arch])).eval()
    perturb(dt.trainable_parameters(model), seed=7, std=0.5 if name == "ia3" else 0.1)
    expected = logits(model, arch)
    dt.save(model, tmp_path / "dt", format="peft")
    back, rewritten = peft_rewrite(arch, tmp_path / "dt", tmp_path / "rewritten")
    assert_same(logits(back, arch), expected, arch)
    assert keys(tmp_path / "dt") == keys(rewritten) - embedding_base_keys(rewritten)
    # and deltatune reads its own export back
    again, _ = load_peft_into_deltatune(arch, tmp_path / "dt")
    assert_same(logits(again, arch), expected)


def test_delta_attached_to_a_model_in_eval_mode_runs_in_eval_mode():
    model = dt.attach(fresh("llama"), dt.LoRAConfig(targets=("attn.q",), r=4, dropout=0.5))
    perturb(dt.trainable_parameters(model), seed=1)
    assert not any(m.training for m in model.modules())


# PEFT's module selection rules --------------------------------------------------------------------


@needs_peft
def test_modules_to_save_follows_peft_plain_suffix_rule(tmp_path):
    """PEFT matches a ``modules_to_save`` name as a plain string suffix: "norm" also takes every
    block's input_layernorm and post_attention_layernorm."""
    model = get_peft_model(fresh("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]))
    perturb(peft_trainable(model), seed=3)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    assert any("input_layernorm" in k for k in keys(tmp_path / "peft"))
    loaded, _ = load_peft_into_deltatune("llama", tmp_path / "peft")
    assert_same(logits(loaded, "llama"), logits(model, "llama"), "llama")
    dt.save(loaded, tmp_path / "dt", format="peft")
    assert keys(tmp_path / "dt") == keys(tmp_path / "peft")
    back = PeftModel.from_pretrained(fresh("llama"), tmp_path / "dt").eval()
    assert_same(logits(back, "llama"), logits(model, "llama"))


class Tricky(nn.Module):
    """Module names that contain PEFT's own words: ``weight``, ``lora``, ``default`` (the adapter's name)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.lora_weight_proj = nn.Linear(8, 8)
        self.default = nn.Linear(8, 8)
        self.lora = nn.ModuleDict({"default": nn.Linear(8, 8), "weight": nn.Linear(8, 8)})
        self.lora_A = nn.Linear(8, 8)  # not adapted: "lora_A.weight" is a base weight here
        self.head_weight = nn.Linear(8, 5)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + torch.tanh(self.lora_weight_proj(h))
        h = self.lora["weight"](self.lora["default"](self.default(h)))
        return self.head_weight(torch.relu(self.lora_A(h)))


def tricky() -> nn.Module:
    torch.manual_seed(0)
    return Tricky().eval()


@needs_peft
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_module_names_containing_weight_lora_and_default_round_trip(bias, tmp_path):
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    # an Embedding has no bias, which bias="lora_only" skips in PEFT but deltatune cannot (see below)
    embed = ["embed"] if bias == "none" else []
    config = LoraConfig(
        r=2, target_modules=["lora_weight_proj", "default", "weight", *embed], modules_to_save=["head_weight"],
        bias=bias,
    )
    model = get_peft_model(tricky(), config)
    perturb(peft_trainable(model), seed=5)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected, base = model(ids), tricky()(ids)
    assert (expected - base).abs().max() > MIN_EFFECT
    assert not any(k.startswith("base_model.model.lora_A.") for k in keys(tmp_path / "peft"))

    ours = tricky()
    dt.load(ours, tmp_path / "peft")
    assert set(delta_layers(ours)) == {*embed, "lora_weight_proj", "default", "lora.default", "lora.weight", "head_weight"}
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=RTOL)
    dt.save(ours, tmp_path / "dt", format="peft")
    assert keys(tmp_path / "dt") == keys(tmp_path / "peft")
    back = PeftModel.from_pretrained(tricky(), tmp_path / "dt").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids), expected, atol=ATOL, rtol=RTOL)


@needs_peft
def test_bias_lora_only_over_layers_with_and_without_bias_is_refused_clearly(tmp_path):
    """PEFT trains the bias of the adapted layers that have one; deltatune's bias="targets" needs
    every adapted layer to have one, so such an adapter is refused, not loaded without its biases."""
    model = get_peft_model(tricky(), LoraConfig(r=2, target_modules=["embed", "default"], bias="lora_only"))
    perturb(peft_trainable(model), seed=5)
    model.save_pretrained(tmp_path / "peft")
    ours = tricky()
    with pytest.raises(CheckpointError, match="lora_only"):
        dt.load(ours, tmp_path / "peft")
    assert dt.deltas(ours) == {}


# legacy pickles, fields, keys ---------------------------------------------------------------------


@needs_peft
@pytest.mark.parametrize("arch, name, old_bias_keys", [
    pytest.param("llama", "rslora-dora", False, id="llama-rslora-dora"),
    # before PEFT 0.7 the trained bias of bias="lora_only" was stored as <module>.bias
    pytest.param("gpt2", "bias-lora-only", True, id="gpt2-bias-lora-only-pre-0.7-keys"),
])
def test_legacy_adapter_model_bin_is_read(arch, name, old_bias_keys, peft_root, tmp_path):
    saved = peft_saved(arch, name, peft_root)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / CONFIG).write_text((saved.directory / CONFIG).read_text())
    state = load_file(str(saved.directory / WEIGHTS))
    if old_bias_keys:
        assert any(k.endswith(".base_layer.bias") for k in state)
        state = {k.replace(".base_layer.bias", ".bias"): v for k, v in state.items()}
    torch.save(state, legacy / "adapter_model.bin")
    model, _ = load_peft_into_deltatune(arch, legacy)
    assert_same(logits(model, arch), saved.logits, arch)
    dt.save(model, tmp_path / "dt", format="peft")
    assert keys(tmp_path / "dt") == keys(saved.directory)


@needs_peft
def test_embedding_matrix_stored_with_the_adapter_must_be_this_models(peft_root, tmp_path):
    """PEFT stores the embedding matrix next to a LoRA on it; one that differs from the model's
    (a resized or retrained vocabulary) cannot be applied to this base."""
    saved = peft_saved("llama", "embedding-and-head", peft_root)
    state = load_file(str(saved.directory / WEIGHTS))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in state
    state[key] = state[key] + 1e-3
    write_adapter(tmp_path / "edited", json.loads((saved.directory / CONFIG).read_text()), state)
    model = fresh("llama")
    with pytest.raises(CheckpointError, match="embed_tokens"):
        dt.load(model, tmp_path / "edited")
    assert dt.deltas(model) == {}


class Payload:
    """Not a tensor: unpickling it would run this module's code."""

    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(directory / WEIGHTS))
    return directory


def small_lora_adapter(directory: Path, **fields) -> Path:
    """A valid LoRA adapter for the tiny llama, written by hand (no peft needed)."""
    generator = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(2, 32, generator=generator),
        f"{prefix}.lora_B.weight": torch.randn(32, 2, generator=generator),
    }
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none", **fields}
    return write_adapter(directory, config, tensors)


@pytest.mark.parametrize("payload", [
    pytest.param(lambda: {"x": Payload()}, id="object-with-reduce"),
    pytest.param(lambda: {"x": torch.zeros(2), "meta": Arch([], [], "", "", [], [], [], False)}, id="dataclass-instance"),
])
def test_legacy_pickle_with_a_non_tensor_object_is_refused(payload, tmp_path, capsys):
    directory = small_lora_adapter(tmp_path / "adapter")
    (directory / WEIGHTS).unlink()
    torch.save(payload(), directory / "adapter_model.bin")
    model = fresh("llama")
    with pytest.raises(CheckpointError, match="adapter_model.bin"):
        dt.load(model, directory)
    assert "code ran" not in capsys.readouterr().out
    assert dt.deltas(model) == {}


def test_legacy_pickle_of_non_tensor_values_is_refused(tmp_path):
    directory = small_lora_adapter(tmp_path / "adapter")
    (directory / WEIGHTS).unlink()
    torch.save({"x": [1, 2, 3]}, directory / "adapter_model.bin")  # plain containers pass weights_only
    with pytest.raises(CheckpointError, match="tensors"):
        dt.load(fresh("llama"), directory)


@pytest.mark.parametrize("field_name, value", [
    ("layer_replication", [[0, 1], [1, 2]]),
    ("lora_bias", True),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"),
    ("use_qalora", True),
    ("bias", "all"),
])
def test_numerics_changing_field_deltatune_cannot_honour_is_an_error_naming_it(field_name, value, tmp_path):
    directory = small_lora_adapter(tmp_path / "adapter", **{field_name: value})
    model = fresh("llama")
    with pytest.raises(CheckpointError, match=field_name):
        dt.load(model, directory)
    assert dt.deltas(model) == {}


def test_unknown_field_is_a_note_and_the_adapter_still_loads(tmp_path):
    plain = small_lora_adapter(tmp_path / "plain")
    with_field = small_lora_adapter(tmp_path / "future", frobnication_level=3)
    expected, _ = load_peft_into_deltatune("llama", plain)
    model = fresh("llama")
    with pytest.warns(PeftFormatNote, match="frobnication_level"):
        dt.load(model, with_field)
    assert_same(logits(model, "llama"), logits(expected, "llama"), "llama")


def test_key_naming_nothing_in_the_model_is_an_error_naming_it(tmp_path):
    directory = small_lora_adapter(tmp_path / "adapter")
    tensors = load_file(str(directory / WEIGHTS))
    stray = "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"
    tensors[stray] = torch.zeros(2, 32)
    save_file(tensors, str(directory / WEIGHTS))
    model = fresh("llama")
    with pytest.raises(CheckpointError, match=stray.replace(".", r"\.")):
        dt.load(model, directory)
    assert dt.deltas(model) == {}


def test_lora_factor_of_the_wrong_shape_is_an_error_and_leaves_nothing_attached(tmp_path):
    directory = small_lora_adapter(tmp_path / "adapter")
    tensors = load_file(str(directory / WEIGHTS))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(31, 2)
    save_file(tensors, str(directory / WEIGHTS))
    model = fresh("llama")
    with pytest.raises(CheckpointError, match="q_proj"):
        dt.load(model, directory)
    assert dt.deltas(model) == {} and not delta_layers(model)


# many adapters on one base ------------------------------------------------------------------------


class Counter:
    """Counts calls of a method across all instances, for work-per-load comparisons (not timings)."""

    def __init__(self, monkeypatch, owner: type, method: str):
        self.calls = 0
        original = getattr(owner, method)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, method, counted)


@needs_peft
def test_ten_adapters_on_one_base_each_give_their_own_peft_logits(tmp_path, monkeypatch):
    arch = "llama"
    directories, expected = [], []
    for i in range(10):
        config = LoraConfig(
            r=2 + i % 3, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=i % 4 == 1,
        )
        model = get_peft_model(fresh(arch), config)
        perturb(peft_trainable(model), seed=100 + i)
        model.eval()
        model.save_pretrained(tmp_path / f"a{i}")
        directories.append(tmp_path / f"a{i}")
        expected.append(logits(model, arch))

    base = fresh(arch)
    copies = Counter(monkeypatch, Delta, "load_saved_state")
    walks = Counter(monkeypatch, nn.Module, "named_children")
    visits = Counter(monkeypatch, nn.Module, "named_modules")
    work = []
    for i, directory in enumerate(directories):
        copies.calls = walks.calls = visits.calls = 0
        dt.load(base, directory, f"a{i}", activate=False)
        work.append((copies.calls, walks.calls, visits.calls))
    monkeypatch.undo()

    # the 10th attach does no more work than the 1st, counted rather than timed: one state copy
    # per adapted module (2 layers x 3 projections), the same walk of the module tree (seen
    # through deltatune's wrappers, it does not grow), and no more module visits than the first
    # load, which also wraps the six layers (later loads visit each attached delta once)
    assert [c for c, _, _ in work] == [6] * 10, work
    assert len({w for _, w, _ in work}) == 1, work
    assert max(v for _, _, v in work[1:]) <= work[0][2], work
    layers = delta_layers(base)
    assert len(layers) == 6 and all(len(layer.deltas) == 10 for layer in layers.values())
    assert all(not info.active for info in dt.deltas(base).values())

    torch.testing.assert_close(logits(base, arch), base_logits(arch))
    for i in range(10):
        dt.activate(base, f"a{i}")
        assert_same(logits(base, arch), expected[i], arch)
    dt.deactivate(base)
    torch.testing.assert_close(logits(base, arch), base_logits(arch))

    # a mixed batch: each row through its own adapter, in one forward pass
    x = inputs(arch)
    names = ["a5", "a8"]  # a5 is a DoRA adapter
    with dt.route(base, names), torch.no_grad():
        routed = base(**x).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(routed[row], expected[int(name[1:])][row], atol=ATOL, rtol=RTOL)


# golden files: PEFT's output, stored (no peft needed) ---------------------------------------------

GOLDEN_CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / CONFIG).is_file()) if GOLDEN.is_dir() else []


def test_golden_files_exist():
    assert len(GOLDEN_CASES) >= 4, f"run scripts/make_peft_golden.py to write {GOLDEN}"


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_peft_adapter_gives_peft_logits(case):
    directory = GOLDEN / case
    expected = load_file(str(directory / "expected.safetensors"))
    with safe_open(str(directory / "expected.safetensors"), "pt") as f:
        arch = f.metadata()["arch"]
    model = tiny_model(arch)
    x = {k.removeprefix("input."): v for k, v in expected.items() if k.startswith("input.")}
    with torch.no_grad():
        base = model(**x).logits
    # the base model must be the one the files were made with, or the comparison means nothing
    torch.testing.assert_close(
        base[..., : expected["base_logits"].shape[-1]], expected["base_logits"], atol=ATOL, rtol=RTOL,
        msg=lambda m: f"the zoo's tiny {arch} is not the model {case} was made with: {m}",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftFormatNote)
        dt.load(model, directory)
    with torch.no_grad():
        got = model(**x).logits
    torch.testing.assert_close(got[..., : expected["logits"].shape[-1]], expected["logits"], atol=ATOL, rtol=RTOL)
    assert (expected["logits"] - expected["base_logits"]).abs().max() > MIN_EFFECT


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_classifier_adapted_by_all_linear_exports_as_peft_loads_it(method, tmp_path):
    """PEFT's SEQ_CLS model always loads the classifier as a full copy (modules_to_save): a delta
    on the classifier (all-linear matches it) is exported merged into that copy, so PEFT loads
    the directory and gives the same logits, and deltatune reads it back to the same logits."""
    import transformers as tf
    from peft import PeftModel

    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(config).eval()
    ours = tf.BertForSequenceClassification(config).eval()
    ours.load_state_dict(base.state_dict())
    delta = dt.LoRAConfig(r=2, targets="all-linear") if method == "lora" else dt.IA3Config(targets="all-linear")
    dt.attach(ours, delta)
    assert "classifier" in dt.deltas(ours)["default"].paths
    perturb(dt.trainable_parameters(ours), seed=3, std=0.1 if method == "lora" else 0.5)
    dt.save(ours, tmp_path / "peft", format="peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    fresh = tf.BertForSequenceClassification(config).eval()
    fresh.load_state_dict(base.state_dict())  # before PEFT wraps base's modules
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    dt.load(fresh, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
