"""Injected faults (docs/reliability.md) for training/sampling/presets.py: fuzzed guidance intervals.

Kept apart from tests/training/sampling/test_sampler.py, which holds this module's other tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.sampling import presets as sampling_presets

# Text made of the characters the parsers care about, plus some noise.
PARSER_ALPHABET = st.sampled_from(list('0123456789,-.eE+ KMGi') + ['...', 'inf', 'nan', 'x', '\n'])
parser_text = st.lists(PARSER_ALPHABET, max_size=20).map(''.join) | st.text(max_size=20)


@pytest.mark.reliability
@settings(max_examples=60, deadline=500)
@given(parser_text)
def test_interval_parse_or_raise_value_error(text):
    try:
        lo, hi = sampling_presets.parse_interval(text)
    except ValueError as err:
        assert str(err).startswith(('expected two numbers LO,HI, got "', 'expected 0 <= LO <= HI, got "'))
        return
    # Accepted: exactly two numbers, 0 <= LO <= HI.
    assert [float(part) for part in text.split(',')] == [lo, hi] and 0 <= lo <= hi
