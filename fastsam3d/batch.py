"""Batch segmentation: prompt files, case discovery, the case loop and its summary.

A batch is a folder of volumes (one file per case, or one DICOM folder per case) and a prompts
file saying where to click in each case. Prompt files come in two formats:

* **JSON**: an object mapping case name -> prompts, where the prompts of a case are either a
  session prompt log (what napari, Slicer and the server autosave: ``{"events": [...]}``, points in
  RAS mm) or a list of points, each ``[x, y, z]`` (a positive voxel click on object 1) or
  ``{"point": [x, y, z], "positive": true, "object_id": 1, "coords": "voxel"}``.
  A file holding a single prompt log (``{"events": [...]}``) is the prompts of one volume.
* **CSV**: columns ``case,x,y,z`` and optionally ``positive`` (1/0, true/false, pos/neg; default
  positive), ``object_id`` (default 1) and ``coords`` (voxel, ras or lps; default voxel). Rows
  are the clicks in order.

A case's name is its file name without the volume extension (``liver_003.nii.gz`` ->
``liver_003``) or its DICOM folder's name. Points of a case are clicked in the order given, as
successive clicks of one :class:`~fastsam3d.session.Session`, so a batch run reproduces an
interactive one. Every output is written atomically, so an interrupted batch leaves only
finished cases, and ``resume`` skips them.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastsam3d import geometry
from fastsam3d.atomic import write_csv, write_text
from fastsam3d.errors import FastSAM3DError, PromptError, VolumeError
from fastsam3d.geometry import COORDS
from fastsam3d.prompts import PromptLog

if TYPE_CHECKING:
    from fastsam3d.io.read import Volume
    from fastsam3d.session import Session

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SUMMARY_FIELDS = ("case", "status", "objects", "voxels", "volume_ml", "seconds", "error", "output")
_TRUE = {"1", "true", "yes", "pos", "positive", "+"}
_FALSE = {"0", "false", "no", "neg", "negative", "-"}


# --------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PointPrompt:
    """One click: a position in ``coords`` (voxel index or RAS/LPS mm), its label, its object."""

    xyz: tuple[float, float, float]
    positive: bool = True
    object_id: int = 1
    coords: str = "voxel"


@dataclass(frozen=True)
class BoxPrompt:
    """A 3D box around an object: opposite corners in ``coords``, its object."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    object_id: int = 1
    coords: str = "voxel"


@dataclass
class CasePrompts:
    """The prompts of one case: a prompt log to replay, then boxes (each an object's first
    prompt), then points clicked in order."""

    log: PromptLog | None = None
    points: list[PointPrompt] = field(default_factory=list)
    boxes: list[BoxPrompt] = field(default_factory=list)

    def check(self, volume: Volume) -> None:
        """Raise PromptError naming the first point or box corner outside ``volume`` (before
        any prompt runs, so a bad one costs no model time and leaves nothing half-done)."""
        corners = [
            (f"box {n} corner", c, b.coords)
            for n, b in enumerate(self.boxes, 1)
            for c in (b.lo, b.hi)
        ]
        clicks = [(f"click {n}", p.xyz, p.coords) for n, p in enumerate(self.points, 1)]
        for what, xyz, coords in corners + clicks:
            vox = geometry.to_voxel(np.asarray(xyz, dtype=np.float64), coords, volume.affine)[0]
            geometry.check_inside(vox, volume.array.shape, what=f"{what} ({_fmt(xyz)} {coords})")

    def apply(self, session: Session) -> None:
        """Run the prompts on the session's current volume; errors name the box or click."""
        self.check(session.volume)
        if self.log is not None:
            session.replay(self.log)
        numbered = [(f"box {n} of {len(self.boxes)} (", b) for n, b in enumerate(self.boxes, 1)]
        numbered += [
            (f"click {n} of {len(self.points)} ({_fmt(p.xyz)} {p.coords}, ", p)
            for n, p in enumerate(self.points, 1)
        ]
        for what, prompt in numbered:
            try:
                if prompt.object_id not in session.objects:
                    session.new_object(prompt.object_id)
                if isinstance(prompt, BoxPrompt):
                    session.add_box(prompt.lo, prompt.hi, prompt.object_id, prompt.coords)
                else:
                    session.add_point(prompt.xyz, prompt.positive, prompt.object_id, prompt.coords)
            except FastSAM3DError as err:
                raise PromptError(f"{what}object {prompt.object_id}): {err}") from None


def _fmt(xyz: tuple[float, float, float]) -> str:
    return ", ".join(f"{v:g}" for v in xyz)


def parse_bool(value: Any, where: str) -> bool:
    """A click label from JSON/CSV/CLI text: 1/0, true/false, yes/no, pos/neg."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise PromptError(
        f"{where}: field 'positive' must be true/false (or 1/0, pos/neg), got {value!r}"
    )


def _object_id(value: Any, where: str) -> int:
    try:
        oid = int(str(value).strip())
    except ValueError:
        raise PromptError(f"{where}: field 'object_id' must be an integer, got {value!r}") from None
    if not 0 < oid < 65536:
        raise PromptError(f"{where}: field 'object_id' must be in 1..65535, got {oid}")
    return oid


def _coords(value: Any, where: str) -> str:
    text = str(value).strip().lower()
    if text not in COORDS:
        raise PromptError(
            f"{where}: field 'coords' must be one of {', '.join(COORDS)}, got {value!r}"
        )
    return text


def _xyz(values: Any, where: str, name: str = "point") -> tuple[float, float, float]:
    try:
        xyz = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise PromptError(f"{where}: field {name!r} must be 3 numbers, got {values!r}") from None
    if len(xyz) != 3 or not all(np.isfinite(xyz)):
        raise PromptError(f"{where}: field {name!r} must be 3 finite numbers, got {values!r}")
    return xyz  # type: ignore[return-value]


def parse_point(text: str, coords: str = "voxel") -> PointPrompt:
    """A command-line point ``X,Y,Z[:pos|:neg][:OBJECT_ID]``, e.g. ``60,48,55:neg:2``."""
    where = f"--point {text!r}"
    head, *tags = text.split(":")
    positive, object_id = True, 1
    for tag in tags:
        if tag.strip().isdigit():
            object_id = _object_id(tag, where)
        else:
            positive = parse_bool(tag, where)
    return PointPrompt(_xyz(head.split(","), where), positive, object_id, _coords(coords, where))


def parse_box(text: str, coords: str = "voxel") -> BoxPrompt:
    """A command-line box ``X0,Y0,Z0,X1,Y1,Z1[:OBJECT_ID]`` (opposite corners), e.g.
    ``40,30,60,90,80,110:2``."""
    where = f"--box {text!r}"
    head, *tags = text.split(":")
    values = head.split(",")
    if len(values) != 6 or len(tags) > 1:
        raise PromptError(f"{where}: expected X0,Y0,Z0,X1,Y1,Z1[:OBJECT_ID]")
    object_id = _object_id(tags[0], where) if tags else 1
    lo, hi = _xyz(values[:3], where, "box"), _xyz(values[3:], where, "box")
    return BoxPrompt(lo, hi, object_id, _coords(coords, where))


def _point_from_json(item: Any, where: str, coords: str) -> PointPrompt:
    if isinstance(item, dict):
        unknown = set(item) - {"point", "positive", "object_id", "coords"}
        if unknown:
            raise PromptError(f"{where}: unknown field {min(unknown)!r}")
        if "point" not in item:
            raise PromptError(f"{where}: missing field 'point' ([x, y, z])")
        return PointPrompt(
            _xyz(item["point"], where),
            parse_bool(item.get("positive", True), where),
            _object_id(item.get("object_id", 1), where),
            _coords(item.get("coords", coords), where),
        )
    return PointPrompt(_xyz(item, where), True, 1, coords)


def case_prompts_from_json(value: Any, where: str, coords: str = "voxel") -> CasePrompts:
    """One case's prompts from JSON: a prompt log or a list of points (see the module doc)."""
    if isinstance(value, dict):
        return CasePrompts(log=PromptLog.from_dict(value, where=where))
    if not isinstance(value, list) or not value:
        raise PromptError(f"{where}: expected a prompt log or a non-empty list of points")
    return CasePrompts(
        points=[
            _point_from_json(item, f"{where}, point {n}", coords) for n, item in enumerate(value, 1)
        ]
    )


def read_prompts(path: str | Path, coords: str = "voxel") -> CasePrompts | dict[str, CasePrompts]:
    """Read a prompts file: a single prompt log gives one :class:`CasePrompts`, a cases file
    (JSON mapping or CSV) gives ``{case name: CasePrompts}``.

    Args:
        path: ``.json`` or ``.csv`` file.
        coords: coordinate system of points that do not name one.

    Raises:
        PromptError: naming the file, the case and the field that is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PromptError(f"{path}: cannot read prompts file: {err.strerror or err}") from None
    if path.suffix.lower() == ".csv":
        return _read_csv(path, text, coords)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if isinstance(data, dict) and "events" in data:
        return CasePrompts(log=PromptLog.from_dict(data, where=str(path)))
    if not isinstance(data, dict) or not data:
        raise PromptError(
            f"{path}: expected a prompt log or an object mapping case name -> prompts"
        )
    return {
        str(name): case_prompts_from_json(value, f"{path}: case {name!r}", coords)
        for name, value in data.items()
    }


def _read_csv(path: Path, text: str, coords: str) -> dict[str, CasePrompts]:
    rows = csv.DictReader(text.splitlines())
    header = [h.strip() for h in rows.fieldnames or []]
    missing = [c for c in ("case", "x", "y", "z") if c not in header]
    if missing:
        raise PromptError(
            f"{path}: missing column {missing[0]!r} "
            "(columns: case,x,y,z[,positive,object_id,coords])"
        )
    cases: dict[str, CasePrompts] = {}
    for line, row in enumerate(rows, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        name = row["case"]
        where = f"{path}, line {line} (case {name!r})"
        if not name:
            raise PromptError(f"{path}, line {line}: field 'case' is empty")
        xyz = []
        for c in "xyz":
            try:
                xyz.append(float(row[c]))
            except ValueError:
                raise PromptError(f"{where}: field {c!r} is not a number: {row[c]!r}") from None
        point = PointPrompt(
            _xyz(xyz, where, "x,y,z"),
            parse_bool(row.get("positive") or True, where),
            _object_id(row.get("object_id") or 1, where),
            _coords(row.get("coords") or coords, where),
        )
        cases.setdefault(name, CasePrompts()).points.append(point)
    if not cases:
        raise PromptError(f"{path}: no prompt rows")
    return cases


# --------------------------------------------------------------------------- cases
def case_name(path: Path) -> str:
    """``liver_003.nii.gz`` -> ``liver_003``; a DICOM folder -> its name."""
    lower = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def discover_cases(input_dir: str | Path) -> dict[str, Path]:
    """Volumes in a folder: files with a volume extension and sub-folders (DICOM series).

    Hidden entries are ignored. Raises VolumeError when two entries give the same case name.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise VolumeError(f"{input_dir}: not a folder")
    cases: dict[str, Path] = {}
    for entry in sorted(input_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or entry.name.lower().endswith(VOLUME_SUFFIXES):
            name = case_name(entry)
            if name in cases:
                raise VolumeError(
                    f"{input_dir}: case {name!r} is both {cases[name].name} and {entry.name}"
                )
            cases[name] = entry
    return cases


@dataclass(frozen=True)
class Case:
    """One planned case: where its volume is, its prompts, where its mask goes."""

    name: str
    source: Path
    prompts: CasePrompts
    output: Path


def plan_batch(
    input_dir: str | Path,
    prompts: dict[str, CasePrompts],
    output_dir: str | Path,
    suffix: str = ".nii.gz",
    prompts_file: str | Path = "prompts file",
) -> tuple[list[Case], list[str]]:
    """Match a prompts file to the cases of a folder.

    Returns the planned cases (in the prompts file's order) and the names of the folder's cases
    that have no prompts (not run). Raises PromptError naming a prompted case that has no
    volume in the folder.
    """
    found = discover_cases(input_dir)
    for name in prompts:
        if name not in found:
            known = ", ".join(list(found)[:8]) + (", ..." if len(found) > 8 else "")
            raise PromptError(
                f"{prompts_file}: case {name!r} has prompts but no volume in {input_dir} "
                f"(cases found: {known or 'none'})"
            )
    out = Path(output_dir)
    plan = [Case(name, found[name], p, out / f"{name}{suffix}") for name, p in prompts.items()]
    return plan, [name for name in found if name not in prompts]


# --------------------------------------------------------------------------- running
@dataclass
class CaseResult:
    """One row of the batch summary."""

    case: str
    status: str  # "ok", "failed", "skipped" (finished in an earlier run), "not run"
    objects: int = 0
    voxels: int = 0
    volume_ml: float = 0.0
    seconds: float = 0.0
    error: str = ""
    output: str = ""


def mask_stats(label_map: np.ndarray, affine: np.ndarray) -> tuple[int, int, float]:
    """(objects, voxels, volume in ml) of a label map on a grid with ``affine``."""
    labelled = label_map != 0
    objects = len(np.unique(label_map[labelled]))
    voxels = int(labelled.sum())
    return objects, voxels, voxels * float(np.prod(geometry.spacing(affine))) / 1000.0


def write_output(label_map: np.ndarray, volume: Volume, path: Path, overwrite: bool) -> Path:
    """Write a label map in the volume's geometry: DICOM-SEG for ``.dcm`` (DICOM inputs only),
    otherwise the format of the extension. Atomic; refuses to overwrite unless asked."""
    if path.suffix.lower() == ".dcm":
        from fastsam3d.io.write import save_dicom_seg

        return save_dicom_seg(label_map, volume, path, overwrite=overwrite)
    from fastsam3d.io.write import save_mask

    return save_mask(label_map, volume, path, overwrite=overwrite)


def segment_volume(
    session: Session,
    volume: Volume,
    prompts: CasePrompts,
    output: Path,
    overwrite: bool = False,
    name: str = "",
) -> CaseResult:
    """Segment one volume with its prompts and write the label map (named ``name`` in the
    result), creating the output's folder; raises FastSAM3DError."""
    t0 = time.perf_counter()
    session.set_volume(volume)
    prompts.apply(session)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = write_output(session.label_map, volume, output, overwrite)
    objects, voxels, ml = mask_stats(session.label_map, volume.affine)
    return CaseResult(
        name, "ok", objects, voxels, round(ml, 3), round(time.perf_counter() - t0, 3), "", str(path)
    )


def previous_results(output_dir: Path) -> dict[str, CaseResult]:
    """Rows of an earlier run's ``summary.json`` (empty if none or unreadable)."""
    try:
        rows = json.loads((output_dir / "summary.json").read_text())["cases"]
        names = {f.name for f in fields(CaseResult)}
        return {r["case"]: CaseResult(**{k: v for k, v in r.items() if k in names}) for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_outputs(plan: list[Case], overwrite: bool, resume: bool) -> None:
    """Refuse up front (nothing written) when outputs exist and neither flag allows it."""
    if overwrite or resume:
        return
    existing = [c.output for c in plan if c.output.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        from fastsam3d.errors import OutputExistsError

        raise OutputExistsError(
            f"{existing[0]} already exists{more}; pass --overwrite to replace or --resume "
            "to skip finished cases"
        )


def failed_result(case: str, err: Exception, seconds: float) -> CaseResult:
    """The summary row of a case that raised: the user's message, or the unexpected error."""
    message = (
        str(err) if isinstance(err, FastSAM3DError) else f"unexpected {type(err).__name__}: {err}"
    )
    return CaseResult(case, "failed", seconds=round(seconds, 3), error=message)


def resumed_results(plan: list[Case], resume: bool) -> tuple[list[Case], list[CaseResult]]:
    """Split the plan into cases to run and rows for cases finished earlier (``resume``: the
    output exists; the earlier summary row is kept when there is one)."""
    if not resume or not plan:
        return list(plan), []
    previous = previous_results(plan[0].output.parent)
    todo, done = [], []
    for case in plan:
        if case.output.exists():
            old = previous.get(case.name)
            ok = old is not None and old.status == "ok"
            done.append(old if ok else CaseResult(case.name, "skipped", output=str(case.output)))
        else:
            todo.append(case)
    return todo, done


def run_batch(
    session: Session,
    plan: list[Case],
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_start: Callable[[Case], None] | None = None,
) -> Iterator[CaseResult]:
    """Run the cases one by one, yielding a result per case (failures too: never raises for a
    case). The next case's volume is read in a background thread while the current one runs."""
    from fastsam3d.io.read import load_volume

    todo, done = resumed_results(plan, resume)
    yield from done
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsam3d-read") as reader:
        pending: Future | None = reader.submit(load_volume, todo[0].source) if todo else None
        for n, case in enumerate(todo):
            current = pending
            pending = reader.submit(load_volume, todo[n + 1].source) if n + 1 < len(todo) else None
            if on_start is not None:
                on_start(case)
            t0 = time.perf_counter()
            try:
                volume = current.result()
                result = segment_volume(
                    session, volume, case.prompts, case.output, overwrite, case.name
                )
            except Exception as err:  # noqa: BLE001 - one broken case must not stop the batch
                result = failed_result(case.name, err, time.perf_counter() - t0)
            yield result


def write_summary(results: list[CaseResult], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.json`` into ``output_dir`` (atomically, replacing
    an earlier summary: the summary always describes the folder as it is now)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    csv_path, json_path = out / "summary.csv", out / "summary.json"
    write_csv(csv_path, rows, SUMMARY_FIELDS)
    ok = sum(r.status in ("ok", "skipped") for r in results)
    payload = {"cases": rows, "ok": ok, "failed": len(results) - ok}
    write_text(json_path, json.dumps(payload, indent=1))
    return csv_path, json_path
