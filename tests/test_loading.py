"""Device/dtype resolution, CPU facts and load errors shared by every model adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from backend.config import ConfigError
from backend.models import loading
from backend.models.loading import (
    ModelLoadError,
    describe_cpu,
    inference_context,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)


def test_resolve_device():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(ConfigError, match="DEVICE='gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_cpu_bf16_support(monkeypatch, native):
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: native)
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", "cuda") == torch.float32


def test_explicit_dtypes():
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ConfigError, match="DTYPE='half-ish'"):
        resolve_dtype("half-ish", "cpu")


def test_describe_cpu_reports_bf16_decision():
    facts = describe_cpu()
    assert facts["model_name"]
    assert facts["capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["bf16_native"] == loading.cpu_supports_bf16()
    assert facts["auto_dtype"] == ("bfloat16" if facts["bf16_native"] else "float32")


def test_inference_context_autocasts_only_for_half_types():
    a = torch.randn(4, 4)
    with inference_context("cpu", torch.float32):
        assert (a @ a).dtype == torch.float32
        assert torch.is_inference_mode_enabled()
    with inference_context("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_load_errors_name_the_model(tmp_path):
    with pytest.raises(ModelLoadError, match="org/missing-model") as info:
        load_pretrained(AutoConfig, "org/missing-model", what="segmenter")
    assert "segmenter" in str(info.value)
    assert "hf download org/missing-model" in str(info.value)
    with pytest.raises(ModelLoadError, match="exists but holds no loadable model"):
        load_pretrained(AutoConfig, str(tmp_path))
