"""The NumPy interpreter of MIL: ``evaluate.py`` runs a program op by op with the kernels of
``kernels/``, one module per family of ops."""
