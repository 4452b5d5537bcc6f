"""Round-trip latency per click over loopback: ``fastsam3d serve`` + RemoteSession on the sample.

Prints JSON lines: the upload, the first click of an object (new tiles, image embeddings) and
refinement clicks (cached embeddings), each as the client's wall time and the server's own
``seconds``; and, as the same-run baseline, the same clicks in process (ratio = remote / local).

    python benchmarks/bench_server_latency.py [--model PATH] [--device cpu] [--refinements 3]

Without ``--model`` it uses the bundled default weights, or, when none are bundled, the default
architecture at full size with random weights (same compute, meaningless masks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def model_path(arg: str | None, folder: Path) -> str:
    if arg:
        return arg
    from fastsam3d.weights import default_checkpoint

    if default_checkpoint() is not None:
        return "default"
    import torch

    from fastsam3d.checkpoint import save_safetensors
    from fastsam3d.registry import build_model

    torch.manual_seed(0)
    return str(save_safetensors(build_model(), folder / "random_default_arch.safetensors"))


def clicks_for(volume, labels, names, refinements: int) -> list[tuple[np.ndarray, bool]]:
    """A click at the liver's centroid, then refinements a few voxels around it (RAS mm)."""
    liver = next(v for v, n in names.items() if n == "liver")
    seed = np.argwhere(labels == liver).mean(0).round()
    offsets = [(0, 0, 0)] + [(3 * (n % 2) - 1, 2 - n, n - 1) for n in range(refinements)]
    return [((volume.affine @ [*(seed + o), 1.0])[:3], n % 3 != 2) for n, o in enumerate(offsets)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--refinements", type=int, default=3)
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()

    from fastsam3d.client import RemoteSession
    from fastsam3d.sample_data import load_sample, sample_path
    from fastsam3d.session import Session

    volume, labels, names = load_sample()
    clicks = clicks_for(volume, labels, names, args.refinements)
    with tempfile.TemporaryDirectory() as tmp:
        model = model_path(args.model, Path(tmp))
        cmd = [sys.executable, "-c", "from fastsam3d.cli import main; main()", "serve"]
        cmd += ["--port", str(args.port), "--model", model, "--device", args.device]
        server = subprocess.Popen(cmd)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            remote = RemoteSession(url)
            for run in ("first", "again"):  # the first upload also imports the NIfTI reader
                t0 = time.perf_counter()
                remote.set_volume_file(sample_path())
                seconds = time.perf_counter() - t0
                print(json.dumps({"bench": f"server_upload_{run}", "seconds": round(seconds, 3)}))
            local = Session(model, device=args.device)
            local.set_volume(volume)
            for n, (ras, positive) in enumerate(clicks):
                t0 = time.perf_counter()
                edit = remote.add_point(ras, positive, coords="ras")
                rt = time.perf_counter() - t0
                t0 = time.perf_counter()
                local.add_point(ras, positive, coords="ras")
                base = time.perf_counter() - t0
                assert np.array_equal(local.label_map, remote.label_map)
                kind = "first_click" if n == 0 else "refinement"
                print(
                    json.dumps(
                        {
                            "bench": f"server_{kind}",
                            "round_trip_s": round(rt, 3),
                            "server_s": round(edit.seconds, 3),
                            "in_process_s": round(base, 3),
                            "ratio": round(rt / base, 3),
                            "tiles": edit.tiles,
                            "patch_voxels": int(edit.patch.size),
                            "device": args.device,
                        }
                    )
                )
            remote.close()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
