"""Check the sm_90a SASS of the CUDA 2:4 GEMV for what its programmatic dependent launch needs.

A GEMV launched with programmatic stream serialization (the kernels with kPdl = true, the last
bool of their template arguments) may start while the kernel before it still runs. Before its
one griddepcontrol.wait (SASS ACQBULK) it must not touch global memory through loads or
stores at all, not x, not y, not the workspace, and not the weights either (a kernel may have
just written them: a GPU pack, an in-place update); it may only ask L2 for weight lines
(prefetch.global.L2: CCTL.E.PF2), and it should, or the early start gains little. Nor may it
use read-only (.nc, LDG...CONSTANT) loads anywhere: ptxas takes their data as constant for the
whole kernel and may move them above the wait. The kernels launched without the attribute
(kPdl = false) have no wait at all.

    python tools/check_gemv_sass.py OBJECT_OR_SASS [--cuobjdump PATH]

Exit 0 when every sparse24_gemv_kernel keeps to that; 1 with one line per violation
otherwise; 2 when no cuobjdump is found (nothing checked).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

_FUNCTION = re.compile(r"Function : (\S+)")
_GLOBAL_ACCESS = re.compile(r"\b(LD|ST|LDG|STG|ATOM|ATOMG|RED|LDGSTS)(\.[A-Z0-9_.]+)?\b")


_PDL_FLAG = re.compile(r"Lb([01])ELb([01])ELb([01])EE")  # cluster, prefetch, pdl


def check(sass: str) -> tuple[int, list[str]]:
    """(number of GEMV kernels checked, violations) for a cuobjdump -sass listing."""
    kernels: dict[str, list[str]] = {}
    name = None
    for line in sass.splitlines():
        if m := _FUNCTION.search(line):
            name = m.group(1)
            kernels[name] = []
        elif name is not None:
            kernels[name].append(line)
    problems = []
    checked = 0
    for name, lines in kernels.items():
        if "sparse24_gemv_kernel" not in name:
            continue
        checked += 1
        flags = _PDL_FLAG.search(name)
        if flags is None:
            problems.append(f"{name}: no (cluster, prefetch, pdl) template flags in the name")
            continue
        waits = [i for i, line in enumerate(lines) if re.search(r"\bACQBULK\b", line)]
        if flags.group(3) == "0":
            if waits:
                problems.append(f"{name}: launched without PDL but has {len(waits)} wait(s)")
            continue
        if len(waits) != 1:
            problems.append(f"{name}: {len(waits)} griddepcontrol.wait (ACQBULK), expected 1")
            continue
        above = lines[: waits[0]]
        for line in above:
            if m := _GLOBAL_ACCESS.search(line):
                problems.append(f"{name}: {m.group(0)} before the wait: {line.strip()}")
        if not any("CCTL.E.PF2" in line for line in above):
            problems.append(f"{name}: no L2 prefetch before the wait (nothing overlaps)")
        # .nc loads (LDG...CONSTANT) may be hoisted above the wait by ptxas: none at all here
        for line in lines:
            if re.search(r"\bLDG\.[A-Z0-9_.]*CONSTANT\b", line):
                problems.append(f"{name}: a read-only (.nc) load in a PDL kernel: {line.strip()}")
                break
    return checked, problems


def _cuobjdump(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    try:
        import triton.backends.nvidia as nvidia  # ships cuobjdump

        bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="sm_90a object / cubin, or a .sass listing")
    parser.add_argument("--cuobjdump", help="cuobjdump to use (default: triton's, then PATH)")
    args = parser.parse_args(argv)
    if args.path.suffix == ".sass":
        sass = args.path.read_text()
    else:
        tool = _cuobjdump(args.cuobjdump)
        if tool is None:
            print(
                "check_gemv_sass: no cuobjdump (triton's or on PATH); not checked", file=sys.stderr
            )
            return 2
        sass = subprocess.run(
            [tool, "-sass", str(args.path)], capture_output=True, text=True, check=True
        ).stdout
    checked, problems = check(sass)
    if checked == 0:
        problems.append("no sparse24_gemv_kernel in the SASS")
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"check_gemv_sass: {checked} GEMV kernels: PDL ones only prefetch before the wait")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
