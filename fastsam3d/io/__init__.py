"""Volume I/O with world geometry: :func:`load_volume`, :func:`save_mask`, :func:`save_dicom_seg`.

Heavy readers/writers (MONAI, nibabel, SimpleITK, highdicom) are imported by the functions that
use them, so importing this package stays light.
"""

from fastsam3d.io.read import Volume, list_dicom_series, load_volume
from fastsam3d.io.write import save_dicom_seg, save_mask

__all__ = ["Volume", "list_dicom_series", "load_volume", "save_dicom_seg", "save_mask"]
