"""Which rows run together: every row exactly once, padding and chunk size bounded."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgerank.runtime.chunking import length_chunks, padded_width, width_chunks

LENGTHS = st.lists(st.integers(1, 300), min_size=1, max_size=60)


@given(LENGTHS, st.integers(1, 2048))
def test_length_chunks_hold_every_row_once_within_the_budget(lengths, budget):
    lengths = np.array(lengths)
    chunks = length_chunks(lengths, budget, min_fill=0.75)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))
    for c in chunks:
        width = lengths[c].max()
        assert len(c) == 1 or width * len(c) <= budget
        assert len(c) == 1 or lengths[c].min() >= 0.75 * width


@given(LENGTHS, st.integers(1, 2048), st.sampled_from([1, 8, 16, 32]))
def test_width_chunks_run_each_row_at_its_own_lengths_width(lengths, budget, step):
    lengths = np.array(lengths)
    rows = np.arange(len(lengths))[::2]  # a subset, as after pruning
    chunks = width_chunks(lengths, budget, step, rows=rows)
    assert sorted(np.concatenate(chunks).tolist()) == rows.tolist()
    for c in chunks:
        widths = {padded_width(n, step) for n in lengths[c]}
        assert len(widths) == 1  # the chunk's width is every row's own
        assert len(c) == 1 or widths.pop() * len(c) <= budget


def test_padded_width_rounds_up_to_the_step():
    assert [padded_width(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, 48]
