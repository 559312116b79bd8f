import os

import numpy as np
import pytest
import torch

from conftest import SHARED_JPEG, make_tar, write_image_folder
from fastcifar.data import DataError, ensure_betons, prepare_betons, read_beton, read_source
from fastcifar.data.beton import MANIFEST, MARKER, check_manifest
from conftest import write_official
from fastcifar.data.loaders import MEAN, STD, ResidentLoader, augment, normalize
from fastcifar.data.sources import CLASSES


# ---------------------------------------------------------------- readers

@pytest.mark.parametrize("key", ["bytes", "str"])
def test_official_folder_both_key_encodings(tmp_path, key):
    want = write_official(str(tmp_path / "cifar-10-batches-py"), key=key)
    for path in (tmp_path / "cifar-10-batches-py", tmp_path):  # the batches folder or its parent
        ds = read_source(str(path))
        for split in ("train", "test"):
            np.testing.assert_array_equal(ds.splits[split].images, want[split][0])
            np.testing.assert_array_equal(ds.splits[split].labels, want[split][1])
    assert ds.splits["train"].images.shape == (100, 32, 32, 3)


def test_official_tarball(tmp_path):
    want = write_official(str(tmp_path / "src" / "cifar-10-batches-py"))
    tar = make_tar(str(tmp_path / "src"), str(tmp_path / "cifar-10-python.tar.gz"))
    ds = read_source(tar)
    np.testing.assert_array_equal(ds.splits["test"].images, want["test"][0])
    assert "official" in ds.description


def test_official_pickle_is_never_executed(tmp_path):
    import pickle
    folder = tmp_path / "b"
    write_official(str(folder))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="forbidden global"):
        read_source(str(folder))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_folder(image_folder, tmp_path, fmt):
    if fmt == "jpg":
        root = str(tmp_path / "jpg")
        want = write_image_folder(root, fmt="jpg")
    else:
        root, want = image_folder
    ds = read_source(root)
    assert ds.class_counts("train") == [3] * 10 and ds.class_counts("test") == [2] * 10
    np.testing.assert_array_equal(ds.splits["train"].labels, want["train"][1])
    if fmt == "png":  # lossless: pixels must survive exactly
        np.testing.assert_array_equal(ds.splits["train"].images, want["train"][0])
    else:
        assert np.abs(ds.splits["train"].images.astype(int) - want["train"][0]).mean() < 60


@pytest.mark.parametrize("suffix,prefix", [(".tar", ""), (".tar.gz", "cifar10"), (".tgz", "")])
def test_image_tarball(image_folder, tmp_path, suffix, prefix):
    root, want = image_folder
    ds = read_source(make_tar(root, str(tmp_path / f"d{suffix}"), prefix=prefix))
    np.testing.assert_array_equal(ds.splits["test"].images, want["test"][0])
    np.testing.assert_array_equal(ds.splits["test"].labels, want["test"][1])


def test_class_folders_follow_official_order(tmp_path):
    # folders created in reverse order must still map to airplane=0 ... truck=9
    write_image_folder(str(tmp_path), per_class=(1, 1), classes=tuple(reversed(CLASSES)))
    ds = read_source(str(tmp_path))
    assert ds.splits["train"].labels.tolist() == list(range(10))


@pytest.mark.slow  # reads all 60,000 images
@pytest.mark.skipif(not os.path.exists(SHARED_JPEG), reason="the shared CIFAR-10 JPEG copy is not beside the repo")
def test_shared_jpeg_copy_reads_fully():
    ds = read_source(SHARED_JPEG)
    assert ds.class_counts("train") == [5000] * 10 and ds.class_counts("test") == [1000] * 10


# ---------------------------------------------------------------- bad input

def _expect(msg, fn, *a):
    with pytest.raises(DataError, match=msg) as e:
        fn(*a)
    assert "\n" not in str(e.value)


def test_bad_sources(tmp_path, image_folder):
    root, _ = image_folder
    _expect("no such file", read_source, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    _expect("empty", read_source, str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    _expect("not a folder or a .tar", read_source, str(tmp_path / "notes.txt"))

    import shutil
    no_test = tmp_path / "notest"
    shutil.copytree(os.path.join(root, "train"), no_test / "train")
    _expect("no 'test/' split", read_source, make_tar(str(no_test), str(tmp_path / "notest.tar.gz")))

    shutil.copytree(root, tmp_path / "unk")
    shutil.copytree(tmp_path / "unk" / "train" / "cat", tmp_path / "unk" / "train" / "unicorn")
    _expect("unknown class folder 'train/unicorn'", read_source, str(tmp_path / "unk"))


def test_bad_images(tmp_path, image_folder):
    from PIL import Image
    root, _ = image_folder
    bad = os.path.join(root, "test", "cat", "0000.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG garbage")
    _expect("unreadable image", read_source, root)
    Image.new("RGB", (31, 32)).save(bad)
    _expect("32x32 RGB", read_source, root)
    Image.new("L", (32, 32)).save(bad)
    _expect("32x32 RGB", read_source, root)


def test_corrupt_tarballs(tmp_path, image_folder):
    root, want = image_folder
    data = open(make_tar(root, str(tmp_path / "ok.tar.gz")), "rb").read()
    rng = np.random.default_rng(0)
    (tmp_path / "trunc.tar.gz").write_bytes(data[: len(data) // 2])
    _expect("not a readable tarball", read_source, str(tmp_path / "trunc.tar.gz"))
    for trial in range(5):  # random byte corruptions: a clear error or a successful read, never a crash
        b = bytearray(data)
        for pos in rng.integers(0, len(b), 8):
            b[pos] ^= 0xFF
        p = tmp_path / f"c{trial}.tar.gz"
        p.write_bytes(bytes(b))
        try:
            ds = read_source(str(p))
        except DataError:
            continue
        for split, (images, labels) in want.items():  # a read that succeeds gives back the original data
            np.testing.assert_array_equal(ds.splits[split].images, images, err_msg=f"trial {trial}")
            np.testing.assert_array_equal(ds.splits[split].labels, labels, err_msg=f"trial {trial}")


def test_corrupt_official_batch(tmp_path):
    folder = tmp_path / "b"
    write_official(str(folder))
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 3])
    _expect("data_batch_3: not a readable CIFAR-10 batch", read_source, str(folder))


# ---------------------------------------------------------------- betons

def test_beton_round_trip_and_reuse(tmp_path, image_folder):
    root, want = image_folder
    out = str(tmp_path / "betons")
    m = ensure_betons(root, out)
    assert m["splits"]["train"]["images"] == 30 and m["splits"]["test"]["per_class"] == [2] * 10
    for split in ("train", "test"):
        images, labels = read_beton(os.path.join(out, f"{split}.beton"))
        np.testing.assert_array_equal(images, want[split][0])
        np.testing.assert_array_equal(labels, want[split][1])
    mtime = os.stat(os.path.join(out, "train.beton")).st_mtime_ns
    ensure_betons(root, out, progress=lambda s: pytest.fail("converted again: " + s))
    assert os.stat(os.path.join(out, "train.beton")).st_mtime_ns == mtime
    assert not [f for f in os.listdir(out) if "partial" in f or f.endswith(".tmp")]


def test_stale_or_corrupt_beton_is_redone(tmp_path, image_folder):
    root, _ = image_folder
    out = str(tmp_path / "betons")
    ensure_betons(root, out)
    p = os.path.join(out, "test.beton")
    b = bytearray(open(p, "rb").read())
    b[len(b) // 2] ^= 0xFF  # same size, different content
    open(p, "wb").write(b)
    msgs = []
    ensure_betons(root, out, progress=msgs.append)
    assert msgs and check_manifest(out)[0] is not None
    # a changed source invalidates the betons too
    write_image_folder(root, seed=7)
    msgs.clear()
    ensure_betons(root, out, progress=msgs.append)
    assert msgs


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, image_folder, monkeypatch):
    import fastcifar.data.beton as beton
    root, _ = image_folder
    out = str(tmp_path / "betons")
    real, calls = beton.write_beton, []

    def interrupted(split, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(split, path, **kw)
    monkeypatch.setattr(beton, "write_beton", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_betons(root, out)
    assert not os.path.exists(os.path.join(out, MANIFEST))
    assert not [f for f in os.listdir(out) if "partial" in f]
    monkeypatch.setattr(beton, "write_beton", real)
    msgs = []
    ensure_betons(root, out, progress=msgs.append)
    assert msgs, "an interrupted conversion must be redone"


def test_beton_folder_as_source(tmp_path, image_folder):
    root, _ = image_folder
    out = str(tmp_path / "betons")
    ensure_betons(root, out)
    folder, m = prepare_betons(out)
    assert folder == out and m["splits"]["train"]["images"] == 30
    p = os.path.join(out, "train.beton")
    os.truncate(p, os.path.getsize(p) // 2)
    _expect("train.beton is truncated or corrupt", prepare_betons, out)
    with open(p, "wb") as f:
        f.write(b"not a beton at all")
    _expect("not a beton this project can read: 18 bytes", read_beton, p)


# ---------------------------------------------------------------- whose folder it is

def _snapshot(folder):
    return {n: (open(os.path.join(folder, n), "rb").read(), os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in sorted(os.listdir(folder))}


@pytest.mark.parametrize("contents", ["user files", "foreign manifest", "foreign betons"])
def test_a_foreign_folder_is_never_converted_into(tmp_path, image_folder, contents):
    """Conversion unlinks a manifest and partial files, and replaces train.beton and test.beton: only in a folder
    that is ours. A checkpoint or a typo naming someone's folder as --beton-dir must not cost them a file."""
    root, _ = image_folder
    folder = tmp_path / "theirs"
    folder.mkdir()
    if contents == "user files":
        (folder / "notes.txt").write_text("mine")
        (folder / "test.beton.partial-1").write_text("a name like ours, not ours")
    elif contents == "foreign manifest":
        (folder / MANIFEST).write_text('{"name": "a web app", "version": 3}')
    else:  # betons of the user's own, no manifest of ours
        (folder / "train.beton").write_bytes(b"their train set")
        (folder / "test.beton").write_bytes(b"their test set")
    before = _snapshot(str(folder))
    _expect("not empty and not a fastcifar beton folder", ensure_betons, root, str(folder))
    assert _snapshot(str(folder)) == before, "nothing may be written, replaced or removed"
    with pytest.raises(DataError, match="not a fastcifar beton folder"):
        prepare_betons(root, str(folder), progress=lambda s: None)


def test_our_folders_are_converted_into(tmp_path, image_folder):
    root, _ = image_folder
    new, empty, old = tmp_path / "new", tmp_path / "empty", tmp_path / "old"
    empty.mkdir()
    for folder in (new, empty):
        ensure_betons(root, str(folder), progress=lambda s: None)
        assert (folder / MARKER).exists() and check_manifest(str(folder))[0] is not None
    # a folder an older version converted (its manifest, no marker), whose test.beton was damaged since
    ensure_betons(root, str(old), progress=lambda s: None)
    (old / MARKER).unlink()
    (old / "test.beton").write_bytes(b"damaged")
    msgs = []
    ensure_betons(root, str(old), progress=msgs.append)
    assert msgs and check_manifest(str(old))[0] is not None and (old / MARKER).exists()
    # killed by an older version before its first beton: nothing but its lock and a partial file
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".lock").write_text("")
    (killed / "train.beton.partial-4242").write_bytes(b"half")
    ensure_betons(root, str(killed), progress=lambda s: None)
    assert sorted(os.listdir(killed)) == sorted([".lock", MARKER, MANIFEST, "train.beton", "test.beton"])


def test_a_file_where_the_folder_should_be(tmp_path, image_folder):
    root, _ = image_folder
    (tmp_path / "f").write_text("x")
    _expect("cannot use it as a beton folder", ensure_betons, root, str(tmp_path / "f"))


# ---------------------------------------------------------------- augmentation and loaders

def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_flip_and_translate_move_content():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    flipped = augment(x, _gen(), translate=0, flip=True)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()

    shifted = augment(x, _gen(), translate=2, flip=False)
    for i in range(len(x)):  # each image is the original moved by (dy, dx) in [-2, 2], zeros where it left
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(shifted[i], torch.roll(x[i], (dy, dx), (1, 2)) * _shift_mask(dy, dx))]
        assert len(hits) == 1
    assert shifted.is_contiguous(memory_format=torch.channels_last)


def _shift_mask(dy, dx):
    m = torch.zeros(1, 32, 32, dtype=torch.uint8)
    m[:, max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = 1
    return m


@pytest.mark.parametrize("size", [8, 5])
def test_cutout_zeroes_a_square(size):
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    y = augment(x, _gen(), translate=0, flip=False, cutout=size)
    assert ((y == 0) | (y == 200)).all() and ((y == 0).all(1) | (y != 0).all(1)).all()  # all channels at once
    for img in (y[:, 0] == 0):
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert img.sum() == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # one rectangle
        # size x size, cut only where the square meets the border
        assert h == size or rows[0] == 0 or rows[-1] == 31, (h, rows)
        assert w == size or cols[0] == 0 or cols[-1] == 31, (w, cols)
        assert 0 < h <= size and 0 < w <= size
    assert ((y[:, 0] == 0).flatten(1).sum(1) == size * size).float().mean() > 0.5


def test_same_seed_same_batches(tmp_path, image_folder):
    root, _ = image_folder
    out = str(tmp_path / "b")
    ensure_betons(root, out)
    runs = [[(x.clone(), y.clone()) for x, y in ResidentLoader(f"{out}/train.beton", 8, "cpu", True, seed=s)]
            for s in (3, 3, 4)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("loader", ["resident", "ffcv"])
def test_loaders_yield_normalized_channels_last(tmp_path, image_folder, loader):
    from fastcifar.data.loaders import LOADERS
    root, want = image_folder
    out = str(tmp_path / "b")
    ensure_betons(root, out)
    L = LOADERS[loader](f"{out}/test.beton", 5, "cpu", train=False)
    xs, ys = zip(*L)
    x = torch.cat(xs)
    assert xs[0].is_contiguous(memory_format=torch.channels_last) and xs[0].dtype == torch.float32
    assert sorted(torch.cat(ys).tolist()) == sorted(want["test"][1].tolist())
    ref = normalize(torch.from_numpy(want["test"][0]).permute(0, 3, 1, 2))
    if loader == "resident":  # sequential order: exactly the test images, normalized
        torch.testing.assert_close(x, ref)
    train = LOADERS[loader](f"{out}/train.beton", 10, "cpu", train=True, seed=0)
    assert len(list(train)) == 3 == len(train)
    # each channel's statistics, in R, G, B order
    px = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    want_px = torch.tensor([(v - m) / s for v, m, s in zip((0, 128, 255), MEAN, STD)]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(px), want_px)


def test_both_loaders_sample_the_same_unaugmented_images(tmp_path, image_folder):
    from fastcifar.data.loaders import FFCVLoader
    root, _ = image_folder
    out = str(tmp_path / "b")
    ensure_betons(root, out)
    beton = f"{out}/train.beton"
    resident = ResidentLoader(beton, 10, "cpu", train=True, seed=1)
    a, b = resident.sample(7), FFCVLoader(beton, 10, "cpu", train=True, seed=2).sample(7)
    assert a.shape == (7, 3, 32, 32) and a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)  # a fixed spread, whatever the seed or loader
    images, _ = read_beton(beton)
    want = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert all(any(torch.equal(s, w) for w in want) for s in a)  # whole images, not augmented ones
    assert len(resident.sample(10_000)) == len(images)  # asking for more gives all
