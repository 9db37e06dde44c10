"""Exceptions with messages meant for the user: each says which file/tensor and what was expected."""


class EdgessmError(Exception):
    """Base class of every error edgessm raises on purpose."""


class ConfigError(EdgessmError):
    """A config.json is missing, malformed or describes an unsupported model."""


class CheckpointError(EdgessmError):
    """Weights are missing, unexpected, of the wrong shape, corrupt or unsafe to load."""


class BackendUnavailable(EdgessmError):
    """A runtime backend (TensorRT, CUDA) is not installed or has no device."""


class NumericsError(EdgessmError):
    """NaN/Inf or another numerical failure, named by layer."""


class DataError(EdgessmError):
    """Input text/data for calibration or evaluation is missing, empty or too short."""
