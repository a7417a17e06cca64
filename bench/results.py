"""bench/RESULTS.md is shared by the benchmarks: each one owns a marked section and rewrites only it."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

PATH = os.path.join(os.path.dirname(__file__), "RESULTS.md")
HEADER = ("# Benchmark results\n\nEvery figure is a ratio measured side by side in one run by the command shown in its "
          "section; re-run it to refresh the section.\n")


def machine() -> str:
    """The CPU model, core count and date (the GPU too, where torch sees one)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {datetime.date.today().isoformat()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return text


def cpu_build() -> str:
    """The build of the CPU kernels in use (avx512, avx2 or baseline; SEME_CPU_ISA caps it). It changes
    their speed several times over, so each build's CPU figures have sections of their own."""
    from seme import _C

    return _C.isa()


def command_line(module: str, argv: list[str]) -> str:
    """The command that re-runs a benchmark as it ran, the SEME_CPU_ISA cap included."""
    cap = os.environ.get("SEME_CPU_ISA")
    return " ".join(([f"SEME_CPU_ISA={cap}"] if cap else []) + ["python -m", module] + list(argv))


def update_section(name: str, body: str) -> None:
    """Replace (or append) the section between the markers of benchmark `name`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = open(PATH, encoding="utf-8").read() if os.path.exists(PATH) else HEADER
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
