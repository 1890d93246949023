"""File what a tools/gpu_session.sh call brought back from the GPU machine.

    python tools/gpu_results.py FILES_AT [--results bench/results] [--logs DIR]

- kernel results JSON: copied into the results folder under a name no earlier run holds
  (a second call on the same day gets -2, ...), then plotted there (bench/plot.py), and
  with a second call's file the day's files drawn together too (<day>-kernels-all-*.png);
- e2e results JSON: its rows merged into that day's e2e file, as the suite itself merges
  (bench/e2e_helpers.write_results), then plotted (bench/plot_e2e.py);
- rest.tar.gz (logs, the call's own plots, its dispatch table) and the logs: unpacked into
  the logs folder, to read rather than commit, except decode profiles (bench/profile_decode.py),
  whose JSON and table go to the results folder;
- writes <day>-kernels-summary.md: bench/summarize.py of the day's kernel files together
  (speedups per M, bandwidth at M = 1, each variant row against its default);
- prints what it filed, the session log and the summary.

Every file it writes is complete or absent: results are validated before they are copied.
The GPU machine gets a copy of the working tree without .git, so a run there says commit
"unknown" unless $SLIMSTACK_COMMIT named it: such results get this checkout's commit (HEAD,
"-dirty" with uncommitted changes: the tree the call was sent), as "commit_filled_from".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402  (bench/ is a folder of scripts)
import e2e_helpers  # noqa: E402


def _unpack(archive: Path, logs: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            # flat files only: nothing may land outside the logs folder
            if not member.isfile() or Path(member.name).name != member.name:
                raise ValueError(f"{archive}: unexpected entry {member.name!r}")
        tar.extractall(logs, filter="data")


def _with_commit(doc: dict) -> dict:
    """The commit of this checkout where the machine could not tell its own."""
    if doc.get("commit") in (None, "", "unknown"):
        sha = common.git_commit()
        if sha != "unknown":
            doc["commit"] = sha
            doc["commit_filled_from"] = "the checkout that filed the results (gpu_results.py)"
    return doc


def file_kernels(src: Path, results: Path) -> Path:
    import plot  # noqa: PLC0415  (matplotlib: only when there is something to draw)

    doc = _with_commit(json.loads(src.read_text()))
    problems = common.validate_results(doc)
    if problems:
        raise ValueError(f"{src} is not a valid results file: {'; '.join(problems)}")
    dest = common.unused_path(results / _dated_name(src))
    common.write_results(doc, dest)
    plot.plot_results(dest)
    # a lease's calls each bring a file (-2, -3, ...): the day's sweep drawn as one, too
    base = results / _dated_name(src)
    runs = [base] + sorted(results.glob(f"{base.stem}-[0-9]*.json"))
    if all(p.exists() for p in runs):
        if dest != base:
            plot.plot_results(*runs, out_stem=base.with_name(f"{base.stem}-all"))
        write_summary(runs, base.with_name(f"{base.stem}-summary.md"))
    return dest


def write_summary(runs: list[Path], dest: Path) -> None:
    """bench/summarize.py of the day's kernel files as one (speedup tables, the A/B verdicts of
    the variant rows against their defaults), written atomically beside them."""
    import summarize  # noqa: PLC0415

    from slimstack.ops.tuning import load_kernel_results, merge_results  # noqa: PLC0415

    merged = merge_results(load_kernel_results(runs))
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(summarize.summarize(merged))
    tmp.replace(dest)


def file_e2e(src: Path, results: Path) -> Path:
    import plot_e2e  # noqa: PLC0415

    doc = _with_commit(json.loads(src.read_text()))
    if doc.get("suite") != e2e_helpers.SUITE or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{src} is not an e2e results file")
    env = {k: v for k, v in doc.items() if k not in ("peak", "rows")}
    dest = e2e_helpers.write_results(results / src.name, env, doc.get("peak", {}), doc["rows"])
    plot_e2e.plot(dest)
    return dest


def file_profiles(logs: Path, results: Path) -> list[Path]:
    """bench/profile_decode.py's JSON and table (packed in the archive): copied as they are."""
    filed = []
    for src in sorted(logs.glob("*-decode-profile-*.json")):
        if json.loads(src.read_text()).get("suite") != "decode-profile":
            raise ValueError(f"{src} is not a decode profile")
        for path in (src, src.with_suffix(".md")):
            if path.exists():
                dest = results / path.name
                shutil.copyfile(path, dest.with_name(dest.name + ".tmp"))
                dest.with_name(dest.name + ".tmp").replace(dest)
                filed.append(dest)
    return filed


def _dated_name(src: Path) -> str:
    """The call's own name without a -N suffix it may have picked on the machine."""
    stem = src.stem
    head, _, tail = stem.rpartition("-")
    if tail.isdigit() and head.endswith("-kernels"):
        stem = head
    return f"{stem}{src.suffix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files_at", type=Path, help="the folder the device call's files lie in")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--logs", type=Path, help="where logs go (default: a new temp folder)")
    args = parser.parse_args(argv)
    if not args.files_at.is_dir():
        parser.error(f"{args.files_at} is not a folder")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="slimstack-gpu-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    filed = []
    for src in sorted(args.files_at.iterdir()):
        if src.name == "rest.tar.gz":
            _unpack(src, logs)
        elif src.name.endswith("-e2e.json"):
            filed.append(file_e2e(src, args.results))
        elif src.suffix == ".json" and "-kernels" in src.name:
            filed.append(file_kernels(src, args.results))
        elif src.is_file():
            shutil.copy2(src, logs / src.name)
    filed += file_profiles(logs, args.results)  # the archive and the kept table both unpacked
    for path in filed:
        print(f"filed {path}")
        summary = path.with_name(f"{path.stem.split('-kernels')[0]}-kernels-summary.md")
        if "-kernels" in path.name and summary.is_file():
            print(f"  summary of the day's kernel files: {summary}")
        if path.name.endswith("-e2e.json"):
            import plot_e2e  # noqa: PLC0415

            for line in plot_e2e.check_targets(json.loads(path.read_text())["rows"]):
                print(f"  {line}")
    print(f"logs in {logs}")
    for name in ("session.log", "summary.md"):
        if (logs / name).is_file():
            print(f"\n--- {name}\n{(logs / name).read_text()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
