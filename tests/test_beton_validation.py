"""A beton is checked against ffcv's file format before any ffcv Loader reads it: a file that lies about its sizes,
pointers, samples, fields or labels is a one-line DataError naming it, whatever its manifest says.

The edits below go through ffcv's own dtypes (ffcv/types.py), not the project's copy of them, so the two agree."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType

from conftest import ROOT, write_image_folder
from fastcifar.data import DataError, ensure_betons, prepare_betons, read_beton
from fastcifar.data.beton import MANIFEST, _sha256, check_manifest, validate_beton

IMAGE_BYTES = 32 * 32 * 3


def beton_parts(path):
    """(header, field descriptors, metadata, allocation table) of a beton, as writable memory maps."""
    h = np.memmap(path, HeaderType, "r+", 0, (1,))
    n, table = int(h[0]["num_samples"]), int(h[0]["alloc_table_ptr"])
    fields = np.memmap(path, FieldDescType, "r+", HeaderType.itemsize, (int(h[0]["num_fields"]),))
    meta_type = np.dtype([("image", [("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")]),
                          ("label", "<i8")], align=True)
    meta = np.memmap(path, meta_type, "r+", HeaderType.itemsize + fields.nbytes, (n,))
    alloc = np.memmap(path, ALLOC_TABLE_TYPE, "r+", table, (n,))
    return h, fields, meta, alloc


def resign(folder):
    """What an attacker does: make the manifest's own sizes and hashes match the edited betons."""
    p = os.path.join(folder, MANIFEST)
    m = json.load(open(p))
    for split in ("train", "test"):
        beton = os.path.join(folder, f"{split}.beton")
        m["splits"][split].update(bytes=os.path.getsize(beton), sha256=_sha256(beton))
    json.dump(m, open(p, "w"))


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = tmp_path_factory.mktemp("bv")
    write_image_folder(str(root / "src"), per_class=(2, 1), seed=5)
    ensure_betons(str(root / "src"), str(root / "betons"), progress=lambda s: None)
    return str(root / "betons")


@pytest.fixture
def folder(betons, tmp_path):
    """A fresh copy of the converted folder for a test to damage."""
    import shutil
    return shutil.copytree(betons, str(tmp_path / "b"))


def refused(path, match):
    with pytest.raises(DataError, match=match) as e:
        validate_beton(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: "), str(e.value)
    return str(e.value)


def test_the_project_dtypes_are_ffcvs():
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import get_metadata_type

    import fastcifar.data.beton as bt
    assert bt._HEADER == HeaderType and bt._FIELD == FieldDescType and bt._ALLOC == ALLOC_TABLE_TYPE
    ffcv_meta = get_metadata_type([RGBImageField(), IntField()])
    assert bt._META.itemsize == ffcv_meta.itemsize
    assert [bt._META.fields[k][1:] for k in bt._META.names] == [ffcv_meta.fields[k][1:] for k in ffcv_meta.names]


def test_converted_betons_validate(betons):
    assert validate_beton(os.path.join(betons, "train.beton")) == 20
    assert validate_beton(os.path.join(betons, "test.beton")) == 10


def test_a_resigned_beton_claiming_one_mib_for_an_image_is_refused(folder):
    """The attack: ffcv would copy 1 MiB into a 3,072-byte slot. The manifest vouches for the file, re-signed."""
    p = os.path.join(folder, "train.beton")
    alloc = beton_parts(p)[3]
    alloc[3]["size"] = 1 << 20
    alloc.flush()
    resign(folder)
    m, why = check_manifest(folder)
    assert m is None and why.startswith("train.beton is not a beton") and "1048576 bytes" in why, why
    with pytest.raises(DataError, match="train.beton") as e:
        prepare_betons(folder)
    assert "\n" not in str(e.value)
    refused(p, "sample 3's image takes 1048576 bytes, not 3072")
    with pytest.raises(DataError, match="takes 1048576 bytes"):
        read_beton(p, num_workers=1)  # the check runs before ffcv's Loader is built


def test_training_on_a_resigned_beton_folder_stops_with_one_line(folder, tmp_path):
    p = os.path.join(folder, "train.beton")
    alloc = beton_parts(p)[3]
    alloc[0]["size"] = 1 << 20
    alloc.flush()
    resign(folder)
    r = subprocess.run([sys.executable, "-m", "fastcifar.train", "--data", folder, "--out", str(tmp_path / "out"),
                        "--epochs", "1", "--batch-size", "8", "--limit", "16", "--device", "cpu", "--threads", "1",
                        "--no-plots", "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 1 and "Traceback" not in r.stderr, \
        f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "train.beton" in last and "1048576 bytes" in last, r.stderr


def _set(part, field, value, i=0):
    def edit(parts):
        arr = parts[part]
        arr[i][field] = value
        arr.flush()
    return edit


def _meta(sub, value, i=0):
    def edit(parts):
        parts[2][i]["image"][sub] = value
        parts[2].flush()
    return edit


def _swap_sample_ids(parts):
    parts[3][1]["sample_id"] = parts[3][0]["sample_id"]
    parts[3].flush()


def _overlap(parts):
    parts[3][1]["ptr"] = parts[3][0]["ptr"] + 100
    parts[2][int(parts[3][1]["sample_id"])]["image"]["data_ptr"] = parts[3][1]["ptr"]
    parts[2].flush()
    parts[3].flush()


def _field_name(parts):
    parts[1][1]["name"][:5] = np.frombuffer(b"lab3l", np.uint8)
    parts[1].flush()


def _field_argument(parts):
    parts[1][0]["arguments"][7] = 1
    parts[1].flush()


def _pointer(where):
    def edit(parts):
        h = parts[0][0]
        ptr = {"past the end": int(h["alloc_table_ptr"]) + 16, "into the header": 8,
               "astride the table": int(h["alloc_table_ptr"]) - 100, "huge": 2 ** 64 - 1000}[where]
        parts[3][2]["ptr"] = ptr
        parts[2][int(parts[3][2]["sample_id"])]["image"]["data_ptr"] = ptr
        parts[2].flush()
        parts[3].flush()
    return edit


EDITS = {
    "size 3071": (_set(3, "size", 3071), "takes 3071 bytes"),
    "size 0": (_set(3, "size", 0, i=5), "takes 0 bytes"),
    "size 2**63": (_set(3, "size", 2 ** 63), "not 3072"),
    "pointer past the end": (_pointer("past the end"), "outside the file's data region"),
    "pointer into the header": (_pointer("into the header"), "outside the file's data region"),
    "pointer astride the table": (_pointer("astride the table"), "outside the file's data region"),
    "pointer near 2**64": (_pointer("huge"), "outside the file's data region"),
    "metadata pointer elsewhere": (_meta("data_ptr", 12345), "points at other bytes"),
    "overlapping images": (_overlap, "overlap"),
    "duplicate sample id": (_swap_sample_ids, "samples 0..9 once each"),
    "sample id out of range": (_set(3, "sample_id", 10), "samples 0..9 once each"),
    "one sample more": (_set(0, "num_samples", 11), "does not fit"),
    "one sample fewer": (_set(0, "num_samples", 9), "does not fit"),
    "2**63 samples": (_set(0, "num_samples", 2 ** 63), "does not fit"),
    "no samples": (_set(0, "num_samples", 0), "does not fit"),
    "table moved": (_set(0, "alloc_table_ptr", 4096), "does not fit"),
    "version 1": (_set(0, "version", 1), "format version 1"),
    "three fields": (_set(0, "num_fields", 3), "3 fields"),
    "page size 3000": (_set(0, "page_size", 3000), "page size 3000"),
    "fields swapped": (_set(1, "type_id", 1), "raw RGB image and an int label"),
    "a bytes field": (_set(1, "type_id", 3, i=1), "raw RGB image and an int label"),
    "field renamed": (_field_name, "raw RGB image and an int label"),
    "field arguments": (_field_argument, "raw RGB image and an int label"),
    "jpeg mode": (_meta("mode", 0), "raw 32x32"),
    "width 31": (_meta("width", 31, i=4), "raw 32x32"),
    "height 64": (_meta("height", 64), "raw 32x32"),
    "label 10": (_set(2, "label", 10, i=9), "labels outside 0..9"),
    "label -1": (_set(2, "label", -1), "labels outside 0..9"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_every_lie_is_one_line_naming_the_file(folder, edit):
    p = os.path.join(folder, "test.beton")
    fn, match = EDITS[edit]
    fn(beton_parts(p))
    refused(p, match)
    resign(folder)
    m, why = check_manifest(folder)
    assert m is None and why.startswith("test.beton is not a beton"), why
    with pytest.raises(DataError, match="test.beton"):
        prepare_betons(folder)


@pytest.mark.parametrize("cut", ["header", "fields", "metadata", "table", "last byte"])
def test_truncated_betons(folder, cut):
    p = os.path.join(folder, "test.beton")
    table = int(beton_parts(p)[0][0]["alloc_table_ptr"])
    keep = {"header": 10, "fields": 1000, "metadata": 2200, "table": table + 50,
            "last byte": os.path.getsize(p) - 1}[cut]
    os.truncate(p, keep)
    refused(p, "shorter than a beton's header" if keep < 2106 else "does not fit")


def test_labels_the_manifest_does_not_count_are_refused(folder):
    p = os.path.join(folder, "test.beton")
    meta = beton_parts(p)[2]
    meta[0]["label"] = (meta[0]["label"] + 1) % 10  # still in range: only the manifest's per-class counts see it
    meta.flush()
    resign(folder)
    assert validate_beton(p) == 10
    assert check_manifest(folder)[1] == f"test.beton's labels do not match {MANIFEST}"


def test_read_beton_refuses_indices_outside_the_file(betons):
    p = os.path.join(betons, "test.beton")
    with pytest.raises(DataError, match="indices outside 0..9"):
        read_beton(p, indices=[0, 10])
    images, labels = read_beton(p, num_workers=1, indices=[9, 0])
    assert images.shape == (2, 32, 32, 3) and labels.shape == (2,)


def test_not_a_beton_at_all(tmp_path):
    p = str(tmp_path / "x.beton")
    open(p, "wb").write(b"not a beton")
    refused(p, "shorter than a beton's header")
    with pytest.raises(DataError, match="no such file|unreadable"):
        validate_beton(str(tmp_path / "missing.beton"))
