"""KeypointPCK and DenseFlowMetric: values, inclusive thresholds, de-duplication, order and
process-count invariance."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_flow.evaluation.metrics import DenseFlowMetric, KeypointPCK


def keypoint_data(pairs: int = 12, kps: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random keypoint predictions with varied errors, padding and groups, ``pairs`` pairs."""
    g = torch.Generator().manual_seed(seed)
    trg = torch.rand(pairs, kps, 2, generator=g) * 100
    pred = trg + torch.randn(pairs, kps, 2, generator=g) * 6
    valid = torch.rand(pairs, kps, generator=g) < 0.8
    valid[:, 0] = True
    return {
        "index": torch.arange(pairs),
        "pred_kps": pred,
        "trg_kps": trg,
        "valid": valid,
        "bound": torch.rand(pairs, generator=g) * 60 + 40,
        "category": torch.randint(0, 3, (pairs,), generator=g),
        "difficulty": torch.randint(0, 2, (pairs, 2), generator=g),
        "src_kps": torch.rand(pairs, kps, 2, generator=g),
    }


def take(data: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in data.items()}


def new_pck() -> KeypointPCK:
    return KeypointPCK(categories=("a", "b", "c"), difficulty_names=("view", "scale"))


def test_keypoint_pck_values_and_inclusive_threshold():
    # Pair 0: errors 10 (exactly 0.1 * 100, a hit at 0.1) and 3 (a hit at 0.05, not at 0.01).
    # Pair 1: one valid keypoint off by 50 of bound 100; its padded slot is perfect but ignored.
    trg = torch.zeros(2, 2, 2)
    pred = torch.tensor([[[6.0, 8.0], [3.0, 0.0]], [[0.0, 50.0], [0.0, 0.0]]])
    metric = KeypointPCK(categories=("x", "y"), difficulty_names=("flag",))
    metric.update(
        index=torch.tensor([0, 1]),
        pred_kps=pred,
        trg_kps=trg,
        valid=torch.tensor([[True, True], [True, False]]),
        bound=torch.tensor([100.0, 100.0]),
        category=torch.tensor([1, 1]),
        difficulty=torch.tensor([[0], [2]]),
    )
    result = metric.compute()
    assert result["pairs"] == 2
    assert result["pck@0.01"] == 0.0
    assert result["pck@0.05"] == 0.25
    assert result["pck@0.1"] == 0.5
    assert result["per_category"] == {
        "y": {"pairs": 2, "pck@0.01": 0.0, "pck@0.05": 0.25, "pck@0.1": 0.5}
    }
    assert result["per_difficulty"]["flag"]["0"]["pck@0.1"] == 1.0
    assert result["per_difficulty"]["flag"]["2"]["pck@0.1"] == 0.0
    records = metric.records()
    assert records.kps_offsets.tolist() == [0, 2, 3]
    assert records.hits[:, 2].tolist() == [True, True, False]


def test_keypoint_pck_rejects_pairs_without_keypoints():
    data = keypoint_data(pairs=2)
    data["valid"][1] = False
    with pytest.raises(ValueError, match="indices \\[1\\]"):
        new_pck().update(**data)


def test_keypoint_pck_deduplicates_and_ignores_update_order():
    data = keypoint_data()
    reference = new_pck()
    reference.update(**data)
    expected = reference.compute()

    shuffled = new_pck()
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    padded = torch.cat((order, order[:3]))  # a sampler repeating three pairs
    for rows in padded.split(5):
        shuffled.update(**take(data, rows))
    assert shuffled.compute() == expected
    assert expected["pairs"] == 12
    records = shuffled.records()
    assert records.index.tolist() == list(range(12))
    assert records.kps_offsets[-1] == int(data["valid"].sum())


def test_dense_flow_metric_values():
    gt = torch.zeros(2, 2, 10, 20)
    pred = gt.clone()
    pred[0, 0, :, :10] = 2.0  # half of pair 0 is off by 2 px = 0.1 * max(10, 20)
    pred[1, 1] = 0.5  # all of pair 1 off by 0.5 px
    valid = torch.ones(2, 1, 10, 20, dtype=torch.bool)
    valid[1, :, :5] = False
    metric = DenseFlowMetric()
    metric.update(torch.tensor([3, 4]), pred, gt, valid)
    result = metric.compute()
    assert result == {
        "pairs": 2,
        "pck@0.01": pytest.approx(0.25),
        "pck@0.05": pytest.approx(0.75),
        "pck@0.1": pytest.approx(1.0),
        "epe_px": pytest.approx((1.0 + 0.5) / 2),
    }


def test_dense_flow_metric_deduplicates_and_ignores_order():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(6, 2, 8, 8, generator=g) * 3
    pred = gt + torch.randn(6, 2, 8, 8, generator=g)
    valid = torch.rand(6, 1, 8, 8, generator=g) < 0.7
    index = torch.arange(6)
    reference = DenseFlowMetric()
    reference.update(index, pred, gt, valid)
    metric = DenseFlowMetric()
    for rows in (torch.tensor([5, 2]), torch.tensor([0, 1, 3]), torch.tensor([4, 5, 0])):
        metric.update(index[rows], pred[rows], gt[rows], valid[rows])
    assert metric.compute() == reference.compute()
    assert reference.compute()["pairs"] == 6


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = keypoint_data(pairs=7)
    # DistributedSampler-style split: pad 7 pairs to 8 with a repeat, stride over ranks.
    rows = torch.cat((torch.arange(7), torch.tensor([0])))[rank::world]
    pck = new_pck()
    dense = DenseFlowMetric()
    for batch in rows.split(3):
        pck.update(**take(data, batch))
        flow = data["pred_kps"][batch, :4].reshape(-1, 2, 2, 2)
        dense.update(
            batch, flow, torch.zeros_like(flow), torch.ones(len(batch), 1, 2, 2, dtype=torch.bool)
        )
    queue.put((rank, pck.compute(), dense.compute(), pck.records().index.tolist()))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_metrics_are_exact_across_processes():
    data = keypoint_data(pairs=7)
    pck = new_pck()
    pck.update(**data)
    flow = data["pred_kps"][:, :4].reshape(-1, 2, 2, 2)
    dense = DenseFlowMetric()
    dense.update(
        data["index"], flow, torch.zeros_like(flow), torch.ones(7, 1, 2, 2, dtype=torch.bool)
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, start_method="fork")
    results = [queue.get() for _ in range(2)]
    for _, pck_result, dense_result, indices in results:
        assert pck_result == pck.compute()
        assert dense_result == dense.compute()
        assert indices == list(range(7))
