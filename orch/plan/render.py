"""Text views of plans for the terminal: one plan in detail, and the ``--auto`` ranking."""

from __future__ import annotations

import re
from collections import Counter

from orch.parallel.schedules.generators import placement_of
from orch.plan.cost import RING_DIMS
from orch.plan.degrees import Degrees
from orch.plan.placement import NO_NIC
from orch.plan.plan import Plan
from orch.plan.search import SearchResult

GIB = 2**30


def gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps a leading digit (GiB, MiB or KiB)."""
    for scale, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def rate(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


def offloaded_tiers(tiers: object) -> str:
    """``params=cpu grads=nvme``: the groups of a saved plan's ``tiers`` whose home is away from
    the device ('' for none, or for a ``tiers`` that is not a mapping): what tells an offloaded
    run's summary and checkpoint listing from a plain one's."""
    if not isinstance(tiers, dict):
        return ""
    return " ".join(f"{group}={tier}" for group, tier in tiers.items() if tier != "device")


def _grad_reduce(plan: Plan) -> str:
    """When the gradients are reduced, and the setting that says so."""
    if plan.grad_reduce == "step":
        when = "once per step, whole gradients held between micro-batches"
    elif plan.degrees.dp_replicate > 1:
        when = "every micro-batch, across replicas once per step"
    else:
        when = "every micro-batch"
    return f"{when} (parallel.grad_reduce: {plan.grad_reduce})"


OPTIMIZERS = {"adamw": "AdamW (two fp32 moments a parameter)",
              "adamw8bit": "8-bit AdamW (two 8-bit moments, an fp32 scale per 256)",
              "muon": "Muon for the blocks' matrices (one fp32 momentum), AdamW for the rest"}
"""How the plan names each ``optimizer.name``, whose states its memory counts."""


def render_plan(plan: Plan) -> str:
    d = plan.degrees
    nodes = f"{plan.nodes} node{'s' if plan.nodes != 1 else ''} x {plan.gpus_per_node}"
    sizes = Counter(place.ranks for place in plan.placement)
    if len(sizes) > 1:  # nodes of different sizes (the gcd said "2 nodes x 4" for 8 + 4)
        nodes = f"{plan.nodes} nodes: " + " + ".join(f"{n} x {size}" for size, n in sizes.items())
    lines = [f"plan for {plan.model} on {plan.device_summary} ({nodes})", ""]
    rows = [
        (
            "dense",
            f"pp {d.pp} x dp {d.dp} (replicate {d.dp_replicate} x shard {d.dp_shard}) x "
            f"cp {d.cp} x tp {d.tp}" + (" +sp" if d.sequence_parallel else ""),
        ),
    ]
    if d.ep > 1 or d.etp > 1:
        rows.append(("experts", f"pp {d.pp} x edp {d.edp} x ep {d.ep} x etp {d.etp}"))
    rows += [
        ("pipeline", _pipeline(plan)),
        (
            "batch",
            f"global {plan.global_batch} x {plan.seq_len} tokens, micro-batch "
            f"{plan.micro_batch}, {plan.microbatches} micro-batch"
            f"{'es' if plan.microbatches != 1 else ''} per rank, recompute "
            f"{plan.recompute}",
        ),
        ("optim", OPTIMIZERS.get(plan.optimizer, plan.optimizer)),
        (
            "links",
            ", ".join(
                f"{dim} {link.kind} {link.bandwidth / 1e9:.3g} GB/s"
                + (f" {link.nic}" if link.nic else "")
                + (f" (rings {link.ring_bandwidth / 1e9:.3g} GB/s)"
                   if dim in RING_DIMS and link.ring_bandwidth != link.bandwidth else "")
                for dim, link in plan.links.items()
                if dim in _link_dims(d) and link.kind != "none"
            )
            or "none (single device)",
        ),
    ]
    if plan.grad_reduce:  # several micro-batches, FSDP-sharded gradients, no pipeline
        rows.insert(-1, ("reduce", _grad_reduce(plan)))
    if plan.placement:
        rows.append(("nodes", _placement(plan)))
    rows += [("note", note) for note in plan.notes]
    lines += [f"  {name:<9}{value}" for name, value in rows]
    mem = plan.memory
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += ["", "  memory per rank (worst pipeline stage)"]
    for name in ("params", "grads", "optimizer", "activations", "buffers"):
        tier = plan.tiers.get(name, "device")
        home = f"  at home on {tier}" if tier != "device" else ""
        lines.append(f"    {name:<12}{gib(getattr(mem, name)):>12}{home}")
    lines.append(
        f"    {'total':<12}{gib(mem.total):>12}  of {gib(plan.memory_limit_bytes)} "
        f"usable: {verdict}"
    )
    if mem.cpu or mem.nvme:
        lines.append(f"    {'offloaded':<12}{gib(mem.cpu):>12} cpu, {gib(mem.nvme)} nvme; on the "
                     f"device at once {gib(mem.window)} (at least {gib(mem.window_min)}) of a "
                     f"{gib(plan.offload_budget_bytes)} offload budget")
    if mem.staging_min:
        lines.append(f"    {'staging':<12}{gib(plan.pinned_budget_bytes):>12} pinned for NVMe "
                     f"transfers (at least {gib(mem.staging_min)})")
    if mem.grad_staging:
        lines.append(f"    {'grad buffers':<12}{gib(mem.grad_staging):>12} pinned, gradients "
                     "gathering on their way to NVMe")
    s = plan.step
    lines += [
        "",
        f"  step time   {_seconds(s.total_s)} (compute {_seconds(s.compute_s)}, exposed comm "
        f"{_seconds(s.exposed_comm_s)}, pipeline bubble {_seconds(s.bubble_s)}"
        + (f", optimizer step {_seconds(s.optimizer_s)}" if s.optimizer_s else "") + ")",
        f"  throughput  {rate(s.tokens_per_s)} tokens/s, MFU {s.mfu * 100:.1f}%",
        "",
        render_rank_grid(plan),
    ]
    return "\n".join(lines)


def _seconds(value: float) -> str:
    """A duration with four significant digits in s or ms (a small model's step printed as
    0.000 s beside a throughput of millions of tokens/s)."""
    return f"{value:.4g} s" if value >= 1 or value == 0 else f"{value * 1e3:.4g} ms"


def _link_dims(d: Degrees) -> tuple[str, ...]:
    """Groups worth showing links for: FSDP's (``dp_shard-cp``: with cp its rings can be
    faster than ``dp_shard``'s alone, 400 GB/s against 100 for fsdp16 cp4 on H100 nodes, which
    the line showed), and the expert view only when it differs from the dense."""
    dense = ("tp", "cp", "dp_shard-cp" if d.cp > 1 else "dp_shard", "dp_replicate", "pp")
    return (*dense, "ep", "etp", "edp") if d.ep > 1 or d.etp > 1 else dense


def _pipeline(plan: Plan) -> str:
    d = plan.degrees
    if d.pp == 1:
        return "none"
    stages = plan.layers_per_stage
    layers = str(stages[0]) if len(set(stages)) == 1 else "/".join(map(str, stages))
    if d.virtual_stages == 1:
        return f"{plan.schedule}, {layers} layers per stage"
    shape = " in a V" if placement_of(plan.schedule) == "v" else ""
    return (f"{plan.schedule}, {layers} layers per stage, {d.virtual_stages} stages per "
            f"rank{shape}")


def _placement(plan: Plan) -> str:
    """Runs of nodes of one NIC type in rank order: ``ranks 0-15 ib-a0 ib-a1 (ib); ...``, with
    numbered names in sequence as ranges (``ib0..ib2047``)."""
    runs: list[list] = []
    for place in plan.placement:
        if runs and runs[-1][0] == place.nic:
            runs[-1][1].append(place)
        else:
            runs.append([place.nic, [place]])
    parts = []
    for nic, places in runs:
        last = places[-1].first_rank + places[-1].ranks - 1
        parts.append(f"ranks {places[0].first_rank}-{last} {_names([p.name for p in places])}"
                     f" ({nic or NO_NIC})")
    return "; ".join(parts)


def _names(names: list[str], most: int = 8) -> str:
    """``names`` with each sequence of three or more numbered names as a range (``ib0..ib2047``,
    where 4,096 nodes were listed one by one on a 27 KB line), and at most ``most`` items: the
    first ones, how many nodes are left out, and the last."""
    items: list[list] = []  # [first, last, count]
    for name in names:
        if items and _next_name(items[-1][1]) == name:
            items[-1][1:] = [name, items[-1][2] + 1]
        else:
            items.append([name, name, 1])
    words = [first if count == 1 else f"{first} {last}" if count == 2 else f"{first}..{last}"
             for first, last, count in items]
    if len(words) <= most:
        return " ".join(words)
    hidden = sum(count for _, _, count in items[most - 2:-1])
    return " ".join([*words[:most - 2], f"... {hidden} more nodes ...", words[-1]])


def _next_name(name: str) -> str | None:
    """The name after ``name`` in a numbered sequence (node9 -> node10, node09 -> node10)."""
    match = re.fullmatch(r"(.*?)(\d+)", name)
    if match is None:
        return None
    digits = match[2]
    return match[1] + str(int(digits) + 1).zfill(len(digits) if digits[0] == "0" else 0)


def render_rank_grid(plan: Plan, max_nodes: int = 2, max_ranks: int = 16) -> str:
    """Each shown rank's coordinate in every dimension larger than 1, one table per node."""
    d = plan.degrees
    sizes = {"pp": d.pp, "dp": d.dp, "cp": d.cp, "tp": d.tp}
    if d.ep > 1 or d.etp > 1:  # otherwise the expert view repeats the dense one
        sizes.update(ep=d.ep, etp=d.etp, edp=d.edp)
    dims = [name for name, size in sizes.items() if size > 1]
    if not dims:
        return "  rank grid   one rank holds everything"
    per_node = plan.gpus_per_node
    coords = plan.rank_coordinates()
    nodes = ([(place.name, place.first_rank, place.ranks) for place in plan.placement]
             or [(f"node {n}", n * per_node, min(per_node, plan.world_size - n * per_node))
                 for n in range(plan.nodes)])
    lines = ["  rank grid   coordinates of each rank"]
    for name, first, count in nodes[:max_nodes]:
        ranks = list(range(first, first + count))
        hidden = len(ranks) - max_ranks
        ranks = ranks[:max_ranks]
        width = len(str(ranks[-1])) + 1
        lines.append(f"    {name}")
        lines.append(
            "      rank "
            + "".join(f"{r:>{width}}" for r in ranks)
            + (f"  ... {hidden} more" if hidden > 0 else "")
        )
        for dim in dims:
            lines.append(f"      {dim:<5}" + "".join(f"{coords[r][dim]:>{width}}" for r in ranks))
    if plan.nodes > max_nodes:
        lines.append(f"    ... {plan.nodes - max_nodes} more nodes")
    return "\n".join(lines)


LAUNCH_REFUSES = "orch launch refuses it"
"""How a plan's note begins when this version's runtime cannot run the plan."""


def render_search(result: SearchResult, devices: str) -> str:
    """The ranking of ``orch plan --auto`` on ``devices`` (``Topology.description``)."""
    kept = f" with {result.kept} (given with --set)" if result.fixed else ""
    head = (
        f"searched {result.evaluated} plans for {devices}{kept}: {result.fit} fit, "
        f"{result.over_memory} over memory"
    )
    if result.over_memory:
        head += f" ({result.most_common_cause})"
    if result.unconnected:
        head += (f"; {result.unconnected} sets of degrees need groups across nodes that share "
                 "no network (give the nodes a common network in the cluster description)")
    if not result.evaluated:  # nothing to weigh: the degrees, not the memory, are the limit
        return head + ("\nno layout of this world size passes the plan's rules: orch plan "
                       "without --auto says which")
    if not result.best and result.unconnected:  # memory was not what stopped them
        return head + ("\nno plan can run: the degrees that fit in memory need groups across "
                       "nodes that share no network; attach the nodes to a common network in "
                       "the cluster description (a NIC's 'network')")
    if not result.best:
        return head + ("\nno plan fits: add devices, offload (offload.*), or shorten "
                       "train.seq_len" + (f", or leave out --set {', '.join(result.fixed)}"
                                          if result.fixed else ""))
    width = max(28, *(len(plan.degrees.short()) + 1 for plan in result.best))
    lines = [
        head,
        "",
        f"  {'#':<3}{'degrees':<{width}}{'mb':>3}  {'recompute':<10}{'reduce':<10}"
        f"{'mem/rank':>11}{'step s':>9}{'tokens/s':>10}{'MFU':>7}",
    ]
    for i, plan in enumerate(result.best, 1):
        lines.append(
            f"  {i:<3}{plan.degrees.short():<{width}}{plan.micro_batch:>3}  "
            f"{plan.recompute:<10}{plan.grad_reduce or '-':<10}{gib(plan.memory.total):>11}"
            f"{plan.step.total_s:>9.3f}"
            f"{rate(plan.step.tokens_per_s):>10}{plan.step.mfu * 100:>6.1f}%"
        )
    refused = [str(i) for i, plan in enumerate(result.best, 1)
               if any(note.startswith(LAUNCH_REFUSES) for note in plan.notes)]
    if refused:
        lines.append(f"  orch launch refuses #{', #'.join(refused)} (see each plan's notes: "
                     "--json, or the best plan's below)")
    lines += ["", "best plan:", render_plan(result.best[0])]
    return "\n".join(lines)
