"""FastSAM3D for 3D Slicer: click-based 3D segmentation, on a fastsam3d server or locally.

Thin Slicer glue (Module / Widget / Logic / Test, the ScriptedLoadableModule pattern). Everything
that is not Slicer-specific lives in ``FastSAM3DLib/logic.py`` and is tested with pytest outside
Slicer; read that module for the IJK (k, j, i) <-> (i, j, k) transposes.

Use: pick the volume and a segmentation, enter the server URL (and token) or tick "Local" (and, on
CPUs with bfloat16 units, "bfloat16 image encoder"), press "Start". Place points with the "+" or
"-" tool in any slice view; each point re-segments the current object, written into its segment
("FastSAM3D 1", "FastSAM3D 2", ...). "Box" draws a markups ROI ("FastSAM3D box": click two opposite
corners in a slice view; its depth through the slice is its shorter side) and sends it as soon as
the second corner is placed, with no "send" button (as SlicerNNInteractive does); dragging its
handles afterwards sends it again. A box replaces the current object's earlier prompts; later
points refine it. "New object" starts the next segment; "Undo" reverts the last prompt (the model's
history, then the segment follows); "Reset object" clears the current one. Writes are also saved in
the Segment Editor's undo stack when the Segment Editor is showing the same segmentation.
"""

from __future__ import annotations

import qt
import slicer
from FastSAM3DLib.logic import (  # Slicer puts the module's folder on sys.path
    FastSAM3DLogicCore,
    local_available,
    local_backend,
    local_bf16_units,
    remote_backend,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

SEGMENT_PREFIX = "FastSAM3D"
BOX_NAME = f"{SEGMENT_PREFIX} box"
CROP_CHOICES = {"model's": None, "1.0 mm": 1.0, "1.5 mm": 1.5}  # the Crop menu: text -> mm


class FastSAM3D(ScriptedLoadableModule):
    def __init__(self, parent):
        super().__init__(parent)
        parent.title = "FastSAM3D"
        parent.categories = ["Segmentation"]
        parent.contributors = ["fastsam3d developers"]
        parent.helpText = (
            "Click-based interactive 3D segmentation (FastSAM3D / SAM-Med3D) on a fastsam3d "
            "server (`fastsam3d serve`) or in Slicer's own Python."
        )
        parent.acknowledgementText = "FastSAM3D and SAM-Med3D authors; 3D Slicer community."


class FastSAM3DWidget(ScriptedLoadableModuleWidget):
    """Connection settings, volume/segmentation selectors, point and box tools, history buttons."""

    def setup(self):
        super().setup()
        self.logic = FastSAM3DLogic()
        form = qt.QFormLayout()
        box = qt.QGroupBox("FastSAM3D")
        box.setLayout(form)
        self.layout.addWidget(box)

        self.urlEdit = qt.QLineEdit("http://127.0.0.1:8765")
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.setEchoMode(qt.QLineEdit.Password)
        self.localCheck = qt.QCheckBox("run in Slicer's Python (needs fastsam3d + torch)")
        self.localCheck.enabled = local_available()
        units = local_bf16_units()
        self.bf16Check = qt.QCheckBox("bfloat16 image encoder")
        self.bf16Check.enabled = bool(units)
        self.bf16Check.toolTip = (
            f"Local only: about 2x faster encoding on this CPU ({', '.join(units)}); masks "
            "Dice >= 0.99 against float32"
            if units
            else "Local only, on CPUs with AMX or AVX512-BF16 (this one has none)"
        )
        self.cropCombo = qt.QComboBox()
        for text in CROP_CHOICES:
            self.cropCombo.addItem(text)
        self.cropCombo.toolTip = (
            "mm per voxel of the 128^3 crops a click opens: the model's (1.0 for the bundled "
            "model, 1.5 for the official ones; on a server, the server's), or 1.5 to show a "
            "large organ more whole after one click. Applied at Start."
        )
        self.volumeSelector = self._selector("vtkMRMLScalarVolumeNode", "Volume to segment")
        self.segmentationSelector = self._selector("vtkMRMLSegmentationNode", "Segmentation")
        self.segmentationSelector.addEnabled = True
        form.addRow("Server URL:", self.urlEdit)
        form.addRow("Token:", self.tokenEdit)
        form.addRow("Local:", self.localCheck)
        form.addRow("Precision:", self.bf16Check)
        form.addRow("Crop:", self.cropCombo)
        form.addRow("Volume:", self.volumeSelector)
        form.addRow("Segmentation:", self.segmentationSelector)

        self.startButton = qt.QPushButton("Start")
        self.positiveButton = qt.QPushButton("+ point")
        self.negativeButton = qt.QPushButton("- point")
        self.boxButton = qt.QPushButton("Box")
        self.boxButton.setToolTip("Click two opposite corners in a slice view; sent when placed")
        self.newObjectButton = qt.QPushButton("New object")
        self.undoButton = qt.QPushButton("Undo")
        self.resetButton = qt.QPushButton("Reset object")
        row = qt.QHBoxLayout()
        for button in (
            self.positiveButton,
            self.negativeButton,
            self.boxButton,
            self.newObjectButton,
            self.undoButton,
            self.resetButton,
        ):
            row.addWidget(button)
        form.addRow(self.startButton)
        form.addRow(row)
        self.statusLabel = qt.QLabel("not started")
        form.addRow(self.statusLabel)
        self.layout.addStretch(1)

        self.startButton.connect("clicked()", self.onStart)
        self.positiveButton.connect("clicked()", lambda: self.placePoint(True))
        self.negativeButton.connect("clicked()", lambda: self.placePoint(False))
        self.boxButton.connect("clicked()", lambda: self.place(self.logic.boxNode()))
        self.newObjectButton.connect("clicked()", lambda: self.run(self.logic.newObject))
        self.undoButton.connect("clicked()", lambda: self.run(self.logic.undo))
        self.resetButton.connect("clicked()", lambda: self.run(self.logic.reset))

    def _selector(self, node_type, tooltip):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = [node_type]
        selector.noneEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setToolTip(tooltip)
        return selector

    def run(self, action, *args):
        """Run a logic call with a wait cursor and show errors in the status line."""
        try:
            with slicer.util.WaitCursor():
                message = action(*args)
            self.statusLabel.text = message or "ok"
        except Exception as err:  # noqa: BLE001 - shown to the user, the widget stays usable
            self.statusLabel.text = f"error: {err}"
            slicer.util.errorDisplay(str(err))

    def onStart(self):
        self.run(
            self.logic.start,
            self.volumeSelector.currentNode(),
            self.segmentationSelector.currentNode(),
            None if self.localCheck.checked else self.urlEdit.text,
            self.tokenEdit.text,
            "bf16" if self.bf16Check.checked else "fp32",
            CROP_CHOICES[self.cropCombo.currentText],
        )

    def placePoint(self, positive):
        """Arm Slicer's point placement on the + or - markups list."""
        self.place(self.logic.pointList(positive))

    def place(self, node):
        """Make ``node`` the active markups node and arm Slicer's Place mode for it."""
        slicer.modules.markups.logic().SetActiveListID(node)  # takes the node, not its ID
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode(interaction.Place)

    def cleanup(self):
        self.logic.stop()


class FastSAM3DLogic(ScriptedLoadableModuleLogic):
    """Slicer side of the logic: nodes in, the Slicer-free core does the rest."""

    def __init__(self):
        super().__init__()
        self.core = None
        self.volumeNode = self.segmentationNode = None
        self.lists = {}
        self.box = self.sentBox = None

    def start(
        self, volumeNode, segmentationNode, url=None, token=None, dtype="fp32", crop_spacing=None
    ):
        """Open a session on ``volumeNode`` (remote at ``url``, or local when url is None; the
        local one in ``dtype``, a server in its own) with crops at ``crop_spacing`` mm (None:
        the model's, or the server's)."""
        if volumeNode is None or segmentationNode is None:
            raise ValueError("choose a volume and a segmentation first")
        self.stop()
        if url is None:
            backend = local_backend(dtype=dtype, crop_spacing=crop_spacing)
        else:
            backend = remote_backend(url, token, crop_spacing=crop_spacing)
        self.core = FastSAM3DLogicCore(backend)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volumeNode))
        self.core.set_volume(slicer.util.arrayFromVolume(volumeNode), ijk_to_ras)
        self.volumeNode, self.segmentationNode = volumeNode, segmentationNode
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return f"session started on {volumeNode.GetName()}"

    def pointList(self, positive):
        """The markups list for + or - points, created and observed on first use."""
        if positive not in self.lists:
            name = f"{SEGMENT_PREFIX} {'+' if positive else '-'}"
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.GetDisplayNode().SetSelectedColor((0.2, 0.9, 0.2) if positive else (0.9, 0.2, 0.2))
            node.AddObserver(
                slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                lambda caller, _event, p=positive: self.onPointPlaced(caller, p),
            )
            self.lists[positive] = node
        return self.lists[positive]

    def onPointPlaced(self, node, positive):
        if self.core is None:
            slicer.util.errorDisplay("press Start first")
            return
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(node.GetNumberOfControlPoints() - 1, ras)
        try:
            with slicer.util.WaitCursor():
                self.writeSegment(self.core.add_point(ras, positive))
        except Exception as err:  # noqa: BLE001 - an observer must not raise into Slicer
            slicer.util.errorDisplay(f"FastSAM3D: {err}")

    def boxNode(self):
        """A fresh ROI for the next box, replacing the previous one (a finished box ROI keeps one
        centre point and takes no new corners), observed for placement and handle drags."""
        if self.box is not None and self.box.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self.box)
        self.box = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", BOX_NAME)
        self.sentBox = None
        for event in (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,  # a corner was placed
            slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,  # a handle drag ended
        ):
            self.box.AddObserver(event, lambda caller, _event: self.onBoxChanged(caller))
        return self.box

    def onBoxChanged(self, roi):
        """Send the ROI as a box once it spans a volume (the first corner alone has size 0), and
        again only when its geometry changed (one edit can raise both observed events)."""
        size = roi.GetSize()
        if min(size) <= 0:
            return
        if self.core is None:
            slicer.util.errorDisplay("press Start first")
            return
        center = [0.0, 0.0, 0.0]
        roi.GetCenterWorld(center)
        # Columns: the ROI's axes in world RAS, scaled by any parent transform, as is Size.
        orientation = slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
        box = (tuple(center), tuple(size), tuple(orientation.ravel()))
        if box == self.sentBox:
            return
        self.sentBox = box
        try:
            with slicer.util.WaitCursor():
                self.writeSegment(self.core.add_box(center, size, orientation))
        except Exception as err:  # noqa: BLE001 - an observer must not raise into Slicer
            slicer.util.errorDisplay(f"FastSAM3D: {err}")

    def newObject(self):
        return f"object {self.core.new_object()}"

    def undo(self):
        if not self.core.undo():
            return "nothing to undo"
        for oid in self.core.objects:
            self.writeSegment(oid)
        return "undone"

    def reset(self):
        oid = self.core.active_object
        self.core.reset(oid)
        self.writeSegment(oid)
        return f"object {oid} reset"

    def writeSegment(self, object_id):
        """Copy one object's mask into its segment (created on first use), after saving the
        segmentation's state in the Segment Editor's undo stack when the editor shows it."""
        self.saveStateForUndo()
        segmentation = self.segmentationNode.GetSegmentation()
        segment_id = f"{SEGMENT_PREFIX}_{object_id}"
        if segmentation.GetSegment(segment_id) is None:
            segmentation.AddEmptySegment(segment_id, f"{SEGMENT_PREFIX} {object_id}")
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            self.core.mask_kji(object_id), self.segmentationNode, segment_id, self.volumeNode
        )

    def saveStateForUndo(self):
        """Let the Segment Editor's own Undo revert our writes too (if it edits this node)."""
        widget = slicer.modules.segmenteditor.widgetRepresentation()
        editor = getattr(widget.self(), "editor", None) if widget else None
        if editor is not None and editor.segmentationNode() is self.segmentationNode:
            editor.saveStateForUndo()

    def stop(self):
        if self.core is not None:
            self.core.close()
            self.core = None


def _ijk_to_ras(volumeNode):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


class FastSAM3DTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the (k, j, i) <-> (i, j, k) handling against a real volume node."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_transpose_round_trip()
        self.test_roi_box_matches_slicer_bounds()

    def test_transpose_round_trip(self):
        import numpy as np
        from FastSAM3DLib.logic import to_slicer, volume_from_slicer

        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        kji = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
        slicer.util.updateVolumeFromArray(node, kji)
        node.SetSpacing(0.5, 0.7, 2.0)
        array_ijk, affine = volume_from_slicer(
            slicer.util.arrayFromVolume(node), slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node))
        )
        assert array_ijk.shape == (6, 5, 4)
        assert array_ijk[5, 0, 0] == kji[0, 0, 5]
        assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.5, 0.7, 2.0])
        assert np.array_equal(to_slicer(array_ijk), kji)
        self.delayDisplay("FastSAM3D transpose round trip passed")

    def test_roi_box_matches_slicer_bounds(self):
        """roi_box fed as onBoxChanged feeds it equals the ROI's own world RAS bounds."""
        import numpy as np
        import vtk
        from FastSAM3DLib.logic import roi_box

        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        objectToNode = vtk.vtkTransform()
        objectToNode.Translate(10.0, -20.0, 30.0)
        objectToNode.RotateZ(30.0)
        roi.GetObjectToNodeMatrix().DeepCopy(objectToNode.GetMatrix())
        roi.SetSize(40.0, 20.0, 10.0)
        center, bounds = [0.0, 0.0, 0.0], [0.0] * 6
        roi.GetCenterWorld(center)
        roi.GetRASBounds(bounds)
        orientation = slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
        big = np.diag([1.0, 1.0, 1.0, 1.0])
        big[:3, 3] = -500.0
        lo, hi = roi_box(center, roi.GetSize(), orientation, big, (1001, 1001, 1001))
        assert np.allclose(lo, bounds[0::2]) and np.allclose(hi, bounds[1::2]), (lo, hi, bounds)
        self.delayDisplay("FastSAM3D ROI box passed")
