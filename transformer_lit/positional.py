"""Position information added to the embeddings: sinusoids (Section 3.5) or a learned table (Table 3, row E).

Both modules map ``(length, offset)`` to a (length, d_model) tensor for positions offset .. offset+length-1;
the offset is the number of tokens already decoded during incremental decoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoid_table(length: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Computed in float64 and returned as float32 (length, d_model), so large positions keep their precision.
    """
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (length, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    angles = pos * inv_freq  # (length, ceil(d_model / 2))
    table = torch.empty(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoids (Section 3.5), cached as a non-persistent buffer and extended on demand.

    Nothing is saved in checkpoints, and any length works: a test sentence longer than the cache makes the
    table grow (to the next power of two), so the test split with long sentences needs no setting.

    Args:
        d_model: Width of the encodings.
        initial_length: Positions computed up front.
    """

    def __init__(self, d_model: int, *, initial_length: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", sinusoid_table(initial_length, d_model), persistent=False)
        self.table: Tensor

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Encodings of positions offset .. offset+length-1 as a (length, d_model) view of the table."""
        end = offset + length
        if end > self.table.size(0):
            capacity = 1 << (end - 1).bit_length()
            self.table = sinusoid_table(capacity, self.d_model).to(self.table.device, self.table.dtype)
        return self.table[offset:end]  # (length, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, cached={self.table.size(0)}"


class LearnedPositionalEmbedding(nn.Module):
    """A learned embedding per position (Table 3, row E), for positions 0 .. max_positions-1.

    Args:
        d_model: Width of the embeddings.
        max_positions: Table size; a longer sequence raises ValueError (clamping would be silent).
    """

    def __init__(self, d_model: int, *, max_positions: int):
        super().__init__()
        self.d_model, self.max_positions = d_model, max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, d_model^-0.5), the token embeddings' scale (as fairseq's learned positions)."""
        nn.init.normal_(self.weight, mean=0.0, std=self.d_model**-0.5)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions offset .. offset+length-1, (length, d_model)."""
        end = offset + length
        if end > self.max_positions:
            raise ValueError(
                f"sequence position {end - 1} exceeds model.max_positions={self.max_positions} "
                f"of the learned position table; raise model.max_positions or filter longer sentences"
            )
        return self.weight[offset:end]  # (length, d_model)

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}, d_model={self.d_model}"
