"""RunConfig: everything that determines one run, and the hash that names its record."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    """One run: algorithm x dataset x setting x seed x budget.

    ``steps`` is the training budget in meta-iterations (optimizer steps); each step consumes
    ``meta_batch`` training episodes (unset: the algorithm's ``default_meta_batch``, one episode per step
    for most, 32 tasks for the MAML family, as in its paper). ``hparams`` go to the algorithm's constructor and
    ``dataset_args`` to the data module's (e.g. ``{"split": "lake"}``). ``precision`` is Lightning's:
    ``"32"`` (float32, the default) or ``"bf16-mixed"`` (autocast to bfloat16 -- on CPUs with AMX/AVX512-BF16
    and on GPUs a large speed-up, see leaderboard/perf.md; it changes rounding, so it is part of the key).
    ``init_from`` names a run (its record name) whose saved embedding network initialises this run's, e.g.
    ProtoNet from a Baseline pre-trained on all training classes; ``save_weights`` makes a run save its
    embedding network for that (:mod:`bench.weights`). In a suite, ``init_from`` may name an algorithm of the
    same suite instead: the run of that algorithm at the same grid point.
    """

    algorithm: str
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_ways: int | None = None
    train_shots: int | None = None
    train_queries: int | None = None
    meta_batch: int | None = None  # resolved to the algorithm's default in __post_init__
    eval_batch: int = 50
    steps: int = 1000
    val_every: int = 500
    val_episodes: int = 100
    test_episodes: int = 1000
    seed: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    dataset_args: dict[str, Any] = field(default_factory=dict)
    suite: str = "adhoc"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    threads: int | None = None
    precision: str = "32"
    init_from: str | None = None
    save_weights: bool = False

    # Fields that do not change what is computed (where and how fast it runs, what else it writes).
    EXECUTION_FIELDS = ("suite", "accelerator", "devices", "num_nodes", "threads", "save_weights")
    # Fields added after records existed: left out of the key at their default, so old keys stay valid.
    KEY_OMITS_AT_DEFAULT = {"precision": "32", "init_from": None}
    PRECISIONS = ("32", "bf16-mixed", "16-mixed")

    def __post_init__(self) -> None:
        if self.meta_batch is None:
            from tasks import algorithm_class  # deferred: the algorithm registry imports torch and Lightning
            self.meta_batch = algorithm_class(self.algorithm).default_meta_batch
        self.precision = str(self.precision)
        if self.precision not in self.PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: use one of {list(self.PRECISIONS)} "
                             f"(\"bf16-mixed\" for autocast to bfloat16; \"16-mixed\" needs a GPU)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown run setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Hash of what is computed (not where), so the same run on another machine has the same key."""
        return self.semantic_hash(self.to_dict())

    @classmethod
    def semantic_hash(cls, values: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
        """:meth:`key` of a config dict (as records store it), also leaving out the fields in ``ignore``;
        ``ignore=("seed",)`` names the recipe that several training seeds of one run share."""
        semantic = {k: v for k, v in values.items() if k not in cls.EXECUTION_FIELDS and k not in ignore
                    and not (k in cls.KEY_OMITS_AT_DEFAULT and v == cls.KEY_OMITS_AT_DEFAULT[k])}
        return hashlib.sha1(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def setting(self) -> str:
        return f"{self.ways}w{self.shots}s"

    @property
    def name(self) -> str:
        split = self.dataset_args.get("split")
        dataset = f"{self.dataset}-{split}" if split else self.dataset
        return f"{self.algorithm}-{dataset}-{self.setting}-seed{self.seed}-{self.key()}"
