"""Multi-scale deformable attention op (the sampling core of ``MSDeformAttn``)."""
from .core import BACKEND_ENV, ms_deform_attn, ms_deform_attn_pytorch, sampling_backend

__all__ = ["BACKEND_ENV", "ms_deform_attn", "ms_deform_attn_pytorch", "sampling_backend"]
