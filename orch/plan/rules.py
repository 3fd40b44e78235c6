"""Rules a set of degrees must satisfy for a given model, batch and machine shape.

Each rule returns its own Problem (field, value, fix, and the config fields it reads besides the
field: ``Problem.reads``), and all rules run, so ``orch plan`` lists
every reason at once. The search enumerates candidates that satisfy these by construction; the
rules are the contract both must agree on (tests check that every searched plan passes them).
"""

from __future__ import annotations

from orch.config.schema import DP_DEGREES, KV_HEADS, OFFLOADED, WORLD_DEGREES, Config
from orch.errors import Problem
from orch.plan.degrees import Degrees


def check_degrees(cfg: Config, deg: Degrees, gpus_per_node: int | None, dp_known: bool = True
                  ) -> list[Problem]:
    """Every rule ``deg`` breaks. ``dp_known`` False: the degrees do not fill the world (said
    already) and ``dp_shard: -1`` had nothing to fill, so ``deg.dp_shard`` is made up and the
    rules that read the data-parallel size (the batch, the schedule, expert folding, DDP) are
    left out. ``gpus_per_node`` None: the machine is not known (a bad ``--world-size``, say,
    said already), so the rules that read its node size (tp and etp inside a node) are."""
    problems: list[Problem] = []

    def need(where: str, message: str, fix: str, reads: tuple[str, ...] = ()) -> None:
        """Say a broken rule: its message is made only then (the search checks thousands of
        degree sets that break none)."""
        problems.append(Problem(where, message, fix, reads))

    m, t, p = cfg.model, cfg.train, cfg.parallel
    if m.heads % deg.tp:
        need(
            "parallel.tp",
            f"model.heads={m.heads} is not divisible by tp={deg.tp}",
            "pick a tp that divides heads",
            ("model.heads",),
        )
    if m.n_kv_heads % deg.tp:
        need(
            "parallel.tp",
            f"model.kv_heads={m.n_kv_heads} is not divisible by tp={deg.tp}",
            f"pick a tp that divides {m.n_kv_heads} (each rank needs whole key/value heads)",
            KV_HEADS,
        )
    if m.ffn_dim % deg.tp and m.has_dense_mlp:
        need(
            "parallel.tp",
            f"model.ffn_dim={m.ffn_dim} is not divisible by tp={deg.tp}",
            "pick a tp that divides ffn_dim",
            ("model.ffn_dim",),
        )
    # the plan showed a split of the layers into stages nothing pipelines (--auto, which
    # picks pp, gives candidates without a pipeline one stage per rank)
    if deg.virtual_stages > 1 and deg.pp <= 1:
        need(
            "parallel.virtual_stages",
            f"{deg.virtual_stages} stages per pipeline rank, but the plan has no pipeline (pp=1)",
            "set parallel.virtual_stages=1, or parallel.pp >= 2",
            ("parallel.pp",),
        )
    ddp = (deg.dp_replicate > 1 and deg.dp_shard * deg.cp == 1 and deg.pp == 1
           and not (m.is_moe and deg.experts_folded) and not cfg.offload.enabled)
    # as orch.parallel.data_parallel.replicates_with_ddp, on the resolved degrees
    if t.compile != "none" and t.recompute == "selective" and ddp and dp_known:
        need(
            "train.compile",
            f"{t.compile} with train.recompute=selective under DDP (dp_replicate="
            f"{deg.dp_replicate}, no sharding): torch 2.13's DDP graph splitting fails on "
            "selective recompute's tags",
            "set train.recompute=full or none, parallel.dp_shard >= 2 (FSDP), or "
            "train.compile=none",
            ("train.recompute", *WORLD_DEGREES, "model.experts", "parallel.ep", "parallel.etp",
             *OFFLOADED),
        )
    chunks = deg.pp * deg.virtual_stages
    split = ("model.layers", "parallel.pp", "parallel.virtual_stages", "parallel.stage_layers")
    if p.stage_layers and deg.pp > 1:
        given = p.stage_layers
        if len(given) != chunks or sum(given) != m.layers or min(given) < 1:
            need(
                "parallel.stage_layers",
                f"{given} must be {chunks} numbers (pp x virtual_stages = {deg.pp} x "
                f"{deg.virtual_stages}), each at least 1, adding up to model.layers={m.layers}",
                "give one layer count per pipeline stage, or leave it empty for the plan's "
                "split (by FLOPs; even with virtual stages)",
                split,
            )
    elif deg.virtual_stages > 1:
        if m.layers < chunks:  # no stage_layers can help: say what can
            need(
                "parallel.virtual_stages",
                f"{chunks} pipeline stages (pp x virtual_stages = {deg.pp} x "
                f"{deg.virtual_stages}) for model.layers={m.layers}: each stage needs a layer",
                f"pick pp and virtual_stages whose product is at most {m.layers}",
                split,
            )
        elif m.layers % chunks:
            need(
                "parallel.virtual_stages",
                f"model.layers={m.layers} is not divisible by pp x virtual_stages = {deg.pp} x "
                f"{deg.virtual_stages}",
                "pick pp and virtual_stages whose product divides layers, or set "
                "parallel.stage_layers",
                split,
            )
    else:  # the plan splits the layers by their FLOPs, evenly or not
        if m.layers < deg.pp:
            need(
                "parallel.pp",
                f"{deg.pp} pipeline stages for model.layers={m.layers}: each stage needs a layer",
                f"pick a pp of at most {m.layers}",
                split,
            )
    if deg.pp != 1 and m.tie_embeddings:
        need(
            "model.tie_embeddings",
            f"true with pp={deg.pp}: the embedding and the output head live on different stages",
            "set model.tie_embeddings=false to pipeline this model",
            ("parallel.pp",),
        )
    if m.is_moe:  # (experts' default, 0, runs none of these: no need to declare it read)
        if m.experts % deg.ep:
            need(
                "parallel.ep",
                f"model.experts={m.experts} is not divisible by ep={deg.ep}",
                "pick an ep that divides the number of experts",
                ("model.experts",),
            )
        if deg.tp != 1 and not deg.sequence_parallel:
            need(
                "parallel.sequence_parallel",
                f"false with tp={deg.tp} and MoE layers: every tp rank would route (and send to "
                "the experts) the same tokens",
                "set parallel.sequence_parallel=true (each tp rank routes its part of the "
                "sequence)",
                ("parallel.tp",),
            )
        shared = m.shared_experts * m.moe_ffn_dim
        if shared % deg.tp:
            need(
                "parallel.tp",
                f"the shared expert's hidden size {shared} (shared_experts x expert_ffn_dim) is "
                f"not divisible by tp={deg.tp}",
                "pick a tp that divides it",
                ("model.shared_experts", "model.expert_ffn_dim", "model.ffn_dim"),
            )
        if m.moe_ffn_dim % deg.etp:
            need(
                "parallel.etp",
                f"expert_ffn_dim={m.moe_ffn_dim} is not divisible by etp={deg.etp}",
                "pick an etp that divides expert_ffn_dim",
                ("model.expert_ffn_dim", "model.ffn_dim"),
            )
        if deg.stage_ranks % (deg.ep * deg.etp) and dp_known:
            need(
                "parallel.ep",
                f"ep x etp = {deg.ep} x {deg.etp} does not fold into the {deg.stage_ranks} ranks "
                f"of a pipeline stage (dp x cp x tp = {deg.dp} x {deg.cp} x {deg.tp})",
                "pick ep and etp whose product divides dp x cp x tp",
                ("parallel.etp", *DP_DEGREES, "parallel.cp", "parallel.tp"),
            )
    if deg.cp > 1:  # (nor cp's default, 1, these; nor sequence_parallel's, false, the next)
        cp = ("parallel.cp", "parallel.cp_kind")
        ulysses_heads = not ((m.heads // deg.tp) % deg.cp or (m.n_kv_heads // deg.tp) % deg.cp)
        if p.cp_kind == "ring":
            if t.seq_len % (2 * deg.cp):
                ulysses = t.seq_len % deg.cp == 0 and ulysses_heads
                need(
                    "train.seq_len",
                    f"{t.seq_len} is not divisible by 2 x cp = {2 * deg.cp} (load-balanced ring "
                    "attention gives each rank two chunks)",
                    f"use a multiple of {2 * deg.cp}" + (
                        ", or parallel.cp_kind=ulysses (a multiple of cp does there)"
                        if ulysses else ""),
                    cp,
                )
        else:
            if t.seq_len % deg.cp:
                need(
                    "train.seq_len",
                    f"{t.seq_len} is not divisible by cp={deg.cp}",
                    f"use a multiple of {deg.cp}",
                    cp,
                )
            if not ulysses_heads:
                need(
                    "parallel.cp",
                    f"Ulysses needs heads/tp and kv_heads/tp divisible by cp={deg.cp} "
                    f"(heads={m.heads}, kv_heads={m.n_kv_heads}, tp={deg.tp})",
                    "use cp_kind: ring, or a cp that divides the heads per tp rank",
                    ("parallel.cp_kind", *KV_HEADS, "parallel.tp"),
                )
    if deg.sequence_parallel:
        local = t.seq_len // deg.cp
        if local % deg.tp:
            need(
                "train.seq_len",
                f"sequence parallel splits the {local} tokens per context rank over tp={deg.tp}",
                f"use a seq_len divisible by cp x tp = {deg.cp * deg.tp}" + (
                    "" if m.is_moe else ", or parallel.sequence_parallel=false"),  # MoE needs it
                ("parallel.cp", "parallel.tp", "parallel.sequence_parallel", "model.experts"),
            )
    per_step = t.micro_batch * deg.dp
    if t.global_batch % per_step and dp_known:
        need(
            "train.global_batch",
            f"{t.global_batch} is not divisible by micro_batch x dp = {t.micro_batch} x {deg.dp}",
            f"use a multiple of {per_step}, or change micro_batch or the data-parallel size",
            ("train.micro_batch", *DP_DEGREES),
        )
    if deg.pp > 1 and t.global_batch % per_step == 0 and dp_known:
        problems += _schedule_problems(cfg, deg, t.global_batch // per_step)
    for dim, size in (("tp", deg.tp), ("etp", deg.etp)) if gpus_per_node else ():
        inside = size <= gpus_per_node and gpus_per_node % size == 0
        if not inside and not p.allow_cross_node_tp:
            need(
                f"parallel.{dim}",
                f"{dim}={size} spans nodes of {gpus_per_node} devices; tensor parallelism over the "
                "network is slow",
                f"use {dim} <= {gpus_per_node} dividing it, or set "
                "parallel.allow_cross_node_tp=true to force it",
                ("parallel.allow_cross_node_tp",),
            )
    return problems


_SCHEDULE_FIELDS = {"name": "parallel.pp_schedule", "stages": "parallel.pp",
                    "microbatches": "train.global_batch", "virtual": "parallel.virtual_stages",
                    "max_deferred": "parallel.pp_max_deferred"}
"""The config field behind each argument a schedule's problems are about: the micro-batches per
step are train.global_batch / (micro_batch x dp), of which global_batch is the lever."""


def _schedule_problems(cfg: Config, deg: Degrees, microbatches: int) -> list[Problem]:
    """Whether the pipeline schedule can be built for these stages and micro-batches (the same
    generator the runtime uses says why not), each problem under the field it is about."""
    p, t = cfg.parallel, cfg.train
    deferred = p.pp_max_deferred if p.pp_schedule.startswith("2bp-") else None
    from orch.parallel.schedules import schedule_problems  # pure Python: no torch import

    fields = ("parallel.pp_schedule", "parallel.pp", "parallel.virtual_stages",
              "parallel.pp_max_deferred", "train.global_batch", "train.micro_batch", *DP_DEGREES)
    problems = []
    for problem in schedule_problems(p.pp_schedule, deg.pp, microbatches, deg.virtual_stages,
                                     deferred):
        where = _SCHEDULE_FIELDS[problem.argument]
        fix = problem.fix
        if problem.argument == "microbatches":
            fix += (f"; the micro-batches per step are train.global_batch / (micro_batch x "
                    f"dp): now {t.global_batch} / ({t.micro_batch} x {deg.dp}) = {microbatches}")
        problems.append(Problem(where, problem.message, fix,
                                tuple(f for f in fields if f != where)))
    # (pp_max_deferred under another schedule is the config's rule: orch.config.rules)
    return problems
