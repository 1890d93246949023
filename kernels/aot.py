"""Compile every Triton kernel ahead of time for a GPU target and read back what ptxas made.

No GPU is needed: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` runs the whole
pipeline down to a cubin, and the cuobjdump / nvdisasm that ship inside triton report the
registers, stack (spills) and SASS. Each variant uses its launcher's own default tile config,
so what is checked here is what runs on the GPU. Pointer and stride arguments are marked
16-divisible, as Triton's JIT specialises them for aligned, realistically sized tensors
(N, K = 4096, ...); that is what lets it emit 128-bit loads.

    python -m slimstack.kernels.aot --json report.json --sass-dir sass/

must run in a process where TRITON_INTERPRET is unset: the interpreter replaces
``@triton.jit`` functions (triton's own library included) when triton is first imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DTYPES = ("fp16", "bf16")
_ALIGNED = [["tt.divisibility", 16]]


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a kernel."""

    name: str
    module: str
    kernel: str
    kind: str  # "gemv" | "gemm" | "elementwise": what the checks expect of its SASS
    types: dict[str, str]  # non-i32 runtime arguments -> triton type string
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    unaligned: frozenset[str] = field(default_factory=frozenset)  # ints not assumed % 16
    dtype: str = ""  # set by variants()
    maxnreg: int | None = None  # the launcher's register cap, when its config sets one


def _precision(dt: str) -> str:
    return "ieee" if dt == "fp32" else "tf32"  # as the launchers choose


def _gemv_variants(dt: str) -> list[Variant]:
    from slimstack.kernels import bitmap_gemv, bitmap_unpack, sparse24_gemv, sparse24_unpack

    out = []
    for m in (1, 16):
        block_m = sparse24_gemv.block_m_for(m)
        common = dict(
            BLOCK_M=block_m, USE_DOT=block_m >= 16, EVEN_K=True, INPUT_PRECISION=_precision(dt)
        )
        cfg = sparse24_gemv.default_config(m)
        out.append(
            Variant(
                f"sparse24_gemv[M={m},{dt}]", "sparse24_gemv", "_sparse24_gemv_kernel", "gemv",
                {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "meta_ptr": "*i32",
                 "out_ptr": f"*{dt}"},
                dict(common, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_X=True,
                     COLUMN_DOTS=True, SMEM_GATHER=True),
                cfg.num_warps, cfg.num_stages, frozenset({"M"}),
            )
        )  # fmt: skip
        cfg = bitmap_gemv.default_config(m)
        out.append(
            Variant(
                f"bitmap_gemv[M={m},{dt}]", "bitmap_gemv", "_bitmap_gemv_kernel", "gemv",
                {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "mask_ptr": "*i32",
                 "row_offsets_ptr": "*i64", "out_ptr": f"*{dt}"},
                dict(common, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HW_POPC=True, PREFETCH=True),
                cfg.num_warps, cfg.num_stages, frozenset({"M"}),
            )
        )  # fmt: skip
    unpack = bitmap_unpack.UnpackConfig()
    out.append(
        Variant(
            f"bitmap_unpack[{dt}]", "bitmap_unpack", "_bitmap_unpack_kernel", "gemv",
            {"values_ptr": f"*{dt}", "mask_ptr": "*i32", "row_offsets_ptr": "*i64",
             "out_ptr": f"*{dt}"},
            dict(BLOCK_N=unpack.block_n, BLOCK_K=unpack.block_k, EVEN_K=True, HW_POPC=True),
            unpack.num_warps, unpack.num_stages,
        )
    )  # fmt: skip
    unpack24 = sparse24_unpack.UnpackConfig()
    out.append(
        Variant(
            f"sparse24_unpack[{dt}]", "sparse24_unpack", "_sparse24_unpack_kernel", "gemv",
            {"values_ptr": f"*{dt}", "meta_ptr": "*i32", "out_ptr": f"*{dt}"},
            dict(BLOCK_N=unpack24.block_n, BLOCK_K=unpack24.block_k, EVEN_K=True),
            unpack24.num_warps, unpack24.num_stages,
        )
    )  # fmt: skip
    cfg = sparse24_gemv.default_config(1)
    out.append(
        Variant(
            f"sparse24_gemv[M=1,split-K,{dt}]", "sparse24_gemv", "_sparse24_gemv_kernel", "gemv",
            {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "meta_ptr": "*i32", "out_ptr": "*fp32"},
            dict(BLOCK_M=1, USE_DOT=False, COLUMN_DOTS=True, SMEM_GATHER=True, EVEN_K=True,
                 EVEN_X=True,
                 INPUT_PRECISION=_precision(dt), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
            cfg.num_warps, cfg.num_stages, frozenset({"M"}),
        )
    )  # fmt: skip
    return out


def _gemm_variants(dt: str) -> list[Variant]:
    from slimstack.kernels import sparse24_gemm

    out = []
    for m in (17, 64, 512, 2048):
        cfg = sparse24_gemm.default_config(m, 4096)
        out.append(
            Variant(
                f"sparse24_gemm[BLOCK_M={cfg.block_m},{dt}]", "sparse24_gemm",
                "_sparse24_gemm_kernel", "gemm",
                {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "meta_ptr": "*i32",
                 "out_ptr": f"*{dt}"},
                dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     GROUP_N=cfg.group_n, EVEN_K=True, INPUT_PRECISION=_precision(dt),
                     W_AS_A=cfg.w_as_a),
                cfg.num_warps, cfg.num_stages, frozenset({"M"}), maxnreg=cfg.maxnreg,
            )
        )  # fmt: skip
    return out


def _fused_variants(dt: str) -> list[Variant]:
    """The decode step's small kernels, each as launched without and with programmatic
    dependent launch (PDL: gdc_wait / gdc_launch_dependents first, kernels/_pdl.py)."""
    plain = _plain_fused_variants(dt)
    return [
        *(replace(v, constexprs={**v.constexprs, "PDL": False}) for v in plain),
        *(
            replace(v, name=f"{v.name[:-1]},pdl]", constexprs={**v.constexprs, "PDL": True})
            for v in plain
        ),
    ]


def _plain_fused_variants(dt: str) -> list[Variant]:
    from slimstack.kernels import rmsnorm

    block_h, warps = rmsnorm.launch_shape(4096)
    return [
        *(
            Variant(
                f"{name}[H=4096,{dt}]", "rmsnorm", "_rmsnorm_kernel", "elementwise",
                {"x_ptr": f"*{dt}", "delta_ptr": f"*{dt}", "w_ptr": f"*{dt}",
                 "sum_ptr": f"*{dt}", "out_ptr": f"*{dt}", "eps": "fp32"},
                {"BLOCK_H": block_h, "HAS_DELTA": has_delta}, warps,
            )
            for name, has_delta in (("rmsnorm", False), ("add_rmsnorm", True))
        ),
        Variant(
            f"rope[D=128,{dt}]", "rope", "_rope_kernel", "elementwise",
            {"t_ptr": f"*{dt}", "cos_ptr": f"*{dt}", "sin_ptr": f"*{dt}"},
            {"HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64}, 4,
            unaligned=frozenset({"S", "H"}),
        ),
        Variant(
            f"rope_to_cache[D=128,{dt}]", "rope", "_rope_to_cache_kernel", "elementwise",
            {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "cos_ptr": f"*{dt}",
             "sin_ptr": f"*{dt}", "kc_ptr": f"*{dt}", "vc_ptr": f"*{dt}", "slot_ptr": "*i64"},
            {"HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64}, 4,
            unaligned=frozenset({"HQ", "HK"}),
        ),
        Variant(
            f"splitk_sum[{dt}]", "splitk_sum", "_splitk_sum_kernel", "elementwise",
            {"partial_ptr": "*fp32", "out_ptr": f"*{dt}"}, {"BLOCK": 1024}, 4,
            unaligned=frozenset({"split"}),
        ),
        Variant(
            f"decode_attention[G=4,D=128,{dt}]", "decode_attention",
            "_decode_attention_split_kernel", "gemm",
            {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "mask_ptr": "*u8",
             "acc_ptr": "*fp32", "stats_ptr": "*fp32", "sm_scale": "fp32"},
            {"BLOCK_G": 16, "BLOCK_T": 64, "BLOCK_D": 128, "INPUT_PRECISION": _precision(dt)}, 4,
            unaligned=frozenset({"HKV", "G", "T", "TILES_PER_SPLIT", "stride_mb"}),
        ),
        Variant(
            f"decode_attention_merge[D=128,{dt}]", "decode_attention",
            "_decode_attention_merge_kernel", "elementwise",
            {"acc_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": f"*{dt}"},
            {"BLOCK_G": 16, "BLOCK_D": 128}, 4,
            unaligned=frozenset({"HKV", "G", "NUM_SPLITS"}),
        ),
        Variant(
            f"swiglu[{dt}]", "swiglu", "_swiglu_kernel", "elementwise",
            {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
            {"BLOCK": 1024}, 4,
        ),
    ]  # fmt: skip


ODD_K = 172  # not a multiple of any K tile: the masked paths


def _odd_k_variants(made: list[Variant]) -> list[Variant]:
    """The specialisations an odd K runs: every sparse matmul again with EVEN_K / EVEN_X as
    its launcher sets them for K = 172 (Kp = 192), and N, K and the row strides of x and the
    output (43, 172) not 16-aligned."""
    from slimstack.kernels.sparse24_gemm import MAX_UNALIGNED_BLOCK_M

    kp = (ODD_K + 63) // 64 * 64
    out = []
    for v in made:
        if v.module not in (
            "sparse24_gemv",
            "sparse24_gemm",
            "bitmap_gemv",
            "bitmap_unpack",
            "sparse24_unpack",
        ):
            continue
        if v.module == "sparse24_gemm" and v.constexprs["BLOCK_M"] > MAX_UNALIGNED_BLOCK_M:
            continue  # default_config keeps unaligned shapes on 64-row tiles
        block_k = v.constexprs["BLOCK_K"]
        evens = {"EVEN_K": kp % block_k == 0}
        if "EVEN_X" in v.constexprs:
            evens["EVEN_X"] = ODD_K % block_k == 0
        unaligned = v.unaligned | {"N", "K", "stride_xm", "stride_om", "stride_out"}
        out.append(
            replace(v, name=f"{v.name[:-1]},odd-K]", constexprs={**v.constexprs, **evens},
                    unaligned=unaligned)
        )  # fmt: skip
    return out


def variants(dtypes: tuple[str, ...] = DTYPES) -> list[Variant]:
    out: list[Variant] = []
    for dt in dtypes:
        made = _gemv_variants(dt) + _gemm_variants(dt)
        made += _odd_k_variants(made) + _fused_variants(dt)
        out += [replace(v, dtype=dt) for v in made]
    return out


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in triton/backends/nvidia/bin or on PATH")
    return found


def _signature(fn: Any, v: Variant) -> tuple[dict[str, str], dict[tuple[int], list]]:
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in v.constexprs:
            sig[arg] = "constexpr"
            continue
        sig[arg] = v.types.get(arg, "i32")
        if sig[arg].startswith("*") or (sig[arg] == "i32" and arg not in v.unaligned):
            attrs[(i,)] = _ALIGNED
    return sig, attrs


def parse_resources(cuobjdump_out: str) -> dict[str, int]:
    """REG / STACK / LOCAL / SHARED from ``cuobjdump -res-usage`` (one kernel per cubin)."""
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", cuobjdump_out))
    return {key.lower(): int(value) for key, value in found.items()}


def opcode_counts(sass: str) -> dict[str, int]:
    """Opcode (with modifiers) -> count, from ``nvdisasm`` output."""
    ops = re.findall(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_x]+)*)", sass
    )
    return dict(Counter(ops))


def loop_local_ops(sass: str) -> int:
    """LDL / STL instructions inside loops: between a label and a later branch back to it."""
    lines = sass.splitlines()
    labels = {
        m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))
    }
    inside: set[int] = set()
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b[^;]*?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            inside.update(range(labels[m.group(1)], i))
    return sum(1 for i in inside if re.search(r"\b(LDL|STL)\b", lines[i]))


def compile_variant(v: Variant, arch: int = 90, sass_dir: Path | None = None) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"slimstack.kernels.{v.module}"), v.kernel)
    sig, attrs = _signature(fn, v)
    src = ASTSource(fn, sig, constexprs=dict(v.constexprs), attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={
            "num_warps": v.num_warps,
            "num_stages": v.num_stages,
            **({} if v.maxnreg is None else {"maxnreg": v.maxnreg}),
        },
    )
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True
        ).stdout
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", v.name)
        (sass_dir / f"{stem}.sass").write_text(sass)
        (sass_dir / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
    return {
        "name": v.name,
        "module": v.module,
        "kind": v.kind,
        "dtype": v.dtype,
        "arch": arch,
        "cubin_bytes": len(cubin),
        "sass_lines": sass.count("\n"),
        "shared_bytes": compiled.metadata.shared,
        **parse_resources(res),
        "opcodes": opcode_counts(sass),
        "loop_local_ops": loop_local_ops(sass),
        "maxnreg": v.maxnreg,
    }


def summarize(report: dict[str, Any]) -> str:
    ops = report["opcodes"]
    pick = lambda prefixes: {k: n for k, n in ops.items() if k.startswith(prefixes)}  # noqa: E731
    return (
        f"{report['name']:<38} regs={report.get('reg')} stack={report.get('stack')} "
        f"local={report.get('local')} smem={report['shared_bytes']} "
        f"loads={pick(('LDG', 'UTMALDG'))} mma={pick(('HGMMA', 'HMMA'))} "
        f"spill_ops={pick(('LDL', 'STL'))}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma-separated: fp16,bf16,fp32"
    )
    parser.add_argument("--json", type=Path, help="write the per-variant reports here")
    parser.add_argument("--sass-dir", type=Path, help="also dump SASS and TTGIR per variant")
    parser.add_argument("--only", default="", help="substring filter on variant names")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    reports = []
    for v in variants(tuple(args.dtypes.split(","))):
        if args.only in v.name:
            reports.append(compile_variant(v, args.arch, args.sass_dir))
            print(summarize(reports[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
