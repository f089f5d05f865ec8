"""The data a run reads: your files or a bundled dataset as Ray Data splits of ``id``, ``x`` and
``label`` rows, the transfer set the teachers label, and how a conversation becomes a prompt.

- ``sources``: Ray Data sources (parquet, jsonl, csv, text, images, presets) as one Dataset per split:
  ``load_source`` and its steps.
- ``readers``: where a source's rows come from; the files a path names, checked and read by Ray Data.
- ``columns``: the train schema checked, the data's kind and every column's role; label names.
- ``rows``: the row stage (ids, splits, labels, subsets, counts) and ``DataError``. No Ray.
- ``preprocess``: the per-kind stages making ``x``: features, images, token ids, LM windows. No Ray.
- ``presets``: the bundled datasets written once as Parquet tables, read by ``sources``.
- ``bundled``: the bundled real data (Fashion-MNIST, fortunes, the standard library's source, MiniLM,
  SmolLM2), read offline, with fixed seeded splits; tokenizers.
- ``transfer``: the transfer set made from the train rows (mixup, noise, augment). No Ray.
- ``chat``: a conversation rendered as the text a chat model continues from. No Ray, no torch.
"""
