"""Build an :class:`~agvm_ds.ops.AnchorGenerator` from an anchor spec and the level strides."""

from agvm_ds.ops import AnchorGenerator


def anchor_generator(spec, strides: list[int]) -> AnchorGenerator:
    """Sizes ``size_per_stride * stride * 2**(i / scales_per_octave)`` per level."""
    n = spec.scales_per_octave
    sizes = [[spec.size_per_stride * s * 2 ** (i / n) for i in range(n)] for s in strides]
    return AnchorGenerator(sizes, spec.aspect_ratios, strides, spec.offset)
