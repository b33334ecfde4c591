"""Subspace similarity and amplification (Hu et al. 2021, §7) on constructed cases, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.analysis.subspace import (
    amplification_factor,
    compare_subspaces,
    lora_amplification,
    similarity_grid,
    subspace_similarity,
)
from deltatune.cli.main import app
from zoo import tiny_model


def orthonormal_rows(k: int, rows: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(k, rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T


def test_identical_subspaces_give_one():
    basis = orthonormal_rows(64, 8)
    mixing = torch.randn(8, 8, dtype=torch.float64)  # another basis of the same row space
    grid = similarity_grid(basis, mixing @ basis)
    assert subspace_similarity(basis, mixing @ basis) == pytest.approx(1.0, abs=1e-9)
    assert grid.shape == (8, 8) and torch.all(grid <= 1 + 1e-9)


def test_nested_subspace_gives_one():
    """A rank-8 A whose row space lies inside a rank-32 A: φ(i=8, j=32) = 1 (min(i, j) normalises)."""
    big = orthonormal_rows(64, 32)
    small = torch.diag(torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1], dtype=torch.float64)) @ big[:8]
    assert subspace_similarity(small, big, 8, 32) == pytest.approx(1.0, abs=1e-9)


def test_orthogonal_subspaces_give_zero():
    basis = orthonormal_rows(64, 16)
    assert subspace_similarity(basis[:8], basis[8:]) == pytest.approx(0.0, abs=1e-12)
    assert similarity_grid(basis[:8], basis[8:]).abs().max() < 1e-12


@pytest.mark.parametrize("r, d", [(4, 64), (8, 256), (16, 128)])
def test_random_subspaces_give_r_over_d(r, d):
    values = [subspace_similarity(torch.randn(r, d, dtype=torch.float64), torch.randn(r, d, dtype=torch.float64))
              for _ in range(200)]
    assert sum(values) / len(values) == pytest.approx(r / d, rel=0.1)


def test_grid_matches_the_definition():
    """Every grid entry equals ‖U_1^{i⊤} U_2^j‖²_F / min(i, j) computed directly."""
    a1, a2 = torch.randn(4, 20, dtype=torch.float64), torch.randn(6, 20, dtype=torch.float64)
    u1 = torch.linalg.svd(a1, full_matrices=False).Vh.T
    u2 = torch.linalg.svd(a2, full_matrices=False).Vh.T
    grid = similarity_grid(a1, a2)
    for i in range(1, 5):
        for j in range(1, 7):
            direct = torch.linalg.matrix_norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(float(direct), abs=1e-10)


def test_amplification_factor():
    """ΔW along directions W barely uses is amplified a lot; along W's own top directions, little."""
    u = orthonormal_rows(32, 32).T
    v = orthonormal_rows(32, 32, seed=1).T
    sigma = torch.linspace(10, 0.01, 32, dtype=torch.float64)
    weight = u @ torch.diag(sigma) @ v.T
    along_top = u[:, :2] @ v[:, :2].T
    along_bottom = u[:, -2:] @ v[:, -2:].T
    # ‖ΔW‖_F = √2 both times; ‖UᵀWV‖_F is the norm of W's singular values in those directions
    assert amplification_factor(along_top, weight) == pytest.approx(2**0.5 / float(sigma[:2].norm()), rel=1e-9)
    assert amplification_factor(along_bottom, weight) == pytest.approx(2**0.5 / float(sigma[-2:].norm()), rel=1e-9)
    # r = 1 projects on ΔW's top direction only (here u₁v₁ᵀ, singular value 3 against 1)
    uneven = 3 * u[:, :1] @ v[:, :1].T + u[:, 1:2] @ v[:, 1:2].T
    assert amplification_factor(uneven, weight, r=1) == pytest.approx(10**0.5 / float(sigma[0]), rel=1e-9)


def _saved_lora(tmp_path, name, r, seed):
    torch.manual_seed(seed)
    model = tiny_model("llama")
    dt.attach(model, dt.config("lora", r=r, targets=["attn.q", "attn.v"]))
    for parameter in dt.trainable_parameters(model):
        torch.nn.init.normal_(parameter)
    dt.save(model, tmp_path / name)
    return model


def test_compare_subspaces_of_saved_deltas(tmp_path):
    model = _saved_lora(tmp_path, "r4", 4, 0)
    _saved_lora(tmp_path, "r8", 8, 1)
    report = compare_subspaces(tmp_path / "r4", tmp_path / "r4")
    assert all(torch.allclose(torch.diagonal(g), torch.ones(4, dtype=g.dtype)) for g in report.grids.values())
    report = compare_subspaces(tmp_path / "r4", tmp_path / "r8", modules="q_proj")
    assert report.mean_grid.shape == (4, 8) and all("q_proj" in p for p in report.grids)
    # of ΔW = B A: the same rank, and a delta shares its own update's subspace fully
    of_delta = compare_subspaces(tmp_path / "r4", tmp_path / "r8", of="delta")
    assert of_delta.mean_grid.shape == (4, 8)
    assert compare_subspaces(tmp_path / "r4", tmp_path / "r4", of="delta").mean_grid[-1, -1] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="of='B' is not valid; allowed: A, delta"):
        compare_subspaces(tmp_path / "r4", tmp_path / "r8", of="B")
    factors = lora_amplification(model)
    assert set(factors) == set(compare_subspaces(tmp_path / "r4", tmp_path / "r8").grids)
    assert all(f > 0 for f in factors.values())


def test_cli_writes_heatmap_and_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    _saved_lora(tmp_path, "a", 4, 0)
    _saved_lora(tmp_path, "b", 8, 1)
    result = CliRunner().invoke(app, ["analyze", "subspace", str(tmp_path / "a"), str(tmp_path / "b"),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "subspace_similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((tmp_path / "out" / "subspace_similarity.json").read_text())
    assert len(numbers["mean_grid"]) == 4 and len(numbers["mean_grid"][0]) == 8
    assert "φ(1,1)" in result.output


def test_cli_rejects_a_non_lora_delta(tmp_path):
    model = tiny_model("llama")
    dt.attach(model, dt.config("ia3"))
    dt.save(model, tmp_path / "ia3")
    result = CliRunner().invoke(app, ["analyze", "subspace", str(tmp_path / "ia3"), str(tmp_path / "ia3")])
    assert result.exit_code == 2 and "needs lora" in result.output
