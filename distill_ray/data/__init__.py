"""The data a run reads: your files or a bundled dataset as Ray Data splits of ``id``, ``x`` and
``label`` rows, the transfer set the teachers label, and how a conversation becomes a prompt.

- ``sources``: Ray Data sources (parquet, jsonl, csv, text, images, presets) as one Dataset per split.
- ``presets``: the bundled datasets written once as Parquet tables, read by ``sources``.
- ``bundled``: the bundled real data (Fashion-MNIST, fortunes, MiniLM, SmolLM2), read offline, with
  fixed seeded splits; tokenizers; ``DataError``.
- ``transfer``: the transfer set made from the train rows (mixup, noise, augment). No Ray.
- ``chat``: a conversation rendered as the text a chat model continues from. No Ray, no torch.
"""
