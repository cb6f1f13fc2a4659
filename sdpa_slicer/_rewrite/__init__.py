"""The rewrite, one pipeline whose steps are modules: ``walk.py`` (every block) -> ``find.py``
(the sites of a block: ``patterns/``, then ``folds/``) -> ``plan/`` (chunks, pure) -> ``emit/``
(the chunked subgraph, swapped in) -> ``report.py``; ``pipeline.py`` runs them, and
``coreml_pass.py`` makes it a coremltools graph pass. ``config.py`` holds ``SliceConfig``."""
