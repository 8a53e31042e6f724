import pytest
import torch

from epmq.grid import (
    dequantize_codes,
    fit_scale_zero,
    group_index,
    pack_codes,
    quantize_codes,
    rtn_quantize,
    unpack_codes,
)


def test_min_max_grid_matches_the_reference_formula():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.5, 1.0, 3.0]])
    scale, zero = fit_scale_zero(w, bits=2, sym=False)
    # row 0: xmin=-1, xmax=2 -> scale 1, zero 1; row 1: xmin clipped to 0 -> scale 1, zero 0
    assert torch.equal(scale, torch.tensor([1.0, 1.0]))
    assert torch.equal(zero, torch.tensor([1.0, 0.0]))
    q = quantize_codes(w, scale[:, None], zero[:, None], 2)
    assert torch.equal(q, torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]]))
    assert torch.equal(dequantize_codes(q, scale[:, None], zero[:, None]), torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.0, 3.0]]))


def test_symmetric_grid_centres_the_zero_point():
    w = torch.tensor([[-3.0, 1.0], [0.0, 0.0]])
    scale, zero = fit_scale_zero(w, bits=4, sym=True)
    assert torch.equal(zero, torch.tensor([8.0, 8.0]))
    assert scale[0] == pytest.approx(6 / 15)
    assert scale[1] == pytest.approx(2 / 15)  # all-zero row uses [-1, 1]


@pytest.mark.parametrize("group_size", [4, 5, -1])
def test_rtn_groups_cover_ragged_last_group(group_size):
    w = torch.randn(6, 13)
    q = rtn_quantize(w, bits=3, group_size=group_size)
    size = 13 if group_size == -1 else group_size
    assert q.scales.shape == (6, -(-13 // size))
    assert torch.equal(q.g_idx, torch.arange(13) // size)
    assert (q.weight - w).abs().max() <= q.scales.max() / 2 + 1e-6


def test_group_index_follows_the_processing_permutation():
    perm = torch.tensor([3, 0, 2, 1])
    assert torch.equal(group_index(4, 2, perm), torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 100])
def test_pack_unpack_round_trip_is_exact(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-n * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_layout_is_little_endian_within_words():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = int(pack_codes(codes, 4)[0, 0]) & 0xFFFFFFFF
    assert word == 0xF7654321


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[4]]), 2)
