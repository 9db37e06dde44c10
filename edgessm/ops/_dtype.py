import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference checks); everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
