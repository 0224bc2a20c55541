"""The command line's parser stays cheap to build.

``grounded-sam-backend --help`` and every flag error build the whole parser; the subcommand
modules import torch and the model code only inside their commands, so these answer at once
instead of after seconds of imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("torch", "transformers", "backend.jobs", "backend.predictor")


def test_building_the_parser_imports_no_model_code() -> None:
    # a fresh interpreter: this test process has long imported torch through other tests
    script = (
        "import sys, backend.cli; backend.cli.build_parser(); "
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == ""


def test_batch_commands_import_no_client_or_queue_code() -> None:
    """As its docstring says: the SDK, httpx, Redis and RQ load only when a command runs."""
    lazy = (*HEAVY_MODULES, "label_studio_sdk", "httpx", "redis", "rq", "backend.ls_client")
    script = f"import sys, backend.commands.batch_commands; print(','.join(m for m in {lazy!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == ""


def test_help_lists_every_subcommand() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    for command in ("serve", "preannotate", "worker", "export-coco", "export-yolo", "import-coco", "evaluate"):
        assert command in done.stdout
