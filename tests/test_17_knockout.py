"""bench.knockout: each kind of step replaced by a function that launches nothing, while an engine is built and run."""

import json

import pytest
import torch

from bench import knockout
from bench.models import TINY


def test_knocked_out_steps_hand_back_a_tensor_of_the_shape_and_the_rest_runs_as_before():
    from minivllm.model import layers

    x, r, w = torch.randn(3, TINY.hidden_size), torch.randn(3, TINY.hidden_size), torch.ones(TINY.hidden_size)
    qkv_w = torch.randn(TINY.q_size + 2 * TINY.kv_size, TINY.hidden_size)
    other_w = torch.randn(5, TINY.hidden_size)  # not a knocked-out shape (the LM head, say)
    before = layers.linear, layers.fused_add_rms_norm
    with knockout.knocked_out(("qkv_proj", "norms"), TINY):
        got = layers.linear(x, qkv_w)
        assert got.shape == (3, qkv_w.shape[0]) and not got.any()  # a blank, made once
        assert layers.linear(x, qkv_w) is got
        assert torch.equal(layers.linear(x, other_w), x @ other_w.T)  # other weights: the real matmul
        out, res = layers.fused_add_rms_norm(x, r, w, 1e-6)
        assert out is x and res is r  # no add, no norm
    assert (layers.linear, layers.fused_add_rms_norm) == before  # restored on leaving
    assert not torch.equal(layers.rms_norm(x, w, 1e-6), x)


def test_the_dry_run_times_every_knockout_and_the_savings(tmp_path):
    assert knockout.main(["--config", "tiny", "--device", "cpu", "--output-len", "6", "--repeats", "2",
                          "--knockouts", "none", "down_proj", "layers", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "17_knockout_tiny.json").read_text())
    assert list(data["knockouts"]) == ["none", "down_proj", "layers"]
    for entry in data["knockouts"].values():
        assert len(entry["runs"]) == 2 and min(entry["runs"]) <= entry["decode_ms_per_token"] <= max(entry["runs"])
    assert set(data["saved_ms_per_token"]) == {"down_proj", "layers"}
    assert data["saved_ms_per_token"]["layers"] == round(
        data["knockouts"]["none"]["decode_ms_per_token"] - data["knockouts"]["layers"]["decode_ms_per_token"], 4)


def test_it_refuses_the_embedded_model():
    with pytest.raises(SystemExit, match="random model"):
        knockout.main(["--config", "default", "--device", "cpu"])
