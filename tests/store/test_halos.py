"""HALOs import: hostile pickles are refused with bounded memory; a failed import leaves nothing behind."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from refmodel.errors import DataFormatError
from refmodel.store.interop import import_halos
from refmodel.testing import subprocess_env


def _shared_nest(depth: int, width: int = 10) -> list:
    """A list whose expansion has width**depth floats but whose pickle has a few bytes per level."""
    x = [0.5]
    for _ in range(depth):
        x = [x] * width
    return x


def test_small_pickle_of_shared_nested_lists_is_refused_with_bounded_memory(tmp_path):
    # 10**7 floats when expanded (the import before this fix took ~340 MiB on it); 185 bytes on disk.
    pkl = tmp_path / "nest.pkl"
    pkl.write_bytes(pickle.dumps({(1, 2, 3): _shared_nest(7)}))
    assert pkl.stat().st_size < 200
    script = textwrap.dedent(f"""
        import resource, sys
        from refmodel.errors import DataFormatError
        from refmodel.store.interop import import_halos
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            import_halos({str(pkl)!r}, {str(tmp_path / 'out')!r}, "fp")
        except DataFormatError as exc:
            print("refused:", exc)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("grew_kib", grew)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                         timeout=120)
    assert "refused:" in res.stdout and "log-prob 0 is a list" in res.stdout, res.stdout + res.stderr
    grew_mib = int(res.stdout.split("grew_kib")[1]) / 1024
    assert grew_mib < 30, f"peak RSS grew by {grew_mib:.0f} MiB"
    assert not (tmp_path / "out").exists()  # no empty store to block a re-run


@pytest.mark.parametrize("cache,match", [
    ([1, 2], "expected a dict"),
    ({(1, 2): "ab"}, "not \\(tuple of ids\\)"),
    ({(1,): []}, "at least 2"),
    ({(1, 2, 3): [0.1]}, "expected 2"),
    ({(1, "2", 3): [0.1, 0.2]}, "token id 1 is a str"),
    ({(1, -2, 3): [0.1, 0.2]}, "token id 1"),
    ({(1, 2, 3): [0.1, None]}, "log-prob 1 is a NoneType"),
    ({(1, 2, 3): [0.1, float("nan")]}, "not finite"),
    ({(1, 2, 3): [[-0.1], [-0.2]]}, "log-prob 0 is a list"),
])
def test_malformed_caches_give_data_format_errors(tmp_path, cache, match):
    pkl = tmp_path / "c.pkl"
    pkl.write_bytes(pickle.dumps(cache))
    with pytest.raises(DataFormatError, match=match):
        import_halos(pkl, tmp_path / "out", "fp")
    assert not (tmp_path / "out").exists()


def test_failed_import_then_a_good_one_into_the_same_folder(tmp_path):
    out = tmp_path / "out"
    good = {tuple(range(i, i + 6)): [-0.5 - i, -1.0, 0.0, -2.0, -0.25] for i in range(20)}
    bad = dict(good)
    bad[(9, 9, 9)] = [0.1, "x"]  # last entry: earlier ones were already put (and some flushed)
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(bad))
    (tmp_path / "good.pkl").write_bytes(pickle.dumps(good))
    out.mkdir()  # an existing empty folder is kept, only emptied
    with pytest.raises(DataFormatError, match="entry 20"):
        import_halos(tmp_path / "bad.pkl", out, "fp", dtype="float32")
    assert out.is_dir() and list(out.iterdir()) == []
    store = import_halos(tmp_path / "good.pkl", out, "fp", dtype="float32")
    assert len(store) == 20
    got = store.get(list(range(3, 9)))
    assert torch.equal(got, torch.tensor([0.0, -3.5, -1.0, 0.0, -2.0, -0.25]))


def test_globals_and_persistent_ids_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({(1, 2): Evil()}))
    with pytest.raises(DataFormatError, match="refusing to unpickle .*system"):
        import_halos(tmp_path / "evil.pkl", tmp_path / "out", "fp")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({(1, 2): [0.5]})[:-3])
    with pytest.raises(DataFormatError, match="not a readable pickle"):
        import_halos(tmp_path / "trunc.pkl", tmp_path / "out", "fp")
