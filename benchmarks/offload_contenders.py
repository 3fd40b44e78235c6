"""The contenders of the offload benchmarks (``offload_cpu.py``, ``offload_finetune.py``).

One model and batch, given as orch ``--set`` items on ``configs/tiny.yaml``, trained from the
same initial weights on the same batches of the shipped corpus with the same AdamW and clipping
by: a plain torch loop, DeepSpeed ZeRO-3 with parameters and optimizer states offloaded to the
CPU or to NVMe (ZeRO-Infinity), and ``orch launch`` with its offload tiers. Each runs in a
process of its own (``python offload_contenders.py --worker NAME ...`` for the first two), so
peak RSS and disk bytes are that contender's alone, and each returns per step: seconds, loss,
disk bytes read and written; and its peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orch_runs import REPO, launch

OTHERS = ("torch loop", "deepspeed cpu", "deepspeed nvme")
"""Contenders this module's worker trains (orch's run through ``orch launch``)."""


def installed(names: Sequence[str]) -> list[str]:
    """``names`` less DeepSpeed's contenders where DeepSpeed is not installed (said on stdout):
    each would otherwise start a process to fail in it, in every round."""
    if importlib.util.find_spec("deepspeed") is not None:
        return list(names)
    kept = [name for name in names if not name.startswith("deepspeed")]
    if len(kept) < len(names):
        print(f"# DeepSpeed is not installed here: {', '.join(sorted(set(names) - set(kept)))} "
              f"left out (no ratio against it; `pip install deepspeed` to run it)", flush=True)
    return kept


def train(name: str, sets: list[str], nvme_dir: Path, env: dict, device: str = "cpu") -> dict:
    """Train contender ``name``: ``orch cpu`` or ``orch nvme`` through ``orch launch``, with
    parameters and optimizer states on that tier and gradients in CPU memory; the others in
    this module's worker. A contender that fails comes back as ``{"failed": the last line of its
    error}``, its error printed whole: one failure does not lose the others' results."""
    try:
        if name.startswith("orch"):
            tier = name.split()[1]
            return run_orch([*sets, f"offload.params={tier}", "offload.grads=cpu",
                             f"offload.optimizer={tier}"], nvme_dir, env)
        return run_other(name, sets, nvme_dir, env, device)
    except RuntimeError as error:
        print(error, flush=True)
        return {"failed": str(error).strip().splitlines()[-1]}


def config(sets: list[str]):
    """orch's config of the run: ``configs/tiny.yaml`` with ``sets``."""
    from orch.config import load_config

    return load_config(REPO / "configs/tiny.yaml", sets)


def model_and_batches(cfg):
    """orch's initial weights and its data stream's first micro-batches, as its worker has."""
    import torch

    from orch.models.llama import Transformer
    from orch.runtime.data import BatchStream, PackedSequences, load_tokens

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    model.init_weights(cfg.train.seed)
    t = cfg.train
    dataset = PackedSequences(load_tokens(cfg.data, cfg.model.vocab_size), t.seq_len)
    stream = BatchStream(dataset, t.global_batch, t.micro_batch, 0, 1, t.seed)
    return model, [stream.next_step() for _ in range(t.steps)]


def _disk() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(name: str, sets: list[str], nvme_dir: str, device: str) -> None:
    """Train with the torch loop or DeepSpeed on ``device`` and print one JSON line of
    measurements (bf16 autocast on a GPU when the config asks for it, as orch computes)."""
    import torch
    import torch.nn.functional as F

    cfg = config(sets)
    model, batches = model_and_batches(cfg)
    o, clip = cfg.optimizer, cfg.train.grad_clip
    adamw = {"lr": cfg.train.lr, "betas": (o.beta1, o.beta2), "eps": o.eps,
             "weight_decay": o.weight_decay}
    bf16 = device == "cuda" and cfg.train.precision == "bf16"
    if name == "torch loop":
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), **adamw)  # torch picks, as for orch

        def train_step(inputs, targets):
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        engine = _deepspeed(model, adamw, clip, cfg.train.micro_batch, name.split()[1],
                            nvme_dir, device, bf16)

        def train_step(inputs, targets):
            loss = F.cross_entropy(engine(inputs).flatten(0, 1).float(), targets.flatten())
            engine.backward(loss)
            engine.step()
            return loss
    times, losses, reads, writes = [], [], [], []
    for micro_batches in batches:
        (inputs, targets), = micro_batches
        inputs, targets = inputs.to(device), targets.to(device)
        start, (read, written) = time.perf_counter(), _disk()
        losses.append(float(train_step(inputs, targets)))  # float(): waits for the device
        times.append(time.perf_counter() - start)
        reads.append(_disk()[0] - read)
        writes.append(_disk()[1] - written)
    print(json.dumps({"step_s": times, "losses": losses, "read": reads, "written": writes,
                      "peak_rss": _peak_rss(), "tokens": int(inputs.numel())}), flush=True)
    os._exit(0)  # DeepSpeed's I/O threads may outlive a clean shutdown


def _deepspeed(model, adamw: dict, clip: float, micro: int, tier: str, nvme_dir: str,
               device: str, bf16: bool):
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from orch.models.weights import buffers_to
    from orch.offload.cpu_adam import use_venv_extension_cache

    # DeepSpeed's CPU Adam and async I/O ops as make setup built them for orch: its default
    # cache (~/.cache/torch_extensions) rebuilt both on a fresh machine, minutes per run of
    # tests/offload/test_finetune_benchmark.py; its shared-memory comm op is built there once.
    use_venv_extension_cache()
    if device == "cpu":
        # deepspeed/runtime/zero/partition_parameters.py, Init._set_dtype, reads
        # `dtype or torch.float16 if is_fp16_supported() else torch.bfloat16`: on the CPU
        # accelerator (no fp16) that is bf16 whatever dtype the engine passes, so
        # ZeRO-Infinity's NVMe parameter buffers come out bf16 and the first fp32 matmul fails
        # ("expected m1 and m2 to have the same dtype"). Claiming fp16 support makes it keep the
        # model's fp32.
        get_accelerator().is_fp16_supported = lambda: True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    offload = {"device": tier, "pin_memory": device != "cpu"}
    if tier == "nvme":
        offload["nvme_path"] = nvme_dir
    zero = {"stage": 3, "offload_param": dict(offload), "offload_optimizer": dict(offload)}
    if tier == "nvme":  # ZeRO-Infinity with parameters really out of RAM: max_in_cpu 0, which
        # then needs stage3_max_reuse_distance 0, or step 2 fails with "Not enough buffers";
        # each swap buffer holds a whole parameter ("More elements ... than buffer size")
        largest = max(p.numel() for p in model.parameters())
        zero["offload_param"].update(max_in_cpu=0, buffer_count=5,
                                     buffer_size=max(int(1e8), largest))
        zero["stage3_max_reuse_distance"] = 0
    config = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
        "gradient_clipping": clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {**adamw, "betas": list(adamw["betas"])}},
        "aio": {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1,
                "single_submit": False, "overlap_events": True},
    }
    # Partitioned into the offload tier a parameter at a time (as if built under zero.Init):
    # given a whole model, deepspeed.initialize first moves all of it to the device, which a
    # model larger than the GPU (the fine-tuning benchmark's) does not survive. zero.Init keeps
    # the dtype it finds, so bf16 parameters are cast first (DeepSpeed's fp32 master copy comes
    # from them either way); buffers (RoPE tables) stay float32 and go to the device.
    if bf16:
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    buffers_to(model, torch.device(device))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    return engine


def run_other(name: str, sets: list[str], nvme_dir: Path, env: dict,
              device: str = "cpu") -> dict:
    """Train contender ``name`` (one of :data:`OTHERS`) in a process of its own."""
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--device", device,
                          "--dir", str(nvme_dir), *sets], capture_output=True, text=True,
                         env=env, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_orch(sets: list[str], nvme_dir: Path, env: dict) -> dict:
    """Train with ``orch launch`` (one process, ``sets`` naming the offload tiers) and read
    back its metrics: the same fields as :func:`run_other`'s, and orch's TFLOP/s per step."""
    on_nvme = [f"offload.nvme_path={nvme_dir}"] if any(s.endswith("=nvme") for s in sets) else []
    rows, _ = launch("configs/tiny.yaml", 1, [*sets, "run.log_interval=1", *on_nvme], env)
    offload = [r["offload"] for r in rows]
    return {"step_s": [r["step_time_s"] for r in rows], "losses": [r["loss"] for r in rows],
            "read": [o.get("nvme_read_bytes", 0) for o in offload],
            "written": [o.get("nvme_written_bytes", 0) for o in offload],
            "peak_rss": max(_host_memory(r) for r in rows), "tokens": rows[0]["tokens"],
            "tflops": [r["tflops"] for r in rows]}


def disk_per_step(runs: Sequence[dict], warmup: int) -> tuple[float, float]:
    """Bytes read and written per step after ``warmup``, over all of ``runs``: their total over
    the steps counted. Not a median of each step's bytes: bytes are counted as they reach the
    disk (``/proc/self/io``) or as a write-behind ends (orch), often in a later step than the
    one that moved them, so one step shows 0.62 GB and the next 2.10 GB."""
    steps = sum(len(r["read"][warmup:]) for r in runs)
    read, written = (sum(sum(r[k][warmup:]) for r in runs) for k in ("read", "written"))
    return read / steps, written / steps


def _host_memory(row: dict) -> int:
    """A metrics record's host memory: on a CPU device its peak resident set (``mem_bytes``);
    on a GPU, where ``mem_bytes`` is the device's, the resident set read at the step's end."""
    if any("mem_used_bytes" in reading for reading in row["devices"]):
        return max(reading["rss_bytes"] for reading in row["devices"])
    return row["mem_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description="one contender's training (a worker)")
    parser.add_argument("--worker", choices=OTHERS, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", required=True, help="NVMe directory")
    parser.add_argument("sets", nargs="*", help="orch --set items: model, batch, steps")
    args = parser.parse_args()
    worker(args.worker, args.sets, args.dir, args.device)


if __name__ == "__main__":
    main()
