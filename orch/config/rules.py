"""Rules between config fields that hold whatever devices the run gets.

Each rule appends a Problem naming the field, the value and a fix, and the other fields it reads
(``Problem.reads``: a failed value's default must not be blamed on the user); all rules run so
users see every problem at once. Rules that depend on the world size or the device (divisibility by
parallel degrees, memory) are the plan's, in ``orch.plan.rules``.
"""

from __future__ import annotations

from orch.config.blend import FIELD, blend_field, blend_paths, parse_blend
from orch.config.schema import COOLDOWN_FIELDS, KV_HEADS, OFFLOADED, Config, ModelConfig
from orch.errors import Problem
from orch.offload.sizes import ALIGN
from orch.parallel.schedules.generators import CHUNKED, SPLIT_BACKWARD, chunks_per_rank
from orch.runtime.indexed import typed_by_config

UINT16_IDS = 1 << 16
SEED_MAX = (1 << 64) - 1
"""The largest ``train.seed``: torch's generators take an unsigned 64-bit seed (one above it
crashed every worker: "Overflow when unpacking long long")."""


def check_config(cfg: Config) -> list[Problem]:
    problems: list[Problem] = []

    def need(ok: bool, where: str, message: str, fix: str, reads: tuple[str, ...] = ()) -> None:
        if not ok:
            problems.append(Problem(where, message, fix, reads))

    m, t, p, o = cfg.model, cfg.train, cfg.parallel, cfg.optimizer
    need(
        bool(cfg.checkpoint.resume.strip()),
        "checkpoint.resume",
        "is empty",
        "use auto (the newest complete checkpoint), none, or a checkpoint directory",
    )
    need(
        bool(cfg.run.dir.strip()),
        "run.dir",
        "is empty: the run would write its files into the current directory",
        "set run.dir to a directory of its own, e.g. runs/NAME",
    )
    for name in ("vocab_size", "dim", "layers", "heads", "ffn_dim", "max_seq_len"):
        value = getattr(m, name)
        need(
            value >= 1, f"model.{name}", f"must be at least 1, got {value}", "use a positive value"
        )
    for name in ("global_batch", "micro_batch", "seq_len", "steps"):
        value = getattr(t, name)
        need(
            value >= 1, f"train.{name}", f"must be at least 1, got {value}", "use a positive value"
        )
    # the rules that divide by those run only where they are positive; every other rule runs
    # (one mistake hid the others: model.dim=-1 hid parallel.tp=0)
    heads_ok = m.dim >= 1 and m.heads >= 1
    if m.head_dim is None:
        need(
            not heads_ok or m.dim % m.heads == 0,
            "model.dim",
            f"{m.dim} is not divisible by model.heads={m.heads}",
            "choose dim = heads x head_dim, e.g. heads 32 with dim 4096, or set model.head_dim "
            "to the heads' width",
            ("model.heads", "model.head_dim"),
        )
        need(
            not heads_ok or m.dim % m.heads or m.dim // m.heads % 2 == 0,
            "model.heads",
            f"head_dim dim/heads = {m.dim // max(1, m.heads)} is odd; RoPE rotates pairs of "
            "channels",
            "choose heads so that dim/heads is even, or set an even model.head_dim",
            ("model.dim", "model.head_dim"),
        )
    else:
        need(
            m.head_dim >= 2 and m.head_dim % 2 == 0,
            "model.head_dim",
            f"{m.head_dim} is not an even width of at least 2; RoPE rotates pairs of channels",
            "use an even head_dim such as 128, or null for dim / heads",
        )
    need(
        m.n_kv_heads >= 1,
        "model.kv_heads",
        f"must be at least 1, got {m.n_kv_heads}",
        "use a kv_heads that divides heads (e.g. 8 for 32 heads), or null for heads",
        KV_HEADS,
    )
    need(
        m.n_kv_heads < 1 or m.heads < 1 or m.heads % m.n_kv_heads == 0,
        "model.kv_heads",
        f"heads={m.heads} is not a multiple of kv_heads={m.n_kv_heads}",
        "use a kv_heads that divides heads (e.g. 8 for 32 heads), or null for heads",
        KV_HEADS,
    )
    need(
        m.norm_eps > 0,
        "model.norm_eps",
        f"must be positive, got {m.norm_eps}",
        "use 1e-5 (Llama 2 and 3) or 1e-6",
    )
    need(
        m.rope_theta > 0,
        "model.rope_theta",
        f"must be positive, got {m.rope_theta}",
        "use 10000 (Llama 2) or 500000 (Llama 3)",
    )
    need(
        m.experts >= 0,
        "model.experts",
        f"must be 0 (dense) or more, got {m.experts}",
        "use 0 for a dense model",
    )
    if m.is_moe:  # (experts' default, 0, runs none of these: no need to declare it read)
        need(
            1 <= m.top_k <= m.experts,
            "model.top_k",
            f"{m.top_k} is not between 1 and experts={m.experts}",
            "route to 1..experts experts",
        )
        need(
            1 <= m.moe_layer_interval <= m.layers,
            "model.moe_layer_interval",
            f"{m.moe_layer_interval} is not between 1 and layers={m.layers}",
            "use 1 to make every layer MoE, 2 for every other layer",
            ("model.layers",),
        )
        need(
            m.capacity_factor is None or m.capacity_factor > 0,
            "model.capacity_factor",
            f"must be positive, got {m.capacity_factor}",
            "use e.g. 1.25, or null for dropless",
        )
        need(
            m.shared_experts >= 0,
            "model.shared_experts",
            f"must be 0 or more, got {m.shared_experts}",
            "use 0 or 1",
        )
        need(
            m.expert_ffn_dim is None or m.expert_ffn_dim >= 1,
            "model.expert_ffn_dim",
            f"must be positive, got {m.expert_ffn_dim}",
            "use a positive size or null for ffn_dim",
        )
        for name in ("aux_loss_coeff", "bias_update_rate"):
            value = getattr(m, name)
            need(
                value >= 0,
                f"model.{name}",
                f"must be 0 (off) or more, got {value}",
                "use e.g. 0.01 for aux_loss_coeff, 0.001 for bias_update_rate",
            )

    need(
        t.seq_len <= m.max_seq_len,
        "train.seq_len",
        f"{t.seq_len} is longer than model.max_seq_len={m.max_seq_len}",
        f"lower train.seq_len or raise model.max_seq_len to at least {t.seq_len}",
        ("model.max_seq_len",),
    )
    need(
        t.micro_batch < 1 or t.global_batch % t.micro_batch == 0,
        "train.global_batch",
        f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}",
        "make global_batch a multiple of micro_batch",
        ("train.micro_batch",),
    )
    need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}", "use e.g. 3e-4")
    need(0 <= t.seed <= SEED_MAX, "train.seed",
         f"{t.seed} is not in [0, 2**64 - 1]: numpy's generators refuse a negative seed and "
         "torch's one over 64 bits", "use e.g. 0")  # either crashed every worker
    need(
        0 <= t.min_lr_ratio <= 1,
        "train.min_lr_ratio",
        f"{t.min_lr_ratio} is not in [0, 1]",
        "use e.g. 0.1 to decay to a tenth of lr",
    )
    warmup_ok = 0 <= t.warmup_steps <= t.steps
    need(
        warmup_ok,
        "train.warmup_steps",
        f"{t.warmup_steps} is not between 0 and train.steps={t.steps}",
        "shorten the warmup" if t.warmup_steps > 0 else "use 0 (no warmup) or the warmup's "
        "length in steps",
        ("train.steps",),
    )
    decay_ok = t.decay_steps == 0 or t.decay_steps >= max(1, t.warmup_steps)
    need(
        decay_ok,
        "train.decay_steps",
        f"{t.decay_steps} is neither 0 nor a step at or after train.warmup_steps="
        f"{t.warmup_steps}",
        "use 0 (decay until train.steps) or a step at or after the warmup",
        ("train.warmup_steps",),
    )
    wsd = t.lr_schedule == "wsd"
    need(  # (without wsd a cooldown is said to be unread below, not judged as well)
        not wsd or t.cooldown_steps >= 0,
        "train.cooldown_steps",
        f"must be 0 or more, got {t.cooldown_steps}",
        "use 0 (a fifth of the steps after warmup) or the cooldown's length in steps",
    )
    stable = max(0, (t.decay_steps or t.steps) - t.warmup_steps)
    end = f"decay_steps={t.decay_steps}" if t.decay_steps else f"steps={t.steps}"
    need(  # judged only between a valid warmup and decay end ("the 0 steps" from a bad one)
        not wsd or not (warmup_ok and decay_ok) or t.cooldown_steps <= stable,
        "train.cooldown_steps",
        f"{t.cooldown_steps} is longer than the {stable} steps from the warmup's end "
        f"(train.warmup_steps={t.warmup_steps}) to the decay's (train.{end})",
        f"use at most {stable}, or 0 for a fifth of them" if stable else
        "use 0 (no step lies between them to cool down over), or end the decay later",
        ("train.warmup_steps", "train.decay_steps", "train.steps"),
    )
    unread = {name: "a wsd schedule's cooldown" for name in COOLDOWN_FIELDS if not wsd}
    if t.lr_schedule == "constant":  # the peak held to the end: no decay, no floor
        unread |= dict.fromkeys(("min_lr_ratio", "decay_steps"), "the decay after the warmup")
    for name, shapes in unread.items():
        need(
            getattr(t, name) == getattr(type(t)(), name),
            f"train.{name}",
            f"{getattr(t, name)} is set, but train.lr_schedule is {t.lr_schedule}: it shapes "
            f"{shapes}",
            f"set train.lr_schedule=wsd, or leave train.{name} out" if name in COOLDOWN_FIELDS
            else f"set a schedule that decays (train.lr_schedule=cosine, linear or wsd), or "
            f"leave train.{name} out",
            ("train.lr_schedule",),
        )
    need(
        t.grad_clip >= 0,
        "train.grad_clip",
        f"must be 0 (off) or positive, got {t.grad_clip}",
        "use 1.0, or 0 to disable clipping",
    )

    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        need(
            0 <= value < 1, f"optimizer.{name}", f"{value} is not in [0, 1)", "use e.g. 0.9 / 0.95"
        )
    need(o.eps > 0, "optimizer.eps", f"must be positive, got {o.eps}", "use e.g. 1e-8")
    need(
        o.weight_decay >= 0,
        "optimizer.weight_decay",
        f"must be 0 or more, got {o.weight_decay}",
        "use e.g. 0.1",
    )
    muon = o.name == "muon"
    # (a value Muon does not read is said to be so below, not judged as well)
    need(not muon or 0 <= o.muon_momentum < 1, "optimizer.muon_momentum",
         f"{o.muon_momentum} is not in [0, 1)", "use e.g. 0.95")
    need(not muon or 1 <= o.muon_ns_steps <= 20, "optimizer.muon_ns_steps",
         f"{o.muon_ns_steps} is not between 1 and 20",
         "use 5 (the quintic iteration's usual count)")
    for name in ("muon_momentum", "muon_ns_steps"):
        need(
            muon or getattr(o, name) == getattr(type(o)(), name),
            f"optimizer.{name}",
            f"{getattr(o, name)} is set, but optimizer.name is {o.name}: it tunes Muon",
            f"set optimizer.name=muon, or leave optimizer.{name} out",
            ("optimizer.name",),
        )
    offloaded = [f"{where}={tier}" for where in OFFLOADED
                 if (tier := getattr(cfg.offload, where.split(".")[1])) != "device"]
    need(
        not (muon and offloaded),
        "optimizer.name",
        f"muon with {', '.join(offloaded)}: the offload engine steps AdamW's CPU kernels unit "
        "by unit on its homes, Muon whole matrices on the device",
        "use optimizer.name=adamw (or adamw8bit) with offload, or keep every offload group on "
        "the device",
        OFFLOADED,
    )

    for name in ("dp_replicate", "tp", "pp", "virtual_stages", "ep", "etp", "cp"):
        value = getattr(p, name)
        need(
            value >= 1,
            f"parallel.{name}",
            f"must be at least 1, got {value}",
            "use 1 to switch this dimension off",
        )
    need(
        p.dp_shard >= 1 or p.dp_shard == -1,
        "parallel.dp_shard",
        f"must be at least 1, or -1 for the rest of the world, got {p.dp_shard}",
        "use -1 to let the plan fill it",
    )
    need(
        p.virtual_stages <= 1 or p.pp_schedule in CHUNKED,  # (below 1: said above)
        "parallel.virtual_stages",
        f"{p.virtual_stages} needs pp_schedule: interleaved (or zbv), not {p.pp_schedule}",
        "set parallel.pp_schedule=interleaved or virtual_stages=1",
        ("parallel.pp_schedule",),
    )
    need(
        p.pp_rebalance_threshold == 0 or p.pp_rebalance_threshold > 1,
        "parallel.pp_rebalance_threshold",
        f"{p.pp_rebalance_threshold} must be above 1 (a ratio of stage times), or 0 for never",
        "use e.g. 1.2",
    )
    chunks = chunks_per_rank(p.pp_schedule, p.virtual_stages)
    need(
        p.pp_rebalance_threshold == 0 or (p.pp > 1 and chunks == 1),
        "parallel.pp_rebalance_threshold",
        f"re-partitioning needs a pipeline of one stage per rank (pp {p.pp}, {chunks} stages "
        f"per rank under {p.pp_schedule})",
        "set parallel.pp_rebalance_threshold=0, or pp > 1 with one stage per rank (not zbv; "
        "virtual_stages=1)",
        ("parallel.pp", "parallel.virtual_stages", "parallel.pp_schedule"),
    )
    need(
        t.compile == "none" or p.tp == 1,
        "train.compile",
        f"{t.compile} with parallel.tp={p.tp}: torch 2.13 hands a plain tensor where tensor "
        "parallelism's redistribution expects a DTensor gradient, and the backward fails",
        "set train.compile=none, or parallel.tp=1",
        ("parallel.tp",),
    )
    need(
        t.compile == "none" or p.pp == 1 or p.pp_schedule not in SPLIT_BACKWARD,
        "train.compile",
        f"{t.compile} with pp_schedule={p.pp_schedule}: a compiled block computes its weight "
        "gradients with its input gradients, so the schedule's deferred W steps would be empty",
        "use pp_schedule 1f1b, gpipe or interleaved with train.compile, or train.compile=none",
        ("parallel.pp", "parallel.pp_schedule"),
    )
    need(
        t.compile == "none" or p.pp == 1 or t.recompute == "none",
        "train.compile",
        f"{t.compile} with parallel.pp={p.pp} and train.recompute={t.recompute}: a pipeline "
        "stage's recomputed compiled block saves other tensors than its first forward did, and "
        "the backward fails",
        "set train.recompute=none, or train.compile=none",
        ("parallel.pp", "train.recompute"),
    )
    need(
        p.pp_max_deferred is None or p.pp_max_deferred >= 0,
        "parallel.pp_max_deferred",
        f"must be 0 or more, got {p.pp_max_deferred}",
        "use null (r waiting weight steps on pipeline rank r) or a bound such as 2",
    )
    need(  # here, not in the plan: beside any other problem of the schedule (zbv's V)
        p.pp_max_deferred is None or p.pp_schedule.startswith("2bp-"),
        "parallel.pp_max_deferred",
        f"{p.pp_max_deferred} applies to the 2bp schedules, not {p.pp_schedule}",
        "leave it empty (null)",
        ("parallel.pp_schedule",),
    )
    need(
        not p.stage_layers or p.pp > 1,
        "parallel.stage_layers",
        f"{p.stage_layers} splits the layers between pipeline stages, but parallel.pp is 1",
        "remove parallel.stage_layers, or set parallel.pp",
        ("parallel.pp",),
    )
    need(
        p.pp_rebalance_steps >= 1,
        "parallel.pp_rebalance_steps",
        f"must be at least 1, got {p.pp_rebalance_steps}",
        "use e.g. 3",
    )
    need(
        p.pp_schedule != "interleaved" or p.virtual_stages >= 2 or p.pp == 1,
        "parallel.pp_schedule",
        "interleaved needs virtual_stages of 2 or more",
        "set parallel.virtual_stages=2 (or more), or pick 1f1b",
        ("parallel.virtual_stages", "parallel.pp"),
    )
    need(
        p.pp_schedule != "zbv" or p.virtual_stages in (1, 2) or p.pp == 1,  # 1: left out, 2
        "parallel.pp_schedule",
        f"zbv runs 2 stages per rank (a V), not virtual_stages={p.virtual_stages}",
        "leave parallel.virtual_stages out (zbv's 2) or set it to 2",
        ("parallel.virtual_stages", "parallel.pp"),
    )
    if not m.is_moe:
        for name in ("ep", "etp"):
            value = getattr(p, name)
            need(
                value == 1,
                f"parallel.{name}",
                f"{value} > 1 but the model has no experts",
                f"set parallel.{name}=1, or model.experts > 0",
                ("model.experts",),
            )

    off = cfg.offload
    tiers = {g: getattr(off, g) for g in ("params", "grads", "optimizer", "activations")}
    for group, tier in tiers.items():
        need(
            tier != "nvme" or bool(off.nvme_path),
            f"offload.{group}",
            "is nvme but offload.nvme_path is empty",
            "set offload.nvme_path to a directory on an SSD",
            ("offload.nvme_path",),
        )
    need(
        off.activations != "auto" or t.recompute == "none",
        "offload.activations",
        f"auto with train.recompute={t.recompute}: the automatic policy decides recompute per "
        "layer itself",
        "set train.recompute=none, or offload.activations to device or cpu",
        ("train.recompute",),
    )
    for name in ("device_budget", "pinned_budget"):
        need(
            off.enabled or getattr(off, name) == "auto",
            f"offload.{name}",
            f"{getattr(off, name)} is set, but nothing is offloaded (every offload group is on "
            "the device), so no budget applies",
            "set offload.params (and grads, optimizer) to cpu or nvme, or leave the budget auto",
            OFFLOADED,
        )
    need(
        off.cpu_adam == "auto" or (off.optimizer != "device" and cfg.optimizer.name == "adamw"),
        "offload.cpu_adam",
        f"{off.cpu_adam} is set, but it picks the CPU step of AdamW with the optimizer states "
        f"offloaded, and this run has optimizer.name={cfg.optimizer.name}, "
        f"offload.optimizer={off.optimizer}",
        "leave offload.cpu_adam auto, or use optimizer.name=adamw with offload.optimizer=cpu or "
        "nvme",
        ("offload.optimizer", "optimizer.name"),
    )
    defaults = type(off)()
    on_nvme = "nvme" in tiers.values()
    for name in ("nvme_path", "io_block_size", "io_queue_depth", "io_threads"):
        need(
            on_nvme or getattr(off, name) == getattr(defaults, name),
            f"offload.{name}",
            f"{getattr(off, name)} is set, but nothing rests on NVMe, so no NVMe I/O applies",
            "set offload.params, grads, optimizer or activations to nvme, or leave it out",
            OFFLOADED,
        )
    need(
        off.enabled or off.prefetch_depth == defaults.prefetch_depth,
        "offload.prefetch_depth",
        f"{off.prefetch_depth} is set, but nothing is offloaded, so nothing is fetched ahead",
        "set offload.params (and grads, optimizer) to cpu or nvme, or leave it out",
        OFFLOADED,
    )
    need(
        off.prefetch_depth >= 0,
        "offload.prefetch_depth",
        f"must be 0 or more, got {off.prefetch_depth}",
        "use 1 or 2",
    )
    for name in ("io_queue_depth", "io_threads"):
        value = getattr(off, name)
        need(value >= 1, f"offload.{name}", f"must be at least 1, got {value}",
             f"use e.g. {getattr(defaults, name)} (the default)")
    need(
        off.io_block_size >= ALIGN and off.io_block_size % ALIGN == 0,
        "offload.io_block_size",
        f"{off.io_block_size:,} bytes is not a positive multiple of {ALIGN:,} (O_DIRECT's "
        "alignment)",
        "use e.g. 1MiB (the default)",
    )

    need(
        0 <= cfg.run.stop_at_step <= t.steps,
        "run.stop_at_step",
        f"{cfg.run.stop_at_step} is not between 0 and train.steps={t.steps}",
        "use 0 to train to train.steps",
        ("train.steps",),
    )
    need(
        cfg.run.comm_timeout_s == 0 or 1 <= cfg.run.comm_timeout_s <= 86_400,
        "run.comm_timeout_s",
        f"{cfg.run.comm_timeout_s:g} is neither 0 (torch's timeouts) nor 1 to 86,400 seconds",
        "use 0, or a few minutes (e.g. 300): long enough for a checkpoint save, which the other "
        "ranks wait for",
    )
    d, ev = cfg.data, cfg.eval
    blend_problems = parse_blend(d.blend)[1]
    problems += blend_problems
    refused = {problem.where for problem in blend_problems}  # (said: not blamed again below)
    need(not (d.blend and d.path), "data.path", f"{d.path!r} is set beside data.blend, which "
         "replaces it", "put the file in data.blend with a weight, or leave data.blend empty",
         (FIELD,))
    need(not (d.blend and d.format != "auto"), "data.format", f"{d.format!r} beside "
         "data.blend, whose files read as their suffixes say (.bin and .npy token ids, others "
         "text)", "leave data.format at auto, and name the files by what they hold", (FIELD,))
    # a uint32 file read as uint16 passes every other check: each id's halves are < 65536
    # (a Megatron .idx beside a .bin names its type, and token_dtype is not read)
    bins = [field for field, path, read_as_text in (
        ("data.path", d.path, d.format == "text"),
        ("eval.path", ev.path if ev.interval > 0 else "", False),  # (its format: its suffix)
        *((blend_field(i), path, False) for i, path in enumerate(blend_paths(d.blend))
          if blend_field(i) not in refused))
        if typed_by_config(path) and not read_as_text]
    need(
        not (bins and d.token_dtype == "uint16" and m.vocab_size > UINT16_IDS),
        "data.token_dtype",
        f"uint16 for a .bin file ({' and '.join(bins)}) of a model with model.vocab_size="
        f"{m.vocab_size}: uint16 holds ids below {UINT16_IDS:,} only, and a file of 32-bit ids "
        "read as uint16 passes every check as two ids each",
        "set data.token_dtype: uint32 (what a tokenizer of this vocabulary writes)",
        (*bins, "data.format", "model.vocab_size", "eval.interval"),
    )
    need(ev.interval >= 0, "eval.interval", f"must be 0 or more, got {ev.interval}",
         "use 0 to switch evaluation off, or e.g. 100")
    need(ev.batches >= 1, "eval.batches", f"must be at least 1, got {ev.batches}",
         "use a positive number of global batches, e.g. 4")
    need(-1 <= d.eos_id < m.vocab_size, "data.eos_id", f"{d.eos_id} is neither -1 (none) nor "
         f"an id of the vocabulary (0 to model.vocab_size - 1 = {m.vocab_size - 1})",
         "set the tokenizer's end-of-document id (orch data prepare prints it), or -1",
         ("model.vocab_size",))
    need(not t.document_mask or d.eos_id >= 0, "train.document_mask", "needs the "
         "end-of-document id, but data.eos_id is -1 (none)", "set data.eos_id to the "
         "tokenizer's eos id (orch data prepare prints it), or train.document_mask to false",
         ("data.eos_id",))
    need(0 <= d.holdout < 1, "data.holdout", f"{d.holdout:g} is not a fraction in [0, 1)",
         "hold out a small fraction of the training data, e.g. 0.01, or 0 for none")
    need(not (d.holdout > 0 and ev.path.strip()), "data.holdout",
         f"{d.holdout:g} holds data out for evaluations, but they read eval.path {ev.path!r}",
         "clear eval.path to evaluate on the held-out data, or set data.holdout to 0",
         ("eval.path",))
    need(ev.interval <= 0 or bool(ev.path.strip()) or d.holdout > 0, "eval.path",
         f"is empty, but eval.interval={ev.interval} asks for evaluations",
         "set eval.path to a held-out text or token file, data.holdout to the fraction of the "
         "training data to hold out for them (e.g. 0.01), or eval.interval to 0",
         ("eval.interval", "data.holdout"))
    prof = cfg.run.profile
    need(
        prof.start == 0 or (1 <= prof.start and prof.steps >= 1
                            and prof.start + prof.steps - 1 <= t.steps),
        "run.profile",
        f"start {prof.start}, steps {prof.steps}: not steps within 1..train.steps={t.steps}",
        "use e.g. {start: 5, steps: 2}, or start: 0 for none",
        ("run.profile.start", "run.profile.steps", "train.steps"),
    )
    need(
        cfg.run.log_interval >= 1,
        "run.log_interval",
        f"must be at least 1, got {cfg.run.log_interval}",
        "use e.g. 10",
    )
    for name in ("interval", "keep_last", "keep_every"):
        value = getattr(cfg.checkpoint, name)
        need(
            value >= 0,
            f"checkpoint.{name}",
            f"must be 0 or more, got {value}",
            "use 0 to switch it off",
        )
    return _checked_no_further(problems)


def _checked_no_further(problems: list[Problem]) -> list[Problem]:
    """``problems`` less those of rules that compare with a value refused on its own (a rule
    that read no other field refused it): train.steps=-5 is said once, not again as the bound
    of train.warmup_steps and run.stop_at_step, values the user did not give."""
    refused = {p.where for p in problems if set(p.reads) <= {p.where}}
    return [p for p in problems
            if not any(_inside(read, field) or _inside(field, read)
                       for read in p.reads if read != p.where for field in refused)]


def _inside(path: str, section: str) -> bool:
    """Whether dotted ``path`` is ``section`` or lies inside it."""
    return path == section or path.startswith((section + ".", section + "["))
def renormalized_top1(m: ModelConfig) -> str | None:
    """What ``orch plan`` notes and ``orch launch`` warns of where an MoE model routes each
    token to one expert with its weight renormalized (``norm_topk_prob``): the weight is then
    always 1 and the router learns only from the balancing loss. Said, not refused: it runs as
    Megatron-Core's default does, and a run saved before ``norm_topk_prob`` existed resumes only
    so (its manifest reads the field at its default)."""
    if not (m.is_moe and m.top_k == 1 and m.norm_topk_prob):
        return None
    return ("model.top_k: 1 with model.norm_topk_prob=true: the router learns only from the "
            "balancing loss, its weight being always 1 (one chosen score renormalized to sum "
            "to 1); set model.norm_topk_prob=false for Switch Transformer's routing (the "
            "expert's output times its router probability), or route to 2 or more experts")


