"""Models: building, splitting, loading and checking them.

The architecture zoo and its timm and user-code adapters (``zoo``, ``entrypoints``); body/head splits
(``split``, ``contract_split``); weights and preprocessing sidecars (``weights``, ``preprocessing``);
building, loading and checking teachers (``teacher_build``, ``loading``, ``teacher_checks``) and whether a
model takes the data (``model_fit``). May import :mod:`kdpipe.ml.runtime` and :mod:`kdpipe.ml.data`, never
:mod:`kdpipe.ml.train`.
"""
