"""Training: the epoch loop with resumable checkpoints (``training``) and the data-free generator (``datafree``).
The top room of :mod:`kdpipe.ml`: may import :mod:`kdpipe.ml.runtime`, :mod:`kdpipe.ml.data` and
:mod:`kdpipe.ml.models`.
"""
