"""The ``.mlpackage`` reader and writer: ``package.py`` loads and saves packages, ``weights.py``
reads a program's values from its weight files lazily and writes only new ones, ``blobs.py``
reads the weight file format."""
