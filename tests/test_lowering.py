"""The weight algebra on its own: exhaustive over small shapes, checked against a direct convolution."""

import itertools

import numpy as np
import pytest

from gconv_rewrite.channelmap import ChannelMap
from gconv_rewrite.lowering import NotFusable, expand_weights, fuse_weights, solve_grouping


def grouped_conv1d(x, w, b, group):
    """Reference grouped 1-D conv (valid padding) in float64: x [C_in, L], w [C_out, Cig, k]."""
    c_out, cig, k = w.shape
    cog = c_out // group
    out = np.zeros((c_out, x.shape[1] - k + 1))
    for o in range(c_out):
        g = o // cog
        for i in range(cig):
            for t in range(k):
                out[o] += w[o, i, t] * x[g * cig + i, t:t + out.shape[1]]
        if b is not None:
            out[o] += b[o]
    return out


def emulation_map(group, cig, cog):
    """Channel map of the standard emulation: output g*Cog+m sums depthwise channels (g*Cig+i)*Cog+m."""
    terms = np.array([[(g * cig + i) * cog + m for i in range(cig)] for g in range(group) for m in range(cog)])
    return ChannelMap(terms, None, "NC")


SHAPES = [(g, cig, cog, k) for g, cig, cog, k in itertools.product([2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 3])
          if cig > 1 or cog > 1]


@pytest.mark.parametrize("group,cig,cog,k", SHAPES)
def test_expand_computes_the_grouped_conv(group, cig, cog, k):
    rng = np.random.default_rng(group * 100 + cig * 10 + cog)
    w = rng.standard_normal((group * cog, cig, k))
    b = rng.standard_normal(group * cog)
    x = rng.standard_normal((group * cig, 9))
    dw, dwb = expand_weights(w, b, group)
    assert dw.shape == (group * cig * cog, 1, k)
    # Depthwise conv with multiplier Cog, then the emulation's channel sums.
    y = np.stack([np.convolve(x[j // cog], dw[j, 0][::-1], mode="valid") + dwb[j] for j in range(dw.shape[0])])
    summed = y.reshape(group, cig, cog, -1).sum(axis=1).reshape(group * cog, -1)
    np.testing.assert_allclose(summed, grouped_conv1d(x, w, b, group), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group,cig,cog,k", SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fuse_inverts_expand_bit_for_bit(group, cig, cog, k, dtype):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((group * cog, cig, k)).astype(dtype)
    b = rng.standard_normal(group * cog).astype(dtype)
    dw, dwb = expand_weights(w, b, group)
    cmap = emulation_map(group, cig, cog)
    grouping = solve_grouping(cmap, cog, group * cig)
    assert (grouping.group, grouping.in_perm, grouping.out_order) == (group, None, None)
    w2, b2 = fuse_weights(grouping, cmap, dw, dwb, cog)
    assert w2.dtype == dtype and w2.tobytes() == w.tobytes()
    assert b2.tobytes() == b.tobytes()


def test_grouping_finds_permutations_and_applies_them():
    group, cig, cog = 3, 2, 2
    c_in = group * cig
    rng = np.random.default_rng(1)
    in_perm = rng.permutation(c_in)
    out_perm = rng.permutation(group * cog)
    w = rng.standard_normal((group * cog, cig, 3))
    # Output o_perm[q] reads input channels in_perm[g*cig + i]: a grouped conv up to permutations.
    terms = np.zeros((group * cog, cig), dtype=np.int64)
    dw = np.zeros((c_in * cog, 1, 3))
    for q in range(group * cog):
        g, m = divmod(q, cog)
        for i in range(cig):
            c = in_perm[g * cig + i]
            j = c * cog + m
            terms[out_perm[q], i] = j
            dw[j, 0] = w[q, i]
    cmap = ChannelMap(terms, None, "NC")
    grouping = solve_grouping(cmap, cog, c_in)
    assert grouping.group == group and grouping.in_perm is not None
    fused, _ = fuse_weights(grouping, cmap, dw, None, cog)
    x = rng.standard_normal((c_in, 8))
    got = grouped_conv1d(x[grouping.in_perm], fused, None, group)
    order = grouping.out_order if grouping.out_order is not None else np.arange(group * cog)
    want = np.zeros_like(got)
    want[order] = got  # fused output q is the map's output out_order[q]
    ref = grouped_conv1d(x[in_perm], w, None, group)
    expect = np.zeros_like(ref)
    expect[out_perm] = ref
    np.testing.assert_allclose(want, expect, atol=1e-12)


def test_sum_over_multiplier_is_a_depthwise_conv_with_summed_kernels():
    group, cig, cog = 2, 3, 4
    terms = np.array([[(g * cig + i) * cog + m for m in range(cog)] for g in range(group) for i in range(cig)])
    grouping = solve_grouping(ChannelMap(terms, None, "NC"), cog, group * cig)
    assert grouping.is_depthwise and grouping.max_terms == cog
    assert "NOT a grouped conv" in grouping.describe()


def test_sum_over_everything_is_refused_as_dense():
    terms = np.arange(8).reshape(1, 8).repeat(2, axis=0)
    with pytest.raises(NotFusable, match="dense"):
        solve_grouping(ChannelMap(terms, None, "NC"), 2, 4)


def test_unequal_groups_are_refused():
    # input channels {0} -> out 0, {1, 2} -> out 1: no equal-size grouping exists
    terms = np.array([[0, -1], [1, 2]])
    with pytest.raises(NotFusable, match="unequal"):
        solve_grouping(ChannelMap(terms, None, "NC"), 1, 3)
