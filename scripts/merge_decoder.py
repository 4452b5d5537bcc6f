"""Make a whole model of a prompt encoder + mask decoder file (``fetch_decoder`` in
scripts/device_lib.sh: a fine-tune with ``--freeze-encoder``) and the default's image encoder.
A whole checkpoint works too (nothing is taken from the default then); ``--single-output`` turns
``first_click_multimask`` off, to evaluate a multimask fine-tune's single output alone.

    python scripts/merge_decoder.py RUN_best.decoder.safetensors OUT.safetensors [--dtype int8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from safetensors import safe_open

from fastsam3d.checkpoint import save_safetensors
from fastsam3d.registry import ModelConfig, build_from_config, build_model
from fastsam3d.weights import default_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="int8", help="int8, fp16 or fp32 (as `convert`)")
    parser.add_argument("--single-output", action="store_true", help="first_click_multimask off")
    args = parser.parse_args()
    with safe_open(args.decoder, "pt") as f:
        part = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (no __iter__)
        meta = f.metadata()
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    if args.single_output:
        config = dataclasses.replace(config, first_click_multimask=False)
    model = build_from_config(config)
    state = build_model(checkpoint=default_checkpoint()).state_dict()
    state.update(part)
    model.load_state_dict(state)
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "config")}
    save_safetensors(model, args.out, dtype=args.dtype, metadata=keep, overwrite=True)


if __name__ == "__main__":
    main()
