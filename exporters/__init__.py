"""Exporters: ONNX export, parity, and the deployment variants (``VARIANTS``).

Importing the package imports every module that registers a variant, so the registry is complete wherever it is
read (the config test keeps it equal to ``kdpipe.config.Variant``).
"""

from kdpipe.exporters import sensitivity, variants  # noqa: F401 - sensitivity registers int8_fallback
