"""Where a GPU refinement click's time goes (issue 8: 0.48 ms against a 0.3 ms target).

    python benchmarks/profile_refine_gpu.py --checkpoint fastsam3d/weights/default.safetensors

For bf16 weights in our CUDA graphs (``cudagraphs`` and ``inductor-graphs``) it times, with CUDA
events, the benchmark's refinement click (``ClickRunner.refine``: ``Predictor.predict_mask``,
the low-res logits and the thresholded 128^3 mask) and its parts: ``predict`` (low-res logits
only), the refinement's graph replay alone, the upsampling and threshold alone, and
``predict_mask`` with the prompts already on the GPU; at 2 and 10 prompts. Then a
torch.profiler table of 20 refinements: kernels per click and GPU-busy time against wall time,
i.e. whether the click waits on kernels or on the host. Prints JSON lines and tables.

``--modes`` takes ``MODE+option+...``: each option an inductor config flag set to True while
the mode compiles (e.g. ``inductor-graphs+max_autotune``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from fastsam3d.bench import ClickRunner, dice, environment, synthetic_crop, time_ms
from fastsam3d.predictor import Predictor
from fastsam3d.registry import build_model
from fastsam3d.transforms import upsample_logits


def parts(runner: ClickRunner, n_prompts: int, repeats: int) -> dict:
    """Median ms of the refinement click and of each of its parts at ``n_prompts`` prompts."""
    p, dev = runner.p, runner.p.device
    pts = runner.ref_pts[:1].repeat(n_prompts, 1) + torch.arange(n_prompts)[:, None]
    lbl = torch.zeros(n_prompts, dtype=torch.int64)
    lbl[0] = 1
    runner.ref_pts, runner.ref_lbl = pts, lbl
    runner.refine()  # capture this prompt count's graph
    gpts, glbl = pts.to(dev), lbl.to(dev)
    low, _ = p.predict(pts, lbl, mask_input=runner.prev)
    # the refinement's graph: key (name, prompts, box, mask, multimask, mask in the graph, ...)
    graph = next(g for k, g in p._graphs.items() if k[:2] == ("click", n_prompts) and k[5])
    row = {"prompts": n_prompts}
    for name, fn in (
        ("refine", runner.refine),
        ("predict", lambda: p.predict(pts, lbl, mask_input=runner.prev)),
        ("refine_prompts_on_gpu", lambda: p.predict_mask(gpts, glbl, mask_input=runner.prev)),
        ("replay", graph.graph.replay),
        ("upsample_threshold", lambda: upsample_logits(low, 128) > 0),
    ):
        row[f"{name}_ms"] = time_ms(fn, dev, repeats)["median_ms"]
    return row


def kernel_profile(runner: ClickRunner, clicks: int = 20) -> tuple[dict, str]:
    """Kernels per refinement, their summed GPU time and the wall time per click."""
    dev = runner.p.device
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(clicks):
            runner.refine()
        end.record()
        torch.cuda.synchronize(dev)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, "device_time", 0.0) for e in kernels)
    summary = {
        "kernels_per_click": len(kernels) / clicks,
        "gpu_busy_us_per_click": busy_us / clicks,
        "wall_us_per_click": start.elapsed_time(end) * 1e3 / clicks,
    }
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80
    )
    return summary, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", default="fastsam3d/weights/default.safetensors")
    ap.add_argument(
        "--modes",
        default="cudagraphs,inductor-graphs",
        help="MODE or MODE+option+... (inductor config flags set to True), comma-separated",
    )
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(json.dumps(environment(dev)), flush=True)
    crop, click = synthetic_crop()
    tables, first_mask = [], None
    for name in args.modes.split(","):
        mode, *flags = name.split("+")
        model = build_model("fastsam3d_dilated", checkpoint=args.checkpoint).to(torch.bfloat16)
        runner = ClickRunner(Predictor(model, dev, dtype="bf16", compile=mode), crop, click)
        with torch._inductor.config.patch({flag: True for flag in flags}):
            runner.first()
            for n in (2, 10):
                print(json.dumps({"mode": name, **parts(runner, n, args.repeats)}), flush=True)
        mask = runner.refine()  # 10 prompts: the same clicks in every mode
        first_mask = mask if first_mask is None else first_mask
        summary, table = kernel_profile(runner)
        row = {"mode": name, "prompts": 10, "dice_vs_first_mode": dice(mask, first_mask)}
        print(json.dumps({**row, **summary}), flush=True)
        tables.append(f"== {name}, bf16 weights, refinement at 10 prompts ==\n{table}")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
