"""A bounded fuzz of what a file can do to us: random byte flips, truncations and field edits of a small beton, and
random byte flips, truncations and entry edits of a small checkpoint.

Every case must end in a one-line DataError / CheckpointError or in a correct read, never a death by signal, a
hang or another exception. A correct read of a beton gives back exactly what the (damaged) file holds where its
own metadata points, read independently with ffcv's Reader: the format has no checksum, so a changed pixel or an
in-range label is not a lie anyone can see; the manifest's sha256 is what catches those. A correct read of a
checkpoint restores every piece and then trains a step.

Each kind of file is fuzzed in one child process (ffcv and torch are imported once), which prints a line before and
after every case: a crash or hang names the case it died in. Cases are drawn from FASTCIFAR_FUZZ_SEED (default 0).
The beton child reads with ffcv's numba JIT off: the same decode, minus about a second of compiling per Loader.
"""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SEED = int(os.environ.get("FASTCIFAR_FUZZ_SEED", "0"))
BETON_CASES = {"flip": 150, "truncate": 40, "edit": 160}
CHECKPOINT_CASES = {"flip": 120, "truncate": 40, "edit": 140}
CHILD_TIMEOUT = 240  # far above what the cases need; a hang ends the child here and names its case


# ---------------------------------------------------------------- betons (run in the child)

def _beton_layout(raw):
    import numpy as np
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType
    h = np.frombuffer(raw, HeaderType, 1)[0]
    n, table = int(h["num_samples"]), int(h["alloc_table_ptr"])
    meta = HeaderType.itemsize + int(h["num_fields"]) * FieldDescType.itemsize
    alloc = np.frombuffer(raw[table:], ALLOC_TABLE_TYPE)
    return n, table, meta, int(alloc["ptr"].min()), alloc


# byte offsets inside each record (ffcv/types.py, fields/rgb_image.py and basics.py); (offset, numpy format)
_HEADER_FIELDS = {"version": (0, "<u2"), "num_fields": (2, "<u2"), "page_size": (4, "<u4"), "num_samples": (8, "<u8"),
                  "alloc_table_ptr": (16, "<u8")}
_ALLOC_FIELDS = {"sample_id": (0, "<u8"), "ptr": (8, "<u8"), "size": (16, "<u8")}
_META_FIELDS = {"mode": (0, "<u1"), "width": (1, "<u2"), "height": (3, "<u2"), "data_ptr": (5, "<u8"),
                "label": (16, "<i8")}
_FIELD_DESC = {"type_id": (0, "<u1"), "name": (1, "<u1"), "arguments": (17, "<u1")}


def _pack(value, fmt):
    import numpy as np
    bits = np.dtype(fmt).itemsize * 8
    return np.array(value % (1 << bits) if fmt[1] == "u" else value, dtype=fmt).tobytes()


def beton_cases(raw, rng):
    """(description, patches [(offset, bytes)], truncate-to or None) for every case, drawn from rng."""
    n, table, meta, data, alloc = _beton_layout(raw)
    size = len(raw)
    regions = {"header": (0, 24), "fields": (24, meta), "metadata": (meta, meta + 24 * n),
               "data": (data, data + 3072 * n), "table": (table, size), "anywhere": (0, size)}
    cases = []
    for i in range(BETON_CASES["flip"]):
        where = list(regions)[i % len(regions)]
        lo, hi = regions[where]
        pos = sorted(set(int(p) for p in rng.integers(lo, hi, int(rng.integers(1, 9)))))
        patches = [(p, bytes([raw[p] ^ int(rng.integers(1, 256))])) for p in pos]
        cases.append((f"flip {len(pos)} bytes in the {where} at {pos}", patches, None))
    for i in range(BETON_CASES["truncate"]):
        where = ["header", "fields", "metadata", "data", "table", "table"][i % 6]
        lo, hi = regions[where]
        cut = int(rng.integers(lo, hi))
        cases.append((f"truncate to {cut} bytes (in the {where})", [], cut))
    u64 = [0, 1, 8, 3071, 3072, 3073, 6144, 1 << 20, 1 << 32, 1 << 63, (1 << 64) - 1]
    for _ in range(BETON_CASES["edit"]):
        kind = ["alloc", "alloc", "alloc", "header", "field", "meta", "meta", "swap", "dup"][int(rng.integers(9))]
        i, j = (int(v) for v in rng.choice(n, 2, replace=False))
        ptr_i, ptr_j = int(alloc[i]["ptr"]), int(alloc[j]["ptr"])
        sid_i = int(alloc[i]["sample_id"])
        if kind == "alloc":
            name = ["sample_id", "ptr", "size"][int(rng.integers(3))]
            off, fmt = _ALLOC_FIELDS[name]
            value = int(rng.choice([*u64, n, n - 1, sid_i + 1, ptr_j, ptr_i + 1, ptr_i - 1, table, size, data - 1,
                                    int(rng.integers(0, 1 << 62))]))
            patches = [(table + 24 * i + off, _pack(value, fmt))]
            if name == "ptr" and rng.random() < 0.5:  # a consistent lie: the metadata points there too
                patches.append((meta + 24 * sid_i + 5, _pack(value, "<u8")))
            cases.append((f"allocation {i}: {name} = {value}{' (metadata too)' if len(patches) == 2 else ''}",
                          patches, None))
        elif kind == "header":
            name = list(_HEADER_FIELDS)[int(rng.integers(5))]
            off, fmt = _HEADER_FIELDS[name]
            value = int(rng.choice([*u64, 2, n - 1, n + 1, 2 * n, table - 24, table + 24, 1 << 21, 65535, 3 << 20]))
            cases.append((f"header: {name} = {value}", [(off, _pack(value, fmt))], None))
        elif kind == "field":
            f, name = int(rng.integers(2)), list(_FIELD_DESC)[int(rng.integers(3))]
            off = 24 + 1041 * f + _FIELD_DESC[name][0] + (int(rng.integers(16)) if name == "name" else
                                                          int(rng.integers(1024)) if name == "arguments" else 0)
            value = int(rng.integers(0, 256)) if name != "type_id" else int(rng.choice([0, 1, 2, 3, 4, 5, 6, 255]))
            if raw[off] == value:
                value ^= 1
            cases.append((f"field {f}: {name} byte {off} = {value}", [(off, bytes([value]))], None))
        elif kind == "meta":
            name = list(_META_FIELDS)[int(rng.integers(5))]
            off, fmt = _META_FIELDS[name]
            value = {"mode": [0, 2, 255], "width": [0, 31, 33, 65535], "height": [0, 16, 64],
                     "data_ptr": [ptr_j, ptr_i + 1, 0, (1 << 64) - 1, size], "label": [-1, 10, 1 << 62, 3, 9]}[name]
            value = int(rng.choice(value))
            cases.append((f"metadata {i}: {name} = {value}", [(meta + 24 * i + off, _pack(value, fmt))], None))
        elif kind == "swap":  # two samples' pointers swapped everywhere: a valid file, the images swapped
            sid_j = int(alloc[j]["sample_id"])
            patches = [(table + 24 * i + 8, _pack(ptr_j, "<u8")), (table + 24 * j + 8, _pack(ptr_i, "<u8")),
                       (meta + 24 * sid_i + 5, _pack(ptr_j, "<u8")), (meta + 24 * sid_j + 5, _pack(ptr_i, "<u8"))]
            cases.append((f"swap the images of samples {sid_i} and {sid_j}", patches, None))
        else:  # one sample's image pointed at another's, consistently: two samples share bytes
            patches = [(table + 24 * i + 8, _pack(ptr_j, "<u8")), (meta + 24 * sid_i + 5, _pack(ptr_j, "<u8"))]
            cases.append((f"sample {sid_i} pointed at sample {int(alloc[j]['sample_id'])}'s image", patches, None))
    return cases


def beton_child(path, seed):
    """Run every case against the beton at path, restoring it after each; one line per outcome."""
    import numpy as np
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader

    from fastcifar.data import DataError, read_beton
    from fastcifar.data.beton import validate_beton
    Compiler.set_enabled(False)
    raw = open(path, "rb").read()
    cases = beton_cases(raw, np.random.default_rng(int(seed)))
    for k, (what, patches, cut) in enumerate(cases):
        print(f"CASE {k} {what}", flush=True)
        with open(path, "r+b") as f:
            if cut is not None:
                f.truncate(cut)
            for off, b in patches:
                f.seek(off)
                f.write(b)
        try:
            n = validate_beton(path)
            images, labels = read_beton(path, num_workers=1)
        except DataError as e:
            print(f"DONE {k} " + ("error" if "\n" not in str(e) and str(e).startswith(path) else f"FAIL {e!r}"),
                  flush=True)
        except Exception as e:
            print(f"DONE {k} FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
        else:  # what the file itself holds where its metadata points, read independently
            r = Reader(path)
            buf = np.fromfile(path, np.uint8)
            want = np.stack([buf[p:p + 3072].reshape(32, 32, 3) for p in r.metadata["f0"]["data_ptr"]])
            ok = n == len(want) and np.array_equal(images, want) and np.array_equal(labels, r.metadata["f1"])
            print(f"DONE {k} " + ("read" if ok else "FAIL a read that is not what the file holds"), flush=True)
        with open(path, "r+b") as f:  # back to the original
            if cut is not None:
                f.seek(cut)
                f.write(raw[cut:])
            for off, b in patches:
                f.seek(off)
                f.write(raw[off:off + len(b)])


# ---------------------------------------------------------------- checkpoints (run in the child)

def _tiny_run(seed=0):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, _Loader()


class _Loader:
    """The training loader's checkpointed state: its augmentation generator."""

    def __init__(self):
        import torch
        self.generator = torch.Generator().manual_seed(0)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def _step(model, opt, sched):
    import torch
    x = torch.randn(4, 3, 6, 6)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def checkpoint_state():
    import torch
    model, opt, sched, loader = _tiny_run()
    _step(model, opt, sched)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "loader": loader.state_dict(), "rng": {"cpu": torch.get_rng_state()}, "device": "cpu", "epoch": 1,
            "history": [{"epoch": 1, "train_loss": 2.3, "train_acc": 0.1, "test_loss": 2.3, "test_acc": 0.1,
                         "train_time_s": 1.0, "eval_time_s": 0.1}],
            "config": {"norm": "bn", "preset": "fast", "epochs": 2}, "model_config": {"norm": "bn", "arch": "lean"},
            "compile_time_s": 0.0}


def _paths(obj, at=()):
    """Every path into a nested state, to pick an entry to edit."""
    out = [at] if at else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, at + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += _paths(v, at + (i,))
    return out


def _edited(state, rng):
    """A deep copy of state with one entry at a random path given a wrong shape, type or key; and what was done."""
    import copy

    import torch
    s = copy.deepcopy(state)
    paths = _paths(s)
    at = paths[int(rng.integers(len(paths)))]
    parent = s
    for k in at[:-1]:
        parent = parent[k]
    key, old = at[-1], parent[at[-1]]
    choice = int(rng.integers(9))
    if choice == 0 and isinstance(parent, dict):
        del parent[key]
        return s, f"remove {at}"
    if choice == 1 and isinstance(parent, dict):
        parent[f"{key}_extra"] = torch.zeros(2)
        return s, f"add a key beside {at}"
    if isinstance(old, torch.Tensor) and choice < 6:
        new = [torch.zeros(*old.shape, 2), torch.zeros(max(old.numel() - 1, 0)), old.to(torch.int64),
               old.to(torch.float16) if old.is_floating_point() else old.to(torch.float32)][choice % 4]
    else:
        new = ["x", None, 1.5, -3, True, [1, 2], {"a": 1}, torch.zeros(3), (1,)][int(rng.integers(9))]
    parent[key] = tuple(new) if isinstance(new, list) and isinstance(parent, tuple) else new
    return s, f"{at} = {type(new).__name__}{tuple(new.shape) if isinstance(new, torch.Tensor) else ''}"


def checkpoint_child(folder, seed):
    import io

    import numpy as np
    import torch

    from fastcifar.checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, load_state, save_checkpoint
    rng = np.random.default_rng(int(seed))
    path = os.path.join(folder, "model.pt")
    state = checkpoint_state()
    save_checkpoint(path, state)
    raw = open(path, "rb").read()
    cases = []
    for _ in range(CHECKPOINT_CASES["flip"]):
        pos = sorted(set(int(p) for p in rng.integers(0, len(raw), int(rng.integers(1, 9)))))
        b = bytearray(raw)
        for p in pos:
            b[p] ^= int(rng.integers(1, 256))
        cases.append((f"flip bytes {pos}", bytes(b)))
    for _ in range(CHECKPOINT_CASES["truncate"]):
        cut = int(rng.integers(0, len(raw)))
        cases.append((f"truncate to {cut} bytes", raw[:cut]))
    for _ in range(CHECKPOINT_CASES["edit"]):
        s, what = _edited(state, rng)
        buf = io.BytesIO()
        torch.save({"version": CHECKPOINT_VERSION, **s}, buf)  # as save_checkpoint writes it
        cases.append((what, buf.getvalue()))
    for k, (what, data) in enumerate(cases):
        print(f"CASE {k} {what}", flush=True)
        open(path, "wb").write(data)
        try:
            ckpt = load_checkpoint(path)
            model, opt, sched, loader = _tiny_run(seed=1)
            for piece, obj in (("model", model), ("optimizer", opt), ("scheduler", sched), ("loader", loader)):
                load_state(obj, ckpt[piece], piece, path)
            torch.set_rng_state(ckpt["rng"]["cpu"])
            _step(model, opt, sched)  # a state that loads must also train on
        except CheckpointError as e:
            print(f"DONE {k} " + ("error" if "\n" not in str(e) and str(e).startswith(path) else f"FAIL {e!r}"),
                  flush=True)
        except Exception as e:
            print(f"DONE {k} FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
        else:
            print(f"DONE {k} read", flush=True)


# ---------------------------------------------------------------- the tests

def _run_child(entry, *args):
    code = f"import sys; sys.path[:0] = [{TESTS!r}, {ROOT!r}]; import test_fuzz; test_fuzz.{entry}(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                           timeout=CHILD_TIMEOUT, env=env, cwd=ROOT)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode(), (e.stderr or b"").decode(), "timeout"
    return out, err, rc


def _tally(out, err, rc, expected, what):
    cases, done, failures = {}, {}, []
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        k, _, text = rest.partition(" ")
        if tag == "CASE":
            cases[int(k)] = text
        elif tag == "DONE":
            done[int(k)] = text
            if text.startswith("FAIL"):
                failures.append(f"case {k} ({cases[int(k)]}): {text}")
    crashed = [k for k in cases if k not in done]
    counts = {"cases": len(cases), "clean errors": sum(v == "error" for v in done.values()),
              "correct reads": sum(v == "read" for v in done.values()), "crashes": len(crashed),
              "other failures": len(failures)}
    summary = f"{what} fuzz (seed {SEED}): " + ", ".join(f"{v} {k}" for k, v in counts.items())
    print(summary)
    died = f"the child died ({rc}) in case {crashed[0]}: {cases[crashed[0]]}" if crashed else \
        f"the child exited {rc}" if rc != 0 else ""
    assert not died and not failures and len(cases) == expected, \
        "\n".join([summary, died, *failures[:20], "--- child stderr", err[-3000:]])
    return counts


def test_fuzz_betons(tmp_path):
    from conftest import write_image_folder
    from fastcifar.data import ensure_betons
    write_image_folder(str(tmp_path / "src"), per_class=(1, 1), seed=2)
    ensure_betons(str(tmp_path / "src"), str(tmp_path / "b"), progress=lambda s: None)
    out, err, rc = _run_child("beton_child", tmp_path / "b" / "test.beton", SEED)
    counts = _tally(out, err, rc, sum(BETON_CASES.values()), "beton")
    assert counts["clean errors"] > counts["cases"] // 2 and counts["correct reads"] > 0, counts


def test_fuzz_checkpoints(tmp_path):
    out, err, rc = _run_child("checkpoint_child", tmp_path, SEED)
    counts = _tally(out, err, rc, sum(CHECKPOINT_CASES.values()), "checkpoint")
    assert counts["clean errors"] > counts["cases"] // 2 and counts["correct reads"] > 0, counts
