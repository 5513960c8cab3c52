"""Operations of the CSSFE head. ``reference`` holds the plain-PyTorch definitions that any fused
kernel must match."""
from cssfe.ops.reference import class_attention, progressive_enhance, semantic_affinity

__all__ = ["class_attention", "progressive_enhance", "semantic_affinity"]
