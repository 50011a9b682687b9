"""Property test of pack (hypothesis): every example placed once, no sequence across a row, labels kept."""

import pytest

pytest.importorskip("hypothesis")  # only this module needs it
from hypothesis import given, settings
from hypothesis import strategies as st

from kindred.data import pack

from .test_data_pack import check_packed, fake_data


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 200).flatmap(lambda m: st.tuples(st.just(m), st.lists(st.integers(1, m), max_size=60))))
def test_pack_properties(case):
    max_tokens, lengths = case
    data = fake_data(lengths, seed=len(lengths))
    check_packed(data, pack(data, max_tokens, pad_id=7), max_tokens)
