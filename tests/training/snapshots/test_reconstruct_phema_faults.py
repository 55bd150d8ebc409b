"""Injected faults (docs/reliability.md) for training/snapshots/reconstruct_phema.py: fuzzed --outstd lists.

Kept apart from tests/test_reconstruct_phema.py, which holds this module's other tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import phema
from training.snapshots import reconstruct_phema as phema_reconstruct

# Text made of the characters the parsers care about, plus some noise.
PARSER_ALPHABET = st.sampled_from(list('0123456789,-.eE+ KMGi') + ['...', 'inf', 'nan', 'x', '\n'])
parser_text = st.lists(PARSER_ALPHABET, max_size=20).map(''.join) | st.text(max_size=20)


@pytest.mark.reliability
@settings(max_examples=60, deadline=500)
@given(parser_text)
def test_std_lists_parse_or_raise_value_error(text):
    try:
        values = phema_reconstruct.parse_std_list(text)
    except ValueError as err:
        assert '\n' not in str(err).strip()
        return
    assert values == sorted(set(values)) and len(values) >= 1
    assert all(type(v) is float and 0 < v < phema.MAX_STD for v in values)


@pytest.mark.reliability
@pytest.mark.parametrize('text', ['1e-300,2e-300,...,0.25', '0.01,0.02,...,inf', '0.01,0.02,...,1e308',
                                  '0.01,0.011,...,nan'])
def test_std_list_ellipsis_cannot_explode(text):
    with pytest.raises(ValueError, match=r"^'\.\.\.' would expand to too many values \(more than 100000\)$"):
        phema_reconstruct.parse_std_list(text)
