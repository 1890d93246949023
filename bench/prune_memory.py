"""Peak memory and time of pruning a synthetic Mistral-7B-shaped checkpoint (4 real-size
decoder layers, bf16, random weights) with Wanda 2:4. Target: peak RSS under 4 GB.

The prune runs in a child process (`slimstack prune`) so its peak RSS is its own, not the
generator's. Writes bench/results/<date>-<device>-prune-memory.json.

    python bench/prune_memory.py [--layers 4] [--nsamples 8 --seqlen 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SHARED, write_synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mistral-7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2" / "valid.txt"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = write_synthetic(Path(tmp) / "source", args.shape, args.layers)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "slimstack.cli",
                "prune",
                str(source),
                "--method",
                "wanda",
                "--sparsity",
                "2:4",
                "--calib",
                args.calib,
                "--nsamples",
                str(args.nsamples),
                "--seqlen",
                str(args.seqlen),
                "--device",
                args.device,
                "--out",
                str(Path(tmp) / "out"),
            ],
            check=True,
        )
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    row = {
        "op": "prune_wanda_2:4",
        "model": f"synthetic-{args.shape}",
        "layers": args.layers,
        "dtype": "bfloat16",
        "checkpoint_mb": round(size / 2**20),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),
        "target_peak_rss_mb": 4096,
        "met": peak_mb < 4096,
    }
    print(json.dumps(row, indent=2))
    RESULTS.mkdir(exist_ok=True)
    name = f"{datetime.date.today()}-{device.replace(' ', '_')}-prune-memory.json"
    record = {"suite": "prune-memory", "gpu": device, "torch": torch.__version__, "rows": [row]}
    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
