"""Parts of the service without a server: wire format, batcher policy, settings, placement rule."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from refmodel.errors import ConfigError, InvalidBatch, ServiceOverloaded
from refmodel.reference import choose_placement
from refmodel.remote import wire
from refmodel.serve.batcher import Batcher, LocalBatcher, run_per_request
from refmodel.serve.settings import ServeSettings, parse_named_paths
from refmodel.serve.validate import FieldError, Limits


def test_wire_round_trip():
    ids = np.array([[2, 5, 6], [7, 8, 0]], dtype=np.int32)
    attn = np.array([[1, 1, 1], [1, 1, 0]])
    req = wire.decode_request(wire.encode_request("tiny", ids, attn, None))
    assert req.model == "tiny" and req.score_mask is None
    np.testing.assert_array_equal(req.input_ids, ids)
    np.testing.assert_array_equal(req.attention_mask, attn)
    out = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    fp, back = wire.decode_response(wire.encode_response("rm1-abc", out))
    assert fp == "rm1-abc" and back.dtype == np.float32
    np.testing.assert_array_equal(back, out)
    with pytest.raises(InvalidBatch, match="shape of input_ids"):
        wire.encode_request("tiny", ids, attn[:, :2])
    with pytest.raises(InvalidBatch, match="unknown flags"):
        wire.decode_request(b"RMB1\x08" + bytes(11))


def _run_batches(batching: bool, lengths_per_request: list[list[int]], max_batch_tokens=16, max_wait_s=0.05):
    seen = []

    def run(payloads):
        seen.append(list(payloads))
        time.sleep(0.01)
        return [p * 10 for p in payloads]

    async def main():
        batcher = LocalBatcher("m", run, ThreadPoolExecutor(1), max_batch_tokens=max_batch_tokens,
                          max_wait_s=max_wait_s, max_queue=100, batching=batching)
        batcher.start()
        n = 0
        calls = []
        for lengths in lengths_per_request:
            payloads = list(range(n, n + len(lengths)))
            n += len(lengths)
            calls.append(batcher.submit(payloads, lengths))
        results = await asyncio.gather(*calls)
        await batcher.stop()
        return results

    return asyncio.run(main()), seen


def test_batcher_merges_under_the_token_budget():
    requests = [[4], [4], [4], [4], [8], [2, 2]]
    results, batches = _run_batches(True, requests)
    assert results == [[0], [10], [20], [30], [40], [50, 60]]
    assert batches[0] == [0, 1, 2, 3]  # 4 x 4 tokens = the budget of 16
    for batch in batches:  # padded tokens: rows x longest row
        longest = max(sum(requests, [])[i] for i in batch)
        assert len(batch) * longest <= 16
    assert sorted(sum(batches, [])) == list(range(7))


def test_batcher_without_batching_runs_each_request_alone():
    requests = [[4], [4], [2, 2], [4]]
    results, batches = _run_batches(False, requests)
    assert batches == [[0], [1], [2, 3], [4]]
    assert results[2] == [20, 30]


def test_batcher_rejects_when_the_queue_is_full():
    async def main():
        batcher = LocalBatcher("m", lambda p: p, ThreadPoolExecutor(1), max_batch_tokens=8, max_wait_s=0.2,
                          max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1, 2], [1, 1]))
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceOverloaded, match="queue of model 'm' is full"):
            await batcher.submit([3], [1])
        assert await first == [1, 2] and batcher.depth == 0
        await batcher.stop()
        with pytest.raises(ServiceOverloaded, match="shutting down"):
            await batcher.submit([3], [1])
    asyncio.run(main())


def test_a_failing_batch_fails_its_requests_only_and_the_batcher_keeps_serving():
    def run(payloads):
        if "bad" in payloads:
            raise RuntimeError("model exploded")
        if "short" in payloads:
            return []
        return [p.upper() for p in payloads]

    async def main():
        batcher = LocalBatcher("m", run, ThreadPoolExecutor(1), max_batch_tokens=100, max_wait_s=0.05, max_queue=10)
        batcher.start()
        first = await asyncio.gather(batcher.submit(["a", "bad"], [1, 1]), batcher.submit(["b"], [1]),
                                     return_exceptions=True)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 sequences"):
            await batcher.submit(["short"], [1])
        later = await batcher.submit(["c", "d"], [1, 1])
        await batcher.stop()
        return first, later, batcher.depth

    (failed, merged), later, depth = asyncio.run(main())
    # The merged batch failed; it ran again request by request, so only the bad row's request fails.
    assert isinstance(failed, RuntimeError) and merged == ["B"]
    assert later == ["C", "D"] and depth == 0


def test_a_failed_batch_is_retried_per_request_with_real_threads():
    calls = []

    def run(payloads):  # a model that fails on any batch holding a poisoned row
        calls.append(list(payloads))
        if any(p < 0 for p in payloads):
            raise IndexError("index out of range in self")
        return [p + 1 for p in payloads]

    async def main():
        batcher = LocalBatcher("m", run, ThreadPoolExecutor(1), max_batch_tokens=1000, max_wait_s=0.05, max_queue=100)
        assert isinstance(batcher, Batcher)  # the protocol the app takes
        batcher.start()
        requests = [[i, i + 100] if i % 4 else [i, -i - 1] for i in range(12)]  # every 4th request is bad
        results = await asyncio.gather(*(batcher.submit(r, [1, 1]) for r in requests), return_exceptions=True)
        await batcher.stop()
        return requests, results

    requests, results = asyncio.run(main())
    for request, result in zip(requests, results, strict=True):
        if min(request) < 0:
            assert isinstance(result, IndexError)
        else:
            assert result == [p + 1 for p in request]
    assert len(calls[0]) == 24  # one merged batch first, then one run per request
    assert sorted(map(sorted, calls[1:])) == sorted(map(sorted, requests))


def test_run_per_request_reports_each_request_alone():
    def run(payloads):
        if "x" in payloads:
            raise ValueError("bad row")
        return [p.upper() for p in payloads]

    out = run_per_request(run, ["a", "x", "b", "c"], ["r1", "r1", "r2", "r3"])
    assert [type(o).__name__ for o in out[:2]] == ["Failed", "Failed"] and out[2:] == ["B", "C"]
    assert str(out[0].error) == "bad row"
    single = run_per_request(run, ["a", "x"], ["r1", "r1"])  # one request: no second run
    assert all(type(o).__name__ == "Failed" for o in single)


def test_a_cancelled_request_does_not_disturb_the_others():
    def run(payloads):
        time.sleep(0.05)
        return [p * 2 for p in payloads]

    async def main():
        batcher = LocalBatcher("m", run, ThreadPoolExecutor(1), max_batch_tokens=100, max_wait_s=0.01, max_queue=10)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit([1], [1]))  # occupies the model thread
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(batcher.submit([2, 3], [1, 1]))
        kept = asyncio.ensure_future(batcher.submit([4], [1]))
        await asyncio.sleep(0.005)
        gone.cancel()  # a client that hung up while queued
        results = await busy, await kept
        await batcher.stop()
        return results, gone.cancelled(), batcher.depth

    (busy, kept), cancelled, depth = asyncio.run(main())
    assert busy == [2] and kept == [8] and cancelled and depth == 0


def test_settings_from_environment_and_checks(monkeypatch, tmp_path):
    monkeypatch.setenv("REFMODEL_MODELS", '{"tiny": "/m/tiny"}')
    monkeypatch.setenv("REFMODEL_MAX_WAIT_MS", "7")
    s = ServeSettings(port=9000)
    assert s.models == {"tiny": "/m/tiny"} and s.max_wait_ms == 7 and s.port == 9000
    assert s.bearer_token() is None
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        ServeSettings(max_batch_tokens=10, max_seq_len=20)
    token = tmp_path / "t"
    token.write_text("abc\n")
    assert ServeSettings(token_file=token).bearer_token() == "abc"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        ServeSettings(token_file=tmp_path / "empty").bearer_token()
    assert parse_named_paths(["a=/x", "b=/y=z"], "--model") == {"a": "/x", "b": "/y=z"}
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_named_paths(["oops"], "--model")


def test_choose_placement(caplog):
    caplog.set_level("INFO", logger="refmodel.reference.remote")
    assert choose_placement(100, None) == "local"
    assert choose_placement(100, 100) == "local"
    assert choose_placement(2 * 2**20, 2**20, name="ref", remote_url="http://svc") == "remote"
    assert "2.0 MiB exceeds the local budget of 1.0 MiB" in caplog.text
    with pytest.raises(ConfigError):
        choose_placement(-1, 10)


def _both(ids, attn=None, score=None, limits=Limits(50, 16, 8)):
    """check_block and check_sequences on the same block: results, or (type, message) of the error."""
    from refmodel.serve.validate import check_block, check_sequences

    def run(fn):
        try:
            return fn()
        except InvalidBatch as exc:
            return type(exc), exc.field, str(exc)
    rows = lambda m: None if m is None else list(torch.from_numpy(m.astype(np.int64)))  # noqa: E731
    block = run(lambda: check_block(ids, limits, attn, score))
    per_row = run(lambda: check_sequences(list(torch.from_numpy(ids.astype(np.int64))), limits, rows(attn),
                                          rows(score)))
    return block, per_row


def test_vectorized_block_check_equals_the_per_row_check():
    rng = np.random.default_rng(0)
    for trial in range(40):
        b, t = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        ids = rng.integers(0, 50, (b, t)).astype(np.int32)
        attn = (rng.random((b, t)) < 0.8).astype(np.uint8) if trial % 2 else None
        if attn is not None:
            attn[:, 0] = 1
        score = ((rng.random((b, t)) < 0.5) & (attn.astype(bool) if attn is not None else True)).astype(np.uint8) \
            if trial % 3 == 0 else None
        block, per_row = _both(ids, attn, score)
        assert len(block) == len(per_row) == b
        for x, y in zip(block, per_row, strict=True):
            assert all((u is None and v is None) or (u == v if isinstance(u, float) else torch.equal(u, v))
                       for u, v in zip(x, y, strict=True))


@pytest.mark.parametrize("case", ["vocab", "mask_value", "empty_row", "score_on_padding", "too_long", "too_many"])
def test_vectorized_block_check_raises_like_the_per_row_check(case):
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    attn = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.uint8)
    score = None
    if case == "vocab":
        ids[1, 1] = 50
    elif case == "mask_value":
        attn[1, 2] = 3
    elif case == "empty_row":
        attn[1] = 0
    elif case == "score_on_padding":
        score = np.array([[0, 1, 1], [0, 1, 1]], dtype=np.uint8)
    elif case == "too_long":
        ids = np.ones((1, 17), dtype=np.int32)
        attn = None
    elif case == "too_many":
        ids = np.ones((9, 2), dtype=np.int32)
        attn = None
    block, per_row = _both(ids, attn, score)
    assert block == per_row and block[0] is FieldError
