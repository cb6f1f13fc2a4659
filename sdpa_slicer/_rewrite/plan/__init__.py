"""Planning, pure: a site's geometry and a ``SliceConfig`` become query chunks and the keys each
chunk attends to (``planning.py``), with the keys a constant mask hides pruned (``pruning.py``)."""
