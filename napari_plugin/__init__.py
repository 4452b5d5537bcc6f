"""napari plugin for FastSAM3D: the interactive widget, a reader and writer that keep the scan's
world geometry, and the bundled sample (npe2 manifest: ``napari.yaml`` at the repository root)."""
