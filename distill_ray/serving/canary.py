"""Canary and A/B routing between a champion and a challenger student, inside one replica.

Why in the replica: a router deployment forwarding every request through a DeploymentHandle adds a
network hop to every answer. Students are small, so each replica loads both and picks per request;
the split (which path is champion, which challenger, the challenger's fraction, the sticky header)
is the deployment's ``user_config``, which Serve applies in place (``reconfigure``, no replica
restart) when only it changes: that is how ``promote`` and ``rollback`` move traffic without
dropping requests.

Sticky routing: a request carrying the sticky header (``X-Distill-Key`` unless configured) is
hashed with sha256, not Python's salted ``hash()``, to a bucket in [0, 1); buckets below the fraction
go to the challenger. The same key lands on the same version on every replica and every restart
while the fraction is unchanged, and raising the fraction only moves keys towards the challenger.
A request without the header is a fresh random draw.

No Ray, no HTTP: ``serving.app`` calls ``TrafficSplit.from_user_config`` in ``reconfigure`` and
``StudentRouter.pick`` per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

STICKY_HEADER = "X-Distill-Key"
"""Request header whose value pins a client to one version (default of ``serve.sticky_header``)."""
VERSION_HEADER = "X-Model-Version"
"""Response header naming the version that answered."""
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
"""What a header name may be here: letters, digits and dashes (an HTTP token, without oddities)."""
UNVERSIONED = "unversioned"


class TrafficSplitError(ValueError):
    """A traffic split that cannot be served; the message names the key and what is allowed."""


def key_bucket(key: str) -> float:
    """The key's place in [0, 1): the first 8 bytes of its sha256 over 2**64. Deterministic across
    processes and machines (Python's ``hash()`` of a str is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def goes_to_challenger(fraction: float, key: str | None, draw: Callable[[], float] = random.random) -> bool:
    """Whether one request goes to the challenger: its key's bucket, or without a key a random draw,
    below ``fraction``. Fraction 0 never and 1 always, key or not."""
    return (key_bucket(key) if key else draw()) < fraction


@dataclass(frozen=True)
class TrafficSplit:
    """Who answers: the deployment's ``user_config``, as plain JSON data in Serve's config."""

    champion: str
    """Student directory (resolved) answering every request the challenger does not."""
    challenger: str | None = None
    """Student directory (resolved) of the challenger; None: the champion answers everything."""
    challenger_fraction: float = 0.0
    """Share of requests (of sticky keys) that go to the challenger, in [0, 1]."""
    sticky_header: str = STICKY_HEADER
    """Request header whose value is hashed to pick the version."""

    def __post_init__(self) -> None:
        if not isinstance(self.champion, str) or not self.champion:
            raise TrafficSplitError("serve.champion: a student directory is required")
        if not 0.0 <= self.challenger_fraction <= 1.0:
            raise TrafficSplitError(f"serve.challenger_fraction: {self.challenger_fraction!r} is out of range; "
                                    "must be within [0, 1]")
        if self.challenger is None and self.challenger_fraction > 0:
            raise TrafficSplitError(f"serve.challenger_fraction: {self.challenger_fraction} needs serve.challenger "
                                    "(the student that gets that share)")
        if self.challenger is not None and self.challenger == self.champion:
            raise TrafficSplitError(f"serve.challenger: {self.challenger} is the champion itself; give another "
                                    "student")
        if not HEADER_NAME.match(self.sticky_header or ""):
            raise TrafficSplitError(f"serve.sticky_header: {self.sticky_header!r} is not a header name; use "
                                    "letters, digits and dashes, e.g. X-Distill-Key")

    @classmethod
    def from_user_config(cls, raw: Mapping[str, Any]) -> TrafficSplit:
        """The split from Serve's ``user_config``; unknown keys and wrong types are refused by name."""
        if not isinstance(raw, Mapping):
            raise TrafficSplitError(f"user_config: expected a mapping of {', '.join(FIELDS)}, got {raw!r}")
        unknown = [k for k in raw if k not in FIELDS]
        if unknown:
            raise TrafficSplitError(f"user_config: unknown key(s) {', '.join(map(str, unknown))}; valid keys: "
                                    f"{', '.join(FIELDS)}")
        fraction = raw.get("challenger_fraction", 0.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TrafficSplitError(f"serve.challenger_fraction: expected a number in [0, 1], got {fraction!r}")
        return cls(champion=raw.get("champion"), challenger=raw.get("challenger") or None,
                   challenger_fraction=float(fraction), sticky_header=raw.get("sticky_header") or STICKY_HEADER)

    def to_user_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def promoted(self) -> TrafficSplit:
        """The challenger becomes the champion and takes all traffic."""
        if self.challenger is None:
            raise TrafficSplitError("there is no challenger to promote; start a canary with "
                                    "`distill-ray serve CHAMPION --challenger PATH --challenger-fraction F`")
        return dataclasses.replace(self, champion=self.challenger, challenger=None, challenger_fraction=0.0)

    def rolled_back(self) -> TrafficSplit:
        """All traffic back to the champion; the challenger is unloaded."""
        if self.challenger is None:
            raise TrafficSplitError("there is no challenger to roll back; the champion already answers everything")
        return dataclasses.replace(self, challenger=None, challenger_fraction=0.0)


FIELDS = tuple(f.name for f in dataclasses.fields(TrafficSplit))


# --- versions ----------------------------------------------------------------------------------

def version_label(card: Mapping[str, Any], model_id: str, taken: Sequence[str] = ()) -> str:
    """What a loaded student is called in ``X-Model-Version`` (and per-version metrics): its distill
    card's ``version``, else its model id (``name@version``). Two run directories both say "v1", so a
    card version another loaded student already uses falls back to the model id."""
    version = str(card.get("version") or "")
    if version and version != UNVERSIONED and version not in taken:
        return version
    return model_id


def student_kind(service: Any) -> tuple:
    """What must match between champion and challenger for one client to talk to both: causal LM, or
    a classifier with the same input (feature shape, or text / token ids)."""
    if service.generates:
        return ("causal_lm",)
    schema = service.predictor.schema
    return ("classifier", schema.input_shape, schema.accepts_text, schema.vocab_size)


def describe_kind(kind: tuple) -> str:
    if kind[0] == "causal_lm":
        return "a causal LM"
    _, shape, accepts_text, vocab = kind
    if shape is not None:
        return f"a classifier of inputs shaped {list(shape)}"
    return f"a classifier of {'text or ' if accepts_text else ''}token ids (vocabulary {vocab})"


@dataclass(frozen=True, eq=False)
class LoadedStudent:
    """One student in a replica: its service (answers) and the version string that names it. Kept
    while referenced, so a request that picked it finishes on it even if a promote drops it."""

    path: str
    service: Any
    """A ``StudentService`` (typed loosely so this module stays free of torch and FastAPI)."""
    version: str


def check_same_kind(champion: LoadedStudent, challenger: LoadedStudent) -> None:
    mine, theirs = student_kind(champion.service), student_kind(challenger.service)
    if mine != theirs:
        raise TrafficSplitError(f"serve.challenger: {challenger.path} is {describe_kind(theirs)} but the champion "
                                f"{champion.path} is {describe_kind(mine)}; a canary needs two students of the "
                                "same kind and input")
    if champion.version == challenger.version:
        raise TrafficSplitError(f"serve.challenger: champion and challenger both identify as {champion.version!r}; "
                                "answers could not be told apart (give one a distinct name or version in its "
                                "distill_card.json)")


class StudentRouter:
    """The students a replica holds and the split between them; replaced whole on ``reconfigure`` so a
    request sees one consistent router."""

    def __init__(self, split: TrafficSplit, champion: LoadedStudent, challenger: LoadedStudent | None = None):
        self.split, self.champion, self.challenger = split, champion, challenger

    @classmethod
    def single(cls, student: LoadedStudent) -> StudentRouter:
        return cls(TrafficSplit(champion=student.path), student)

    @property
    def sticky_header(self) -> str:
        return self.split.sticky_header

    def pick(self, key: str | None, draw: Callable[[], float] = random.random) -> LoadedStudent:
        if self.challenger is not None and goes_to_challenger(self.split.challenger_fraction, key, draw):
            return self.challenger
        return self.champion

    def loaded(self) -> dict[str, LoadedStudent]:
        return {s.path: s for s in (self.champion, self.challenger) if s is not None}

    def rerouted(self, split: TrafficSplit, load: Callable[[str, Sequence[str]], LoadedStudent]) -> StudentRouter:
        """The router for a new split: students already loaded are reused (a promote loads nothing),
        new paths are loaded with ``load(path, versions_taken)``; a challenger of another kind is refused."""
        have = self.loaded()
        champion = have.get(split.champion) or load(split.champion, [s.version for s in have.values()])
        challenger = None
        if split.challenger is not None:
            taken = [s.version for s in {**have, champion.path: champion}.values() if s.path != split.challenger]
            challenger = have.get(split.challenger) or load(split.challenger, taken)
            check_same_kind(champion, challenger)
        return StudentRouter(split, champion, challenger)


def batch_by_student(items: Sequence[tuple[LoadedStudent, Any]],
                     on_group: Callable[[LoadedStudent, list[Any]], None] | None = None) -> list[Any]:
    """One ``@serve.batch`` call across versions: each student's inputs go through its own model in
    one call, and the rows come back in the order of ``items``. ``on_group(student, its_rows)`` is
    called once per student in the batch (the replica records its metrics there)."""
    groups: dict[int, list[int]] = {}
    for i, (student, _) in enumerate(items):
        groups.setdefault(id(student), []).append(i)
    rows: list[Any] = [None] * len(items)
    for indices in groups.values():
        student = items[indices[0]][0]
        group_rows = list(student.service.batch_probabilities([items[i][1] for i in indices]))
        for i, row in zip(indices, group_rows):
            rows[i] = row
        if on_group is not None:
            on_group(student, group_rows)
    return rows
