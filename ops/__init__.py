"""Multi-scale deformable attention op (the sampling core of ``MSDeformAttn``)."""
from .core import ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch"]
