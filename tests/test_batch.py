"""Library side of batch runs: prompt files, case matching, the case loop, resume, summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _cli_data import tiny_model, write_phantom

from fastsam3d.batch import (
    BoxPrompt,
    CasePrompts,
    PointPrompt,
    check_outputs,
    discover_cases,
    parse_box,
    parse_point,
    plan_batch,
    read_prompts,
    run_batch,
    write_summary,
)
from fastsam3d.errors import OutputExistsError, PromptError, VolumeError
from fastsam3d.io.read import load_volume
from fastsam3d.prompts import PromptEvent, PromptLog

INSIDE = (14, 21, 17)  # a voxel of phantom label 1


def test_parse_point_forms():
    assert parse_point("1,2,3") == PointPrompt((1.0, 2.0, 3.0), True, 1, "voxel")
    assert parse_point("1.5,-2,3:neg:4", "ras") == PointPrompt((1.5, -2.0, 3.0), False, 4, "ras")
    with pytest.raises(PromptError, match="'positive'"):
        parse_point("1,2,3:maybe")
    with pytest.raises(PromptError, match="3 finite numbers"):
        parse_point("1,2")


def test_parse_box_forms():
    assert parse_box("1,2,3,4,5,6") == BoxPrompt((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 1, "voxel")
    assert parse_box("1,2,3,4,5,6:2", "lps") == BoxPrompt((1, 2, 3), (4, 5, 6), 2, "lps")
    for bad in ("1,2,3,4,5", "1,2,3,4,5,6:2:3", "1,2,3,4,5,x"):
        with pytest.raises(PromptError, match="--box"):
            parse_box(bad)


def test_boxes_run_before_the_clicks_and_are_checked_first(tmp_path: Path):
    from fastsam3d.session import Session

    image, _ = write_phantom(tmp_path, "p")
    session = Session(tiny_model(), device="cpu")
    session.set_volume(load_volume(image))
    prompts = CasePrompts(
        points=[PointPrompt(INSIDE)], boxes=[BoxPrompt((8, 12, 10), (20, 30, 24), 2)]
    )
    prompts.apply(session)
    assert [(e.op, e.object_id) for e in session.log.events if e.op in ("box", "point")] == [
        ("box", 2),
        ("point", 1),
    ]
    outside = CasePrompts(
        boxes=[BoxPrompt((8, 12, 10), (20, 30, 99))], points=[PointPrompt(INSIDE)]
    )
    with pytest.raises(PromptError, match=r"box 1 corner \(20, 30, 99 voxel\)"):
        outside.apply(session)


def test_json_prompt_file_forms(tmp_path: Path):
    log = PromptLog(events=[PromptEvent("point", 1, [1.0, 2.0, 3.0], True)])
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "a": [[1, 2, 3], {"point": [4, 5, 6], "positive": False, "object_id": 2, "coords": "lps"}],
        "b": log.to_dict(),
    }))  # fmt: skip
    cases = read_prompts(path)
    assert cases["a"].points == [
        PointPrompt((1.0, 2.0, 3.0)),
        PointPrompt((4.0, 5.0, 6.0), False, 2, "lps"),
    ]
    assert cases["b"].log.events[0].ras == [1.0, 2.0, 3.0]
    # a single prompt log file is the prompts of one volume
    single = tmp_path / "log.json"
    log.save(single)
    assert isinstance(read_prompts(single), CasePrompts)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"a": [{"point": [1, 2, 3], "positive": "perhaps"}]}',
            "case 'a', point 1: field 'positive'",
        ),
        ('{"a": [{"point": [1, 2, 3], "coords": "ijk"}]}', "case 'a', point 1: field 'coords'"),
        ('{"a": [{"pt": [1, 2, 3]}]}', "case 'a', point 1: unknown field 'pt'"),
        ('{"a": [[1, 2]]}', "case 'a', point 1: field 'point'"),
        ('{"a": []}', "case 'a': expected a prompt log or a non-empty list"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_json_prompt_errors_name_case_and_field(tmp_path: Path, content: str, message: str):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_prompts(path)


def test_csv_prompt_file(tmp_path: Path):
    path = tmp_path / "p.csv"
    path.write_text(
        "case,x,y,z,positive,object_id,coords\na,1,2,3,1,1,voxel\na,4,5,6,neg,2,\nb,7,8,9,,,ras\n"
    )
    cases = read_prompts(path)
    assert [p.positive for p in cases["a"].points] == [True, False]
    assert cases["a"].points[1].object_id == 2
    assert cases["b"].points == [PointPrompt((7.0, 8.0, 9.0), True, 1, "ras")]
    path.write_text("case,x,y,z\na,1,oops,3\n")
    with pytest.raises(PromptError, match=r"line 2 \(case 'a'\): field 'y' is not a number"):
        read_prompts(path)
    path.write_text("case,x,y\na,1,2\n")
    with pytest.raises(PromptError, match="missing column 'z'"):
        read_prompts(path)


def test_plan_matches_cases_and_names_missing_one(tmp_path: Path):
    for name in ("a", "b"):
        write_phantom(tmp_path, name)
    assert set(discover_cases(tmp_path)) == {"a", "b", "labels"}  # sub-folders are DICOM cases
    prompts = {"a": CasePrompts(points=[PointPrompt(INSIDE)])}
    plan, unprompted = plan_batch(tmp_path, prompts, tmp_path / "out")
    assert [c.name for c in plan] == ["a"] and plan[0].output == tmp_path / "out" / "a.nii.gz"
    assert set(unprompted) == {"b", "labels"}
    with pytest.raises(PromptError, match="case 'zz' has prompts but no volume"):
        plan_batch(tmp_path, {"zz": prompts["a"]}, tmp_path / "out")
    with pytest.raises(VolumeError, match="not a folder"):
        discover_cases(tmp_path / "a.nii.gz")


def test_point_outside_volume_is_named(tmp_path: Path):
    image, _ = write_phantom(tmp_path, "a")
    volume = load_volume(image)
    prompts = CasePrompts(points=[PointPrompt(INSIDE), PointPrompt((0, 0, 99), False)])
    with pytest.raises(PromptError, match=r"click 2 \(0, 0, 99 voxel\).*outside the volume"):
        prompts.check(volume)


def test_run_batch_failure_resume_and_summary(tmp_path: Path):
    from fastsam3d.session import Session

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b"):
        write_phantom(inp, name)
    (inp / "broken.nii.gz").write_bytes(b"not a volume")
    prompts = {
        "a": CasePrompts(points=[PointPrompt(INSIDE), PointPrompt((5, 5, 5), False)]),
        "broken": CasePrompts(points=[PointPrompt(INSIDE)]),
        "b": CasePrompts(points=[PointPrompt(INSIDE, object_id=3)]),
    }
    out = tmp_path / "out"
    plan, _ = plan_batch(inp, prompts, out)
    session = Session(tiny_model(), device="cpu")
    started = []
    results = list(run_batch(session, plan, on_start=lambda c: started.append(c.name)))
    assert started == ["a", "broken", "b"]
    status = {r.case: r for r in results}
    assert status["a"].status == "ok" and status["b"].status == "ok"
    assert status["broken"].status == "failed" and "broken.nii.gz" in status["broken"].error
    written = load_volume(out / "b.nii.gz")
    assert set(np.unique(written.array)) <= {0, 3}  # object id 3 as asked
    np.testing.assert_allclose(written.affine, load_volume(inp / "b.nii.gz").affine, atol=1e-5)
    csv_path, json_path = write_summary(results, out)
    summary = json.loads(json_path.read_text())
    assert summary["failed"] == 1 and csv_path.read_text().startswith("case,status,objects")
    # existing outputs: refused up front, unless resume (finished cases keep their rows)
    with pytest.raises(OutputExistsError, match="--resume"):
        check_outputs(plan, overwrite=False, resume=False)
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    again = {r.case: r for r in run_batch(session, plan, resume=True)}
    assert again["a"] == status["a"] and again["broken"].status == "failed"
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime


def test_prompt_log_file_replays_a_session(tmp_path: Path):
    """A log saved by an interactive session (napari, Slicer, server) re-runs to the same mask."""
    from fastsam3d.batch import segment_volume
    from fastsam3d.session import Session

    image, _ = write_phantom(tmp_path, "a")
    volume = load_volume(image)
    session = Session(tiny_model(), device="cpu")
    session.set_volume(volume)
    session.add_point(INSIDE)
    session.add_point((5, 5, 5), positive=False)
    expected = session.label_map.copy()
    session.log.save(tmp_path / "log.json")
    prompts = read_prompts(tmp_path / "log.json")
    result = segment_volume(session, volume, prompts, tmp_path / "out" / "a.nii.gz", name="a")
    assert result.status == "ok" and result.voxels == int((expected > 0).sum())
    np.testing.assert_array_equal(load_volume(tmp_path / "out" / "a.nii.gz").array, expected)
