"""``python -m fastsam3d``: the same command line as the ``fastsam3d`` console script."""

from fastsam3d.cli import main

main()
