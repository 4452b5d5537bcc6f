"""Predictor: one model on one device, a cache of crop embeddings, prompts in, logits out.

Like segment-anything's ``SamPredictor``, the expensive image embedding is computed once per
crop and every refinement click reruns only the prompt encoder and the mask decoder. Unlike it,
several crops stay cached (LRU), because an interactive session moves between crops and
objects. Torch only: no file I/O beyond the checkpoint, no geometry.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from fastsam3d.cache import EmbeddingCache
from fastsam3d.errors import PromptError
from fastsam3d.modeling import Sam3D
from fastsam3d.transforms import MODEL_SPACING_MM, upsample_logits


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = ("fp32", "bf16")
COMPILE_MODES = ("cudagraphs", "inductor", "inductor-graphs")
GRAPH_MODES = ("cudagraphs", "inductor-graphs")  # replayed through our own CudaGraph
QUANTIZE_MODES = ("int8",)


class Predictor:
    """Runs a :class:`~fastsam3d.modeling.sam3d.Sam3D` on crops with an embedding cache.

    The defaults (float32, eager) are the reference. The faster paths are opt-in and checked
    against it in ``tests/test_perf_paths.py`` (masks Dice >= 0.99); ``benchmarks/NOTES.md``
    says what each one buys.

    Args:
        model: the model (moved to ``device`` and set to eval mode).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        cache_size: how many crop embeddings to keep.
        dtype: ``"fp32"`` or ``"bf16"`` (autocast: matrix products in bfloat16, norms and
            softmax in float32; outputs are float32 either way). On the CPU only the image
            encoder runs in bfloat16, from a copy whose Linear and convolution weights are
            stored so (:func:`bf16_matrix_weights`; autocast would cast every weight again on
            every call): about 2x faster where the CPU has bfloat16 matrix units (AMX,
            AVX512-BF16; elsewhere bfloat16 is emulated). Of the click path only the mask
            decoder's output upscaling runs in bfloat16 there (:func:`bf16_upscaling`: two
            transposed convolutions of fixed shape, ~300 M multiply-adds, 6.1 -> ~4 ms of a
            one-thread click); the rest stays float32: in bfloat16 it was no faster, and oneDNN
            compiled a kernel for every new number of prompts (~12 ms on each of a session's
            first clicks; benchmarks/NOTES.md).
        compile: None (eager), ``"cudagraphs"`` (CUDA only: encoder and click captured once per
            prompt shape and replayed, which removes the kernel-launch and host overhead that
            dominates a 128^3 click on a GPU), ``"inductor"`` (``torch.compile``; mode
            ``"reduce-overhead"`` on CUDA) or ``"inductor-graphs"`` (CUDA only: ``torch.compile``
            with inductor's fused kernels, captured in our own graphs as ``"cudagraphs"`` does, so
            a replay runs no guards). If capture or compilation fails, the predictor warns and
            stays eager.
        quantize: None or ``"int8"`` (CPU only: dynamic int8 quantisation of the image encoder's
            Linear layers, weights int8, activations quantised per call, fbgemm kernels; the
            decoder stays float32 because its small matrices ran 5x slower quantised).
        click_threads: CPU threads for the click path (prompt encoder + decoder; the session
            maps the click's logits to the native grid on them too), None to leave torch's
            setting, ``"auto"`` (default) for one fewer than torch's threads, at least one. The
            decoder is a chain of small operations whose OpenMP barriers stall whenever
            another process (or the GUI) holds a core: on the 2-core CI machine a refinement
            took 318 ms with 2 threads and 91 ms with 1, and 1944 vs 292 ms with one core busy
            (benchmarks/NOTES.md), so one core is left free: 1 thread on 2 cores, 3 on a
            4-core laptop. The setting is process-wide while a click runs and restored after.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "auto",
        cache_size: int = 16,
        *,
        dtype: str = "fp32",
        compile: str | None = None,
        quantize: str | None = None,
        click_threads: int | Literal["auto"] | None = "auto",
    ):
        self.device = resolve_device(device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {compile!r}")
        if compile in GRAPH_MODES and self.device.type != "cuda":
            raise ValueError(f"compile={compile!r} needs a CUDA device")
        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
        if quantize and self.device.type != "cpu":
            raise ValueError("quantize='int8' runs on the CPU only")
        if quantize and dtype != "fp32":
            raise ValueError("quantize='int8' and dtype='bf16' both speed up the encoder: pick one")
        m = self.model = model.to(self.device).eval()
        encoder = quantize_linear_int8(m.image_encoder) if quantize else m.image_encoder
        decoder = m.mask_decoder
        if dtype == "bf16" and self.device.type == "cpu":
            if not cpu_bf16_units():
                warnings.warn(
                    "this CPU has no bfloat16 matrix units (AMX or AVX512-BF16): bf16 is emulated "
                    "and far slower than fp32 here (on a 2-core AVX2 EPYC the encoder took 5.5 s "
                    "against 0.11 s); use fp32",
                    RuntimeWarning,
                    stacklevel=2,
                )
            encoder, decoder = bf16_matrix_weights(encoder), bf16_upscaling(decoder)
        # the caller's model (maybe shared) keeps its own parts
        if encoder is not m.image_encoder or decoder is not m.mask_decoder:
            self.model = Sam3D(encoder, m.prompt_encoder, decoder, m.config).eval()
        self.dtype = dtype
        self.compile = compile
        if click_threads == "auto":
            click_threads = max(1, torch.get_num_threads() - 1)
        self.click_threads = click_threads if self.device.type == "cpu" else None
        self._cache = EmbeddingCache(cache_size)
        self._embedding: torch.Tensor | None = None
        self._dense_pe: torch.Tensor | None = None
        self._encode = self._encode_eager
        self._click = self._click_eager
        self._graphs: dict[tuple, CudaGraph] = {}
        self._pool = None
        if compile in ("inductor", "inductor-graphs"):
            mode = (
                "reduce-overhead" if compile == "inductor" and self.device.type == "cuda" else None
            )
            self._encode = _compiled(self._encode_eager, mode, self.device)
            self._click = _compiled(self._click_eager, mode, self.device)
        self.encoder_calls = 0  # how many times the image encoder ran (tests check the cache)

    @property
    def accepts_boxes(self) -> bool:
        return bool(getattr(self.model.config, "accepts_boxes", False))

    @property
    def first_click_multimask(self) -> bool:
        """Whether a lone first click is answered by the best of all 4 outputs
        (``predict(multimask="all")``; see :class:`~fastsam3d.registry.ModelConfig`)."""
        return bool(getattr(self.model.config, "first_click_multimask", False))

    @property
    def crop_spacing_mm(self) -> float:
        """Voxel size of the crops a Session samples for this model (``ModelConfig``)."""
        return float(getattr(self.model.config, "crop_spacing_mm", MODEL_SPACING_MM))

    @property
    def img_size(self) -> int:
        return int(getattr(self.model.config, "img_size", 128))

    def _autocast(self, encoder: bool) -> torch.autocast:
        """bf16 autocast for the encoder, and for the click path except on the CPU (see
        ``dtype``). No cast cache: each weight is used once per call, and a cache is unsafe
        in capture."""
        bf16 = self.dtype == "bf16" and (encoder or self.device.type != "cpu")
        return torch.autocast(self.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False)

    def _encode_eager(self, image: torch.Tensor) -> torch.Tensor:
        with self._autocast(encoder=True):
            return self.model.image_encoder(image).float()

    def _click_eager(
        self,
        embedding: torch.Tensor,
        dense_pe: torch.Tensor,
        prompts: torch.Tensor | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        multimask: bool | str,
        full_res: bool,
    ) -> tuple[torch.Tensor, ...]:
        """Prompt encoder + decoder; ``prompts`` (1, N, 4): coordinates then label, one tensor so
        that a click makes one host-to-device copy. With ``full_res`` also the thresholded
        crop-resolution masks (inside the click's CUDA graph in the graph modes)."""
        points = None if prompts is None else (prompts[..., :3], prompts[..., 3].long())
        with self._autocast(encoder=False):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
            dec = self.model.mask_decoder
            low_res, iou = dec(
                image_embeddings=embedding,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask is True,
                outputs=range(dec.num_mask_tokens) if multimask == "all" else None,
            )
        low_res = low_res.float()
        if full_res:
            return low_res, iou.float(), upsample_logits(low_res, self.img_size) > 0
        return low_res, iou.float()

    def _run(self, name: str, fn, args: tuple, key: tuple, reuse: int = 0):
        """``fn(*args)``, through a CUDA graph keyed by ``key`` in the graph modes (there the
        first ``reuse`` args are copied in only when they are other tensors than last time; see
        :class:`CudaGraph`). Tensors in ``args`` may still be on the CPU in the graph modes."""
        if self.compile == "inductor" and self.device.type == "cuda":
            # reduce-overhead replays CUDA graphs whose outputs the next replay overwrites
            torch.compiler.cudagraph_mark_step_begin()
            return _map_tensors(fn(*_map_tensors(args, self._to_device)), torch.clone)
        if self.compile not in GRAPH_MODES:
            return fn(*_map_tensors(args, self._to_device))
        graph = self._graphs.get((name, *key))
        if graph is None:
            try:
                if self._pool is None:  # one memory pool for this predictor's graphs
                    self._pool = torch.cuda.graph_pool_handle()
                graph = CudaGraph(fn, _map_tensors(args, self._to_device), self._pool, reuse)
            except RuntimeError as err:  # capture unsupported here: stay eager, say so once
                warnings.warn(f"CUDA graph capture failed ({err}); running eagerly", stacklevel=3)
                self.compile = None
                return fn(*_map_tensors(args, self._to_device))
            self._graphs[(name, *key)] = graph
        return graph(args)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def set_image(self, image: torch.Tensor | None = None, key: Hashable | None = None) -> None:
        """Select the crop to prompt on, computing its embedding unless ``key`` is cached.

        Args:
            image: (1, 1, S, S, S) normalised crop; may be None if ``key`` is cached.
            key: cache key (e.g. the crop grid); None disables caching for this image.
        """
        self._embedding = self._cache.fetch(key, image, self._encode_crop)

    def _encode_crop(self, image: torch.Tensor) -> torch.Tensor:
        image = image.to(self.device, torch.float32)
        self.encoder_calls += 1
        return self._run("encode", self._encode, (image,), (tuple(image.shape),))

    def share(self) -> Predictor:
        """A predictor on the same weights with its own embedding cache (one per user session
        in the server)."""
        return Predictor(
            self.model, self.device, self._cache.size, dtype=self.dtype,
            compile=self.compile, click_threads=self.click_threads,
        )  # fmt: skip

    def is_cached(self, key: Hashable) -> bool:
        return key in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()
        self._embedding = None

    @torch.inference_mode()
    def predict(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        box: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool | str = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for the current crop.

        Args:
            points: (N, 3) or (1, N, 3) crop voxel coordinates (tensor axes 2, 3, 4).
            labels: (N,) or (1, N): 1 positive, 0 negative.
            box: (2, 3) or (1, 2, 3) lo/hi corners in crop voxel units (models with boxes only).
            mask_input: (1, 1, 32, 32, 32) previous low-res logits (official first click: zeros).
            multimask: True -> the 3 multimask outputs instead of the single one; ``"all"`` ->
                all 4 (the single one first), for a lone first click (``first_click_multimask``).

        Returns:
            ``(low_res_logits, iou)``: (1, K, 32, 32, 32) and (1, K), K = 1, 3 or 4,
            float32 on the predictor's device.
        """
        return self._predict(points, labels, box, mask_input, multimask, full_res=False)

    @torch.inference_mode()
    def predict_mask(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        box: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool | str = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`predict`, and the masks at the crop's resolution, as segment-anything's
        predictor returns them: ``(low_res_logits, iou, masks)``, masks (1, K, S, S, S) bool,
        the logits upsampled (:func:`~fastsam3d.transforms.upsample_logits`) and thresholded
        at 0. In the CUDA graph modes that is part of the click's graph (one replay, no
        launches of its own); on the CPU it runs after the click, on all threads."""
        return self._predict(points, labels, box, mask_input, multimask, full_res=True)

    def _predict(self, points, labels, box, mask_input, multimask, full_res: bool) -> tuple:
        if self._embedding is None:
            raise RuntimeError("call set_image() before predict()")
        if box is not None and not self.accepts_boxes:
            raise PromptError("this model was not trained with box prompts; use clicks instead")
        prompts = None
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32).reshape(1, -1, 3)
            lbl = torch.as_tensor(labels, dtype=torch.float32, device=coords.device)
            prompts = torch.cat([coords, lbl.reshape(1, -1, 1)], dim=-1)
        boxes = None if box is None else torch.as_tensor(box, dtype=torch.float32).reshape(1, 2, 3)
        if self.device.type == "cuda":  # asynchronous copies: a pageable one syncs the host
            prompts, boxes = _pinned(prompts), _pinned(boxes)
        masks = None if mask_input is None else mask_input.float()
        if self._dense_pe is None:  # constant: computed once, not per click
            with self._autocast(encoder=False):
                self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        in_click = full_res and self.device.type != "cpu"
        key = (
            None if prompts is None else prompts.shape[1],
            boxes is not None,
            masks is not None,
            multimask,
            in_click,
            tuple(self._embedding.shape),
        )
        args = (self._embedding, self._dense_pe, prompts, boxes, masks, multimask, in_click)
        with cpu_threads(self.click_threads):
            out = self._run("click", self._click, args, key, reuse=2)
        if full_res and not in_click:
            out = (*out, upsample_logits(out[0], self.img_size) > 0)
        return out


def _compiled(fn, mode: str | None, device: torch.device):
    """``torch.compile(fn)``; on CUDA compiled with inductor's ``freezing``: the weights are
    taken as constants, so tensors derived from them (the decoder's permuted upscaling weights,
    ``_patch_layout``) are made once at compile time instead of by copy kernels in every click.
    A predictor's weights must not change after its first call. (``torch.compile(options=
    {"freezing": True})`` did not fold them; the config set while compiling does.)"""
    import torch._inductor.config  # only where compiling: a slow import

    compiled = torch.compile(fn, mode=mode, dynamic=False)
    if device.type != "cuda":
        return compiled

    def run(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)

    return run


def _pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU tensor in page-locked memory (copied to a GPU without a host sync)."""
    return t.pin_memory() if t is not None and t.device.type == "cpu" else t


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block (None: left as it is),
    restored after: a click's work on a shared CPU (see ``Predictor(click_threads=...)``)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CudaGraph:
    """One CUDA graph of ``fn(*args)``: static copies of the tensor inputs, outputs cloned out.

    ``args`` may nest tensors in tuples and hold plain Python values (part of the graph key);
    its tensors may be on the CPU (copied straight into the static inputs). The first ``reuse``
    args are tensors that their owner never changes in place (the predictor's image embedding
    and positional encoding): a replay copies them only when other tensors come than last time.
    Graphs given the same ``pool`` (from ``torch.cuda.graph_pool_handle()``) share memory; that
    is safe when they replay one after another on one stream and their outputs are cloned
    before the next replay, as here.
    """

    def __init__(self, fn, args: tuple, pool: tuple | None = None, reuse: int = 0):
        self.static_args = _map_tensors(args, torch.clone)
        self._sources = [weakref.ref(a) for a in args[:reuse]]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: cuBLAS/cuDNN handles and autotuning outside capture
                fn(*self.static_args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_out = fn(*self.static_args)

    def __call__(self, args: tuple):
        for i, (source, arg) in enumerate(zip(self._sources, args)):
            if source() is not arg:
                self.static_args[i].copy_(arg, non_blocking=True)
                self._sources[i] = weakref.ref(arg)
        n = len(self._sources)
        _map_tensors((self.static_args[n:], args[n:]), None)
        self.graph.replay()
        return _map_tensors(self.static_out, torch.clone)


def _map_tensors(tree, fn):
    """Apply ``fn`` to every tensor in nested tuples; with ``fn=None`` and ``tree=(dst, src)``
    copy ``src``'s tensors into ``dst``'s."""
    if fn is None:
        dst, src = tree
        if isinstance(dst, torch.Tensor):
            dst.copy_(src, non_blocking=True)  # CPU sources are pinned (Predictor._predict)
        elif isinstance(dst, tuple):
            for d, s in zip(dst, src):
                _map_tensors((d, s), None)
        return None
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(_map_tensors(t, fn) for t in tree)
    return tree


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` of ``model`` (CPU; a quantised copy).

    Weights are stored int8 per tensor, activations are quantised on the fly per call, and the
    matrix products run in fbgemm (x86) or qnnpack (ARM). Convolutions, norms and attention
    stay float32.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def cpu_bf16_units() -> list[str]:
    """This CPU's bfloat16 matrix units as torch detects them (empty: bf16 would be emulated,
    slower than fp32), for choosing ``dtype="bf16"`` on a CPU."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]


def bf16_matrix_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose Linear and convolution weights and biases are bfloat16.

    Norms, embeddings and buffers stay float32. Under autocast every matrix product casts its
    weight to bfloat16 anyway, so the arithmetic is autocast's, minus one cast per weight and
    call, and half the bytes are read. The caller's model is left as it was; a model already
    converted is returned as is (``Predictor.share`` keeps one copy of the weights).
    """
    kinds = (torch.nn.Linear, torch.nn.Conv3d, torch.nn.ConvTranspose3d)
    if all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, kinds)):
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, kinds):
            module.to(torch.bfloat16)
    return model


def bf16_upscaling(decoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of a mask decoder whose output upscaling convolutions' weights are stored in
    bfloat16, so that on the CPU their matrix products run in bfloat16 and everything else,
    their biases too, in float32 (``modeling.mask_decoder._patch_deconv``); a decoder already
    so is returned as is."""
    if decoder.output_upscaling[0].weight.dtype == torch.bfloat16:
        return decoder
    decoder = copy.deepcopy(decoder)
    for conv in decoder.output_upscaling:
        if isinstance(conv, torch.nn.ConvTranspose3d):
            conv.weight = torch.nn.Parameter(conv.weight.detach().bfloat16(), requires_grad=False)
    return decoder


UNTRAINED = "untrained"
UNTRAINED_NAME = "UNTRAINED default architecture (random weights: checks the pipeline, not a model)"


def load_predictor(
    model: str | Path | torch.nn.Module = "default", device: str = "auto", **options: Any
) -> tuple[Predictor, str]:
    """A predictor for ``model``: ``"default"`` (bundled weights), a checkpoint path, a folder
    from ``fastsam3d export-onnx`` (an :class:`~fastsam3d.export.OnnxPredictor`), a module,
    or ``"untrained"`` (the default architecture with seeded random weights, explicitly named so,
    for checking an installation's pipeline before trained weights exist).

    ``options`` go to :class:`Predictor` (``dtype``, ``compile``, ``quantize``, ``cache_size``).

    Returns the predictor and a display name. Raises CheckpointError if ``"default"`` is asked
    for and no trained weights are bundled: random weights are never presented as a model.
    """
    from fastsam3d.errors import CheckpointError
    from fastsam3d.registry import build_model

    if isinstance(model, torch.nn.Module):
        return Predictor(model, device, **options), type(model).__name__
    if str(model) == UNTRAINED:
        torch.manual_seed(0)
        return Predictor(build_model(), device, **options), UNTRAINED_NAME
    if str(model) == "default":
        from fastsam3d.weights import default_checkpoint

        path = default_checkpoint()
        if path is None:
            raise CheckpointError(
                "no trained default weights are bundled with this installation; pass a "
                "checkpoint file (e.g. an official FastSAM3D or SAM-Med3D .pth) with --model PATH"
            )
        return Predictor(build_model(checkpoint=path), device, **options), "default"
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file (use 'default' or a path)")
    if path.is_dir():
        return _onnx_predictor(path, device, options), f"{path.name} (onnxruntime)"
    return Predictor(build_model(checkpoint=path), device, **options), path.name


def _onnx_predictor(folder: Path, device: str, options: dict[str, Any]):
    """The onnxruntime backend for a folder written by ``fastsam3d export-onnx``."""
    from fastsam3d.errors import CheckpointError
    from fastsam3d.export import ENCODER_FILE, OnnxPredictor

    if not (folder / ENCODER_FILE).is_file():
        raise CheckpointError(
            f"{folder} is a folder without {ENCODER_FILE}: give a checkpoint file, or a folder "
            "written by fastsam3d export-onnx"
        )
    if device not in ("auto", "cpu"):
        raise CheckpointError(f"{folder}: the onnxruntime backend runs on the CPU, not {device!r}")
    if options.pop("dtype", "fp32") != "fp32":
        raise CheckpointError(f"{folder}: the onnxruntime backend computes in float32 only")
    unsupported = sorted(set(options) - {"cache_size"})
    if unsupported:
        raise ValueError(f"the onnxruntime backend has no {', '.join(unsupported)} option")
    return OnnxPredictor(folder, **options)
