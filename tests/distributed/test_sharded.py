"""distributed="sharded" (FSDP2's fully_shard) on gloo: bit-identical to one process.

Each test spawns W processes once for many cases (``_cases.py``). The reference is the same
cases in this process, on the plain model, one thread. Gradients are injected from a
one-process copy of the model (so the optimizer alone is compared) except in the real FSDP2
test, which runs fully_shard's own forward and backward passes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import _cases
import pytest
import torch

import gluon_optim as go
from gluon_optim.distributed import rows
from gluon_optim.lab.parallel import run


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = set(_cases.SHARDED_CASES) | set(_cases.FSDP_CASES)
        return {n: _cases.params(_cases.train(n, distributed="local")[0]) for n in names}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[Any]]:
    out = {}
    for world in (2, 3):
        out[world] = run(_cases.sharded_parity, world, tmp_path_factory.mktemp(f"s{world}"))
    return out


def _equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: Any) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), (what, name)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", _cases.SHARDED_CASES)
def test_every_rank_ends_bit_identical_to_one_process(
    parity: dict[int, list[Any]], reference: dict[str, Any], world: int, case: str
) -> None:
    for rank, result in enumerate(parity[world]):
        _equal(result["params"][case], reference[case], (world, rank))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", sorted(_cases.EXPERT_CASES))
def test_each_rank_steps_its_own_experts_bit_identical_to_one_process(
    parity: dict[int, list[Any]], world: int, case: str
) -> None:
    """Shard(0) of a stack ``(4, ...)`` holds whole experts (2 and 2 at W=2; 2, 1, 1 at W=3):
    each rank computes its experts' LMOs, and the stacks end as one process's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _cases.params(_cases.train_experts(case, sharded=False)[0])
    finally:
        torch.set_num_threads(threads)
    for rank, result in enumerate(parity[world]):
        got = result["experts"][case]
        assert got["blocks"]["experts.up"] == got["blocks"]["experts.down"] == "experts"
        _equal(got["params"], expected, (world, rank, case))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", _cases.BLOCK_CASES)
def test_previous_iterate_blocks_equal_closures(
    parity: dict[int, list[Any]], reference: dict[str, Any], world: int, case: str
) -> None:
    for rank, result in enumerate(parity[world]):
        _equal(result["block"][case], reference[case], (world, rank))


@pytest.mark.parametrize("world", [2, 3])
def test_no_rank_repeats_another_ranks_newton_schulz(
    parity: dict[int, list[Any]], world: int
) -> None:
    for case in ("muon", "scion", "mvr2-exact"):
        calls = [r["comm"][case]["polar_calls"] for r in parity[world]]
        # 3 matrices per step (fc, conv, mix), each computed once, by its owner.
        assert sum(calls) == 3 * _cases.STEPS, (case, calls)
        assert all(c > 0 for c in calls), (case, calls)


@pytest.mark.parametrize("world", [2, 3])
def test_limuons_randomized_svd_runs_once_per_matrix(
    parity: dict[int, list[Any]], world: int
) -> None:
    for case in ("limuon-exact", "limuon-ns-approx"):
        calls = [r["comm"][case]["rsvd_calls"] for r in parity[world]]
        # Every LMO parameter of these presets is a matrix with low-rank state: fc, conv, mix
        # (and embedding and head where the preset gives them the estimator), once per step.
        with _cases._Counter() as counter:
            _cases.train(case, distributed="local")
        assert sum(calls) == counter.rsvd_calls, (case, calls)
        assert all(c > 0 for c in calls), (case, calls)


def _formula(comm: dict[str, Any], rank: int, world: int, a: int, b: int) -> int:
    """Bytes ``rank`` sends per step under muon: phase 1, its rows of the matrices others own
    (``a`` bytes each: bfloat16); phase 2, an 8-byte status to every other rank in each chunk
    and the rows of its own matrices every other rank holds (``b`` bytes each), each part
    padded to 8 bytes."""

    def pad(n: int) -> int:
        return n + (-n % 8)

    total = 8 * (world - 1) * go.distributed.EXCHANGE_CHUNKS
    for key, owner in comm["owners"].items():
        shape = comm["shapes"][key]
        per_row = math.prod(shape[1:])

        def count(r: int, shape: tuple[int, ...] = shape) -> int:
            start, stop = rows(shape[0], world, r)
            return stop - start

        if owner != rank:
            total += pad(count(rank) * per_row * a)
        else:
            total += sum(pad(count(r) * per_row * b) for r in range(world) if r != rank)
    return total


@pytest.mark.parametrize("world", [2, 3])
def test_bytes_sent_equal_the_documented_formula(parity: dict[int, list[Any]], world: int) -> None:
    per_rank = []
    for rank, result in enumerate(parity[world]):
        comm = result["comm"]["muon"]
        # What went through all_to_all_single (wrapped, every step alike) ...
        assert comm["sent"] == _cases.STEPS * comm["last_bytes"]
        assert comm["last_bytes"] == sum(comm["phase_bytes"])
        # ... equals the formula: bfloat16 rows to the owner, bfloat16 direction rows back.
        assert comm["last_bytes"] == _formula(comm, rank, world, 2, 2)
        per_rank.append(comm["last_bytes"])
    # The hidden matrices' rows split evenly here (24 rows), so the mean over ranks is dion's
    # 4 (W - 1) P / W^2 for P matrix elements.
    elements = 24 * 8 + 24 * 24 * 3 + 24 * 24
    statuses = 8 * (world - 1) * go.distributed.EXCHANGE_CHUNKS
    assert sum(per_rank) / world == pytest.approx(4 * (world - 1) * elements / world**2 + statuses)
    # ... and the library's own formula, from the same shapes and owners.
    shapes = [comm["shapes"][k] for k in comm["owners"]]
    owners = list(comm["owners"].values())
    assert go.distributed.sharded_bytes(shapes, owners, world) == per_rank


def test_real_fsdp2_with_the_full_batch_on_every_rank_equals_one_process(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    # fully_shard's reduce-scatter averages two identical gradients: exact at W = 2.
    for rank, result in enumerate(run(_cases.fsdp, 2, tmp_path)):
        for case in _cases.FSDP_CASES:
            _equal(result[case], reference[case], (rank, case))


def test_the_step_issues_only_its_own_collectives(tmp_path: Path) -> None:
    # CommDebugMode sees every collective, DTensor's implicit ones included: one all-reduce
    # (the agreement) and the all-to-alls (rows to owners; direction rows back, in chunks),
    # and nothing else, for every kind of step.
    all_to_alls = 2 * go.distributed.EXCHANGE_CHUNKS
    for result in run(_cases.comm_modes, 2, tmp_path):
        for case, counts in result.items():
            assert counts == {"c10d.allreduce_": 1, "c10d.alltoall_base_": all_to_alls}, case


def test_a_dcp_checkpoint_saved_at_two_ranks_resumes_at_one_three_and_four(
    tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_cases.CHECKPOINT_ENV, str(tmp_path / "checkpoints"))
    run(_cases.dcp_save, 2, tmp_path / "save")
    for world in (1, 3, 4):
        for rank, result in enumerate(run(_cases.dcp_resume, world, tmp_path / f"r{world}")):
            for case in _cases.RESUME_SHARDED:
                _equal(result[case], reference[case], (world, rank, case))
    # The checkpoint of another model: DCP's own error, on every rank, before anything loads.
    for rank, out in enumerate(run(_cases.dcp_other_model, 2, tmp_path / "other")):
        assert "Size mismatch between saved torch.Size([24, 24]) and current" in out["wider"]
        assert "for model.mix.weight" in out["wider"], rank
        assert "Missing key in checkpoint state_dict: model.extra.weight" in out["longer"], rank
        assert out["wider_unchanged"] == out["longer_unchanged"] == "True", rank


def test_bad_input_is_a_clear_error_on_every_rank(tmp_path: Path) -> None:
    results = run(_cases.sharded_errors, 2, tmp_path)
    for rank, out in enumerate(results):
        assert out["nan"].startswith("FloatingPointError: Non-finite gradient"), (rank, out)
        assert "'fc.weight'" in out["nan"]
        assert out["grad_none"].startswith("RuntimeError: distributed='sharded'"), out
        assert "['mix.weight'] have a gradient on 1 of 2 ranks" in out["grad_none"]
        assert "different parameter groups" in out["order"], out
        for mode in ("replicated", "local"):
            assert f"needs distributed='sharded' (or 'auto'), not '{mode}'" in out[mode]
        assert out["plain"].startswith("ValueError: distributed='sharded' needs DTensor"), out
        assert "state_dtype='bfloat16' is not supported by the sharded mode" in out["state_dtype"]
        assert "'fc.weight': blocks='chunks=2' is not supported by the sharded" in out["blocks"]
        assert "'w' has placements (Shard(dim=1),)" in out["shard1"], out
        assert "'v' is a plain tensor while 'w' is a DTensor" in out["mixed"], out
        assert "'w' is a DTensor on a 2-D mesh" in out["mesh2d"], out
        # A non-finite state on rank 1's shard only: refused on both ranks, nothing loaded.
        assert "'momentum_buffer' holds non-finite values" in out["nan_state"], out
        # An owner's failure ends the step on every rank instead of leaving them waiting.
        expected = "no convergence (injected)" if rank == 1 else "rank(s) [1] failed computing"
        assert expected in out["owner_fails"], out


def test_sharded_mode_needs_a_dtensor_here() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="distributed='sharded' needs DTensor parameters"):
        go.Gluon([p], distributed="sharded")


def test_the_smoothness_probe_measures_each_layer_once_and_merges_in_both_modes(
    tmp_path: Path,
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = _cases.model()
        opt = go.muon(net)
        probe = go.smoothness.SmoothnessProbe(opt, 2)
        for k in range(5):
            opt.zero_grad()
            _cases.loss_of(net, k).backward()
            opt.step()
        probe.remove()
    finally:
        torch.set_num_threads(threads)
    assert len(probe.records) == 2 * 3  # steps 2 and 4, three hidden matrices
    results = run(_cases.probe_records, 2, tmp_path)
    for mode in ("sharded", "replicated"):
        for rank, result in enumerate(results):
            assert result[mode]["records"] == probe.records, (mode, rank)
        # Each layer measured by one rank (its LMO's owner), every rank holding every record.
        assert sum(r[mode]["measured"] for r in results) == len(probe.records), mode
        assert all(r[mode]["measured"] > 0 for r in results), mode


def test_empty_and_uneven_shards_and_replicate_placements(tmp_path: Path) -> None:
    for rank, out in enumerate(run(_cases.fewer_rows_than_ranks, 3, tmp_path)):
        for label in ("muon", "mvr2"):
            assert out[label]["differ"] == [], (rank, label)
        rows = out["muon"]["local_rows"]
        # 2 rows over 3 ranks: the last rank's shard is empty; 1 row: two empty shards.
        assert rows["two_rows"] == [(1, 5), (1, 5), (0, 5)][rank]
        assert rows["one_row"] == [(1, 7), (0, 7), (0, 7)][rank]
        assert rows["replicated"] == (4, 6)
