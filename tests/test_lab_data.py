"""The lab's offline data loaders: corpora, shards, images, determinism and every error path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gluon_optim.lab.data import (
    DataError,
    ImageDataset,
    TokenDataset,
    cifar10,
    digits,
    load_data,
    read_shard,
    shard_corpus,
    stdlib_corpus,
    text_corpus,
    write_shard,
)
from gluon_optim.lab.data.tokens import _collect_stdlib

# ---------------------------------------------------------------------------- token batches


def _counting(n: int = 5000) -> TokenDataset:
    """Token i has id i, so every correct window is a run of consecutive integers."""
    train = np.arange(n, dtype=np.uint16)
    val = np.arange(n, 2 * n, dtype=np.uint16)
    return TokenDataset("counting", 2 * n, [train], [val])


def test_batch_shapes_and_shift() -> None:
    ds = _counting()
    x, y = ds.batch("train", 0, 8, 32, seed=0)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # consecutive ids: y is x shifted by one token
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert int(x.min()) >= 0 and int(y.max()) < ds.num_tokens("train")


def test_batch_is_a_pure_function_of_its_arguments() -> None:
    a, b = _counting(), _counting()  # two instances: what a resumed run would build
    x1, y1 = a.batch("train", 7, 4, 16, seed=3)
    x2, y2 = b.batch("train", 7, 4, 16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a.batch("train", 8, 4, 16, seed=3)  # an intervening call changes nothing
    assert torch.equal(a.batch("train", 7, 4, 16, seed=3)[0], x1)
    assert not torch.equal(a.batch("train", 8, 4, 16, seed=3)[0], x1)
    assert not torch.equal(a.batch("train", 7, 4, 16, seed=4)[0], x1)
    xv, _ = a.batch("val", 7, 4, 16, seed=3)
    assert int(xv.min()) >= 5000  # val windows come from the val stream
    assert not torch.equal(xv - 5000, x1)


def test_eval_batches_are_fixed() -> None:
    a, b = _counting(), _counting()
    ea = a.eval_batches("val", 3, 4, 16)
    eb = b.eval_batches("val", 3, 4, 16)
    assert len(ea) == 3
    for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 16) and int(xa.min()) >= 5000
    assert not torch.equal(ea[0][0], ea[1][0])
    assert a.eval_batches("val", 0, 4, 16) == []


def test_batch_rejects_short_split_and_bad_arguments() -> None:
    ds = TokenDataset("tiny", 256, [np.arange(10, dtype=np.uint8)], [np.arange(5, dtype=np.uint8)])
    ds.batch("train", 0, 2, 9, seed=0)  # exactly block_size + 1 tokens is enough
    with pytest.raises(DataError, match=r"val split has 5 tokens.*block_size \+ 1 = 6"):
        ds.batch("val", 0, 2, 5, seed=0)
    with pytest.raises(DataError, match="train split has 10 tokens"):
        ds.eval_batches("train", 1, 2, 10)
    with pytest.raises(DataError, match="unknown split 'test'"):
        ds.batch("test", 0, 2, 4, seed=0)
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        ds.batch("train", 0, 0, 4, seed=0)
    with pytest.raises(DataError, match="step must be >= 0"):
        ds.batch("train", -1, 2, 4, seed=0)
    with pytest.raises(DataError, match="block_size must be an integer"):
        ds.batch("train", 0, 2, 4.0, seed=0)  # type: ignore[arg-type]


def test_empty_split_is_rejected() -> None:
    with pytest.raises(DataError, match="val split is empty"):
        TokenDataset("e", 256, [np.arange(9, dtype=np.uint8)], [np.zeros(0, np.uint8)])


# ---------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_cached_and_deterministic(tmp_path: Path) -> None:
    first = stdlib_corpus(tmp_path, max_bytes=3000)
    assert first.vocab_size == 256 and first.name == "stdlib"
    assert first.num_tokens("train") == first.num_tokens("val") == 3000
    assert first.info["cached"] is False
    data_files = sorted(tmp_path.glob("stdlib-*.u8"))
    assert [f.name.rsplit(".", 2)[1] for f in data_files] == ["train", "val"]
    assert len(list(tmp_path.glob("stdlib-*.json"))) == 1
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temp files
    stamps = [f.stat().st_mtime_ns for f in data_files]

    second = stdlib_corpus(tmp_path, max_bytes=3000)
    assert second.info["cached"] is True
    assert [f.stat().st_mtime_ns for f in data_files] == stamps  # reused, not rewritten
    for split in ("train", "val"):
        b1 = first.batch(split, 5, 4, 64, seed=1)
        b2 = second.batch(split, 5, 4, 64, seed=1)
        assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])

    # Proof that the second load reads the cache: same-size edited bytes show up.
    train_file = data_files[0]
    train_file.write_bytes(b"z" * 3000)
    third = stdlib_corpus(tmp_path, max_bytes=3000)
    x, _ = third.batch("train", 0, 2, 8, seed=0)
    assert bool((x == ord("z")).all())


def test_stdlib_corpus_splits_by_file(tmp_path: Path) -> None:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [rel for rel, _ in _collect_stdlib(root)]
    assert files == sorted(files)
    assert not any(
        part in {"site-packages", "test", "tests"} for f in files for part in f.split("/")
    )
    ds = stdlib_corpus(tmp_path, max_bytes=2000, val_every=4)
    # File 0 opens the train split; file 3 (the 4th) opens the val split.
    first_train = (root / files[0]).read_bytes()
    first_val = (root / files[3]).read_bytes()
    train_arr = np.asarray(ds._streams["train"].parts[0])
    val_arr = np.asarray(ds._streams["val"].parts[0])
    n = min(len(first_train), 2000)
    assert bytes(train_arr[:n]) == first_train[:n]
    m = min(len(first_val), 2000)
    assert bytes(val_arr[:m]) == first_val[:m]
    assert bytes(train_arr[:200]) != bytes(val_arr[:200])


def test_stdlib_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLUON_OPTIM_CACHE", str(tmp_path / "envcache"))
    stdlib_corpus(max_bytes=500)
    assert len(list((tmp_path / "envcache").glob("stdlib-*.train.u8"))) == 1


def test_stdlib_unwritable_cache_warns_and_works(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="could not write the stdlib corpus cache"):
        ds = stdlib_corpus(blocker / "cache", max_bytes=500)
    assert ds.num_tokens("train") == 500


def test_stdlib_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="max_bytes must be >= 1"):
        stdlib_corpus(tmp_path, max_bytes=0)
    with pytest.raises(DataError, match="val_every must be >= 2"):
        stdlib_corpus(tmp_path, val_every=1)


# ---------------------------------------------------------------------------- text corpus


def test_text_file_split_by_position(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8 + b"\xff\xfe not utf-8 \x80"  # arbitrary bytes are fine
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    ds = text_corpus(path, val_every=4)
    n_val = len(data) // 4
    assert ds.vocab_size == 256
    assert ds.num_tokens("val") == n_val
    assert ds.num_tokens("train") == len(data) - n_val
    x, y = ds.batch("val", 0, 4, 10, seed=0)
    val_bytes = data[-n_val:]
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert bytes(row_x) in val_bytes and bytes(row_y) in val_bytes
        assert row_y[:-1] == row_x[1:]


def test_text_folder_split_by_file(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    contents = {}
    for i in range(12):
        sub = root / ("a" if i < 6 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        contents[f"{sub.name}/f{i:02d}.txt"] = f"file {i} ".encode() * 5
        (sub / f"f{i:02d}.txt").write_bytes(contents[f"{sub.name}/f{i:02d}.txt"])
    (root / ".hidden").write_bytes(b"SECRET" * 100)
    (root / ".git").mkdir()
    (root / ".git" / "obj").write_bytes(b"SECRET" * 100)
    ds = text_corpus(root, val_every=5)
    order = sorted(contents)
    val_names = [order[4], order[9]]
    train_names = [n for n in order if n not in val_names]
    assert ds.info["files"] == 12 and ds.info["val_files"] == 2
    assert ds.num_tokens("val") == sum(len(contents[n]) for n in val_names) + 1
    assert ds.num_tokens("train") == sum(len(contents[n]) for n in train_names) + 9
    val = bytes(np.asarray(ds._streams["val"].parts[0]))
    assert val == b"\n".join(contents[n] for n in val_names)
    x, _ = ds.batch("train", 0, 16, 20, seed=0)
    assert all(b"SECRET" not in bytes(r) for r in x.tolist())


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file or directory"):
        text_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        text_corpus(tmp_path / "empty.txt")
    (tmp_path / "small.txt").write_bytes(b"abc")
    with pytest.raises(DataError, match="3 bytes is too small"):
        text_corpus(tmp_path / "small.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir: the folder contains no files"):
        text_corpus(tmp_path / "emptydir")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        (few / f"{i}.txt").write_bytes(b"hello")
    with pytest.raises(DataError, match="3 files, fewer than val_every=10"):
        text_corpus(few)
    zeros = tmp_path / "zeros"
    zeros.mkdir()
    for i in range(4):
        (zeros / f"{i}.txt").write_bytes(b"" if i == 3 else b"data")
    with pytest.raises(DataError, match="the val files are all empty"):
        text_corpus(zeros, val_every=4)


# ---------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path: Path) -> None:
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / "one.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(path).tolist() == tokens.tolist()
    write_shard(tmp_path / "list.bin", [3, 4, 5])
    assert read_shard(tmp_path / "list.bin").tolist() == [3, 4, 5]
    write_shard(tmp_path / "empty.bin", [])
    assert read_shard(tmp_path / "empty.bin").shape == (0,)


def test_multiple_shards_are_one_stream(tmp_path: Path) -> None:
    sizes = [50, 7, 60]  # a 7-token shard lies wholly inside many 20-token windows
    bounds = np.cumsum([0, *sizes])
    for i in reversed(range(3)):  # written out of order: the glob result is sorted
        write_shard(tmp_path / f"train_{i:03d}.bin", np.arange(bounds[i], bounds[i] + sizes[i]))
    write_shard(tmp_path / "val_000.bin", np.arange(1000, 1100))
    ds = shard_corpus(str(tmp_path / "train_*.bin"), str(tmp_path / "val_*.bin"), vocab_size=2000)
    assert ds.num_tokens("train") == 117 and ds.num_tokens("val") == 100
    assert ds.info["train_shards"] == [str(tmp_path / f"train_{i:03d}.bin") for i in range(3)]
    crossed = 0
    for step in range(20):
        x, y = ds.batch("train", step, 8, 20, seed=0)
        assert torch.equal(y, x + 1)  # consecutive across shard boundaries
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)
        crossed += int(((x[:, 0] < 50) & (x[:, -1] >= 57)).sum())
    assert crossed > 0
    # The last window reaching the final token is reachable: offsets span the whole stream.
    tops = {int(ds.batch("train", s, 64, 20, seed=1)[1].max()) for s in range(30)}
    assert 116 in tops
    # A folder means its *.bin files.
    val_dir = tmp_path / "v"
    val_dir.mkdir()
    write_shard(val_dir / "a.bin", np.arange(30))
    ds2 = shard_corpus(str(tmp_path / "train_00[01].bin"), str(val_dir))
    assert ds2.num_tokens("train") == 57 and ds2.num_tokens("val") == 30
    assert ds2.vocab_size == 50304


def _corrupt(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))


def test_shard_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(100))
    with pytest.raises(DataError, match="matches no files"):
        shard_corpus(str(tmp_path / "nothing_*.bin"), str(good))
    with pytest.raises(DataError, match=r"missing\.bin: no such file"):
        shard_corpus(str(good), str(tmp_path / "missing.bin"))
    bad_magic = tmp_path / "magic.bin"
    write_shard(bad_magic, np.arange(10))
    _corrupt(bad_magic, 0, 12345)
    with pytest.raises(DataError, match=r"magic\.bin: bad magic number 12345 .*20240520"):
        shard_corpus(str(good), str(bad_magic))
    bad_version = tmp_path / "version.bin"
    write_shard(bad_version, np.arange(10))
    _corrupt(bad_version, 4, 2)
    with pytest.raises(DataError, match=r"version\.bin: unsupported version 2"):
        read_shard(bad_version)
    bad_count = tmp_path / "count.bin"
    write_shard(bad_count, np.arange(10))
    _corrupt(bad_count, 8, 11)
    with pytest.raises(
        DataError, match=r"count\.bin: header says 11 tokens.*1046 bytes.*1044 bytes"
    ):
        read_shard(bad_count)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(
        DataError, match=r"short\.bin: 100 bytes, shorter than the 1024-byte header"
    ):
        read_shard(short)
    empty = tmp_path / "empty.bin"
    write_shard(empty, [])
    with pytest.raises(DataError, match="hold 0 tokens"):
        shard_corpus(str(good), str(empty))
    ds = shard_corpus(str(good), str(good), vocab_size=50)
    with pytest.raises(DataError, match=r"token id \d+ in the train split is >= vocab_size 50"):
        for step in range(50):
            ds.batch("train", step, 4, 8, seed=0)


def test_write_shard_rejects_bad_tokens(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\[0, 65535\], got range \[-1, 3\]"):
        write_shard(tmp_path / "neg.bin", [-1, 3])
    with pytest.raises(DataError, match="got range"):
        write_shard(tmp_path / "big.bin", [70000])
    with pytest.raises(DataError, match="must be 1-D"):
        write_shard(tmp_path / "2d.bin", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(DataError, match="must be integers"):
        write_shard(tmp_path / "float.bin", np.array([1.5]))
    assert not list(tmp_path.iterdir())  # nothing written for rejected input


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digit_data() -> ImageDataset:
    return digits()


def test_digits_shapes_classes_normalization(digit_data: ImageDataset) -> None:
    ds = digit_data
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 8)
    assert ds.num_examples("train") + ds.num_examples("val") == 1797
    assert ds.num_examples("val") == 450
    x, y = ds.batch("train", 0, None, seed=0)
    assert x.shape == (1347, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
    xv, yv = ds.batch("val", 0, 0, seed=0)
    assert xv.shape == (450, 1, 8, 8)
    assert abs(float(xv.mean())) < 0.1  # normalized with TRAIN statistics, so only close to 0
    for labels, n in ((y, 1347), (yv, 450)):  # stratified: every class in proportion
        counts = torch.bincount(labels, minlength=10).double() / n
        assert float((counts - 0.1).abs().max()) < 0.02


def test_digits_split_is_deterministic(digit_data: ImageDataset) -> None:
    again = digits()
    assert torch.equal(again.batch("val", 0, None, 0)[1], digit_data.batch("val", 0, None, 0)[1])
    other = digits(seed=1)
    assert not torch.equal(
        other.batch("val", 0, None, 0)[1], digit_data.batch("val", 0, None, 0)[1]
    )
    with pytest.raises(DataError, match="val_fraction must be in"):
        digits(val_fraction=1.0)


def _indexed(n: int = 103) -> ImageDataset:
    """Image i is filled with the value i, so a batch reveals which examples it holds."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 2, 3, 3).contiguous()
    y = torch.arange(n) % 10
    return ImageDataset("indexed", (x, y), (x[:20].clone(), y[:20].clone()), 10)


def _ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return [int(v) for v in batch[0][:, 0, 0, 0]]


def test_image_minibatches_are_seeded_epochs() -> None:
    ds = _indexed()
    assert (ds.in_channels, ds.image_size, ds.num_examples("train")) == (2, 3, 103)
    epoch0 = [_ids(ds.batch("train", s, 10, seed=5)) for s in range(10)]  # 103 // 10 per epoch
    flat = sum(epoch0, [])
    assert len(flat) == 100 and len(set(flat)) == 100  # no repeats inside an epoch
    assert flat != sorted(flat)  # shuffled
    epoch1 = [_ids(ds.batch("train", s, 10, seed=5)) for s in range(10, 20)]
    assert len(set(sum(epoch1, []))) == 100 and epoch1 != epoch0  # a new order each epoch
    x, y = ds.batch("train", 3, 10, seed=5)
    assert torch.equal(y, x[:, 0, 0, 0].long() % 10)  # images and labels stay paired
    fresh = _indexed()  # a new object (a resumed run), jumping straight to a later step
    assert _ids(fresh.batch("train", 13, 10, seed=5)) == epoch1[3]
    assert _ids(fresh.batch("train", 3, 10, seed=5)) == epoch0[3]
    assert _ids(ds.batch("train", 0, 10, seed=6)) != epoch0[0]
    with pytest.raises(DataError, match="batch_size 200 exceeds the 103 examples"):
        ds.batch("train", 0, 200, seed=0)
    full = ds.batch("train", 9, None, seed=3)
    assert _ids(full) == list(range(103))  # full batch: fixed order, step/seed ignored
    assert _ids(ds.batch("train", 4, 0, seed=1)) == _ids(ds.batch("train", 0, -1, seed=2))
    with pytest.raises(DataError, match="unknown split"):
        ds.batch("valid", 0, 10, seed=0)


def test_image_dataset_validates_tensors() -> None:
    x = torch.zeros(4, 1, 2, 2)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(DataError, match="must be float32"):
        ImageDataset("bad", (x.double(), y), (x, y), 10)
    with pytest.raises(DataError, match="labels must be int64"):
        ImageDataset("bad", (x, y[:3]), (x, y), 10)
    with pytest.raises(DataError, match="outside"):
        ImageDataset("bad", (x, y + 10), (x, y), 10)
    with pytest.raises(DataError, match="shapes differ"):
        ImageDataset("bad", (x, y), (torch.zeros(4, 3, 2, 2), y), 10)
    with pytest.raises(DataError, match="val split is empty"):
        ImageDataset("bad", (x, y), (x[:0], y[:0]), 10)


def test_image_eval_batches_cover_split_in_order(digit_data: ImageDataset) -> None:
    chunks = digit_data.eval_batches("val", 128)
    assert [c[0].shape[0] for c in chunks] == [128, 128, 128, 66]
    full_x, full_y = digit_data.batch("val", 0, None, seed=0)
    assert torch.equal(torch.cat([c[0] for c in chunks]), full_x)
    assert torch.equal(torch.cat([c[1] for c in chunks]), full_y)
    (whole,) = digit_data.eval_batches("val", None)
    assert torch.equal(whole[1], full_y)


# ---------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(rng: np.random.Generator, n: int) -> dict[bytes, Any]:
    return {
        b"batch_label": b"tiny",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _write_cifar(root: Path, n: int = 20) -> dict[str, dict[bytes, Any]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_batch(rng, n)
        with (root / name).open("wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return batches


def test_cifar10_from_tiny_pickles(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path / "cifar")
    ds = cifar10(tmp_path / "cifar")
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    assert ds.num_examples("train") == 100 and ds.num_examples("val") == 20
    x, y = ds.batch("train", 0, None, seed=0)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
    expected_labels = [v for i in range(1, 6) for v in batches[f"data_batch_{i}"][b"labels"]]
    assert y.tolist() == expected_labels
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4)
    # Channel-major layout: undo the normalization and compare with the raw bytes.
    mean = torch.tensor(ds.info["mean"]).reshape(3, 1, 1)
    std = torch.tensor(ds.info["std"]).reshape(3, 1, 1)
    xv, yv = ds.batch("val", 0, None, seed=0)
    raw = torch.from_numpy(batches["test_batch"][b"data"][3].reshape(3, 32, 32).astype(np.float32))
    assert torch.allclose(xv[3] * std + mean, raw / 255, atol=1e-5)
    assert yv.tolist() == batches["test_batch"][b"labels"]
    xb, yb = ds.batch("train", 2, 16, seed=0)
    assert xb.shape == (16, 3, 32, 32) and yb.shape == (16,)
    # The parent of the extracted archive works too.
    _write_cifar(tmp_path / "parent" / "cifar-10-batches-py")
    assert cifar10(tmp_path / "parent").num_examples("val") == 20


def test_cifar10_reads_numpy1_pickles(tmp_path: Path) -> None:
    root = tmp_path / "old"
    _write_cifar(root, n=10)
    for f in root.iterdir():  # the real archive names numpy.core (numpy 1.x); must load quietly
        raw = f.read_bytes()
        assert b"numpy._core.multiarray" in raw
        f.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert cifar10(root).num_examples("train") == 50


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.getenv, ("HOME",))


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: no such directory"):
        cifar10(tmp_path / "nowhere")
    root = tmp_path / "c"
    _write_cifar(root, n=5)
    (root / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        cifar10(root)
    (root / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match=r"test_batch: corrupt or not a pickle"):
        cifar10(root)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"pixels": np.zeros((5, 3072), np.uint8)}, f)
    with pytest.raises(DataError, match=r"test_batch: needs keys b'data' and b'labels'"):
        cifar10(root)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, f)
    with pytest.raises(DataError, match="rows have 100 values, not 3072"):
        cifar10(root)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 10]}, f)
    with pytest.raises(DataError, match=r"labels span \[0, 10\], outside \[0, 10\)"):
        cifar10(root)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="5 images but labels of shape"):
        cifar10(root)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refusing to load global"):
        cifar10(root)
    (root / "afile").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        cifar10(root / "afile")


# ---------------------------------------------------------------------------- load_data


def test_load_data_specs(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_bytes(b"hello world " * 50)
    assert isinstance(load_data(f"text:{text}"), TokenDataset)
    write_shard(tmp_path / "a.bin", np.arange(64))
    ds = load_data(f"shards:{tmp_path / '*.bin'},{tmp_path / 'a.bin'}")
    assert isinstance(ds, TokenDataset) and ds.num_tokens("val") == 64
    _write_cifar(tmp_path / "cifar", n=4)
    assert isinstance(load_data(f"cifar10:{tmp_path / 'cifar'}"), ImageDataset)
    assert isinstance(load_data("digits"), ImageDataset)
    std = load_data("stdlib", cache_dir=tmp_path / "cache")
    assert isinstance(std, TokenDataset) and std.vocab_size == 256
    assert list((tmp_path / "cache").glob("stdlib-*.train.u8"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "imagenet:/data",
            r"unknown data kind 'imagenet'.*stdlib.*text:PATH.*shards:.*digits.*cifar10",
        ),
        ("", "unknown data kind ''"),
        ("text", "text needs an argument"),
        ("text:", "text needs an argument"),
        ("digits:4", "digits takes no argument"),
        ("shards:only_one", "exactly two comma-separated globs"),
        ("shards:a,b,c", "exactly two comma-separated globs"),
        ("text:/definitely/not/here", "no such file or directory"),
    ],
)
def test_load_data_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(spec)
