"""The HTTP server (``fastsam3d serve``): ``app.create_app()``; the nnInteractive-compatible
protocol in ``nninteractive``. Importing this package imports nothing heavy: ``wire`` (numpy
only) is shared with the torch-free client."""
