"""The CPU click with the decoder's folded cross-attention against the plain one, same process.

    python benchmarks/bench_decoder_fold.py [--threads 1 2] [--repeats 9] [--checkpoint PATH]

A refinement click (prompt encoder + mask decoder to the 32^3 logits: two clicks and the
previous mask as prompt) on a 128^3 crop of ``fastsam3d.bench.synthetic_crop``. On the CPU
``DecoderAttention`` folds the image tokens' projections into the prompt tokens' side; the
baseline forces the plain attention. The two alternate in blocks of five clicks; each row
gives the median of the block medians. ``ratio`` = plain ms / folded ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastsam3d.bench import ClickRunner, synthetic_crop
from fastsam3d.modeling.transformer import DecoderAttention
from fastsam3d.predictor import Predictor
from fastsam3d.registry import build_model
from fastsam3d.weights import default_checkpoint


def plain_only(self: DecoderAttention, nq: int, nk: int) -> dict[str | None, int]:
    """A cost table in which only the plain attention is on offer (the baseline)."""
    return {None: 0}


def run(threads: int, repeats: int, checkpoint: Path | None) -> dict:
    """Alternate folded and plain clicks on ``threads`` CPU threads; one JSON row."""
    torch.set_num_threads(threads)
    model = build_model(checkpoint=checkpoint or default_checkpoint())
    pred = Predictor(model, "cpu", click_threads=threads)
    crop, click = synthetic_crop()
    runner = ClickRunner(pred, crop, click)
    runner.first()

    @torch.inference_mode()
    def refine() -> torch.Tensor:
        return pred.predict(runner.ref_pts, runner.ref_lbl, mask_input=runner.prev)[0]

    modes = {
        "folded": contextlib.nullcontext,
        "plain": lambda: mock.patch.object(DecoderAttention, "_fold_costs", plain_only),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    logits = {}
    for _ in range(repeats):
        for name, mode in modes.items():
            with mode():
                block = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    logits[name] = refine()
                    block.append(time.perf_counter() - t0)
            times[name].append(statistics.median(block) * 1e3)
    folded, plain = (statistics.median(times[k]) for k in ("folded", "plain"))
    return {
        "kind": "decoder_fold",
        "threads": threads,
        "folded_ms": round(folded, 2),
        "plain_ms": round(plain, 2),
        "ratio": round(plain / folded, 3),
        "max_abs_logit_diff": (logits["folded"] - logits["plain"]).abs().max().item(),
        "masks_equal": bool(torch.equal(logits["folded"] > 0, logits["plain"] > 0)),
        "torch": torch.__version__,
    }


def main() -> None:
    """Print one JSON row per thread count."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--checkpoint", type=Path, help="weights (default: the bundled model)")
    args = ap.parse_args()
    for threads in args.threads:
        print(json.dumps(run(threads, args.repeats, args.checkpoint)), flush=True)


if __name__ == "__main__":
    main()
