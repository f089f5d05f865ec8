"""Write the held-out check datasets: real data that installs offline, that no other config of this
repository uses and that nothing here was tuned on, in the formats a new user brings. The configs in
``jobs/configs/firsttry/`` read them from the default place with distill-ray's defaults (issue 25).

- ``satellite.parquet``: Landsat multispectral pixels (UCI Statlog Satellite, from Debian's
  ``r-cran-mlbench``, GPL-2): 6,435 rows, 36 numeric columns ``x_1..x_36`` (4 spectral bands of a
  3x3 neighbourhood) and a string label ``land_cover`` (6 classes, e.g. "red soil", "cotton crop");
- ``letters.parquet``: UCI Letter Recognition (same package): 20,000 rows, 16 numeric glyph
  statistics, string label ``letter`` ("A".."Z", 26 classes);
- ``austen.jsonl``: paragraphs of Jane Austen's six novels (Debian's ``r-cran-janeaustenr``, MIT; the
  texts are public domain), 800 seeded paragraphs of at least 10 words per novel, one JSON object per
  line: ``{"text": ..., "label": "Emma"}`` (6 classes: which novel);
- ``animals/<class>/<n>.png``: Animal-Shape MNIST (PyPI ``animal-mnist`` 0.4, MIT): 28x28 greyscale
  silhouettes of 10 animals ("bear".."zebra"), 1,000 per class less exact duplicates.

    python jobs/make_check_data.py [OUT_DIR]      # default: ~/.cache/distill-ray/check
    python jobs/make_check_data.py --force        # rewrite what is already there

Each output is written once (to a temporary name, then renamed) and skipped when it exists. The R
data (.rda files and R's lazy-load databases) is read with the PyPI package ``rdata`` (extra ``check``);
the Debian packages are used system-wide when installed, else unpacked from ``apt-get download`` into
the cache as distill_ray.data.bundled does for its presets. ``make check-data`` installs all of it.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

MLBENCH = ("r-cran-mlbench", Path("usr/lib/R/site-library/mlbench/data"))
JANEAUSTENR = ("r-cran-janeaustenr", Path("usr/lib/R/site-library/janeaustenr/data"))
ANIMAL_MNIST = "animal-mnist==0.4"  # installed --no-deps: its declared deps (tensorflow) only serve its loader
ANIMAL_FILES = ("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz")
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
NOVELS = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
          "sensesensibility": "Sense and Sensibility"}
PARAGRAPHS_PER_NOVEL = 800
MIN_WORDS = 10
SEED = 0


class SourceMissing(RuntimeError):
    """A source is not installed and could not be fetched; the message names the package and the command."""


def _rdata():
    try:
        import rdata
    except ImportError:
        raise SourceMissing("the R datasets are read with the PyPI package rdata: "
                            "pip install 'distill-ray[check]' (or `make check-data`)") from None
    return rdata


def _debian_data(package: str, subdir: Path, marker: str) -> Path:
    from distill_ray.data.bundled import DataUnavailable, debian_dataset_dir

    try:
        return debian_dataset_dir(package, subdir, marker=marker)
    except DataUnavailable as err:
        raise SourceMissing(f"Debian package {package} is missing: apt-get install {package} ({err})") from None


def _write_atomic(target: Path, write) -> None:
    """``write(tmp_path)`` then rename: an interrupted run leaves no half-written dataset behind."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    write(tmp)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    tmp.rename(target)


# --- tables: Debian r-cran-mlbench ---------------------------------------------------------------

def _mlbench_table(name: str, label: str):
    rdata = _rdata()
    root = _debian_data(*MLBENCH, marker=f"{name}.rda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII." (the level names are ASCII)
        frame = rdata.read_rda(str(root / f"{name}.rda"))[name]
    return frame, label


def _write_table(frame, label_column: str, label_field: str, out: Path) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for col in frame.columns:
        if col == label_column:
            continue
        columns[str(col).replace(".", "_")] = frame[col].to_numpy(dtype=np.float32)
    columns[label_field] = [str(v) for v in frame[label_column]]
    _write_atomic(out, lambda tmp: pq.write_table(pa.table(columns), tmp))
    return len(frame)


def make_satellite(out: Path) -> str:
    frame, _ = _mlbench_table("Satellite", "classes")
    n = _write_table(frame, "classes", "land_cover", out)
    return f"{n} rows, {frame['classes'].nunique()} classes"


def make_letters(out: Path) -> str:
    frame, _ = _mlbench_table("LetterRecognition", "lettr")
    n = _write_table(frame, "lettr", "letter", out)
    return f"{n} rows, {frame['lettr'].nunique()} classes"


# --- text: Debian r-cran-janeaustenr --------------------------------------------------------------

def _lazyload(root: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` records, each a 4-byte
    length and a zlib stream of R serialisation), converted by rdata."""
    rdata = _rdata()
    index = rdata.read_rds(str(root / "Rdata.rdx"))
    raw = (root / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = raw[int(offset): int(offset) + int(length)]
        size = struct.unpack(">I", record[:4])[0]
        body = zlib.decompress(record[4:])
        if len(body) != size:
            raise SourceMissing(f"{root / 'Rdata.rdb'}: record {name} is damaged; reinstall {JANEAUSTENR[0]}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(body))
    return objects


def _paragraphs(lines) -> list[str]:
    paragraphs, current = [], []
    for line in [*lines, ""]:
        line = str(line).strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def make_austen(out: Path) -> str:
    import numpy as np

    books = _lazyload(_debian_data(*JANEAUSTENR, marker="Rdata.rdb"))
    missing = set(NOVELS) - set(books)
    if missing:
        raise SourceMissing(f"{JANEAUSTENR[0]} lacks {sorted(missing)}; reinstall it: apt-get install {JANEAUSTENR[0]}")
    rng = np.random.default_rng(SEED)
    rows = []
    for key, title in NOVELS.items():
        kept = [p for p in _paragraphs(books[key]) if len(p.split()) >= MIN_WORDS]
        pick = np.sort(rng.permutation(len(kept))[:PARAGRAPHS_PER_NOVEL])
        rows += [{"text": kept[i], "label": title} for i in pick]

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    _write_atomic(out, write)
    return f"{len(rows)} rows, {len(NOVELS)} classes"


# --- images: PyPI animal-mnist --------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """The package's data are pickled numpy arrays: allow what rebuilds an array and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the animal-mnist data")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy.core is numpy._core under numpy 2
            return super().find_class(module, name)


def _animal_files(cache: Path) -> tuple[bytes, bytes]:
    """The two data files: from the installed package, else from its wheel (``pip download --no-deps``
    into the cache, as the Debian sources are unpacked there)."""
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        if all((root / f).is_file() for f in ANIMAL_FILES):
            return tuple((root / f).read_bytes() for f in ANIMAL_FILES)
    wheels = cache / "wheels"
    found = sorted(glob.glob(str(wheels / "animal_mnist-0.4-*.whl")))
    if not found:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                              ANIMAL_MNIST], capture_output=True, text=True)
        found = sorted(glob.glob(str(wheels / "animal_mnist-0.4-*.whl")))
        if got.returncode != 0 or not found:
            raise SourceMissing(f"PyPI package animal-mnist is missing: pip install --no-deps '{ANIMAL_MNIST}' "
                                f"({(got.stderr.strip().splitlines() or ['no wheel'])[-1]})")
    with zipfile.ZipFile(found[0]) as wheel:
        return tuple(wheel.read(f) for f in ANIMAL_FILES)


def make_animals(out: Path, cache: Path) -> str:
    import hashlib

    import numpy as np
    from distill_ray.extras import require

    Image = require("PIL.Image", "jobs/make_check_data.py")
    data, labels = (_ArrayUnpickler(gzip.open(io.BytesIO(raw))).load() for raw in _animal_files(cache))
    images, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(ANIMALS):
        raise SourceMissing(f"animal-mnist data has an unexpected shape {images.shape}; pip install --no-deps '{ANIMAL_MNIST}'")
    seen, kept = set(), []
    for i, image in enumerate(images):  # the package holds a few hundred exact copies: keep the first
        digest = hashlib.sha1(image.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(i)

    def write(tmp: Path) -> None:
        for i in kept:
            folder = tmp / ANIMALS[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")

    _write_atomic(out, write)
    return f"{len(kept)} images, {len(set(labels[kept].tolist()))} classes"


def main(argv: list[str] | None = None) -> int:
    from distill_ray.extras import MissingExtra

    default = Path(os.environ.get("DISTILL_RAY_CACHE", "~/.cache/distill-ray")).expanduser() / "check"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=default, help=f"output folder (default {default})")
    parser.add_argument("--force", action="store_true", help="rewrite datasets that already exist")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("DISTILL_RAY_CACHE", "~/.cache/distill-ray")).expanduser()
    jobs = [("satellite.parquet", make_satellite), ("letters.parquet", make_letters),
            ("austen.jsonl", make_austen), ("animals", lambda p: make_animals(p, cache))]
    failed = 0
    for name, make in jobs:
        target = out / name
        if target.exists() and not args.force:
            print(f"{target}: already there")
            continue
        try:
            print(f"{target}: {make(target)}")
        except (SourceMissing, MissingExtra) as err:
            print(f"{target}: not written: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
