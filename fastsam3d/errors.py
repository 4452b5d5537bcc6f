"""Exceptions with messages meant for the user (CLI, napari, server all show them as they are)."""


class FastSAM3DError(Exception):
    """Base class: a problem the user can fix; the message names the file/point/object."""


class VolumeError(FastSAM3DError):
    """A volume could not be read or is not a usable 3D image."""


class CheckpointError(FastSAM3DError):
    """A checkpoint file is unreadable, unsafe, or does not match the architecture."""


class PromptError(FastSAM3DError):
    """A click, box or prompt file is invalid (outside the volume, unknown object, bad field)."""


class OutputExistsError(FastSAM3DError):
    """Refusing to overwrite an existing output without ``overwrite=True``."""


class DownloadError(FastSAM3DError):
    """A checkpoint could not be fetched, is not in the cache, or failed its checksum."""
