"""refmodel.tools.bench: the caveat `refmodel bench --quick` prints when its small shape favours naive."""

from __future__ import annotations

from refmodel.tools.bench import quick_caveat


def _rows(refmodel_s: float, naive_s: float) -> list[dict]:
    return [{"mode": "fwd", "impl": "refmodel", "seconds": refmodel_s, "mem_vs_naive": 0.25},
            {"mode": "fwd", "impl": "naive", "seconds": naive_s, "mem_vs_naive": 1.0}]


def test_a_loss_at_the_quick_shape_is_explained():
    text = quick_caveat(_rows(0.02, 0.01), 1024, 8000, "float32")
    assert text is not None and text.startswith("# caveat: refmodel is slower than naive here (fwd)")
    assert "31 MiB of float32" in text and "0.25x of naive's peak" in text and "without --quick" in text


def test_no_caveat_where_refmodel_wins():
    assert quick_caveat(_rows(0.01, 0.02), 1024, 8000, "float32") is None
