"""Frozen teachers: trained or loaded, run as services that live for a whole run or sweep, and
answering batches with logits or top-k log-probabilities, also when their tokenizer is not the student's.

- ``spec``: ``TeacherSpec``, what a teacher is (no torch, no Ray: it travels with every request).
- ``runner``: ``TeacherRunner``, the plain-Python core inside the teacher actors.
- ``service``: a teacher's replicas (Ray actors, loaded once) that batch every caller's requests, and
  score given token sequences (on-policy distillation).
- ``recipes``: train a teacher classifier or causal LM from labels. Plain PyTorch, no Ray.
- ``setup``: recipe teachers trained as parallel Ray tasks, every teacher as a ``TeacherSpec``.
- ``cross_tokenizer``: a teacher with its own tokenizer answers for the student's positions.
- ``token_alignment``: the two tokenizations aligned and the vocabularies mapped. No Ray, no torch.
"""
