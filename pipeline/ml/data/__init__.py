"""Data: everything between files on disk and a training batch.

In-memory sets (``memory``), finding and fingerprinting them (``sources``); image files and shards
(``filelists``, ``datasets``, ``loaders``, opened by ``imagedata``); augmentation recipes (``recipes``);
unlabelled images (``unlabeled``); transfer sets, condensation by distribution matching and its
differentiable augmentation (``transfer_sets``, ``transfer_splits``, ``condense``, ``dsa``).
May import :mod:`kdpipe.ml.runtime`; nothing from :mod:`kdpipe.ml.models` or :mod:`kdpipe.ml.train`
(tests/unit/test_layering.py).
"""
