"""Runtime: where the work runs. Devices and threads (``device``) and data-parallel processes under torchrun
(``distributed``). The bottom room of :mod:`kdpipe.ml`: imports none of the others.
"""
