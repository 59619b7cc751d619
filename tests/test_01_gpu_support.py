"""A GPU older than Ampere gets one clear message when the engine's config is made, naming the GPU and bf16.

No GPU here: the capability query (``kernels._env.gpu_capability``) and ``torch.cuda.is_available`` are
monkeypatched; the answer key is the rule itself (compute capability >= 8.0, as NVIDIA lists bf16 support).
"""

import pytest
import torch

import kernels._env as env
from minivllm.config import EngineConfig


def _pretend_gpu(monkeypatch, name: str, cc: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env, "gpu_capability", lambda index=0: (name, cc))


@pytest.mark.parametrize("name, cc", [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0))])
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_a_gpu_without_bf16_is_refused_with_its_name_and_what_it_lacks(monkeypatch, name, cc, device):
    _pretend_gpu(monkeypatch, name, cc)
    with pytest.raises(RuntimeError) as e:
        EngineConfig(device=device)
    message = str(e.value)
    assert name in message and f"{cc[0]}.{cc[1]}" in message
    assert "bf16" in message and "8.0" in message and "device='cpu'" in message


@pytest.mark.parametrize("name, cc", [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA GeForce RTX 3080", (8, 6)),
                                      ("NVIDIA L4", (8, 9)), ("NVIDIA H200", (9, 0))])
def test_ampere_and_later_pass(monkeypatch, name, cc):
    _pretend_gpu(monkeypatch, name, cc)
    assert EngineConfig(device="auto").torch_device.type == "cuda"


def test_the_cpu_is_never_checked(monkeypatch):
    _pretend_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert EngineConfig(device="cpu").torch_device.type == "cpu"
