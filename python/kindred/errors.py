"""The KindredError family: every error kindred raises on purpose is one of these."""


class KindredError(Exception):
    """Base of all kindred errors."""


class KindredValueError(KindredError, ValueError):
    """Bad input: a wrong shape, dtype, device, value, setting or malformed file (the message names it)."""


class KindredFormatError(KindredValueError):
    """A malformed or truncated file or quantization state (the message names the file/tensor and offset)."""
