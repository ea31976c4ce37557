"""Meta-learning algorithms, one LightningModule each, all on :class:`tasks.base.EpisodicTask`."""
from __future__ import annotations

from tasks.anil import ANIL
from tasks.base import EpisodicTask
from tasks.baseline import Baseline, BaselinePlusPlus
from tasks.fomaml import FOMAML
from tasks.maml import MAML
from tasks.matching import MatchingNet
from tasks.metalstm import MetaLSTM
from tasks.metasgd import MetaSGD
from tasks.pretrained import Pretrained
from tasks.protonet import ProtoNet
from tasks.relation import RelationNet
from tasks.reptile import Reptile
from tasks.siamese import Siamese

ALGORITHMS: dict[str, type[EpisodicTask]] = {
    "protonet": ProtoNet,
    "maml": MAML,
    "fomaml": FOMAML,
    "metasgd": MetaSGD,
    "anil": ANIL,
    "reptile": Reptile,
    "metalstm": MetaLSTM,
    "pretrained": Pretrained,
    "matching": MatchingNet,
    "relation": RelationNet,
    "siamese": Siamese,
    "baseline": Baseline,
    "baselinepp": BaselinePlusPlus,
}


def algorithm_class(name: str) -> type[EpisodicTask]:
    """The task class registered as ``name``; an unknown name lists the known ones."""
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(sorted(ALGORITHMS))}") from None
