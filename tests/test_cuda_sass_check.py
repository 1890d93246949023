"""tools/check_gemv_sass.py: the SASS invariant that makes the GEMV's programmatic dependent
launch safe (only L2 prefetches before griddepcontrol.wait in the kPdl kernels, no wait in
the others), on small hand-written listings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_gemv_sass.py"
_spec = importlib.util.spec_from_file_location("check_gemv_sass", _TOOL)
check_gemv_sass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_gemv_sass)


def _header(pdl: int) -> str:
    return (
        "\t\tFunction : _ZN9slimstack4cuda20sparse24_gemv_kernelI13__nv_bfloat16Li1ELi1E"
        f"Lb0ELb1ELb{pdl}EEEvNS1_10GemvParamsE\n"
    )


_PREFETCH = "        /*0080*/  @!P1 CCTL.E.PF2 [R50.64+0xc0] ;\n"
_WEIGHTS = "        /*0100*/  @!P1 LDG.E.NA.128.CONSTANT R24, desc[UR10][R50.64+0xc0] ;\n"
_WAIT = "        /*0200*/        ACQBULK ;\n"
_X = "        /*0300*/  @!P1 LDG.E.128.CONSTANT R44, desc[UR8][R48.64] ;\n"
_Y = "        /*0400*/        STG.E.U16 desc[UR14][R6.64], R3 ;\n"
_OTHER = "\t\tFunction : _ZN9slimstack4cuda20splitk_reduce_kernelI6__halfEEv\n" + _Y


_COHERENT = "        /*0250*/  @!P1 LDG.E.EF.128 R24, desc[UR10][R50.64+0xc0] ;\n"


def test_prefetch_then_wait_then_loads_passes():
    listing = _header(1) + _PREFETCH + _WAIT + _COHERENT + _Y + _OTHER
    assert check_gemv_sass.check(listing) == (1, [])


def test_a_read_only_load_anywhere_in_a_pdl_kernel_is_reported():
    _, problems = check_gemv_sass.check(_header(1) + _PREFETCH + _WAIT + _X)
    assert len(problems) == 1 and "read-only (.nc)" in problems[0]


def test_a_kernel_without_pdl_needs_no_wait_and_may_load_anywhere():
    assert check_gemv_sass.check(_header(0) + _WEIGHTS + _X + _Y) == (1, [])
    _, problems = check_gemv_sass.check(_header(0) + _WEIGHTS + _WAIT)
    assert "without PDL but has 1 wait" in problems[0]


def test_any_load_or_store_above_the_wait_is_reported():
    for access, name in ((_COHERENT, "LDG.E.EF.128"), (_Y, "STG")):
        _, problems = check_gemv_sass.check(_header(1) + _PREFETCH + access + _WAIT)
        assert len(problems) == 1 and name in problems[0], problems


def test_a_missing_wait_or_prefetch_is_reported():
    _, none = check_gemv_sass.check(_header(1) + _PREFETCH + _X)
    _, two = check_gemv_sass.check(_header(1) + _PREFETCH + _WAIT + _WAIT)
    _, no_prefetch = check_gemv_sass.check(_header(1) + _WAIT + _WEIGHTS)
    assert "0 griddepcontrol.wait" in none[0] and "2 griddepcontrol.wait" in two[0]
    assert "no L2 prefetch" in no_prefetch[0]


def test_main_reads_a_listing_and_fails_on_a_violation(tmp_path):
    good, bad, empty = tmp_path / "good.sass", tmp_path / "bad.sass", tmp_path / "empty.sass"
    good.write_text(_header(1) + _PREFETCH + _WAIT + _COHERENT)
    bad.write_text(_header(1) + _X + _WAIT)
    empty.write_text(_OTHER)
    assert check_gemv_sass.main([str(good)]) == 0
    assert check_gemv_sass.main([str(bad)]) == 1
    assert check_gemv_sass.main([str(empty)]) == 1
