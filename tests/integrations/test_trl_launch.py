"""The TRL trainers under ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process: one launch, every case.

``trl_launch.py`` runs each case (trainer x reference x backend: DDP, FSDP2, ZeRO-3; see its ``CASES``) on
both ranks; the same function run here in one process gives the 1-process values (its "ddp" cases: in one
process every backend is the plain model). Checked: the first-step loss within 1e-6; the policy really
sharded, a model-based reference sharded like it (per-rank bytes), no TRL reference model;
the logged store hits / misses / rows are the sums over the ranks (which differ per rank: the store
lacks one pair); the KL monitor averages over the ranks; refmodel's progress bar and monitor warnings
appear on rank 0 only (rank 1's stderr, kept apart by torchrun's ``--redirects``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch
import trl_launch
from trl_helpers import make_models

from refmodel.testing import ServeProcess, free_port, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOL = 1e-6


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``(1-process results, {rank: results}, {rank: stderr})``."""
    root = tmp_path_factory.mktemp("trl_launch")
    policy, reference = make_models(root / "models")
    with ServeProcess(["--model", f"reference={reference}"], root / "server.log") as server:
        spec = {"policy": str(policy), "reference": str(reference), "service": server.url, "out": str(root / "two")}
        Path(spec["out"]).mkdir()
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        logs = root / "logs"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "--log-dir", str(logs), "--redirects", "3", trl_launch.__file__, str(spec_path)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=subprocess_env(OMP_NUM_THREADS=1))
        stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
        assert res.returncode == 0, (res.stderr[-2000:], {r: e[-3000:] for r, e in stderr.items()})
        ranks = {r: json.loads((Path(spec["out"]) / f"result-{r}.json").read_text()) for r in (0, 1)}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each rank (CPU GEMMs split their sums by thread count)
        try:
            single = trl_launch.run({**spec, "out": str(root / "one")})
        finally:
            torch.set_num_threads(threads)
    return single, ranks, stderr


def by_case(results: list[dict]) -> dict[str, dict]:
    return {r["case"]: r for r in results}


@pytest.mark.parametrize("case", ["/".join(c) for c in trl_launch.CASES])
def test_first_step_loss_equals_one_process(launched, case):
    single, ranks, _ = launched
    trainer, reference, _ = case.split("/")
    want = by_case(single)[f"{trainer}/{reference}/ddp"]["loss"]  # one process: every backend is the plain model
    for rank in (0, 1):
        got = by_case(ranks[rank])[case]["loss"]
        assert abs(got - want) <= TOL, (case, rank, got, want)
        assert by_case(ranks[rank])[case]["reference"] != "NoneType"
    if reference in trl_launch.SAME_AS_POLICY:  # step 2: the reference synced after step 1 (under the backend)
        want2 = by_case(single)[f"{trainer}/{reference}/ddp"]["losses"][1]
        for rank in (0, 1):
            got2 = by_case(ranks[rank])[case]["losses"][1]
            assert abs(got2 - want2) <= TOL, (case, rank, "step 2", got2, want2)
        assert abs(want2 - 0.6931471805599453) > 1e-4  # the synced reference lags the policy
    if trainer != "grpo" and reference not in trl_launch.SAME_AS_POLICY:
        assert abs(want - 0.6931471805599453) > 1e-3  # the reference moves the loss


KINDS = {"ddp": ("DistributedType.MULTI_CPU", "none"), "fsdp2": ("DistributedType.FSDP", "fsdp2"),
         "zero3": ("DistributedType.DEEPSPEED", "zero3")}


@pytest.mark.parametrize("backend", list(trl_launch.BACKENDS))
def test_the_reference_is_sharded_like_the_policy_and_trl_loads_none(launched, backend):
    """Under FSDP2 / ZeRO-3 the trainer really shards the policy, a model-based reference given to the trainer
    (built before the policy was wrapped) holds about half the weights per rank (its per-rank bytes), the
    TR-DPO reference synced after the step, and TRL holds no reference model of its own."""
    _, ranks, _ = launched
    for rank in (0, 1):
        results = by_case(ranks[rank])
        full = results["dpo/frozen/ddp"]["ref_bytes"]
        for trainer, reference, b in trl_launch.CASES:
            if b != backend:
                continue
            got = results[f"{trainer}/{reference}/{backend}"]
            assert (got["distributed"], got["sharding"]) == KINDS[backend], got
            assert got["trl_ref_model"] is False, got  # GRPO keeps a stand-in object, not a model
            if reference.startswith("synced"):
                assert got["syncs"] == 2, got  # after each of its 2 steps
            if reference in ("frozen", "frozen_sampling", "synced_full"):
                want = full if backend == "ddp" else 0.6 * full  # a whole copy under DDP, shards otherwise
                assert 0 < got["ref_bytes"] <= want, (got, full)
            if reference == "adapter":
                assert got["ref_bytes"] == 0  # the policy's own base weights


def test_logged_store_counts_are_the_sums_over_the_ranks(launched):
    single, ranks, _ = launched
    case = "dpo/store/ddp"
    mine = [by_case(ranks[r])[case]["mine"] for r in (0, 1)]
    assert mine[0] != mine[1]  # one rank got the pair the store lacks
    total = {k: mine[0][k] + mine[1][k] for k in mine[0]}
    assert total == {"rows": 8, "store_hits": 6, "store_misses": 2}
    for rank in (0, 1):
        logged = by_case(ranks[rank])[case]["logged"]
        assert logged["refmodel/store_hits"] == 6 and logged["refmodel/store_misses"] == 2, logged
        assert logged["refmodel/ref_rows"] == 8
    one = by_case(single)[case]["logged"]
    assert (one["refmodel/store_hits"], one["refmodel/store_misses"], one["refmodel/ref_rows"]) == (6, 2, 8)


def test_kl_monitor_averages_over_the_ranks(launched):
    _, ranks, _ = launched
    for rank in (0, 1):
        assert by_case(ranks[rank])["kl_monitor"] == {"case": "kl_monitor", "last": 1.5, "warned": True}


def test_bars_and_shared_warnings_on_rank_0_only(launched):
    _, _, stderr = launched
    for text in ("reference log-probs", "launch test KL = 1.5 nats", "kl = "):
        assert text in stderr[0], text
        assert text not in stderr[1], (text, stderr[1][-3000:])
