"""The b-bit uniform weight grid: per-row groups of columns, quantize / dequantize, bit packing.

Follows the reference GPTQ quantizer (IST-DASLab/gptq ``quant.py``; the GPTQ of the paper's eq. 2, Frantar et al. 2023): for each
row of a group, ``xmin = min(row, 0)``, ``xmax = max(row, 0)``, ``scale = (xmax - xmin) / maxq``,
``zero = round(-xmin / scale)``; an all-zero range uses ``[-1, 1]``. Symmetric grids use
``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` (where xmin < 0) and ``zero = (maxq + 1) / 2``.
A value ``x`` maps to the code ``q = clamp(round(x / scale) + zero, 0, maxq)`` and back to
``scale * (q - zero)``.

Groups are ``group_size`` consecutive columns (in the solver's column order); the last group of a
row may be shorter when ``group_size`` does not divide ``d_in``; ``group_size = -1`` is one group per
row. Which group each column belongs to is recorded in ``g_idx`` (as in GPTQ checkpoints), so
act-order's permuted groups are represented exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def max_code(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return 2**bits - 1


def fit_scale_zero(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of the min-max grid for the columns in ``w`` (d_out x n).

    Returns float tensors of shape (d_out,); ``zero`` holds integers.
    """
    maxq = max_code(bits)
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def fit_scale_zero_true_range(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's grid (mit-han-lab/llm-awq ``quantizer.py``, ``pseudo_quantize_tensor``): the row's true
    min and max, not widened to include 0.

    Asymmetric: ``scale = max(xmax - xmin, 1e-5) / maxq``, ``zero = clamp(round(-xmin / scale), 0, maxq)``.
    Symmetric: ``scale = max(absmax, 1e-5) / (2^(bits-1) - 1)`` with signed codes in
    ``[-2^(bits-1), 2^(bits-1) - 1]``, stored shifted by ``zero = 2^(bits-1)``.
    """
    maxq = max_code(bits)
    if sym:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(dim=1).clamp(min=1e-5) / (half - 1)
        return scale, torch.full_like(scale, half)
    xmin, xmax = w.amin(dim=1), w.amax(dim=1)
    scale = (xmax - xmin).clamp(min=1e-5) / maxq
    return scale, torch.round(-xmin / scale).clamp(0, maxq)


#: the grids a quantizer can fit: GPTQ's (range widened to include 0) or AWQ's (true min/max)
GRID_FITS = {"zero_inclusive": fit_scale_zero, "true_range": fit_scale_zero_true_range}


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] (same dtype as ``x``); ``scale``/``zero`` broadcast against ``x``."""
    return torch.clamp(torch.round(x / scale) + zero, 0, max_code(bits))


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)``: the one formula every path uses, so round trips are bit-exact."""
    return scale * (q - zero)


def group_index(d_in: int, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Group of each input column: consecutive groups in the (possibly permuted) processing order."""
    size = d_in if group_size == -1 else group_size
    if size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    order_group = torch.arange(d_in) // size
    if perm is None:
        return order_group
    g_idx = torch.empty(d_in, dtype=torch.long)
    g_idx[perm] = order_group
    return g_idx


@dataclass
class QuantizedWeight:
    """A weight on the grid: ``weight[r, c] == scales[r, g_idx[c]] * (codes[r, c] - zeros[r, g_idx[c]])``."""

    codes: torch.Tensor  # (d_out, d_in) uint8
    scales: torch.Tensor  # (d_out, n_groups) float32
    zeros: torch.Tensor  # (d_out, n_groups) uint8
    g_idx: torch.Tensor  # (d_in,) int64
    bits: int
    group_size: int
    sym: bool

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight."""
        columns = self.g_idx.to(self.codes.device)
        return dequantize_codes(
            self.codes.float(), self.scales[:, columns], self.zeros[:, columns].float()
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to(self, device) -> QuantizedWeight:
        """The same weight with every tensor on ``device``."""
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device),
                               self.g_idx.to(device), self.bits, self.group_size, self.sym)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = False, grid: str = "zero_inclusive"
) -> QuantizedWeight:
    """Round-to-nearest on the min-max grid of each row group: no calibration data.

    ``grid`` names the scale/zero fit (:data:`GRID_FITS`): GPTQ's by default, ``true_range`` for AWQ.
    """
    fit = GRID_FITS[grid]
    w = weight.detach().float()
    d_out, d_in = w.shape
    g_idx = group_index(d_in, group_size)
    n_groups = int(g_idx[-1]) + 1
    size = d_in if group_size == -1 else group_size
    codes = torch.empty_like(w)
    scales = torch.empty(d_out, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for group in range(n_groups):
        cols = slice(group * size, min((group + 1) * size, d_in))
        scale, zero = fit(w[:, cols], bits, sym)
        codes[:, cols] = quantize_codes(w[:, cols], scale[:, None], zero[:, None], bits)
        scales[:, group], zeros[:, group] = scale, zero
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, bits, group_size, sym)


# ----------------------------------------------------------------------------------- bit packing

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows x n) into int32 words, ``bits`` per code, little-endian bit order.

    Codes are laid out as one bit stream per row, so any ``bits`` in 1..8 packs densely
    (3-bit codes straddle words). For bits dividing 32 this is the layout of compressed-tensors'
    ``pack_to_int32`` (code j of a word in bits [j*bits, (j+1)*bits)).
    """
    max_code(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    words = math.ceil(n * bits / 32)
    c = codes.to(torch.int64).cpu()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > max_code(bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((c[:, :, None] >> shifts) & 1).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits)).reshape(rows, words, 32)
    packed = (stream << torch.arange(32, dtype=torch.int64)).sum(dim=2)
    # Reinterpret the unsigned 32-bit words as int32 (two's complement).
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (rows x words) int32 -> (rows x n) uint8 codes."""
    max_code(bits)
    rows, words = packed.shape
    if words != math.ceil(n * bits / 32):
        raise ValueError(f"{words} packed words cannot hold {n} codes of {bits} bits")
    unsigned = packed.cpu().to(torch.int64) & 0xFFFFFFFF
    stream = ((unsigned[:, :, None] >> torch.arange(32, dtype=torch.int64)) & 1).reshape(rows, words * 32)
    stream = stream[:, : n * bits].reshape(rows, n, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(dim=2).to(torch.uint8)
