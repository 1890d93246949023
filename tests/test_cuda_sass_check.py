"""tools/check_gemv_sass.py: the SASS invariant that makes the GEMV's programmatic dependent
launch safe (only weight loads before griddepcontrol.wait), on small hand-written listings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_gemv_sass.py"
_spec = importlib.util.spec_from_file_location("check_gemv_sass", _TOOL)
check_gemv_sass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_gemv_sass)

_HEADER = "\t\tFunction : _ZN9slimstack4cuda20sparse24_gemv_kernelI13__nv_bfloat16Li1EEEv\n"
_WEIGHTS = "        /*0100*/  @!P1 LDG.E.NA.128.CONSTANT R24, desc[UR10][R50.64+0xc0] ;\n"
_WAIT = "        /*0200*/        ACQBULK ;\n"
_X = "        /*0300*/  @!P1 LDG.E.128.CONSTANT R44, desc[UR8][R48.64] ;\n"
_Y = "        /*0400*/        STG.E.U16 desc[UR14][R6.64], R3 ;\n"
_OTHER = "\t\tFunction : _ZN9slimstack4cuda20splitk_reduce_kernelI6__halfEEv\n" + _Y


def test_weights_then_wait_then_x_passes():
    checked, problems = check_gemv_sass.check(_HEADER + _WEIGHTS + _WAIT + _X + _Y + _OTHER)
    assert (checked, problems) == (1, [])


def test_an_x_load_above_the_wait_is_reported():
    checked, problems = check_gemv_sass.check(_HEADER + _WEIGHTS + _X + _WAIT + _Y)
    assert checked == 1 and len(problems) == 1 and "LDG.E.128.CONSTANT" in problems[0]


def test_a_store_above_the_wait_is_reported():
    _, problems = check_gemv_sass.check(_HEADER + _Y + _WAIT)
    assert len(problems) == 1 and "STG" in problems[0]


def test_a_missing_or_doubled_wait_is_reported():
    _, none = check_gemv_sass.check(_HEADER + _WEIGHTS + _X)
    _, two = check_gemv_sass.check(_HEADER + _WAIT + _WEIGHTS + _WAIT)
    assert "0 griddepcontrol.wait" in none[0] and "2 griddepcontrol.wait" in two[0]


def test_main_reads_a_listing_and_fails_on_a_violation(tmp_path):
    good, bad = tmp_path / "good.sass", tmp_path / "bad.sass"
    good.write_text(_HEADER + _WEIGHTS + _WAIT + _X)
    bad.write_text(_HEADER + _X + _WAIT)
    assert check_gemv_sass.main([str(good)]) == 0
    assert check_gemv_sass.main([str(bad)]) == 1
    (tmp_path / "empty.sass").write_text(_OTHER)
    assert check_gemv_sass.main([str(tmp_path / "empty.sass")]) == 1
