"""Batch segmentation on a Dask cluster: ``fastsam3d segment DIR -o OUT --prompts P --dask local``.

Each worker holds one :class:`~fastsam3d.session.Session` (built once by a worker plugin, so the
model is loaded once per worker, not once per case) and runs one case at a time; cases go out as
tasks and results come back as they finish. Workers read their volumes and write their masks
themselves (atomic writes), so the input and output folders must be visible to every worker,
as they are on a ``LocalCluster`` or a cluster with a shared file system.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from fastsam3d.batch import Case, CaseResult, failed_result, resumed_results, segment_volume
from fastsam3d.errors import FastSAM3DError

PLUGIN_NAME = "fastsam3d-session"


class SessionPlugin(WorkerPlugin):
    """Builds the worker's session at start-up; a lock keeps its cases one at a time."""

    name = PLUGIN_NAME

    def __init__(
        self, model: str, device: str, dtype: str = "fp32", crop_spacing: float | None = None
    ):
        self.model, self.device, self.dtype = model, device, dtype
        self.crop_spacing = crop_spacing
        self.session = None
        self.error = ""
        self.lock = threading.Lock()

    def setup(self, worker) -> None:
        from fastsam3d.session import Session

        try:
            self.session = Session(
                model=self.model, device=self.device, dtype=self.dtype,
                crop_spacing=self.crop_spacing,
            )  # fmt: skip
        except FastSAM3DError as err:
            self.error = str(err)

    def __getstate__(self) -> dict:  # the lock and the session never travel
        return {k: getattr(self, k) for k in ("model", "device", "dtype", "crop_spacing")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def segment_on_worker(case: Case, overwrite: bool) -> CaseResult:
    """Dask task: one case on this worker's session; failures come back as a failed row."""
    from fastsam3d.io.read import load_volume

    plugin: SessionPlugin = get_worker().plugins[PLUGIN_NAME]
    t0 = time.perf_counter()
    try:
        if plugin.session is None:
            raise FastSAM3DError(plugin.error or "the worker has no session")
        with plugin.lock:
            volume = load_volume(case.source)
            return segment_volume(
                plugin.session, volume, case.prompts, case.output, overwrite, case.name
            )
    except Exception as err:  # noqa: BLE001 - one broken case must not stop the batch
        return failed_result(case.name, err, time.perf_counter() - t0)


def run_batch_dask(
    plan: list[Case],
    model: str,
    device: str,
    scheduler: str = "local",
    *,
    dtype: str = "fp32",
    crop_spacing: float | None = None,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
) -> Iterator[CaseResult]:
    """Run the cases on Dask, yielding results as they finish (in completion order).

    Args:
        plan: the cases (see :func:`fastsam3d.batch.plan_batch`).
        model: ``"default"`` or a checkpoint path (loaded on every worker).
        device: device on the workers.
        dtype: ``"fp32"`` or ``"bf16"`` (see :class:`~fastsam3d.predictor.Predictor`).
        crop_spacing: the sessions' crop spacing (None: the model's; see
            :class:`~fastsam3d.session.Session`).
        scheduler: ``"local"`` starts a ``LocalCluster`` of ``workers`` workers (one thread each;
            a single worker runs in this process); anything else is a scheduler address.
        overwrite, resume: as :func:`fastsam3d.batch.run_batch`.
    """
    from fastsam3d.predictor import load_predictor

    if model != "default":
        model = str(Path(model).expanduser().absolute())
    load_predictor(model, "cpu", dtype=dtype)  # a bad model fails here, once, not per worker
    todo, done = resumed_results(plan, resume)
    yield from done
    if not todo:
        return
    cluster = None
    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=workers > 1,
            dashboard_address=None,  # no dashboard (nothing needs bokeh)
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        client.register_plugin(SessionPlugin(model, device, dtype, crop_spacing), name=PLUGIN_NAME)
        futures = [client.submit(segment_on_worker, case, overwrite, pure=False) for case in todo]
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
