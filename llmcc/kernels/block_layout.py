"""Block layouts read off a constant attention mask: which (query block, key block) tiles a kernel must compute.

A model whose attention mask is a constant (a block-sparse pattern kept as a buffer: BigBird- or Longformer-style
layouts, Sparse-Transformer strides) exports it as an additive [.., .., Sq, Skv] tensor of 0 (visible) and a large
negative number (hidden). A tile whose every entry is hidden adds exp(hidden - max) = 0 to each of its rows as long
as the row sees some key, so skipping it is exact. This module finds those tiles:

  ``tile_layout``          [L, nq, nk] bool at any tile size: a tile is kept when any of its entries is visible
                           (the CPU flash kernel keeps the mask as a bias, so partly visible tiles stay exact);
  ``uniform_block_size``   the largest block size at which every block is wholly visible (0) or wholly hidden: then
                           the layout *is* the mask, and a kernel may drop the mask (the Triton block-sparse kernel);
  ``layout_csr``           the kernels' form of a layout: row_ptr [L * nq + 1] and col_idx [nnz], int32.

``None`` from the first two means "no block layout": a row that sees no key at all (the unfused graph then spreads
its probability over every key, which skipping cannot reproduce), a mask that differs per batch element, a mask with
no hidden tile (nothing to skip), or no uniform block size.
"""

from __future__ import annotations

import numpy as np

HIDDEN = -1e30  # an additive mask entry at or below this hides its key (HF uses finfo.min, torch -inf)
BLOCK_SIZES = (128, 64, 32, 16)  # the Triton kernel's layout blocks: powers of two >= 16


def _heads_mask(mask: np.ndarray, num_heads: int) -> np.ndarray | None:
    """[L, Sq, Skv] visibility of a mask broadcast as [B, H, Sq, Skv] with B = 1; L is 1 or num_heads."""
    m = np.asarray(mask)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[0] != 1 or m.shape[1] not in (1, num_heads):
        return None
    visible = m[0] > HIDDEN
    if not visible.any(axis=-1).all():
        return None
    return visible


def tile_layout(mask: np.ndarray, num_heads: int, block_q: int, block_k: int) -> np.ndarray | None:
    """[L, cdiv(Sq, block_q), cdiv(Skv, block_k)] bool, True where a tile holds a visible entry; None when no
    tile can be skipped or the mask has no block layout (see the module docstring)."""
    visible = _heads_mask(mask, num_heads)
    if visible is None:
        return None
    heads, sq, skv = visible.shape
    nq, nk = -(-sq // block_q), -(-skv // block_k)
    padded = np.zeros((heads, nq * block_q, nk * block_k), bool)
    padded[:, :sq, :skv] = visible
    layout = padded.reshape(heads, nq, block_q, nk, block_k).any(axis=(2, 4))
    return None if layout.all() else layout


def uniform_block_size(mask: np.ndarray, num_heads: int, sizes=BLOCK_SIZES) -> int | None:
    """The largest of ``sizes`` at which every block of the mask is wholly visible with value exactly 0 or wholly
    hidden (blocks cut by the sequence end count their in-range part); None if there is none or the layout is
    dense. Visible entries must be 0: a kernel that drops the mask adds nothing to the scores."""
    m = np.asarray(mask)
    visible = _heads_mask(m, num_heads)
    if visible is None or np.any(m[m > HIDDEN] != 0):
        return None
    heads, sq, skv = visible.shape
    for bs in sizes:
        nq, nk = -(-sq // bs), -(-skv // bs)
        pad_value = np.zeros((heads, nq * bs, nk * bs), np.int8)  # 1 visible, -1 hidden, 0 past the end
        pad_value[:, :sq, :skv] = np.where(visible, 1, -1)
        blocks = pad_value.reshape(heads, nq, bs, nk, bs)
        any_visible = (blocks == 1).any(axis=(2, 4))
        any_hidden = (blocks == -1).any(axis=(2, 4))
        if not (any_visible & any_hidden).any():
            return None if any_visible.all() else bs
    return None


def layout_csr(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row_ptr int32 [L * nq + 1], col_idx int32 [max(nnz, 1)]) of a [L, nq, nk] layout, columns ascending; an
    empty layout gets one unread column so no buffer has size 0."""
    flat = np.asarray(layout, bool).reshape(-1, layout.shape[-1])
    row_ptr = np.zeros(flat.shape[0] + 1, np.int32)
    row_ptr[1:] = np.cumsum(flat.sum(axis=1))
    col_idx = np.nonzero(flat)[1].astype(np.int32)
    return row_ptr, col_idx if col_idx.size else np.zeros(1, np.int32)
