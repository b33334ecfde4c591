"""Role discovery (deltatune.anatomy) on every architecture of the test zoo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from zoo import ARCHITECTURES, FUSED_QKV, GATED_FFN, NUM_LAYERS, is_seq2seq, tiny_inputs, tiny_model

from deltatune.anatomy import ROLE_GROUPS, ROLES, analyze, is_linear_like, iter_modules, linear_shape

PROJECTION_ROLES = (*ROLE_GROUPS["attn"], *ROLE_GROUPS["ffn"])

# Test data, not library code: where each architecture keeps its blocks.
EXPECTED_STACKS = {
    "llama": ("model.layers",),
    "mistral": ("model.layers",),
    "qwen2": ("model.layers",),
    "gemma": ("model.layers",),
    "gpt2": ("transformer.h",),
    "gpt_neox": ("gpt_neox.layers",),
    "opt": ("model.decoder.layers",),
    "bloom": ("transformer.h",),
    "falcon": ("transformer.h",),
    "phi": ("model.layers",),
    "bert": ("bert.encoder.layer",),
    "roberta": ("roberta.encoder.layer",),
    "distilbert": ("distilbert.transformer.layer",),
    "t5": ("encoder.block", "decoder.block"),
    "bart": ("model.encoder.layers", "model.decoder.layers"),
}


def expected_role_counts(arch: str) -> dict[str, int]:
    """How many modules of each projection role ``arch`` has in the zoo."""
    # Encoder-decoders: encoder self-attention, decoder self- and cross-attention.
    attention_modules = 3 * NUM_LAYERS if is_seq2seq(arch) else NUM_LAYERS
    ffn_modules = 2 * NUM_LAYERS if is_seq2seq(arch) else NUM_LAYERS
    counts = dict.fromkeys(PROJECTION_ROLES, 0)
    if arch in FUSED_QKV:
        counts["attn.qkv"] = attention_modules
    else:
        counts.update({"attn.q": attention_modules, "attn.k": attention_modules, "attn.v": attention_modules})
    counts["attn.o"] = attention_modules
    counts["ffn.up"] = counts["ffn.down"] = ffn_modules
    if arch in GATED_FFN:
        counts["ffn.gate"] = ffn_modules
    return counts


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_and_model(request):
    return request.param, tiny_model(request.param)


class StandInDelta(nn.Module):
    """What the core's delta wrappers look like to anatomy: ``is_delta_layer`` and ``.base``."""

    is_delta_layer = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(4, 4)  # a child of the wrapper that must stay invisible

    @property
    def weight(self) -> torch.Tensor:
        # Some models read it directly (T5's feed-forward checks ``wo.weight.dtype``).
        return self.base.weight

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is module)


def wrap(model: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, StandInDelta(getattr(parent, name)))


def test_role_groups_cover_the_projection_roles():
    assert ROLE_GROUPS == {
        "attn": ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv"),
        "ffn": ("ffn.up", "ffn.gate", "ffn.down"),
    }
    assert set(ROLES) == {"embed", "head", "block", "norm", *PROJECTION_ROLES}


def test_finds_stacks(arch_and_model):
    arch, model = arch_and_model
    anatomy = analyze(model)
    assert anatomy.stacks == EXPECTED_STACKS[arch]
    assert dict(anatomy.num_layers) == dict.fromkeys(anatomy.stacks, NUM_LAYERS)
    blocks = anatomy.paths_with_role("block")
    assert blocks == [f"{stack}.{i}" for stack in anatomy.stacks for i in range(NUM_LAYERS)]


def test_finds_projection_roles(arch_and_model):
    arch, model = arch_and_model
    anatomy = analyze(model)
    found = {role: len(anatomy.paths_with_role(role)) for role in PROJECTION_ROLES}
    assert found == expected_role_counts(arch)
    assert len(anatomy.paths_with_role("attn")) == sum(found[r] for r in ROLE_GROUPS["attn"])


def test_roles_agree_with_shapes(arch_and_model):
    _, model = arch_and_model
    anatomy = analyze(model)
    hidden = model.config.hidden_size
    for path, role in anatomy.role_of.items():
        if role in ("attn.q", "attn.k", "attn.v", "attn.qkv", "ffn.up", "ffn.gate"):
            assert linear_shape(model.get_submodule(path))[0] == hidden, path
        elif role in ("attn.o", "ffn.down"):
            assert linear_shape(model.get_submodule(path))[1] == hidden, path


def test_finds_embed_head_and_norms(arch_and_model):
    arch, model = arch_and_model
    anatomy = analyze(model)
    input_embedding = model.get_input_embeddings()
    if arch in ("t5", "bart"):
        # the shared embedding only holds the weight; the encoder's and decoder's tied
        # embed_tokens modules are the ones the forward calls, so they carry the role
        prefix = "model." if arch == "bart" else ""
        assert anatomy.paths_with_role("embed") == [f"{prefix}encoder.embed_tokens", f"{prefix}decoder.embed_tokens"]
        assert all(model.get_submodule(p).weight is input_embedding.weight for p in anatomy.paths_with_role("embed"))
    else:
        assert anatomy.paths_with_role("embed") == [_path_of(model, input_embedding)]
    assert anatomy.head == _path_of(model, model.get_output_embeddings())
    assert anatomy.paths_with_role("head") == [anatomy.head]
    norms = anatomy.paths_with_role("norm")
    # At least one norm per block plus the final one; every one really is a norm layer.
    assert len(norms) > sum(anatomy.num_layers.values())
    assert all("norm" in type(model.get_submodule(p)).__name__.lower() for p in norms)


def test_layer_of(arch_and_model):
    _, model = arch_and_model
    anatomy = analyze(model)
    for path, _ in iter_modules(model):
        block = next((f"{s}.{i}" for s in anatomy.stacks for i in range(NUM_LAYERS)
                      if path == f"{s}.{i}" or path.startswith(f"{s}.{i}.")), None)
        if block is None:
            assert path not in anatomy.layer_of, path
        else:
            assert anatomy.layer_of[path] == int(block.rsplit(".", 1)[1]), path
    # Every projection role lives inside a block.
    for role in PROJECTION_ROLES:
        assert all(p in anatomy.layer_of for p in anatomy.paths_with_role(role))


def test_describe_mentions_stacks_and_roles(arch_and_model):
    _, model = arch_and_model
    anatomy = analyze(model)
    report = anatomy.describe()
    assert all(stack in report for stack in anatomy.stacks)
    assert "attn.o" in report and "ffn.down" in report


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_anatomy_survives_delta_wrappers(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    before = analyze(model)
    paths_before = [p for p, _ in iter_modules(model)]
    with torch.no_grad():
        logits_before = model(**inputs).logits

    for path in [*before.paths_with_role("attn"), *before.paths_with_role("ffn"), before.head]:
        wrap(model, path)
    wrap(model, before.paths_with_role("block")[0])  # a composite module, wrapped around wrappers

    after = analyze(model)
    assert [p for p, _ in iter_modules(model)] == paths_before
    assert not any("lora_A" in p or ".base" in p for p, _ in iter_modules(model))
    assert after == before
    assert all(not isinstance(m, StandInDelta) for _, m in iter_modules(model))
    assert is_linear_like(model.get_submodule(before.head))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits_before)


def test_linear_shape_handles_conv1d():
    from transformers.pytorch_utils import Conv1D

    assert linear_shape(nn.Linear(3, 5)) == (3, 5)
    assert linear_shape(Conv1D(5, 3)) == (3, 5)  # Conv1D(nf=out, nx=in), weight stored (in, out)
    with pytest.raises(TypeError):
        linear_shape(nn.LayerNorm(3))


class Block(nn.Module):
    """A block with Llama-style names whose q_proj does not read the hidden size."""

    def __init__(self, hidden: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden + 1, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)


def test_shape_check_rejects_misleading_names():
    model = nn.Module()
    model.layers = nn.ModuleList(Block(8) for _ in range(3))
    model.config = SimpleNamespace(hidden_size=8)
    anatomy = analyze(model)
    assert anatomy.stacks == ("layers",)
    assert anatomy.paths_with_role("attn.o") == [f"layers.{i}.o_proj" for i in range(3)]
    assert anatomy.paths_with_role("attn.q") == []


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
    nn.Sequential(nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2)),
    nn.Linear(3, 3),
    nn.ModuleList(),
])
def test_unknown_models_do_not_crash(model):
    anatomy = analyze(model)
    assert anatomy.stacks == ()
    assert anatomy.head is None
    assert not anatomy.paths_with_role("attn") and not anatomy.paths_with_role("ffn")
    assert isinstance(anatomy.describe(), str)


def test_custom_stack_without_known_names():
    class MLPBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.outer = nn.Linear(4, 4)

    model = nn.Module()
    model.embedding = nn.Embedding(10, 4)
    model.blocks = nn.Sequential(MLPBlock(), MLPBlock())
    anatomy = analyze(model)
    assert anatomy.stacks == ("blocks",)
    assert anatomy.layer_of["blocks.1.outer"] == 1
    # No get_input_embeddings: embeddings outside the stacks are the embed role.
    assert anatomy.paths_with_role("embed") == ["embedding"]


def test_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="unknown role"):
        analyze(nn.Linear(2, 2)).paths_with_role("attn.x")
