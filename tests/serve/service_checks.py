"""The service's client-level checks, shared by every way of running it (a ``refmodel serve`` process,
the Ray Serve deployment): a test module defines the fixtures ``server`` (``.url``, ``.headers``; the
main test configuration of ``serve_helpers.start_main_server``), ``llama`` (the in-process model) and
``tiny_reward_dir``, and subclasses :class:`ServiceClientChecks` as ``Test...``.

Tolerance: 1e-5 nats between served and in-process log-probs. The served model is loaded through the
model cache and runs inside a padded batch whose shape differs from the in-process call, so fp32
sums are reordered (observed differences ~1e-6); any real misalignment or masking bug is >= 1e-2.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import TOKEN

from refmodel import ReferenceClient
from refmodel import fingerprint as model_fingerprint
from refmodel.errors import InvalidBatch, ModelNotAllowed, RequestTooLarge, Unauthorized
from refmodel.logprobs.model import model_logprobs
from refmodel.reference import Remote
from refmodel.remote import wire

ATOL = 1e-5


def random_rows(n: int, seed: int, vocab: int = 95, lo: int = 2, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def expected(model, row: list[int], score_from: int = 0) -> torch.Tensor:
    """In-process log-probs of one unpadded sequence (the naive per-sequence path)."""
    ids = torch.tensor([row])
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, score_from:] = True
    with torch.no_grad():
        return model_logprobs(model, ids, score_mask=score)[0]


def post(server, path, **kwargs):
    return httpx.post(server.url + path, headers={**server.headers, **kwargs.pop("headers", {})},
                      timeout=30, **kwargs)


def _binary(model="tiny", ids=((2, 5, 6),), attn=None, score=None):
    return wire.encode_request(model, np.asarray(ids), None if attn is None else np.asarray(attn),
                               None if score is None else np.asarray(score))


BAD_JSON = [
    ({"model": "nope", "input_ids": [[2, 5]]}, 404, None, "not served"),
    ({"model": "rm", "input_ids": [[2, 5]]}, 404, None, "rewards model"),
    ({"model": "tiny", "input_ids": [[2, 5, 95]]}, 422, "input_ids", "input_ids[0][2] = 95 is outside the vocabulary"),
    ({"model": "tiny", "input_ids": [[2, -1]]}, 422, "input_ids", "outside the vocabulary"),
    ({"model": "tiny", "input_ids": [[2, 5], []]}, 422, "input_ids", "input_ids[1] is empty"),
    ({"model": "tiny", "input_ids": []}, 422, "input_ids", "input_ids is empty"),
    ({"model": "tiny", "input_ids": [[2] * 65]}, 422, "input_ids", "max_seq_len=64"),
    ({"model": "tiny", "input_ids": [[2, 5]] * 65}, 422, "input_ids", "at most 64"),
    ({"model": "tiny", "input_ids": [[2, 5.5]]}, 422, "input_ids", "input_ids[0][1]"),
    ({"model": "tiny", "input_ids": [[2, "5"]]}, 422, "input_ids", "valid integer"),
    ({"model": "tiny", "input_ids": [[2, 10**30]]}, 422, "input_ids", "not a 64-bit integer"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "attention_mask": [[1, 1]]}, 422, "attention_mask",
     "attention_mask[0] has 2 entries"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "attention_mask": [[1, 1, 1], [1]]}, 422, "attention_mask",
     "2 rows"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "attention_mask": [[0, 0, 0]]}, 422, "attention_mask",
     "no real tokens"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "attention_mask": [[1, 2, 1]]}, 422, "attention_mask", "only 0 and 1"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "score_mask": [[0, 1]]}, 422, "score_mask", "score_mask[0] has 2"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "attention_mask": [[1, 1, 0]], "score_mask": [[0, 1, 1]]}, 422,
     "score_mask", "padded positions"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "score_mask": [[0, 1, 1]], "score_start": 1}, 422, "score_start",
     "not both"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "score_start": [1, 2]}, 422, "score_start", "2 entries"),
    ({"model": "tiny", "input_ids": [[2, 5, 6]], "score_start": 9}, 422, "score_start", "0 <= score_start <= 3"),
    ({"model": "tiny"}, 422, "input_ids", "Field required"),
    ({"model": "tiny", "input_ids": [[2, 5]], "top_p": 0.9}, 422, "top_p", "Extra inputs"),
    ({"model": "tiny", "input_ids": [[2, 5]], "temperature": 0}, 422, "temperature", "finite number > 0"),
]




class ServiceClientChecks:
    def test_json_logprobs_equal_in_process(self, server, llama):
        rows = random_rows(6, seed=1)
        r = post(server, "/v1/logprobs", json={"model": "tiny", "input_ids": rows, "score_start": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["fingerprint"] == model_fingerprint(llama)
        for row, got in zip(rows, body["logprobs"], strict=True):
            assert len(got) == len(row)
            torch.testing.assert_close(torch.tensor(got), expected(llama, row, 3), atol=ATOL, rtol=0)


    def test_client_binary_matches_model_logprobs_with_left_padding(self, server, llama):
        rows = random_rows(5, seed=2)
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding, as generation code produces it
            ids[i, width - len(row):] = torch.tensor(row)
            attn[i, width - len(row):] = 1
        score = attn.clone()
        score[:, : width - 4] = 0  # only the last 4 tokens are the completion
        with torch.no_grad():
            want = model_logprobs(llama, ids, attn, score)
        with ReferenceClient(server.url, token=TOKEN) as client:
            got = client.compute_log_probs("tiny", ids, attn, score)
        assert [g.dtype for g in got] == [torch.float32] * len(rows)
        torch.testing.assert_close(torch.stack(got), want, atol=ATOL, rtol=0)
        assert (torch.stack(got)[score == 0] == 0).all()


    def test_sequence_scores_the_same_alone_and_in_a_batch(self, server, llama):
        rows = random_rows(12, seed=3)
        with ReferenceClient(server.url, token=TOKEN) as client:
            alone = client.compute_log_probs("tiny", [rows[0]])[0]
            in_request = client.compute_log_probs("tiny", rows)[0]

            async def concurrent():  # many single-sequence requests merged by the batcher
                async with ReferenceClient(server.url, token=TOKEN) as aclient:
                    return await asyncio.gather(*(aclient.acompute_log_probs("tiny", [r]) for r in rows))
            merged = asyncio.run(concurrent())[0][0]
        torch.testing.assert_close(in_request, alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(merged, alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(alone, expected(llama, rows[0]), atol=ATOL, rtol=0)


    def test_one_sync_client_shared_by_threads(self, server, llama):
        from concurrent.futures import ThreadPoolExecutor

        rows = random_rows(24, seed=11)
        with ReferenceClient(server.url, token=TOKEN) as client:
            with ThreadPoolExecutor(6) as pool:
                got = list(pool.map(lambda r: client.compute_log_probs("tiny", [r])[0], rows))
        for row, out in zip(rows, got, strict=True):
            torch.testing.assert_close(out, expected(llama, row).float(), atol=ATOL, rtol=0)

    def test_thirty_two_concurrent_clients(self, server, llama):
        rows = random_rows(32, seed=4)

        async def one_client(i):
            async with ReferenceClient(server.url, token=TOKEN) as client:
                out = []
                for k in range(3):
                    out.append((await client.acompute_log_probs("tiny", [rows[(i + k) % 32]]))[0])
                return out

        async def main():
            return await asyncio.gather(*(one_client(i) for i in range(32)))

        results = asyncio.run(main())
        for i, outs in enumerate(results):
            for k, got in enumerate(outs):
                torch.testing.assert_close(got, expected(llama, rows[(i + k) % 32]), atol=ATOL, rtol=0)
        metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
        batch_sum = next(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith('refmodel_batch_size_sum{model="tiny"}'))
        batch_count = next(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith('refmodel_batch_size_count{model="tiny"}'))
        assert batch_sum / batch_count > 1.0, "concurrent requests were never merged into one batch"




    @pytest.mark.parametrize("payload,status,field,message", BAD_JSON)
    def test_bad_json_input(self, server, payload, status, field, message):
        r = post(server, "/v1/logprobs", json=payload)
        assert r.status_code == status, r.text
        assert message in r.json()["detail"]
        if field is not None:
            assert r.json()["field"] == field


    def test_bad_bodies(self, server):
        r = post(server, "/v1/logprobs", content=b'{"model": "tiny", "input_ids": [[2',
                 headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
        r = post(server, "/v1/logprobs", content=b'{"model": "tiny", "input_ids": [[2, 5]]}',
                 headers={"Content-Type": "text/plain"})
        assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"]
        big = {"model": "tiny", "input_ids": [[2] * 60] * 600}  # > 64 KiB of JSON
        r = post(server, "/v1/logprobs", json=big)
        assert r.status_code == 413 and "65536 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(100):
                yield b" " * 1024
        r = post(server, "/v1/logprobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        with ReferenceClient(server.url, token=TOKEN) as client, pytest.raises(RequestTooLarge, match="413"):
            client.compute_log_probs("tiny", [[2] * 60] * 300)


    @pytest.mark.parametrize("body,field,message", [
        (b"RMB1", "body", "16-byte header"),
        (b"XXXX" + bytes(12), "body", "bad magic"),
        (_binary()[:-1], "body", "but the body has"),
        (_binary(ids=((2, 5, 99),)), "input_ids", "outside the vocabulary"),
        (_binary(ids=((2, 5, 6),), attn=((1, 0, 1),))[:-1] + b"\x03", "attention_mask", "only 0 and 1"),
        (_binary(ids=np.zeros((1, 0), dtype=np.int32)), "input_ids", "T=0"),
        (_binary(ids=np.zeros((0, 3), dtype=np.int32)), "input_ids", "input_ids is empty"),
        (_binary(ids=((2,) * 65,)), "input_ids", "max_seq_len=64"),
    ])
    def test_bad_binary_input(self, server, body, field, message):
        r = post(server, "/v1/logprobs:binary", content=body, headers={"Content-Type": wire.CONTENT_TYPE})
        assert r.status_code == 422, r.text
        assert message in r.json()["detail"] and r.json()["field"] == field


    def test_binary_unknown_model_is_404(self, server):
        r = post(server, "/v1/logprobs:binary", content=_binary(model="other"))
        assert r.status_code == 404 and "allows ['tiny']" in r.json()["detail"]


    def test_client_maps_errors(self, server):
        with ReferenceClient(server.url, token=TOKEN) as client:
            with pytest.raises(ModelNotAllowed, match="not served"):
                client.compute_log_probs("nope", [[2, 5]])
            with pytest.raises(InvalidBatch, match="outside the vocabulary"):
                client.compute_log_probs("tiny", [[2, 500]])
        with ReferenceClient(server.url, token="wrong") as client, pytest.raises(Unauthorized, match="401"):
            client.compute_log_probs("tiny", [[2, 5]])


    @pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic " + TOKEN, TOKEN, "Bearer " + TOKEN + "x"])
    def test_auth_rejects(self, server, header):
        headers = {} if header is None else {"Authorization": header}
        for method, path in [("POST", "/v1/logprobs"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", "/v1/rewards"), ("POST", "/v1/logprobs:binary")]:
            r = httpx.request(method, server.url + path, headers=headers, json={"model": "tiny", "input_ids": [[2]]})
            assert r.status_code == 401, (path, r.text)
            assert "bearer token" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"


    def test_auth_accepts_and_healthz_is_open(self, server):
        assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
        r = httpx.get(server.url + "/v1/models", headers=server.headers)
        assert r.status_code == 200
        kinds = {m["name"]: m["kind"] for m in r.json()["models"]}
        assert kinds == {"tiny": "logprobs", "rm": "rewards"}
        metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
        for name in ("refmodel_queue_depth", "refmodel_batch_size", "refmodel_tokens_total",
                     "refmodel_tokens_per_second", "refmodel_request_latency_seconds"):
            assert name in metrics


    def test_rewards_match_in_process(self, server, tiny_reward_dir):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
        rows = random_rows(5, seed=5)
        with ReferenceClient(server.url, token=TOKEN) as client:
            got = client.compute_rewards("rm", rows)
            with pytest.raises(ModelNotAllowed, match="logprobs model"):
                client.compute_rewards("tiny", rows)
        with torch.no_grad():  # HF's own pooling on each unpadded sequence
            want = torch.tensor([model(torch.tensor([row])).logits[0, 0].item() for row in rows])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


    def test_remote_reference(self, server, llama):
        remote = Remote(server.url, "tiny", token=TOKEN)
        assert remote.fingerprint == model_fingerprint(llama) and remote.memory_bytes == 0
        ids = torch.tensor(random_rows(3, seed=6, lo=9, hi=9))
        with torch.no_grad():
            want = model_logprobs(llama, ids)
        torch.testing.assert_close(remote.logprobs(ids), want, atol=ATOL, rtol=0)
        remote.on_step(1, None)
        remote.close()
