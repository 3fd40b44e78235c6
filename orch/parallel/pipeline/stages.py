"""Split a Transformer into pipeline stages by layers.

There are ``pp * virtual`` global stages; stage ``s`` runs on the pipeline rank the schedule places
it on (``Schedule.stages_of``: ``s % pp``, or a V for ZB-V), holds the plan's
``layers_per_stage[s]`` consecutive layers, and the first and last stages also hold the embedding
and the final norm and output head. Each rank keeps one pruned model (:func:`prune_to_rank`): the
union of its stages' pieces, under the original parameter names (layers stay keyed by their global
index), so one optimizer, one checkpoint state dict and gradient clipping see the rank's whole
share, and checkpoints move between pipeline layouts. Each stage the executor runs is a view of that
model (:func:`stage_view`) sharing its modules, or the model itself when the rank has one stage.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from orch.models.llama import Transformer


def stage_layers(layers_per_stage: Sequence[int]) -> list[range]:
    """The global layer indices of each stage: ``[3, 5] -> [range(0, 3), range(3, 8)]``."""
    bounds = list(itertools.accumulate(layers_per_stage, initial=0))
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def prune_to_rank(model: Transformer, layers: Sequence[range], stages: Sequence[int]) -> None:
    """Drop from ``model`` (in place) every piece that none of ``stages`` holds; ``layers`` are
    all stages' layer ranges (:func:`stage_layers`)."""
    keep = {str(i) for s in stages for i in layers[s]}
    for name in [name for name in model.layers if name not in keep]:
        del model.layers[name]
    if 0 not in stages:
        model.tok_embeddings = None
    if len(layers) - 1 not in stages:
        model.norm = None
        model.output = None


def stage_view(model: Transformer, layers: range, first: bool, last: bool) -> Transformer:
    """A Transformer sharing ``model``'s modules that runs only ``layers`` (plus the embedding
    if ``first`` and the norm and head if ``last``): one stage of a rank with several. Make it
    after everything that replaces ``model``'s modules (recompute wrappers) or sets its
    ``positions``."""
    view = Transformer.__new__(Transformer)
    nn.Module.__init__(view)
    view.cfg = model.cfg
    view.tok_embeddings = model.tok_embeddings if first else None
    view.rope = model.rope
    view.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    view.norm = model.norm if last else None
    view.output = model.output if last else None
    view.positions = model.positions
    return view


__all__ = ["prune_to_rank", "stage_layers", "stage_view"]
