"""``make mutate`` stays runnable: every mutation still matches the source it mutates
(each occurrence is mutated), so a refactor that moves the code fails here instead of in the next mutation run."""

from __future__ import annotations

import pytest

import mutate


@pytest.mark.parametrize("mutation", mutate.MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_matches_its_source(mutation):
    text = (mutate.ROOT / mutation.path).read_text()
    assert mutation.old in text, f"{mutation.name}: update tests/mutate.py ({mutation.path})"
    assert (mutate.ROOT / "tests").exists() and all((mutate.ROOT / t).exists() for t in mutate.TESTS)
