import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter. It must
# be chosen before triton decorates any kernel, so before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
    yield


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max(max|ref|, 1e-6), computed in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    y, ref = y.double(), ref.double()
    return float((y - ref).abs().max() / max(float(ref.abs().max()), 1e-6))
