import os
import pickle
import shutil
import sys
import tarfile

# Triton decides interpreted or compiled for every @triton.jit function, its own library's included, when it
# is first imported; so without an NVIDIA device import it (and the kernels) here, under TRITON_INTERPRET=1,
# before any test module can (torch.compile and torch.utils.flop_counter import triton). The variable is
# unset again: it is set only around the kernel tests, and the training tests keep the torch path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVIDIA_VISIBLE = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
WE_SET_INTERPRET = not NVIDIA_VISIBLE and "TRITON_INTERPRET" not in os.environ
if WE_SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ROOT)  # benchmarks/ runs from the checkout (python -m benchmarks...); it is not installed
try:
    import fastcifar_kernels  # noqa: F401
finally:
    if WE_SET_INTERPRET:
        del os.environ["TRITON_INTERPRET"]
KERNELS = sys.modules["fastcifar_kernels.group_norm_relu"]

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastcifar.data.sources import CLASSES  # noqa: E402

SHARED_JPEG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpeg.tar.gz")


def random_images(rng, n):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_image_folder(root, per_class=(3, 2), fmt="png", seed=0, classes=CLASSES):
    """train/<class>/NNNN.<fmt> and test/<class>/... with random pixels; returns {split: (images, labels)}."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(("train", "test"), per_class):
        imgs, labels = [], []
        for ci, c in enumerate(classes):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for j in range(n):
                im = random_images(rng, 1)[0]
                Image.fromarray(im).save(os.path.join(root, split, c, f"{j:04d}.{fmt}"))
                imgs.append(im)
                labels.append(ci)
        out[split] = (np.stack(imgs), np.array(labels))
    return out


def make_tar(src_dir, path, prefix=""):
    mode = "w:gz" if path.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for name in sorted(os.listdir(src_dir)):
            tf.add(os.path.join(src_dir, name), arcname=os.path.join(prefix, name) if prefix else name)
    return path


def write_official(folder, n_per_batch=20, key="bytes", seed=0):
    """The official layout (data_batch_1..5, test_batch, batches.meta) as Python-2-style pickles: uint8 (N, 3072)
    CHW rows."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    k = (lambda s: s.encode()) if key == "bytes" else (lambda s: s)
    out = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = random_images(rng, n_per_batch)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        d = {k("batch_label"): k(name), k("labels"): labels,
             k("data"): imgs.transpose(0, 3, 1, 2).reshape(n_per_batch, -1),
             k("filenames"): [k(f"{i}.png") for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(imgs)
        out[split][1].extend(labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:  # every complete official folder has it
        pickle.dump({k("label_names"): [k(c) for c in CLASSES], k("num_vis"): 3072}, f, protocol=2)
    return {s: (np.concatenate(v[0]), np.array(v[1])) for s, v in out.items()}


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    return str(root), write_image_folder(str(root))


@pytest.fixture(scope="session")
def small_source(tmp_path_factory):
    """A learnable-enough tiny image folder tarball for CLI smoke runs (20 train, 10 test per class)."""
    root = tmp_path_factory.mktemp("small")
    write_image_folder(str(root / "tree"), per_class=(20, 10), seed=1)
    return make_tar(str(root / "tree"), str(root / "small.tar.gz"))


@pytest.fixture(scope="session")
def small_arrays(small_source, tmp_path_factory):
    """small_source read once into an array folder, for runs whose subject is not betons: a run that reads betons
    converts them first, and a child process that reads them pays ffcv's numba start-up (10-14 s on a 2-core CPU)."""
    from fastcifar.data import prepare_data
    folder = str(tmp_path_factory.mktemp("small-arrays") / "arrays")
    return prepare_data(small_source, folder, progress=lambda m: None, kind="arrays").folder


@pytest.fixture(autouse=True)
def _kernel_routes_follow_the_test_env():
    # the kernels read FASTCIFAR_KERNELS_DISABLE / TRITON_INTERPRET once per process; each test sets its own
    KERNELS._reset_routes()
    yield
    KERNELS._reset_routes()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # never touch the user's ~/.cache from a test
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)
