"""gluon-optim bench --distributed: the computed tables (the timed part runs in the CLI only)."""

from __future__ import annotations

import pytest

import gluon_optim as go
from gluon_optim.lab.bench import distributed as bench


def test_communication_rows_follow_their_formulas() -> None:
    rows = {(r["shapes"], r["world"]): r for r in bench.communication()}
    assert set(rows) == {(s, w) for s in bench.SHAPE_SETS for w in (8, 64)}
    gpt2 = rows["gpt2-124m", 8]
    p = gpt2["matrix_elements"]
    assert p == 12 * (3 + 1 + 4 + 4) * 768 * 768
    # 48 matrices over 8 ranks balance exactly, so ours meets the bound: 2 (W-1)/W bytes each.
    assert gpt2["imbalance"] <= 1.15
    assert gpt2["ours_replicated"] == pytest.approx(gpt2["ours_bound"])
    assert gpt2["ours_bytes_per_element"] == pytest.approx(2 * 7 / 8)
    assert gpt2["ddp_grad_allreduce_fp32"] == pytest.approx(2 * 7 / 8 * p * 4)
    assert gpt2["dion_fsdp2_all_to_all_bf16"] == pytest.approx(4 * 7 * p / 64)
    # With fewer matrices than ranks the padded all-gather exceeds the bound: reported, not hidden.
    assert rows["gpt2-124m", 64]["ours_replicated"] > rows["gpt2-124m", 64]["ours_bound"]
    # Sharded: every row count divides by W here, so the mean rank sends dion's 4 (W-1) P / W^2;
    # the largest rank sends more where the owners are uneven (W = 64: 48 matrices).
    for row in rows.values():  # plus an 8-byte status to every other rank, in each chunk
        statuses = 8 * (row["world"] - 1) * go.distributed.EXCHANGE_CHUNKS
        assert row["ours_sharded_mean"] == row["dion_fsdp2_all_to_all_bf16"] + statuses
    assert gpt2["ours_sharded_max"] == pytest.approx(gpt2["ours_sharded_mean"])
    assert rows["gpt2-124m", 64]["ours_sharded_max"] > rows["gpt2-124m", 64]["ours_sharded_mean"]


def test_format_lists_every_measurement() -> None:
    result = {
        "communication": bench.communication(worlds=(8,)),
        "torch_muon_dtensor_collectives": {"wide": {"c10d.all_reduce": 1}},
        "step_time": [
            {
                "mode": "sharded",
                "world": 1,
                "step_ms": 10.0,
                "speedup": 1.0,
                "ranks": [{"step_ms": 10.0, "directions_ms": 7.0}],
            }
        ],
    }
    text = bench.format_distributed_table(result)
    assert "| gpt2-124m | 8 |" in text and "| 1.3b | 8 |" in text
    assert "* wide: 1 (all_reduce 1)" in text
    assert "| sharded | 1 | 10.0 | 10.0 / 7.0 | 1.00x |" in text
