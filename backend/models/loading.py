"""Shared model-loading helpers: clear load errors, device and dtype resolution, CPU facts.

Every adapter loads through :func:`load_pretrained` so that a missing model (no internet,
wrong id, empty cache, typo in a local path) ends in one :class:`ModelLoadError` that names
the id or path and says how to fix it, instead of a hub traceback several screens long.

``dtype`` here is the *compute* dtype: adapters keep float32 weights and run their forwards
under :func:`inference_context`, which adds ``torch.autocast`` for bfloat16/float16. Autocast
keeps numerically touchy ops (layer norms, softmax, grid sampling) in float32, which loading
the weights in bfloat16 would not.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from backend.config import ConfigError

T = TypeVar("T")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model (or its processor) could not be loaded; the message names the id or path and
    what to do about it."""


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ``./x``, ``~``,
    more than one slash) can only be a local directory."""
    return (
        model_id.startswith((".", "/", "~"))
        or model_id.count("/") > 1
        or "\\" in model_id
        or Path(model_id).expanduser().exists()
    )


def explain_missing_model(model_id: str, what: str, cause: BaseException | None = None) -> str:
    """The text of a load error: what failed, for which id/path, and the ways to fix it."""
    # transformers' messages run to several lines; the first one says what was missing
    first_line = f" ({type(cause).__name__}: {str(cause).splitlines()[0]})" if cause and str(cause) else ""
    if _looks_like_path(model_id):
        path = Path(model_id).expanduser()
        state = "does not exist" if not path.exists() else "exists but holds no loadable model"
        return (
            f"could not load {what} from local path {model_id!r}{first_line} -- the directory {state}. "
            f"Point the setting at a folder written by save_pretrained (config.json, weights, "
            f"processor files), or use a Hugging Face model id."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in {"", "0", "false", "False"}
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface (default)")
    mode = (
        "HF_HUB_OFFLINE is set, so only the local cache is searched"
        if offline
        else "the Hugging Face Hub could not be reached, has no such repository, or it is gated "
        "(gated repositories also need HF_TOKEN)"
    )
    return (
        f"could not load {what} {model_id!r}{first_line} -- {mode}. "
        f"Check the id, or pre-download it where there is internet "
        f"(`hf download {model_id}`) into the cache at HF_HOME={hf_home} and mount that cache "
        f"here (then HF_HUB_OFFLINE=1 avoids network calls), or set the model to a local "
        f"directory written by save_pretrained."
    )


def load_pretrained(cls: type[T] | Any, model_id: str, what: str = "model", **kwargs: Any) -> T:
    """``cls.from_pretrained(model_id, **kwargs)`` with every load failure turned into a
    :class:`ModelLoadError` that names ``model_id``.

    ``cls`` is any class with ``from_pretrained`` (models, ``AutoProcessor``...). ``OSError``
    covers missing repos, missing files and network errors as transformers reports them;
    ``ValueError`` covers a folder holding a model of another type.
    """
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(explain_missing_model(model_id, what, exc)) from exc


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA device is visible, else ``"cpu"``; an explicit
    name is validated so a typo or a CUDA request on a CPU-only host fails at start-up."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"DEVICE={name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE={name!r} but no CUDA device is available (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"DEVICE={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return name


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 matmul (AVX512_BF16 or AMX).

    On CPUs without it (e.g. AVX2-only EPYC Zen 3) bfloat16 is emulated and a SAM ViT-B
    encoder ran 4.4x *slower* than float32; with it (Zen 4) it ran about 2x faster.
    ``mkldnn``'s own check is not enough: it also answers True for plain AVX-512, which
    emulates bfloat16.
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The compute dtype for ``device`` (see :func:`inference_context`).

    ``"auto"``: on CPU bfloat16 only where the CPU does bfloat16 natively
    (:func:`cpu_supports_bf16`), else float32. On CUDA float32: GPU forwards are already
    fast, and half-precision changes which detector queries win, so speed is not worth the
    silent change in proposals there; ask for ``bfloat16``/``float16`` explicitly.
    Explicit ``float16`` on CPU is refused (slow and poorly supported by CPU kernels).
    """
    key = (name or "auto").strip().lower()
    device_type = torch.device(device).type
    if key == "auto":
        if device_type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise ConfigError(f"DTYPE={name!r} is not one of auto, float32, bfloat16, float16")
    dtype = _DTYPES[key]
    if dtype == torch.float16 and device_type == "cpu":
        raise ConfigError("DTYPE=float16 is not supported on CPU (use bfloat16 or float32)")
    return dtype


def apply_torch_threads(threads: int) -> None:
    """``TORCH_THREADS``: torch's intra-op thread count (0 leaves torch's default, one per core).

    Called once where the models load. The count is process-wide for threads whose first torch
    op comes later (the server's request threads); a thread that already ran torch ops keeps
    the count it started with (OpenMP keeps it per thread). Fewer threads than cores pays off
    when the backend shares its CPU: on 2 shared cores at load 4-6 one SAM decoder call took
    0.37 s with 1 thread and 0.93 s with 2 (medians, bench/NOTES.md), as spinning OpenMP
    threads waited for a core.
    """
    if threads < 0:
        raise ConfigError(f"TORCH_THREADS={threads} must be >= 0 (0: torch's default)")
    if threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def inference_context(device: str, dtype: torch.dtype) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast to ``dtype`` when it is not float32."""
    with torch.inference_mode():
        if dtype == torch.float32:
            yield
        else:
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
                yield


def _cpu_model_name() -> str:
    """The marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_family_model() -> str:
    """``family F model M`` from /proc/cpuinfo: tells e.g. EPYC Zen 3 (25/1) from Zen 4
    (25/17) when the model name is just "AMD EPYC" inside a VM."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in {"cpu family", "model"} and key not in found:
                    found[key] = value.strip()
                if not line.strip():
                    break
    except OSError:
        return ""
    if not found:
        return ""
    return f"family {found.get('cpu family', '?')} model {found.get('model', '?')}"


def describe_cpu() -> dict[str, Any]:
    """CPU facts that decide CPU speed and the bf16 choice, for benchmarks and ``/health``.

    Timings from different machines are not comparable without these.
    """
    return {
        "model_name": _cpu_model_name(),
        "family_model": _cpu_family_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "bf16_native": cpu_supports_bf16(),
        "auto_dtype": str(resolve_dtype("auto", "cpu")).removeprefix("torch."),
    }
