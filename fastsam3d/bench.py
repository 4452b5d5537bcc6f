"""Latency, throughput, memory and accuracy of the model paths (``fastsam3d bench``).

Torch and numpy only (runs on a bare GPU machine). Every figure of a variant is printed beside
the same figure of a plain eager float32 run of the same model in the same process, as a ratio,
so machine noise cancels. Output: one JSON object per line (``"kind"`` says what it is), then a
readable table.

Timing: warm-up, then the median and p90 of ``repeats`` runs; CUDA events around each run on a
GPU, ``perf_counter`` on the CPU. A click is timed from prompt tensors on the host to the 128^3
boolean mask on the device (prompt encoder + mask decoder + trilinear upsampling + threshold);
the first click adds the image encoder on a crop already on the device.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fastsam3d.predictor import Predictor
from fastsam3d.session import Edit, Session, _Object, _Tile, _true_box
from fastsam3d.transforms import crop_logits_to_native, upsample_logits

LOW_RES = 32
# bench_refine's volumes: shape, spacing (mm)
REFINE_CASES = {
    "crop128": ((128, 128, 128), (1.5, 1.5, 1.5)),
    "ct512": ((512, 512, 300), (0.8, 0.8, 1.0)),
}


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded with every run."""
    env = {
        "kind": "env",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count)
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> dict:
    """Median and p90 wall time of ``fn()`` in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
        "n": repeats,
    }


def synthetic_crop(size: int = 128, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A normalised CT-like crop (1, 1, size^3): soft-tissue body, bright ellipsoids, noise.

    Returns the crop and the crop-voxel centre of the ellipsoid the benchmark clicks on.
    """
    rng = np.random.default_rng(seed)
    ax = np.arange(size, dtype=np.float32) - size / 2
    a, b, c = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.where(a**2 / 0.2 + b**2 / 0.16 <= size**2, 100.0, 0.0).astype(np.float32)
    centres = [(-20, 8, 0), (18, -12, 10), (4, 24, -16)]
    for k, (x, y, z) in enumerate(centres):
        r = np.array([16, 12, 20]) * (1 + 0.2 * k)
        vol[((a - x) / r[0]) ** 2 + ((b - y) / r[1]) ** 2 + ((c - z) / r[2]) ** 2 <= 1] = (
            180 + 60 * k
        )
    vol += rng.normal(0, 8, vol.shape).astype(np.float32)
    vol = np.clip(vol, 0, None)
    fg = vol > 0
    vol = (vol - vol[fg].mean()) / vol[fg].std(ddof=1)
    click = np.asarray(centres[0], dtype=np.float32) + size / 2
    return torch.from_numpy(vol)[None, None], click


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    inter = (a & b).sum().item()
    total = a.sum().item() + b.sum().item()
    return 1.0 if total == 0 else 2 * inter / total


@dataclass
class Variant:
    """A way of running the model: predictor options under a short name."""

    name: str
    dtype: str = "fp32"
    compile: str | None = None
    quantize: str | None = None
    bf16_weights: bool = False  # cast the model itself to bfloat16 (no per-call weight casts)
    cudnn_benchmark: bool = False  # let cuDNN time its algorithms per shape
    click_threads: int | None = 1  # CPU threads of the click path (None: torch's setting)


def default_variants(device: torch.device) -> list[Variant]:
    """fp32 eager first (the baseline), then the paths worth measuring on ``device``."""
    if device.type == "cuda":
        return [
            Variant("fp32-eager"),
            Variant("bf16-eager", dtype="bf16"),
            Variant("bf16w-eager", dtype="bf16", bf16_weights=True),
            Variant("fp32-graphs", compile="cudagraphs"),
            Variant("bf16-graphs", dtype="bf16", compile="cudagraphs"),
            Variant("bf16w-graphs", dtype="bf16", compile="cudagraphs", bf16_weights=True),
            Variant("bf16-graphs-cudnnb", dtype="bf16", compile="cudagraphs", cudnn_benchmark=True),
        ]
    return [
        Variant("fp32-eager", click_threads=None),
        Variant("fp32-1thread-click"),
        Variant("int8-1thread-click", quantize="int8"),
        Variant("bf16-1thread-click", dtype="bf16"),
    ]


class ClickRunner:
    """First and refinement clicks of one predictor on one crop, ending in a 128^3 mask."""

    def __init__(self, predictor: Predictor, crop: torch.Tensor, click: np.ndarray):
        self.p = predictor
        self.crop = crop.to(predictor.device)
        size = crop.shape[-1]
        self.first_pts = torch.tensor(click[None], dtype=torch.float32)
        self.first_lbl = torch.tensor([1])
        self.ref_pts = torch.tensor(np.stack([click, click + [10, 0, 0]]), dtype=torch.float32)
        self.ref_lbl = torch.tensor([1, 0])
        self.zeros = torch.zeros(1, 1, size // 4, size // 4, size // 4, device=predictor.device)
        self.size = size
        self.prev = self.zeros

    @torch.inference_mode()
    def encoder(self) -> None:
        self.p.set_image(self.crop)

    @torch.inference_mode()
    def first(self) -> torch.Tensor:
        self.p.set_image(self.crop)
        low, _, mask = self.p.predict_mask(self.first_pts, self.first_lbl, mask_input=self.zeros)
        self.prev = low
        return mask[0, 0]

    @torch.inference_mode()
    def refine(self) -> torch.Tensor:
        return self.p.predict_mask(self.ref_pts, self.ref_lbl, mask_input=self.prev)[2][0, 0]


def _resident_bytes(device: torch.device) -> int:
    """Device memory already held before a variant starts (CUDA; 0 on the CPU, where the
    process peak RSS is reported as is)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak_bytes(device: torch.device, fn: Callable[[], object]) -> int:
    """Peak device memory of ``fn()`` (CUDA) or the process's peak RSS so far (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# aten operations that only make views or take no work (not counted as launched work)
_NO_WORK_OPS = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "_reshape_alias", "reshape", "as_strided", "transpose", "t", "permute",
    "movedim", "expand", "unsqueeze", "squeeze", "flatten", "select", "slice", "unfold", "split",
    "unbind", "alias", "detach", "empty", "empty_strided", "resolve_conj", "resolve_neg",
    "lift_fresh",
))  # fmt: skip


def launched_ops(fn: Callable[[], object], device: torch.device) -> int:
    """How many operations one call of ``fn`` launches: device kernels and copies on CUDA
    (what a CUDA graph replays, one launch overhead each); on the CPU the top-level aten
    operations that do work, a proxy for that count which needs no GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    if cuda:
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    return sum(
        e.name.startswith("aten::")
        and e.name not in _NO_WORK_OPS
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
        and not (e.name == "aten::to" and not e.cpu_children)  # a no-op .to()
        for e in events
    )


def bench_clicks(
    model_factory: Callable[[], torch.nn.Module],
    device: torch.device,
    variants: Iterable[Variant],
    repeats: int = 50,
    arch: str = "",
) -> list[dict]:
    """Encoder, first click, refinement click, peak memory and Dice for each variant.

    The first variant is the baseline: every other variant's figures get ``*_ratio`` =
    baseline / variant (> 1 is faster) and the Dice of its masks against the baseline's.
    """
    crop, click = synthetic_crop()
    rows: list[dict] = []
    base: dict | None = None
    ref_masks: tuple[torch.Tensor, torch.Tensor] | None = None
    for v in variants:
        gc.collect()
        resident = _resident_bytes(device)
        model = model_factory()
        if v.bf16_weights:
            model = model.to(torch.bfloat16)
        torch.backends.cudnn.benchmark = v.cudnn_benchmark
        t0 = time.perf_counter()
        try:
            pred = Predictor(
                model,
                device,
                dtype=v.dtype,
                compile=v.compile,
                quantize=v.quantize,
                click_threads=v.click_threads,
            )
            runner = ClickRunner(pred, crop, click)
            first_mask, refine_mask = runner.first().clone(), runner.refine().clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as err:  # noqa: BLE001 - a path this machine cannot run is reported
            rows.append({"kind": "clicks", "arch": arch, "variant": v.name, "error": repr(err)})
            continue
        row = {
            "kind": "clicks",
            "arch": arch,
            "variant": v.name,
            "device": str(device),
            "setup_s": time.perf_counter() - t0,  # includes capture / compilation
        }
        for name, fn, n in (
            ("encoder", runner.encoder, repeats),
            ("first_click", runner.first, repeats),
            ("refine_click", runner.refine, repeats * 2),
        ):
            stats = time_ms(fn, device, n)
            row[f"{name}_ms"] = stats["median_ms"]
            row[f"{name}_p90_ms"] = stats["p90_ms"]
        row["peak_mem_bytes"] = _peak_bytes(device, runner.first) - resident
        if base is None:
            base, ref_masks = row, (first_mask, refine_mask)
            row["mask_voxels"] = int(first_mask.sum())
            for name, fn in (("encoder", runner.encoder), ("refine_click", runner.refine)):
                row[f"{name}_ops"] = launched_ops(fn, device)
        else:
            for name in ("encoder", "first_click", "refine_click"):
                row[f"{name}_ratio"] = base[f"{name}_ms"] / row[f"{name}_ms"]
            row["dice_first"] = dice(first_mask, ref_masks[0])
            row["dice_refine"] = dice(refine_mask, ref_masks[1])
        rows.append(row)
        del pred, runner, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    return rows


def bench_batch(
    model_factory: Callable[[], torch.nn.Module],
    device: torch.device,
    batches: Iterable[int] = (1, 4, 8),
    repeats: int = 30,
    arch: str = "",
) -> list[dict]:
    """First-click throughput (volumes/s): B crops through encoder + decoder + upsampling.

    Variants: fp32 eager (baseline), bf16 eager, bf16 in a CUDA graph (GPU only).
    """
    from fastsam3d.predictor import CudaGraph

    model = model_factory().to(device).eval()
    crop, click = synthetic_crop()
    pe = model.prompt_encoder.get_dense_pe()
    rows = []

    def first_click(images: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, bf16: bool):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
            emb = model.image_encoder(images)
            masks = torch.zeros(images.shape[0], 1, LOW_RES, LOW_RES, LOW_RES, device=device)
            sparse, dense = model.prompt_encoder((coords, labels), None, masks)
            low, _ = model.mask_decoder(emb, pe, sparse, dense, False)
        return upsample_logits(low.float(), 4 * low.shape[-1]) > 0

    for b in batches:
        images = crop.to(device).repeat(b, 1, 1, 1, 1)
        coords = torch.tensor(click, device=device).reshape(1, 1, 3).repeat(b, 1, 1)
        labels = torch.ones(b, 1, dtype=torch.int64, device=device)
        base_ms = None
        modes = [("fp32-eager", False, False), ("bf16-eager", True, False)]
        if device.type == "cuda":
            modes.append(("bf16-graphs", True, True))
        for name, bf16, graphed in modes:
            inputs = (images, coords, labels)
            try:
                with torch.inference_mode():
                    if graphed:
                        graph = CudaGraph(lambda i, c, lab: first_click(i, c, lab, True), inputs)
                        fn = functools.partial(graph, inputs)
                    else:
                        fn = functools.partial(first_click, *inputs, bf16)
                    stats = time_ms(fn, device, repeats)
                    peak = _peak_bytes(device, fn)
            except Exception as err:  # noqa: BLE001 - reported, the other rows still run
                rows.append({"kind": "batch", "variant": name, "batch": b, "error": repr(err)})
                continue
            row = {
                "kind": "batch",
                "arch": arch,
                "variant": name,
                "batch": b,
                "median_ms": stats["median_ms"],
                "volumes_per_s": b / stats["median_ms"] * 1e3,
                "peak_mem_bytes": peak,
            }
            if base_ms is None:
                base_ms = stats["median_ms"]
            else:
                row["ratio"] = base_ms / stats["median_ms"]
            rows.append(row)
    return rows


def bench_compile(
    model_factory: Callable[[], torch.nn.Module],
    device: torch.device,
    repeats: int = 50,
    arch: str = "",
) -> list[dict]:
    """``torch.compile`` (inductor; "reduce-overhead" on CUDA) against eager: cost and gain;
    on CUDA also inductor's fused kernels inside our own graphs, beside the hand-made graphs."""
    variants = [
        Variant("fp32-eager", click_threads=None),
        Variant("fp32-inductor", compile="inductor"),
    ]
    if device.type == "cuda":
        bf16w = {"dtype": "bf16", "bf16_weights": True}
        variants += [
            Variant("bf16w-graphs", compile="cudagraphs", **bf16w),
            Variant("bf16w-ind-graphs", compile="inductor-graphs", **bf16w),
        ]
    return bench_clicks(model_factory, device, variants, repeats, arch)


def table(rows: list[dict]) -> str:
    """A readable table of the click and batch rows."""
    lines = []
    clicks = [r for r in rows if r.get("kind") == "clicks"]
    if clicks:
        lines.append(
            f"{'arch':18} {'variant':14} {'encoder ms':>11} {'first ms':>10} {'refine ms':>10} "
            f"{'x enc':>6} {'x first':>7} {'x ref':>6} {'peak MiB':>9} {'dice':>6} {'setup s':>8}"
        )
        for r in clicks:
            if "error" in r:
                lines.append(f"{r['arch']:18} {r['variant']:14} error: {r['error'][:60]}")
                continue
            lines.append(
                f"{r['arch']:18} {r['variant']:14} {r['encoder_ms']:11.2f} {r['first_click_ms']:10.2f} "
                f"{r['refine_click_ms']:10.2f} {r.get('encoder_ratio', 1.0):6.2f} "
                f"{r.get('first_click_ratio', 1.0):7.2f} {r.get('refine_click_ratio', 1.0):6.2f} "
                f"{r['peak_mem_bytes'] / 2**20:9.0f} {min(r.get('dice_first', 1), r.get('dice_refine', 1)):6.3f} "
                f"{r['setup_s']:8.1f}"
            )
    sparse = [r for r in rows if r.get("kind") == "sparse"]
    if sparse:
        lines.append(
            f"\n{'pattern':16} {'size':>5} {'tokens':>7} {'encoder ms':>11} {'x dense':>8} "
            f"{'graph ms':>9} {'x dense':>8}"
        )
        for r in sparse:
            graphed = f" {r['graph_ms']:9.2f} {r['graph_ratio']:8.2f}" if "graph_ms" in r else ""
            lines.append(
                f"{r['pattern']:16} {r['size']:5d} {r['tokens']:7d} {r['encoder_ms']:11.2f} "
                f"{r['ratio']:8.2f}{graphed}"
            )
    pipe = [r for r in rows if r.get("kind") == "pipeline"]
    if pipe:
        lines.append(
            f"\n{'pipeline':18} {'load ms':>8} {'set_vol':>8} {'first ms':>9} {'refine ms':>9} "
            f"{'save ms':>8} {'x first':>7} {'x ref':>6} {'RSS MiB':>8}"
        )
        for r in pipe:
            lines.append(
                f"{r['variant']:18} {r['load_ms']:8.0f} {r['set_volume_ms']:8.0f} "
                f"{r['first_click_ms']:9.0f} {r['refine_click_ms']:9.0f} {r['save_ms']:8.0f} "
                f"{r.get('first_click_ratio', 1.0):7.2f} {r.get('refine_click_ratio', 1.0):6.2f} "
                f"{r['peak_rss_bytes'] / 2**20:8.0f}"
            )
    refine = [r for r in rows if r.get("kind") == "refine"]
    if refine:
        lines.append(
            f"\n{'case':8} {'variant':22} {'first ms':>9} {'refine ms':>10} {'model ms':>9} "
            f"{'x ref':>6} {'equal':>6}"
        )
        for r in refine:
            lines.append(
                f"{r['case']:8} {r['variant']:22} {r['first_click_ms']:9.0f} "
                f"{r['refine_click_ms']:10.1f} {r['model_ms']:9.1f} "
                f"{r.get('refine_ratio', 1.0):6.2f} {r.get('labels_equal', '')!s:>6}"
            )
    onnx_rows = [r for r in rows if r.get("kind") == "onnx"]
    for r in onnx_rows:
        lines.append(
            f"\nonnxruntime vs torch (CPU): encoder {r['ort_encoder_ms']:.0f} vs "
            f"{r['torch_encoder_ms']:.0f} ms (x{r['encoder_ratio']:.2f}), click "
            f"{r['ort_click_ms']:.1f} vs {r['torch_click_ms']:.1f} ms (x{r['click_ratio']:.2f}), "
            f"max |logit diff| {r['max_abs_logit_diff']:.2e}, Dice {r['dice']:.4f}"
        )
    batch = [r for r in rows if r.get("kind") == "batch" and "error" not in r]
    if batch:
        lines.append(
            f"\n{'arch':18} {'variant':14} {'batch':>5} {'ms':>9} {'vol/s':>9} {'x':>6} {'peak MiB':>9}"
        )
        for r in batch:
            lines.append(
                f"{r['arch']:18} {r['variant']:14} {r['batch']:5d} {r['median_ms']:9.2f} "
                f"{r['volumes_per_s']:9.1f} {r.get('ratio', 1.0):6.2f} {r['peak_mem_bytes'] / 2**20:9.0f}"
            )
    return "\n".join(lines)


def run_model_bench(
    archs: Iterable[str] = ("fastsam3d_dilated",),
    device: str = "auto",
    repeats: int | None = None,
    batch: bool | None = None,
    compile: bool = False,
    checkpoint: str | None = None,
    emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True),
) -> list[dict]:
    """Run the model benchmark and emit each JSON row as it comes; returns all rows.

    ``repeats`` defaults to 100 on a GPU and 7 on the CPU; ``batch`` (default: GPU only) adds
    the throughput rows; ``compile`` adds torch.compile against eager (slow to compile).
    """
    from fastsam3d.predictor import resolve_device
    from fastsam3d.registry import build_model

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    repeats = repeats or (100 if gpu else 7)
    rows = [environment(dev)]
    emit(rows[0])
    for arch in archs:

        def factory(arch: str = arch) -> torch.nn.Module:
            torch.manual_seed(0)
            return build_model(arch, checkpoint=checkpoint) if checkpoint else build_model(arch)

        name = arch if not checkpoint else f"{arch}:{os.path.basename(checkpoint)}"
        parts = [bench_clicks(factory, dev, default_variants(dev), repeats, name)]
        if batch if batch is not None else gpu:
            parts.append(bench_batch(factory, dev, repeats=max(10, repeats // 3), arch=name))
        if compile:
            parts.append(bench_compile(factory, dev, repeats, name)[1:])
        for part in parts:
            for row in part:
                emit(row)
                rows.append(row)
    return rows


def bench_sparse(
    device: str = "auto", sizes: Iterable[int] = (128, 192, 256), repeats: int | None = None
) -> list[dict]:
    """Image-encoder latency: dense (global) vs our dilated grid/block attention vs the
    official sparse pattern, on crops of ``sizes``^3 (tokens grow 8x from 128^3 to 256^3).

    The three encoders differ only in the attention pattern (same widths and depth, random
    weights); ``ratio`` = dense time / this time (> 1: faster than dense). On a GPU each encoder
    is also timed replayed as one CUDA graph (``graph_ms``, ``graph_ratio``), the way the fast
    click path runs it: eager times there are mostly the host's kernel launches.
    """
    from fastsam3d.predictor import CudaGraph, resolve_device
    from fastsam3d.registry import build_model

    dev = resolve_device(device)
    repeats = repeats or (50 if dev.type == "cuda" else 3)
    patterns = {
        "dense": ("fastsam3d_dilated", {"attention": "global"}),
        "dilated": ("fastsam3d_dilated", {}),
        "official_sparse": ("fastsam3d_sparse", {}),
    }
    rows = []
    for size in sizes:
        x = torch.randn(1, 1, size, size, size, device=dev)
        dense_ms = dense_graph_ms = None
        for name, (arch, overrides) in patterns.items():
            torch.manual_seed(0)
            enc = build_model(arch, **overrides).image_encoder.to(dev).eval()
            with torch.inference_mode():
                stats = time_ms(functools.partial(enc, x), dev, repeats, warmup=2)
                peak = _peak_bytes(dev, functools.partial(enc, x))
                if dev.type == "cuda":
                    graph = CudaGraph(enc, (x,))
                    graph_ms = time_ms(functools.partial(graph, (x,)), dev, repeats)["median_ms"]
                    del graph
            row = {
                "kind": "sparse",
                "pattern": name,
                "size": size,
                "tokens": (size // 16) ** 3,
                "encoder_ms": stats["median_ms"],
                "encoder_p90_ms": stats["p90_ms"],
                "peak_mem_bytes": peak,
            }
            dense_ms = dense_ms or stats["median_ms"]
            row["ratio"] = dense_ms / stats["median_ms"]
            if dev.type == "cuda":
                dense_graph_ms = dense_graph_ms or graph_ms
                row["graph_ms"], row["graph_ratio"] = graph_ms, dense_graph_ms / graph_ms
            rows.append(row)
            del enc
    return rows


def profile_clicks(arch: str = "fastsam3d_dilated", device: str = "auto", rows: int = 25) -> str:
    """Kernel-time table (torch.profiler) of one eager fp32 and one bf16 first click +
    refinement: where the device time goes, for benchmarks/NOTES.md."""
    from torch.profiler import ProfilerActivity, profile

    from fastsam3d.predictor import resolve_device
    from fastsam3d.registry import build_model

    dev = resolve_device(device)
    crop, click = synthetic_crop()
    out = []
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        runner = ClickRunner(Predictor(build_model(arch), dev, dtype=dtype), crop, click)
        for _ in range(3):
            runner.first(), runner.refine()
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if dev.type == "cuda" else []
        )
        with profile(activities=activities) as prof:
            runner.first()
            runner.refine()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        out.append(f"== {arch} {dtype} eager: first click + refinement ==")
        out.append(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
    return "\n".join(out)


def ct_like_volume(
    shape: tuple[int, int, int] = (512, 512, 300),
    seed: int = 0,
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.0),
):
    """A CT-like int16 volume (HU) of ``shape`` at ``spacing`` mm: air, a body ellipse, organs
    as bright ellipsoids, noise; the layout is the 512 x 512 x 300 one scaled to ``shape`` (so a
    128^3 volume holds whole organs too). Returns (Volume, voxel of a click in the first
    organ)."""
    from fastsam3d.io.read import Volume

    rng = np.random.default_rng(seed)
    i, j, k = (np.arange(n, dtype=np.float32) - n / 2 for n in shape)
    arr = np.full(shape, -1000, np.int16)
    body = (i[:, None] / (0.42 * shape[0])) ** 2 + (j[None, :] / (0.35 * shape[1])) ** 2 <= 1
    arr[body] = 40
    scale = np.asarray(shape) / (512, 512, 300)
    organs = [((-60, 20, 0), (70, 55, 60), 120), ((70, -30, 30), (35, 30, 40), 200)]
    for centre, radii, hu in organs:
        (ci, cj, ck), (ri, rj, rk) = np.multiply(centre, scale), np.multiply(radii, scale)
        e = (
            ((i[:, None, None] - ci) / ri) ** 2
            + ((j[None, :, None] - cj) / rj) ** 2
            + ((k[None, None, :] - ck) / rk) ** 2
        ) <= 1
        arr[e] = hu
    arr += rng.normal(0, 10, shape).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2)
    click = np.multiply(organs[0][0], scale) + np.asarray(shape) / 2
    return Volume(arr, affine), click


class ReferenceSession(Session):
    """:class:`~fastsam3d.session.Session` with the stitching and label-map update as they were
    before the refinement path was optimised: every tile of the object mapped over its whole
    native box (``crop_logits_to_native`` > 0), the label map updated by boolean indexing. The
    baseline of :func:`bench_refine` and the reference ``tests/test_session_paste.py`` holds
    the session to (same label maps, edits and undo steps)."""

    def _commit(
        self,
        oid: int,
        obj: _Object,
        new_tiles: list[_Tile],
        before: dict[int, _Object],
        t0: float,
        iou: float,
        clear: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Edit:
        tiles, lo, hi = self._stitch_frame(obj, new_tiles)
        if clear is not None:
            lo, hi = np.minimum(lo, clear[0]), np.maximum(hi, clear[1])
        affine, shape = self.volume.affine, self.label_map.shape
        canvas = np.zeros(tuple(hi - lo), bool)
        for t in tiles:  # later tiles win where tiles overlap
            bbox, values, inside = crop_logits_to_native(t.logits, t.grid, affine, shape)
            a = np.maximum([s.start for s in bbox], lo)
            b = np.minimum([s.stop for s in bbox], hi)
            if np.all(b > a):
                src = tuple(slice(x - s.start, y - s.start) for x, y, s in zip(a, b, bbox))
                dst = tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))
                keep = inside[src].cpu().numpy()
                canvas[dst][keep] = (values[src] > 0).cpu().numpy()[keep]
        bound = self._box_bound(obj)
        if bound is not None:  # every voxel outside the box bound goes
            index = np.indices(canvas.shape, sparse=True)
            for axis, ix in enumerate(index):
                canvas &= (ix + lo[axis] >= bound[0][axis]) & (ix + lo[axis] < bound[1][axis])
        changed = _true_box(canvas != obj.mask.region(lo, hi))
        region = None if changed is None else (lo + changed[0], lo + changed[1])
        self._objects[oid] = replace(obj, tiles=tiles, mask=obj.mask.with_region(lo, hi, canvas))
        edit = self._apply(oid, region, before, t0)
        edit.iou, edit.tiles = iou, len(tiles)
        return edit

    def _apply(
        self,
        oid: int,
        region: tuple[np.ndarray, np.ndarray] | None,
        before: dict[int, _Object],
        t0: float,
        active_before: int | None = None,
    ) -> Edit:
        active_before = self.active_object if active_before is None else active_before
        self.active_object = oid
        lo, hi = (np.zeros(3, int), np.zeros(3, int)) if region is None else region
        bbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        view = self.label_map[bbox]
        old = view.copy()
        if view.size:
            mine = np.zeros(view.shape, bool)
            if oid in self._objects:
                mine = self._objects[oid].mask.region(lo, hi)
            view[(view == oid) & ~mine] = 0
            view[mine & ((view == 0) | (not self.protect))] = oid
            for other, obj in self._objects.items():
                if other != oid and obj.mask.arr.size:
                    view[(view == 0) & obj.mask.region(lo, hi)] = other
            known = np.zeros(65536, bool)
            known[[0, *self._objects]] = True
            view[~known[view]] = 0
        return self._record(oid, bbox, old, view.copy(), before, active_before, t0)


class BallPredictor(Predictor):
    """A stand-in for a trained model's local masks (the untrained one's fill the crop): low-res
    logits of a ball around the newest click, ``radius`` low-res voxels (of 32^3, 6 mm each at
    the model's 1.5 mm) plus 2.5 per further positive click, 1.5 less after a negative one,
    with noise seeded by the prompts (same prompts, same logits); a box alone gives a ball of
    ``radius`` around its centre. Used by :func:`bench_refine` and the session tests; the image
    encoder still runs."""

    def __init__(self, model: torch.nn.Module, radius: float = 3.0, **options):
        super().__init__(model, "cpu", **options)
        self.radius = radius

    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask=False):
        if points is None:  # a box alone
            points, labels = torch.as_tensor(box, dtype=torch.float32).reshape(2, 3).mean(0), [1]
        pts = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 3) / 4  # low-res voxels
        lbl = torch.as_tensor(labels).reshape(-1)
        radius = self.radius + 2.5 * (float((lbl == 1).sum()) - 1) - 1.5 * float(lbl[-1] == 0)
        axis = torch.arange(LOW_RES, dtype=torch.float32) + 0.5
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
        dist = (grid - pts[-1].reshape(3, 1, 1, 1)).norm(dim=0)
        gen = torch.Generator().manual_seed(int(pts.sum() * 1000) % 2**31)
        logits = radius - dist + 0.8 * torch.randn(dist.shape, generator=gen)
        return logits[None, None], torch.full((1, 1), 0.5)


def bench_refine(
    model: str | torch.nn.Module = "untrained",
    repeats: int = 7,
    cases: Iterable[str] = tuple(REFINE_CASES),
    dtype: str = "fp32",
    device: str = "cpu",
) -> list[dict]:
    """Refinement clicks through the whole :class:`~fastsam3d.session.Session` path (wall
    time, mask on the host), on the CPU unless ``device`` says "cuda".

    Cases: ``crop128`` (a 128^3 volume at 1.5 mm, one crop) and ``ct512`` (a loaded 512 x 512
    x 300 CT-like volume at 0.8 x 0.8 x 1.0 mm), one tile per click (``max_new_tiles=0``).
    ``model``: as for :class:`~fastsam3d.session.Session` (an ``export-onnx`` folder runs the
    onnxruntime backend), or ``"ball"`` for
    :class:`BallPredictor` objects of ~1M voxels on the CT (a trained model's masks are local;
    the untrained model's fill the tile, the worst case here); ``dtype`` as for
    :class:`~fastsam3d.predictor.Predictor` (not for ``"ball"``). Variants:
    :class:`ReferenceSession` (baseline), the session, and (real models) the session with the
    click path on torch's threads instead of one (CPU) or with the model in CUDA graphs (GPU).
    Each timed refinement is a new negative click beside the first (the same sequence for
    every variant; history 2, so memory stays flat);
    ``model_ms`` times the predictor alone on the last click's prompts, ``labels_equal`` /
    ``dice`` compare the final label map with the baseline's.
    """
    from fastsam3d.io.read import Volume
    from fastsam3d.predictor import load_predictor
    from fastsam3d.registry import build_model

    cpu = torch.device("cpu")
    if model == "ball":
        torch.manual_seed(0)
        pred, name = BallPredictor(build_model(), radius=9.0), "ball (BallPredictor, radius 9)"
        variants = [("reference", ReferenceSession, pred), ("session", Session, pred)]
    else:
        pred, name = load_predictor(model, device, dtype=dtype)
        variants = [("reference", ReferenceSession, pred), ("session", Session, pred)]
        if isinstance(pred, Predictor) and pred.device.type == "cuda":
            graphs = Predictor(pred.model, pred.device, dtype=dtype, compile="cudagraphs")
            variants.append(("session-cuda-graphs", Session, graphs))
        elif isinstance(pred, Predictor):  # not for an export-onnx folder (onnxruntime)
            threads = Predictor(pred.model, "cpu", dtype=dtype, click_threads=None)
            variants.append(("session-torch-threads", Session, threads))
    rows = []
    for case in cases:
        shape, spacing = REFINE_CASES[case]
        raw, click = ct_like_volume(shape, spacing=spacing)
        volume = Volume(raw.array.astype(np.float32), raw.affine)
        base, base_labels = None, None
        for variant, cls, p in variants:
            s = cls(p, max_new_tiles=0, history=2)
            # Each timed lambda runs at once, inside this iteration; defaults bind its values.
            first = time_ms(
                lambda s=s, v=volume, c=click: (s.set_volume(v), s.add_point(c)), cpu, 1, warmup=1
            )
            offsets = iter(range(10**6))
            refine = time_ms(
                lambda s=s, c=click, o=offsets: s.add_point(c + [4 + next(o) % 5, 0, 0],
                                                            positive=False),
                cpu, repeats, warmup=2,
            )  # fmt: skip
            obj = s._objects[s.active_object]
            tile = obj.tiles[-1]  # the session's model step alone, on the last click's prompts
            model_ms = time_ms(
                lambda s=s, t=tile, o=obj: s._predict(t.grid, o, t.logits),
                getattr(p, "device", cpu), repeats, warmup=1,
            )  # fmt: skip
            row = {
                "kind": "refine", "case": case, "variant": variant, "model": name,
                "shape": list(shape), "spacing_mm": list(spacing),
                "first_click_ms": first["median_ms"], "refine_click_ms": refine["median_ms"],
                "refine_p90_ms": refine["p90_ms"], "model_ms": model_ms["median_ms"],
                "mask_voxels": int((s.label_map > 0).sum()), "threads": torch.get_num_threads(),
                "click_threads": getattr(p, "click_threads", None), "dtype": dtype,
                "device": str(getattr(p, "device", cpu)),
            }  # fmt: skip
            if base is None:
                base, base_labels = row, s.label_map
            else:
                row["refine_ratio"] = base["refine_click_ms"] / row["refine_click_ms"]
                row["labels_equal"] = bool(np.array_equal(s.label_map, base_labels))
                masks = (torch.from_numpy(m > 0) for m in (s.label_map, base_labels))
                row["dice"] = dice(*masks)
            rows.append(row)
    return rows


def bench_pipeline(
    shape: tuple[int, int, int] = (512, 512, 300),
    repeats: int = 3,
    checkpoint: str | None = None,
    arch: str = "fastsam3d_dilated",
    quantize: bool = True,
) -> list[dict]:
    """The whole path on the CPU: NIfTI on disk -> load -> first click -> refinement -> mask
    written, for a CT-like ``shape`` volume. One tile per click (``max_new_tiles=0``).

    Baseline: fp32 eager model with 3D ``grid_sample`` resampling (the separable transforms
    switched off) and torch's thread setting for clicks; variants: separable transforms with
    single-threaded clicks, then + int8 encoder. ``*_ratio`` = baseline / variant.
    """
    import tempfile

    import fastsam3d.transforms as tr
    from fastsam3d.registry import build_model

    volume, click = ct_like_volume(shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ct.nii.gz"
        import nibabel as nib

        nib.save(nib.Nifti1Image(volume.array.astype(np.int16), volume.affine), src)
        # (name, quantize, separable transforms, click threads, all threads)
        variants = [
            ("fp32-grid_sample", None, False, None, None),
            ("fp32-separable-1thread", None, True, 1, None),
        ]
        if quantize:
            variants.append(("int8-separable-1thread", "int8", True, 1, None))
            variants.append(("int8-separable-all1", "int8", True, 1, 1))
        base = None
        axis_permutation = tr._axis_permutation
        default_threads = torch.get_num_threads()
        for name, quant, separable, click_threads, threads in variants:
            torch.manual_seed(0)
            model = build_model(arch, checkpoint=checkpoint) if checkpoint else build_model(arch)
            pred = Predictor(model, "cpu", quantize=quant, click_threads=click_threads)
            tr._axis_permutation = axis_permutation if separable else (lambda m: None)
            torch.set_num_threads(threads or default_threads)
            try:
                stages: dict[str, list[float]] = {}
                for n in range(repeats + 1):  # the first round warms up
                    times = _pipeline_once(src, pred, click, Path(tmp) / f"m{n}.nii.gz")
                    if n:
                        for key, value in times.items():
                            stages.setdefault(key, []).append(value)
            finally:
                tr._axis_permutation = axis_permutation
                torch.set_num_threads(default_threads)
            row = {"kind": "pipeline", "variant": name, "shape": list(shape), "arch": arch}
            row.update({k: statistics.median(v) for k, v in stages.items()})
            row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if base is None:
                base = row
            else:
                for key in stages:
                    row[key.replace("_ms", "_ratio")] = base[key] / row[key]
            rows.append(row)
    return rows


def _pipeline_once(src: Path, pred: Predictor, click: np.ndarray, out: Path) -> dict[str, float]:
    """One pass of the file -> mask path, each stage timed in ms."""
    from fastsam3d.io.read import load_volume
    from fastsam3d.io.write import save_mask

    t = [time.perf_counter()]
    volume = load_volume(src)
    t.append(time.perf_counter())
    session = Session(pred, max_new_tiles=0)
    session.set_volume(volume)
    t.append(time.perf_counter())
    session.add_point(click)
    t.append(time.perf_counter())
    session.add_point(click + [6, 0, 0], positive=False)
    t.append(time.perf_counter())
    save_mask(session.label_map, volume, out, overwrite=True)
    t.append(time.perf_counter())
    names = ("load_ms", "set_volume_ms", "first_click_ms", "refine_click_ms", "save_ms")
    times = {n: (b - a) * 1e3 for n, a, b in zip(names, t, t[1:])}
    times["total_ms"] = (t[-1] - t[0]) * 1e3
    return times


def bench_onnx(
    model_factory: Callable[[], torch.nn.Module], folder: str | Path, repeats: int = 5
) -> dict:
    """onnxruntime (CPU) beside torch eager fp32 (CPU) on the same crop and clicks: largest
    logit difference, mask Dice, and the encoder / click times with ratios (torch / ort), both
    on all of torch's threads (onnxruntime's default is one per core; the predictor's default
    one-thread click would make the ratio a thread count's)."""
    from fastsam3d.export import OnnxPredictor, export_onnx

    model = model_factory()
    t0 = time.perf_counter()
    export_onnx(model, folder)
    export_s = time.perf_counter() - t0
    crop, click = synthetic_crop()
    threads = torch.get_num_threads()
    torch_p = Predictor(model, "cpu", click_threads=None)
    ort_p = OnnxPredictor(folder, threads=threads)
    pts, lbl = np.stack([click, click + [10, 0, 0]]), np.array([1, 0])
    zeros = np.zeros((1, 1, LOW_RES, LOW_RES, LOW_RES), np.float32)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        t_enc = time_ms(lambda: torch_p.set_image(crop), cpu, repeats, warmup=1)
        t_click = time_ms(
            lambda: torch_p.predict(
                torch.from_numpy(pts).float(),
                torch.from_numpy(lbl),
                mask_input=torch.from_numpy(zeros),
            ),
            cpu,
            repeats * 4,
            warmup=1,
        )
        ref, _ = torch_p.predict(
            torch.from_numpy(pts).float(), torch.from_numpy(lbl), mask_input=torch.from_numpy(zeros)
        )
    o_enc = time_ms(lambda: ort_p.set_image(crop.numpy()), cpu, repeats, warmup=1)
    o_click = time_ms(lambda: ort_p.predict(pts, lbl, mask_input=zeros), cpu, repeats * 4, warmup=1)
    got, _ = ort_p.predict(pts, lbl, mask_input=zeros)
    got_t = torch.from_numpy(got)
    return {
        "kind": "onnx",
        "threads": threads,
        "export_s": export_s,
        "max_abs_logit_diff": float((got_t - ref).abs().max()),
        "dice": dice(got_t > 0, ref > 0),
        "torch_encoder_ms": t_enc["median_ms"],
        "ort_encoder_ms": o_enc["median_ms"],
        "encoder_ratio": t_enc["median_ms"] / o_enc["median_ms"],
        "torch_click_ms": t_click["median_ms"],
        "ort_click_ms": o_click["median_ms"],
        "click_ratio": t_click["median_ms"] / o_click["median_ms"],
    }
