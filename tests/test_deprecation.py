"""refmodel._deprecation: old keywords and attributes keep working for one release, with a FutureWarning."""

from __future__ import annotations

import pytest

from refmodel._deprecation import REMOVED_IN, moved_attribute, renamed_keywords


@renamed_keywords(ref_logps="ref_logprobs")
def _loss(x, *, ref_logprobs=None):
    return x if ref_logprobs is None else x + ref_logprobs


def test_an_old_keyword_is_passed_on_as_the_new_one_with_a_warning():
    assert _loss(1, ref_logprobs=2) == 3
    with pytest.warns(FutureWarning, match=rf"_loss\(ref_logps=\.\.\.\) is deprecated and goes in refmodel "
                                           rf"{REMOVED_IN}; use ref_logprobs=\.\.\."):
        assert _loss(1, ref_logps=2) == 3


def test_both_the_old_and_the_new_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="both 'ref_logps' .* and 'ref_logprobs'"):
        _loss(1, ref_logps=2, ref_logprobs=2)


def test_a_moved_attribute_is_its_new_home_and_anything_else_an_attribute_error():
    with pytest.warns(FutureWarning, match="pkg.old is deprecated .* use refmodel.errors.StoreMiss"):
        got = moved_attribute("pkg", "old", {"old": "refmodel.errors.StoreMiss"})
    from refmodel.errors import StoreMiss

    assert got is StoreMiss
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'other'"):
        moved_attribute("pkg", "other", {"old": "refmodel.errors.StoreMiss"})
