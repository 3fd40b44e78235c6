"""The config schema: one dataclass tree, of which YAML is only the serialization.

Field types drive everything else: YAML values and ``--set`` overrides are converted by them,
unknown keys are found by them, and ``orch plan`` reads them. A field's docstring-like ``help``
metadata is shown in error messages. Cross-field rules that need no device information live in
``orch.config.rules``; rules that depend on the world size live in ``orch.plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from orch.config.blend import blend_stand_in

Bytes = Annotated[int, "bytes"]
"""A byte count. YAML may write it as a number or with a unit: ``512MiB``, ``80GB``, ``1.5TiB``."""

Tier = Literal["device", "cpu", "nvme"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModelConfig:
    """A Llama-style decoder; ``experts > 0`` makes every ``moe_layer_interval``-th layer MoE."""

    name: str = field(default="custom", metadata=_help("a label shown in plans and logs"))
    vocab_size: int = field(default=256, metadata=_help("tokenizer vocabulary size"))
    dim: int = field(default=256, metadata=_help("hidden size"))
    layers: int = field(default=4, metadata=_help("number of decoder layers"))
    heads: int = field(default=8, metadata=_help("attention (query) heads"))
    kv_heads: int | None = field(
        default=None, metadata=_help("key/value heads for grouped-query attention; null = heads")
    )
    head_dim: int | None = field(
        default=None,
        metadata=_help("width of each attention head; null = dim / heads (Llama), set where "
                       "heads x head_dim is not dim (Mistral NeMo: 128 at dim 5120, 32 heads)"),
    )
    qk_norm: bool = field(
        default=False,
        metadata=_help("RMSNorm over each query and key head before RoPE (Qwen3)"),
    )
    qkv_bias: bool = field(
        default=False,
        metadata=_help("biases on the query, key and value projections (Qwen2, Qwen2.5)"),
    )
    ffn_dim: int = field(default=688, metadata=_help("SwiGLU hidden size of dense layers"))
    rope_theta: float = field(default=10000.0, metadata=_help("RoPE base frequency"))
    max_seq_len: int = field(default=2048, metadata=_help("longest sequence the model supports"))
    norm_eps: float = field(default=1e-5, metadata=_help("RMSNorm epsilon"))
    tie_embeddings: bool = field(default=False, metadata=_help("share embedding and output head"))
    init_from: str = field(
        default="", metadata=_help("HuggingFace checkpoint directory to start from (Llama, "
                                   "Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE)")
    )
    experts: int = field(default=0, metadata=_help("routed experts per MoE layer; 0 = dense"))
    top_k: int = field(default=2, metadata=_help("experts each token is routed to"))
    capacity_factor: float | None = field(
        default=None, metadata=_help("expert capacity factor; null = dropless routing")
    )
    expert_ffn_dim: int | None = field(
        default=None, metadata=_help("SwiGLU hidden size of each expert; null = ffn_dim")
    )
    shared_experts: int = field(default=0, metadata=_help("always-active experts per MoE layer"))
    moe_layer_interval: int = field(
        default=1, metadata=_help("every n-th layer is MoE (1 = all layers)")
    )
    score_func: Literal["softmax", "sigmoid"] = field(
        default="softmax", metadata=_help("router scores: softmax, or sigmoid (DeepSeek-V3)")
    )
    norm_topk_prob: bool = field(
        default=True,
        metadata=_help(
            "combine weights: the chosen experts' scores renormalized to sum to 1 per token "
            "(Mixtral, DeepSeek-V3); false = the raw scores (Switch, Qwen2-MoE, OLMoE)"
        ),
    )
    aux_loss_coeff: float = field(
        default=0.01, metadata=_help("weight of the load-balancing loss; 0 = off")
    )
    bias_update_rate: float = field(
        default=0.0,
        metadata=_help("aux-loss-free balancing: expert bias step per optimizer step; 0 = off"),
    )

    @property
    def head_size(self) -> int:
        """Each attention head's width: ``head_dim``, or dim / heads where it is null (a field
        of its own, not resolved into ``head_dim``, so that a checkpoint saved before the field
        existed reads as the same config)."""
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_ffn_dim(self) -> int:
        return self.expert_ffn_dim if self.expert_ffn_dim is not None else self.ffn_dim

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based) is an MoE layer; the last of each interval is."""
        return self.is_moe and (index + 1) % self.moe_layer_interval == 0

    @property
    def moe_layers(self) -> int:
        """How many layers :meth:`is_moe_layer` says are MoE (the last of each interval)."""
        return self.layers // self.moe_layer_interval if self.is_moe else 0

    @property
    def has_dense_mlp(self) -> bool:
        """Whether some layer has a dense MLP (of ``ffn_dim``): not where every layer is MoE,
        whose experts have ``moe_ffn_dim``, so tensor parallelism need not divide ffn_dim."""
        return self.moe_layers < self.layers


@dataclass
class DataConfig:
    """Where training tokens come from."""

    path: str = field(
        default="", metadata=_help("text or token file; empty = the corpus shipped with orch")
    )
    format: Literal["auto", "text", "tokens"] = field(
        default="auto", metadata=_help("auto picks by suffix: .bin/.npy are tokens, else text")
    )
    token_dtype: Literal["uint16", "uint32"] = field(
        default="uint16", metadata=_help("element type of a .bin token file (not read where "
                                         "a Megatron .idx beside it names its own)")
    )
    tokenizer: Literal["byte"] = field(
        default="byte", metadata=_help("byte-level tokenizer, needs no download")
    )
    eos_id: int = field(
        default=-1,
        metadata=_help("the end-of-document id between documents in the token stream (orch "
                       "data prepare appends the tokenizer's eos_token); -1 = none"),
    )
    holdout: float = field(
        default=0.0,
        metadata=_help("fraction of the training data held out of training for evaluation (the "
                       "last tokens of data.path, of each data.blend file): Megatron's --split; "
                       "evaluations read it where eval.path is empty"),
    )
    blend: list[str] = field(
        default_factory=list,
        metadata={**_help("a weighted mixture of data files instead of data.path, each entry "
                          "'WEIGHT PATH' (Megatron's --data-path pairs); each file read by "
                          "data.path's rules, its format by its suffix"),
                  "item_stand_in": blend_stand_in},
    )


@dataclass
class EvalConfig:
    """Held-out evaluation during training: the mean token cross-entropy of the same first
    ``batches`` global batches of ``path`` (read as ``data.path`` is, text or token ids by its
    suffix), every ``interval`` optimizer steps and at ``train.steps``."""

    interval: int = field(
        default=0, metadata=_help("evaluate every n optimizer steps and at train.steps; 0 = never")
    )
    batches: int = field(default=1, metadata=_help("global batches of eval.path per evaluation"))
    path: str = field(
        default="", metadata=_help("held-out text or token file (which, by its suffix), read "
                                   "with data.path's rules (data.token_dtype, data.tokenizer)")
    )


@dataclass
class TrainConfig:
    """Batch sizes, schedule and numerics. Batch sizes count sequences."""

    global_batch: int = field(default=8, metadata=_help("sequences per optimizer step"))
    micro_batch: int = field(default=1, metadata=_help("sequences per forward/backward per rank"))
    seq_len: int = field(default=256, metadata=_help("tokens per sequence"))
    steps: int = field(default=100, metadata=_help("optimizer steps"))
    lr: float = field(default=3e-4, metadata=_help("peak learning rate"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("final lr as a fraction of lr"))
    warmup_steps: int = field(default=10, metadata=_help("linear warmup steps"))
    lr_schedule: Literal["cosine", "linear", "wsd", "constant"] = field(
        default="cosine",
        metadata=_help("decay after warmup; wsd: warmup-stable-decay, the peak lr until the "
                       "last train.cooldown_steps before the decay's end"),
    )
    decay_steps: int = field(
        default=0, metadata=_help("step where the decay ends and the lr stays at its floor; "
                                  "0 = train.steps (a run extended to more steps keeps its "
                                  "schedule with this set to its old train.steps)")
    )
    cooldown_steps: int = field(
        default=0, metadata=_help("wsd only: steps of the final decay, ending at decay_steps "
                                  "(else train.steps); 0 = a fifth of the steps after warmup")
    )
    cooldown_shape: Literal["linear", "cosine", "sqrt"] = field(
        default="linear", metadata=_help("wsd only: the cooldown's curve from the peak lr to "
                                         "the floor (sqrt: 1 - sqrt of its progress)")
    )
    grad_clip: float = field(default=1.0, metadata=_help("max global grad norm; 0 = off"))
    document_mask: bool = field(
        default=False,
        metadata=_help("attention within documents only (block-causal; documents end at "
                       "data.eos_id): torchtitan's block_causal, Megatron's "
                       "--reset-attention-mask"),
    )
    stop_on_nonfinite: bool = field(
        default=True,
        metadata=_help("stop the run at a step whose gradient norm is NaN or infinite, before "
                       "its update reaches the weights (Megatron's "
                       "--check-for-nan-in-loss-and-grad); false trains on"),
    )
    seed: int = field(default=0, metadata=_help("seed for init and data order"))
    precision: Literal["bf16", "fp32"] = field(
        default="bf16", metadata=_help("compute dtype; parameters and optimizer stay fp32")
    )
    recompute: Literal["none", "selective", "full"] = field(
        default="none", metadata=_help("activation checkpointing")
    )
    compile: Literal["none", "inductor", "aot_eager"] = field(
        default="none",
        metadata=_help("torch.compile each decoder block with this backend (inductor: fused "
                       "kernels; aot_eager: the same graphs run eagerly, to debug)"),
    )


COOLDOWN_FIELDS = ("cooldown_steps", "cooldown_shape")
"""A ``wsd`` schedule's fields that a resume may change, as it may ``decay_steps`` (all three
left out of the config fingerprint): they place and shape the decay, so they change only the
rates of steps to come, and ``orch.runtime.optim.decay_change`` says how."""
AFTER_PEAK_FIELDS = ("lr_schedule", "min_lr_ratio")
"""The schedule's fields that only the steps after the peak lr read (every schedule warms up
alike): in the config fingerprint, yet a resume may change them where the checkpoint's weights
never left the peak and the new schedule holds it through their step, so nothing trained
changes (deciding a cooldown later is what ``wsd`` is for;
``orch.runtime.optim.after_peak_refusal``)."""


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit", "muon"] = field(
        default="adamw",
        metadata=_help("optimizer; muon: Muon for the blocks' matrices, AdamW (beta1, beta2, "
                       "eps) for the embedding, output head and norms, one lr"),
    )
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    muon_momentum: float = field(
        default=0.95, metadata=_help("muon only: Nesterov momentum of the matrices' gradients"))
    muon_ns_steps: int = field(
        default=5, metadata=_help("muon only: Newton-Schulz iterations per matrix and step"))


@dataclass
class ParallelConfig:
    """Parallel degrees. ``dp_shard: -1`` takes whatever the other degrees leave of the world."""

    dp_replicate: int = field(default=1, metadata=_help("replicated data-parallel degree"))
    dp_shard: int = field(
        default=-1, metadata=_help("FSDP sharding degree; -1 = the rest of the world")
    )
    tp: int = field(default=1, metadata=_help("tensor-parallel degree"))
    sequence_parallel: bool = field(
        default=True, metadata=_help("shard norms/dropout along the sequence when tp > 1")
    )
    pp: int = field(default=1, metadata=_help("pipeline stages"))
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "2bp-gpipe", "2bp-1f1b", "zb-h1",
                         "zbv"] = field(default="1f1b", metadata=_help("pipeline schedule"))
    virtual_stages: int = field(
        default=1, metadata=_help("model chunks per pipeline rank (interleaved: 2 or more; "
                                  "zbv: 2, which the default 1 means for it)")
    )
    pp_max_deferred: int | None = field(
        default=None,
        metadata=_help("2bp schedules: deferred weight-gradient steps that may wait per rank "
                       "(each keeps an activation alive); null = r on pipeline rank r"),
    )
    stage_layers: list[int] = field(
        default_factory=list,
        metadata=_help("layers of each pipeline stage, first to last (pp x virtual_stages "
                       "numbers); empty = the plan's split, evening out each stage's FLOPs (the "
                       "head's on the last) over its device speed"),
    )
    pp_rebalance_threshold: float = field(
        default=0.0,
        metadata=_help("re-partition the pipeline once when the slowest stage's measured "
                       "compute exceeds the fastest's by this factor (e.g. 1.2); 0 = never"),
    )
    pp_rebalance_steps: int = field(
        default=3, metadata=_help("logged steps measured before deciding a re-partition")
    )
    ep: int = field(default=1, metadata=_help("expert-parallel degree"))
    etp: int = field(default=1, metadata=_help("tensor-parallel degree inside each expert"))
    cp: int = field(default=1, metadata=_help("context-parallel degree"))
    cp_kind: Literal["ring", "ulysses"] = field(
        default="ring", metadata=_help("context-parallel attention")
    )
    allow_cross_node_tp: bool = field(
        default=False, metadata=_help("let tensor-parallel groups span nodes (slow; forced)")
    )
    grad_reduce: Literal["microbatch", "step"] = field(
        default="microbatch",
        metadata=_help("when FSDP reduces gradients under accumulation: microbatch "
                       "reduce-scatters each micro-batch's (sharded between them; HSDP's "
                       "all-reduce waits for the last), step once per step (whole unsharded "
                       "gradients held between micro-batches); DDP and pipeline stages reduce "
                       "once per step either way"),
    )
    node_order: Literal["auto", "listed"] = field(
        default="auto", metadata=_help("with a cluster description: auto orders the nodes by "
                                       "their fastest network (NIC-aware), listed keeps the "
                                       "description's order")
    )


@dataclass
class OffloadConfig:
    """Home tier of each tensor group, and the budgets the offload engine must keep."""

    params: Tier = field(default="device", metadata=_help("device | cpu | nvme"))
    grads: Tier = field(default="device", metadata=_help("device | cpu | nvme"))
    optimizer: Tier = field(default="device", metadata=_help("device | cpu | nvme"))
    activations: Tier | Literal["auto"] = field(
        default="device",
        metadata=_help("device | cpu | nvme | auto (keep, swap or recompute each layer, measured)"),
    )
    nvme_path: str = field(default="", metadata=_help("directory for NVMe-tier files"))
    device_budget: Bytes | Literal["auto"] = field(
        default="auto", metadata=_help("device bytes the engine may use; auto = device memory")
    )
    pinned_budget: Bytes | Literal["auto"] = field(
        default="auto", metadata=_help("pinned CPU bytes for staging buffers")
    )
    cpu_adam: Literal["auto", "deepspeed", "torch"] = field(
        default="auto",
        metadata=_help("CPU AdamW kernel: deepspeed's CPU Adam, torch's fused; auto = deepspeed's "
                       "when its op builds"),
    )
    prefetch_depth: int = field(default=2, metadata=_help("layers fetched ahead of use"))
    shard_params: bool = field(
        default=False,
        metadata=_help("replicas keep only the parameters of the units they step (ZeRO-3); the "
                       "others receive a unit from its owner each time they use it"),
    )
    io_block_size: Bytes = field(default=1 << 20, metadata=_help("NVMe I/O block size"))
    io_queue_depth: int = field(default=32, metadata=_help("NVMe I/O queue depth"))
    io_threads: int = field(default=2, metadata=_help("NVMe I/O threads"))

    @property
    def enabled(self) -> bool:
        return any(
            t != "device" for t in (self.params, self.grads, self.optimizer, self.activations)
        )


@dataclass
class CheckpointConfig:
    interval: int = field(default=0, metadata=_help("save every n steps; 0 = only at the end"))
    keep_last: int = field(default=3, metadata=_help("checkpoints kept; 0 = all"))
    keep_every: int = field(default=0, metadata=_help("also keep every n-th step forever"))
    async_save: bool = field(default=False, metadata=_help("save while training continues"))
    resume: str = field(
        default="auto", metadata=_help("auto = newest complete checkpoint, none, or a path")
    )


@dataclass
class ProfileConfig:
    start: int = field(default=0, metadata=_help("first step to profile; 0 = no profiling"))
    steps: int = field(default=2, metadata=_help("steps to profile from start"))


@dataclass
class RunConfig:
    dir: str = field(default="runs/default", metadata=_help("run directory"))
    log_interval: int = field(default=10, metadata=_help("steps between progress lines"))
    stop_at_step: int = field(
        default=0,
        metadata=_help("checkpoint and stop after this step, as if preempted; 0 = train.steps"),
    )
    profile: ProfileConfig = field(
        default_factory=ProfileConfig,
        metadata=_help("torch profiler trace of steps start .. start+steps-1 into "
                       "RUN_DIR/profile/"),
    )
    tensorboard: bool = field(
        default=False, metadata=_help("also write the metrics as TensorBoard events (RUN_DIR/tb)")
    )
    comm_timeout_s: float = field(
        default=0.0,
        metadata=_help("seconds a collective waits for the other ranks, from the second step on, "
                       "before the run stops (a node lost without a connection reset: a "
                       "partition, a power loss); 0 = torch's (30 min gloo, 10 min NCCL)"),
    )


@dataclass
class Config:
    """A whole orch run. Paths inside are relative to the directory orch was started from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: str | None = field(default=None, metadata=_help("cluster description YAML"))


# What the checks that use a derived value read (each one's Problems declare it: Problem.reads)
WORLD_DEGREES = tuple(f"parallel.{name}" for name in ("pp", "dp_replicate", "dp_shard", "cp", "tp"))
"""The degrees whose product is the world size."""
DP_DEGREES = ("parallel.dp_replicate", "parallel.dp_shard")
"""What the data-parallel size (dp_replicate x dp_shard) reads."""
OFFLOADED = tuple(f"offload.{group}" for group in ("params", "grads", "optimizer", "activations"))
"""What :attr:`OffloadConfig.enabled` (whether anything is offloaded) reads: every group's home."""
KV_HEADS = ("model.kv_heads", "model.heads")
"""What :attr:`ModelConfig.n_kv_heads` reads (null kv_heads: as many as heads)."""
MODEL_SHAPE = tuple(f"model.{name}" for name in (
    "vocab_size", "dim", "layers", "heads", "kv_heads", "head_dim", "qk_norm", "qkv_bias",
    "ffn_dim", "tie_embeddings", "experts", "top_k", "expert_ffn_dim", "shared_experts",
    "moe_layer_interval"))
"""What the model's parameter shapes read (orch's Transformer; the plan's ``model_key``): a
check of shapes or bytes reads these, not the rest of ``model`` (its name, RoPE, norm eps)."""
