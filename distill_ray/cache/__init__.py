"""The on-disk caches that make teachers run once: the soft-target store (Parquet with a verified
manifest, read as the training dataset) and the sequence-KD response cache, and how both are built.

- ``soft_targets``: the soft-target store: spec, Parquet layout, atomic writes, verified reads.
- ``topk_encoding``: how top-k targets are stored (q8, plain) and decoded on read. No Ray.
- ``build``: the soft-target cache built by one Ray Data stage per teacher, asking its service.
- ``responses``: sequence-level KD's teacher responses, generated once by Ray Data and kept.
- ``files``: what both caches do alike with files: publish by rename, checksums. No Ray.
"""
