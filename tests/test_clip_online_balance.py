"""Online balancing (MetaCLIP's per-epoch draw): the per-entry counts over epochs follow the expected distribution
(chi-square), epochs differ, the stream is deterministic and a resumed epoch gives the same batches; sources
(manifest, entry counts, pool) and their user errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from clip_train.data import ShardBatches, StreamConfig, epoch_loader, resolve_shards, sample_meta
from clip_train.errors import TrainError
from clip_train.online_balance import OnlineBalance, load_online_balance
from clip_train.shards import Sample, jpeg_bytes, shape_image, write_shards
from clip_train.tokenizer import CLIPTokenizer


def _zipf_pool(n: int, n_entries: int, seed: int) -> tuple[list[str], list[list[int]], dict[int, int]]:
    """n pairs; most match one entry (Zipf-distributed), some two."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_entries + 1) ** 1.1
    weights /= weights.sum()
    uids, lists, counts = [], [], {}
    for i in range(n):
        k = 1 if rng.random() < 0.85 else 2
        entries = sorted({int(e) for e in rng.choice(n_entries, size=k, p=weights)})
        uids.append(f"u{i:06d}")
        lists.append(entries)
        for e in entries:
            counts[e] = counts.get(e, 0) + 1
    return uids, lists, counts


def test_per_entry_counts_over_epochs_match_metaclip_chi_square():
    uids, lists, counts = _zipf_pool(6000, 60, seed=0)
    t = 40.0
    online = OnlineBalance(counts, t, seed=11)
    epochs = 30
    single = [i for i, ids in enumerate(lists) if len(ids) == 1]  # independent Bernoulli sums per entry
    p = np.array([online.keep_probability(lists[i]) for i in single])
    entry_of = np.array([lists[i][0] for i in single])
    observed = np.zeros(60)
    per_epoch_kept = []
    for epoch in range(epochs):
        keep = np.array([online.keep(epoch, uids[i], lists[i]) for i in single])
        observed += np.bincount(entry_of[keep], minlength=60)
        per_epoch_kept.append(set(np.asarray(single)[keep].tolist()))
    expected = epochs * np.bincount(entry_of, weights=p, minlength=60)
    variance = epochs * np.bincount(entry_of, weights=p * (1 - p), minlength=60)
    tested = variance > 0  # entries below t are kept whole: no randomness to test
    assert tested.sum() >= 10
    chi2 = float((((observed - expected) ** 2)[tested] / variance[tested]).sum())
    p_value = stats.chi2.sf(chi2, df=int(tested.sum()))
    assert p_value > 1e-3, (chi2, int(tested.sum()))
    # Head entries are capped near t per epoch; entries under t keep everything, every epoch.
    head = int(np.argmax(np.bincount(entry_of, minlength=60)))
    assert abs(observed[head] / epochs - t) < 0.25 * t
    tail = [e for e in range(60) if 0 < counts.get(e, 0) < t]
    assert all(observed[e] == epochs * np.sum(entry_of == e) for e in tail)
    # A new draw every epoch: head pairs differ between epochs, the same epoch is the same draw.
    assert per_epoch_kept[0] != per_epoch_kept[1]
    again = {i for i in single if online.keep(0, uids[i], lists[i])}
    assert again == per_epoch_kept[0]
    # a different seed is a different stream
    other = OnlineBalance(counts, t, seed=12)
    assert {i for i in single if other.keep(0, uids[i], lists[i])} != per_epoch_kept[0]


def test_expected_kept_agrees_with_build_math():
    from pipelines.balance import metaclip

    uids, lists, counts = _zipf_pool(2000, 30, seed=1)
    online = OnlineBalance(counts, 25.0)
    assert online.expected_kept(lists) == pytest.approx(metaclip.expected_kept(lists, counts, 25.0))


# ------------------------------------------------------------------------------------------------ in the loader
@pytest.fixture(scope="module")
def pool_shards(tmp_path_factory):
    """120 shape images whose .json lists integer entry ids: entry 0 is the head (every pair), 1..5 the tail."""
    out = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(4)
    samples = []
    for i in range(120):
        entries = [0] + ([1 + i % 5] if i % 3 == 0 else [])
        key = f"p{i:05d}"
        samples.append(Sample(key, jpeg_bytes(shape_image("red", "circle", rng, 32)), f"a red circle number {i}",
                              {"uid": key, "entry_ids": entries}))
    write_shards(samples, out / "shards", samples_per_shard=30)
    counts = {0: 120, **{e: 8 for e in range(1, 6)}}
    manifest = {"entry_counts": {"before": {str(k): v for k, v in counts.items()}}, "balance": {"t": 20.0}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.train([f"a red circle number {i}" for i in range(120)], vocab_size=600)


def _cfg(urls, online, steps=4):
    return StreamConfig(urls=urls, batch_size=6, image_size=32, steps_per_epoch=steps, seed=3, shuffle_buffer=20,
                        shuffle_initial=5, online=online)


def test_loader_keeps_exactly_the_epochs_draw(pool_shards):
    online = load_online_balance(str(pool_shards / "manifest.json"), seed=3)
    assert online.t == 20.0 and online.counts[0] == 120
    urls = resolve_shards(str(pool_shards / "shards")).urls
    for epoch in (0, 1):
        ds = ShardBatches(_cfg(urls, online), tokenizer=None, epoch=epoch)
        seen = []
        stream = ds.samples()
        for _ in range(60):
            meta = sample_meta(next(stream))
            seen.append(meta["uid"])
            assert online.keep(epoch, meta["uid"], meta["entry_ids"])
        tail_pairs = {f"p{i:05d}" for i in range(120) if i % 3 == 0}
        assert tail_pairs & set(seen)  # tail pairs (p = 1) are always in the draw
        assert ds.stats["online_seen"] > ds.stats["online_kept"] > 0  # head pairs were dropped


def test_online_stream_is_deterministic_and_resumes_mid_epoch(pool_shards, tokenizer):
    online = load_online_balance(str(pool_shards), seed=3)  # a build directory holding manifest.json
    urls = resolve_shards(str(pool_shards / "shards")).urls

    def batches(skip=0, workers=0):
        return [(b[0], b[1]) for b in epoch_loader(_cfg(urls, online), tokenizer, 1, 0, 1, workers, skip_batches=skip)]

    full, again, resumed = batches(), batches(), batches(skip=2)
    assert len(full) == 4 and len(resumed) == 2
    for (a, b), (c, d) in zip(full, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    for (a, b), (c, d) in zip(full[2:], resumed):
        assert torch.equal(a, c) and torch.equal(b, d)
    no_online = [(b[0], b[1]) for b in epoch_loader(_cfg(urls, None), tokenizer, 1, 0, 1, 0)]
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(full, no_online))


def test_sources_and_user_errors(tmp_path):
    pq.write_table(pa.table({"entry_id": pa.array([1, 2], pa.int32()), "count": pa.array([5, 50], pa.int64())}),
                   tmp_path / "counts.parquet")
    ob = load_online_balance(str(tmp_path / "counts.parquet"), t=10)
    assert ob.keep_probability([2]) == pytest.approx(0.2) and ob.keep_probability([1]) == 1.0
    with pytest.raises(TrainError, match="--online-t"):
        load_online_balance(str(tmp_path / "counts.parquet"))
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"uid": ["a", "b", "c"], "entry_ids": [[1], [1, 2], [2]], "status": ["ok", "ok", "bad"]}),
                   pool / "samples-0.parquet")
    ob = load_online_balance(str(pool), t=1)
    assert dict(ob.counts) == {1: 2, 2: 1}
    (tmp_path / "m.json").write_text(json.dumps({"balance": {"t": 3}}))
    with pytest.raises(TrainError, match="entry_counts.before"):
        load_online_balance(str(tmp_path / "m.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no manifest.json and no Parquet"):
        load_online_balance(str(tmp_path / "empty"))
    with pytest.raises(TrainError, match="positive"):
        OnlineBalance({1: 3}, t=0)
    with pytest.raises(TrainError, match="integer"):
        OnlineBalance({1: 3}, t=2).keep(0, "u", ["red"])


@pytest.mark.slow
def test_trainer_with_online_balance_logs_the_draw(pool_shards, tmp_path):
    from clip_train import train

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = train.main(["--data", str(pool_shards / "shards"), "--model", "tiny", "--out", str(out), "--batch-size", "8",
                         "--steps", "3", "--workers", "0", "--threads", "1", "--device", "cpu", "--vocab-size", "600",
                         "--online-balance", str(pool_shards / "manifest.json"), "--seed", "3"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    ob = config["online_balance"]
    assert ob["t"] == 20.0 and ob["pool_samples"] == 120
    # 40 tail pairs are kept whole, the 80 head-only pairs with p = 20/120
    assert ob["expected_per_epoch"] == pytest.approx(40 + 80 * 20 / 120)
    assert config["samples_per_epoch"] == round(ob["expected_per_epoch"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert 0 < metrics[-1]["online_kept_fraction"] < 1 and metrics[-1]["skipped"] == {}
