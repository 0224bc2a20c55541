"""Every benchmark with modest defaults (``make bench``): tables and JSON in bench/results/.

    .venv/bin/python -m bench.run_all [--skip load zoo]

Each bench runs in its own process, so one's peak RSS and thread pools do not leak into the
next (the random real-size models are built once, up front, by
:func:`bench.common.ensure_models`). Expect 20-25 minutes on 2 idle CPU cores, most of it in
image-encoder forwards; the tables of the run are joined into bench/results/summary.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import RESULTS_DIR, ensure_models, load_average, machine, print_machine

# SAM 3 routes of bench.zoo are left out: one SAM 3 forward takes minutes on 2 cores
# (run ``python -m bench.zoo`` for them).
BENCHES: dict[str, list[str]] = {
    "interactive": ["--clicks", "50", "--naive", "1"],
    "preannotate": ["--rounds", "1", "--box-rounds", "2"],
    "everything": ["--points-per-side", "8", "--worst-points-per-side", "4", "--decoder-batch", "0"],
    "load": ["--seconds", "30", "--batch-seconds", "10"],  # issue 8: 50 concurrent clicks for 30 s
    "zoo": ["--routes", "grounded", "sam2"],
}
TITLES = {
    "interactive": "Clicks (bench/interactive.py)",
    "preannotate": "Pre-annotation (bench/preannotate.py)",
    "everything": "Segment everything (bench/everything.py)",
    "zoo": "Model routes (bench/zoo.py)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(BENCHES))
    args = parser.parse_args()
    print_machine(machine())
    ensure_models()
    failed: list[str] = []
    for name, bench_args in BENCHES.items():
        if name in args.skip:
            continue
        print(f"\n=== bench.{name} {' '.join(bench_args)}  (load {load_average()})", flush=True)
        started = time.perf_counter()
        if subprocess.run([sys.executable, "-m", f"bench.{name}", *bench_args]).returncode:
            failed.append(name)
        print(f"=== bench.{name} took {time.perf_counter() - started:.0f} s", flush=True)
    sections = [
        f"## {title}\n\n{(RESULTS_DIR / f'{name}.md').read_text()}"
        for name, title in TITLES.items()
        if (RESULTS_DIR / f"{name}.md").exists()
    ]
    summary = RESULTS_DIR / "summary.md"
    summary.write_text("\n".join(sections))
    print(f"\n{summary.read_text()}\nwrote {summary}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
