"""Every Triton kernel compiles ahead of time for Hopper (sm_90), with no GPU.

The compile runs in child processes (``python -m slimstack.kernels.aot``, one per dtype, in
parallel) with TRITON_INTERPRET unset: the interpreter swaps triton's own @jit library when
triton is first imported, so this process, which may be in interpreter mode, cannot compile.
This module therefore imports neither triton nor the kernels.

Without a GPU, Triton's ``n_spills`` (read when a kernel is loaded onto a device) is not
available; the same facts come from the cubin: ``cuobjdump -res-usage`` (STACK / LOCAL bytes)
and the SASS (no LDL / STL local-memory traffic).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DTYPES = ("fp16", "bf16", "fp32")
HALF = ("fp16", "bf16")  # the serving dtypes: tiles are sized for them
MODULES = (
    "sparse24_gemv", "sparse24_gemm", "bitmap_gemv", "bitmap_unpack", "sparse24_unpack",
    "splitk_sum", "rmsnorm", "rope", "swiglu", "decode_attention",
)  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def _has_prefix(ops: dict[str, int], *prefixes: str) -> bool:
    return any(op.startswith(prefixes) for op in ops)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        dt: subprocess.Popen(
            [sys.executable, "-m", "slimstack.kernels.aot", "--arch", "90", "--dtypes", dt,
             "--json", str(out / f"{dt}.json")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for dt in DTYPES
    }  # fmt: skip
    found = []
    for dt, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"AOT compile for {dt} failed:\n{log[-6000:]}"
        found += json.loads((out / f"{dt}.json").read_text())
    return found


def test_every_kernel_compiles_for_sm90_in_both_dtypes(reports):
    compiled = {(r["module"], r["dtype"]) for r in reports}
    missing = {(m, dt) for m in MODULES for dt in DTYPES} - compiled
    assert not missing, f"kernels without an sm_90 build: {sorted(missing)}"
    for r in reports:
        assert r["arch"] == 90
        assert r["cubin_bytes"] > 0 and r["sass_lines"] > 10, f"{r['name']}: empty cubin/SASS"


def test_no_register_spills(reports):
    """16-bit kernels, odd-K (masked) specialisations included. fp32 on a GPU is a
    correctness path whose 2x wider registers may spill in the big tiles: not checked."""
    half = [r for r in reports if r["dtype"] in HALF]
    assert any("odd-K" in r["name"] for r in half)
    for r in half:
        if r["maxnreg"] is not None:
            # A register cap (two CTAs per SM) may park a few values outside the loops
            # (triton 3.9: 8 bytes around the epilogue of the 256 x 64 GEMM tile), none inside.
            assert r["stack"] <= 16 and r["local"] == 0 and r["loop_local_ops"] == 0, (
                f"{r['name']} (maxnreg {r['maxnreg']}) spills: {r['stack']} B stack, "
                f"{r['loop_local_ops']} local-memory ops in loops"
            )
            continue
        assert r["stack"] == 0 and r["local"] == 0, (
            f"{r['name']} spills: {r['stack']} B stack, {r['local']} B local"
        )
        assert not _has_prefix(r["opcodes"], "LDL", "STL"), f"{r['name']} uses local memory"


def test_matmuls_use_tensor_cores(reports):
    dot_kernels = [
        r for r in reports if r["dtype"] in HALF and (r["kind"] == "gemm" or "M=16" in r["name"])
    ]
    assert len(dot_kernels) >= 2 * len(HALF)
    for r in dot_kernels:
        assert _has_prefix(r["opcodes"], "HGMMA", "HMMA"), f"{r['name']}: no tensor-core MMA"


def test_streaming_loads_are_128_bit(reports):
    """The packed values (and the fused kernels' rows) move in 16-byte loads per thread."""
    wide = ("LDG.E.128", "LDGSTS.E.BYPASS.128", "LDGSTS.E.128")
    for r in reports:
        if r["module"] in ("bitmap_gemv", "bitmap_unpack"):
            continue  # their values are gathered per kept column (see _bitmap_tile.py)
        assert _has_prefix(r["opcodes"], *wide), f"{r['name']}: no 128-bit global loads"


def test_unpacks_write_the_dense_weight_in_128_bit_stores(reports):
    """Where K keeps rows 16-byte aligned (every 7B / 13B shape); odd K stores 2 bytes."""
    unpack = [
        r
        for r in reports
        if r["module"] in ("bitmap_unpack", "sparse24_unpack")
        and r["dtype"] in HALF
        and "odd-K" not in r["name"]
    ]
    assert {r["module"] for r in unpack} == {"bitmap_unpack", "sparse24_unpack"}
    for r in unpack:
        stores = {op: n for op, n in r["opcodes"].items() if op.startswith("STG")}
        assert set(stores) == {"STG.E.128"}, f"{r['name']}: stores {stores}"


def test_large_prefill_tile_is_capped_for_two_ctas_per_sm(reports):
    """The 256-row GEMM tile keeps to 128 registers and the shared memory of half an SM
    (16-bit types: fp32 is a correctness path)."""
    big = [
        r
        for r in reports
        if r["module"] == "sparse24_gemm" and "BLOCK_M=256" in r["name"] and r["dtype"] in HALF
    ]
    assert big
    for r in big:
        assert r["maxnreg"] == 128 and r["reg"] <= 128, r["name"]
        assert 2 * (r["shared_bytes"] + 1024) <= 228 * 1024, f"{r['name']}: {r['shared_bytes']} B"


def test_loop_local_ops_counts_only_loop_bodies():
    from slimstack.kernels.aot import loop_local_ops

    sass = """
        /*0000*/   STL [R1], R3 ;
.L_x_0:
        /*0010*/   STL [R1+0x4], R2 ;
        /*0020*/   LDL R2, [R1+0x4] ;
        /*0030*/   @P0 BRA `(.L_x_0) ;
        /*0040*/   LDL R3, [R1] ;
        /*0050*/   BRA `(.L_x_1) ;
.L_x_1:
        /*0060*/   EXIT ;
"""
    assert loop_local_ops(sass) == 2
    assert loop_local_ops(sass.replace("@P0 BRA `(.L_x_0)", "NOP")) == 0


def test_pdl_variants_wait_and_the_others_do_not(reports):
    """The small decode kernels with PDL wait (griddepcontrol.wait: ACQBULK) before anything
    else; without it they carry no wait at all (the kernel as before)."""
    pdl = [r for r in reports if r["name"].endswith(",pdl]")]
    assert {r["module"] for r in pdl} >= {
        "rmsnorm", "rope", "swiglu", "splitk_sum", "decode_attention"
    }  # fmt: skip
    for r in reports:
        if r["module"] not in {m for m in (p["module"] for p in pdl)}:
            continue
        waits = r["opcodes"].get("ACQBULK", 0)
        assert waits == (1 if r["name"].endswith(",pdl]") else 0), f"{r['name']}: {waits} waits"
