"""Write the three "your own data" examples docs/data.md walks through, from real data that installs
offline, in the formats a user brings (nothing here is read by distill-ray's presets):

- ``digits.parquet``: scikit-learn's handwritten digits (1,797 rows, BSD) as a table: 64 numeric
  columns ``pixel_0..pixel_63`` and a string label column ``digit`` ("zero".."nine");
- ``fortunes_topics.jsonl``: Debian fortunes (BSD) from six categories outside the 12 of the
  fortunes preset, one JSON object per line: ``{"quote": ..., "topic": ...}``;
- ``digit_images/<name>/<n>.png``: the same digits as 8x8 greyscale PNGs, one folder per class.

    python jobs/make_example_data.py [OUT_DIR]      # default: ~/.cache/distill-ray/examples

The configs ``jobs/configs/own_{tabular,text,images}.yaml`` read them from the default place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TOPICS = ("literature", "humorists", "wisdom", "people", "pets", "linux")


def main(out: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distill_ray.extras import require

    # sklearn first: its extra (examples) brings Pillow too
    load_digits = require("sklearn.datasets", "jobs/make_example_data.py").load_digits
    Image = require("PIL.Image", "jobs/make_example_data.py")

    from distill_ray.data.bundled import debian_dataset_dir, fortune_items, FORTUNES_PACKAGE, FORTUNES_SUBDIR

    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pixels = digits.data.astype(np.float32)  # 0..16 intensities
    table = {f"pixel_{i}": pixels[:, i] for i in range(pixels.shape[1])}
    table["digit"] = [NAMES[t] for t in digits.target]
    pq.write_table(pa.table(table), out / "digits.parquet")

    images = out / "digit_images"
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = images / NAMES[target]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")

    root = debian_dataset_dir(FORTUNES_PACKAGE, FORTUNES_SUBDIR, marker=TOPICS[0])
    with open(out / "fortunes_topics.jsonl", "w") as f:
        for topic in TOPICS:
            for text in fortune_items(root / topic):
                f.write(json.dumps({"quote": text, "topic": topic}) + "\n")
    print(f"wrote {out / 'digits.parquet'}, {out / 'fortunes_topics.jsonl'} and {images}/")


if __name__ == "__main__":
    import argparse

    default = Path(os.environ.get("DISTILL_RAY_CACHE", "~/.cache/distill-ray")).expanduser() / "examples"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=default, help=f"output directory (default {default})")
    main(parser.parse_args().out.expanduser())
