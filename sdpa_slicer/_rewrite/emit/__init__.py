"""Emitting, the only part of the rewrite that changes a program, in four layers, each using only
those below it: ``site.py`` lays out the chunked form of each site of a block, ``chunks.py``
builds the attention of each chunk over its keys, ``ops.py`` adds, caches and rolls back ops,
and ``transaction.py`` swaps them in for the site's ops, all or nothing. ``masks.py`` turns a
mask into values to add to the scores. ``static_slices.py``, run before anything is matched,
gives slices with a run-time start and a static length their length."""
