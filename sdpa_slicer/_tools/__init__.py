"""What is built on the library for people: the ``sdpa-slicer`` command (``cli.py``), the memory
picture (``plot.py``), progress bars (``progress.py``) and the built-in example layers
(``demo.py``)."""
