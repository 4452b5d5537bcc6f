"""The 45 reported labels of ts_abdomen_ct (``report_labels.txt``), read once for the
evaluation scripts beside this file."""

from pathlib import Path

REPORT_LABELS = [
    int(v) for v in (Path(__file__).parent / "report_labels.txt").read_text().split(",")
]
