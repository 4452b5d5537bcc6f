# ruff: noqa: N999 - Slicer names a scripted module's library <Module>Lib
"""Slicer-free parts of the FastSAM3D Slicer module (testable with pytest)."""
