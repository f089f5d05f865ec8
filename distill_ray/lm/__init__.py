"""What is particular to language models: greedy generation and ROUGE-L, sequence-level KD's
prompts and training rows, POCL's reference-model difficulty for instruction data, and students cut
from a teacher.

- ``generation``: batched greedy responses, ROUGE-L, code that parses. No Ray.
- ``sequence_kd``: sequence-level KD, the pure part: prompts, teachers' responses, training rows. No Ray.
- ``reference``: POCL's difficulty from a reference model's loss and ROUGE-L on each train row.
- ``cut``: a student cut from a causal-LM teacher (its embeddings, kept layers, norm, head). No Ray.
"""
