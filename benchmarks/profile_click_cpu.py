"""Where a CPU refinement click's time goes (issue 8: ~21 ms on one thread against 15 ms).

    python benchmarks/profile_click_cpu.py --threads 1 --threads 2

For each thread count it times the benchmark's refinement click without its 128^3 mask
(``Predictor.predict``: prompt encoder + decoder to the 32^3 logits, 2 prompts, the previous
logits fed back), then profiles 10 such clicks with torch.profiler and prints, per click, the
milliseconds of the aten operators that take the most self time. Prints JSON lines, one per
thread count, and the profiler tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

import torch
from torch.profiler import ProfilerActivity, profile

from fastsam3d.bench import ClickRunner, environment, synthetic_crop, time_ms
from fastsam3d.predictor import load_predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' or a checkpoint path")
    ap.add_argument("--threads", type=int, action="append", help="click threads (repeatable)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--top", type=int, default=12, help="operators listed per table")
    args = ap.parse_args()
    print(json.dumps(environment(torch.device("cpu"))))
    crop, click = synthetic_crop()
    for threads in args.threads or [1]:
        p, name = load_predictor(args.model, "cpu", click_threads=threads)
        runner = ClickRunner(p, crop, click)
        runner.first()

        def click_model(runner: ClickRunner = runner) -> None:
            runner.p.predict(runner.ref_pts, runner.ref_lbl, mask_input=runner.prev)

        row = {"kind": "click_profile", "model": name, "threads": threads}
        row.update(time_ms(click_model, torch.device("cpu"), args.repeats))
        clicks = 10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(clicks):
                click_model()
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        row["ops_ms_per_click"] = {
            e.key: round(e.self_cpu_time_total / 1e3 / clicks, 3) for e in ops[: args.top]
        }
        print(json.dumps(row))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
