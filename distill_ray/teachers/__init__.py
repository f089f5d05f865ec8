"""Frozen teachers: trained or loaded, described as Ray Data actor-pool stages, and answering batches
with logits or top-k log-probabilities, also when their tokenizer is not the student's.

- ``runner``: ``TeacherSpec`` and ``TeacherRunner``, the plain-Python core inside the teacher actors.
- ``recipes``: train a teacher classifier or causal LM from labels. Plain PyTorch, no Ray.
- ``setup``: recipe teachers trained as parallel Ray tasks, every teacher as a ``TeacherSpec``.
- ``cross_tokenizer``: a teacher with its own tokenizer answers for the student's positions.
- ``token_alignment``: the two tokenizations aligned and the vocabularies mapped. No Ray, no torch.
"""
