"""Tiny GRPO run with RelexCallback, launched by tests/test_distributed.py under torchrun / accelerate launch.

Besides the callback's own outputs (``<out>/relex``), the script records, for the test only, the full parameters
at step 0 and at every snapshot step (``<out>/trajectory.pt``, rank 0; the test script may gather, the callback
never does) so the test can replay the exact trajectory through the single-process engine, and writes
``<out>/rank-<r>.json`` with what the callback reported on each rank.

With ``--validate`` the callback runs in validation mode (``stop_training=False``) and the script records the full
parameters at every step up to ``--max-steps`` (the real weights at the horizons); ``rank-<r>.json`` then holds the
``validation`` section each rank computed.

With ``--eval`` the trainer gets an eval set and the callback scores the horizons (``evaluate_horizons=True``); for
the test only, every process records the full parameters its model holds each time ``trainer.evaluate()`` is called
(``<out>/evaluated-rank-<r>.pt``: what each replica or partition really evaluated), and ``rank-<r>.json`` holds the
``horizon_eval`` section each process has.

With ``--bf16 --record-masters`` (DeepSpeed with bf16 mixed precision) the script also records, at the same steps,
the optimizer's fp32 master weights (``masters`` in ``trajectory.pt``), gathered on every process.

Usage: python train_grpo.py OUT [--fsdp2] [--tcut 6] [--horizons 12,20] [--validate --max-steps 9] [--eval]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from relex_callback import RelexCallback  # noqa: E402
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer  # noqa: E402


def ones_reward(completions, **kwargs):
    """A reward that varies within every group (count of '1' characters), so advantages are never all zero."""
    return [float(str(c).count("1")) + 0.1 * len(str(c)) for c in completions]


RECORD_PARTITIONS = "--record-partitions" in sys.argv


def full_params(model, names):
    """Full copies of the named parameters (gathers under ZeRO-3 / FSDP2: test code only)."""
    params = dict(model.named_parameters())
    if RECORD_PARTITIONS:
        return gather_partitions(model, names)
    sel = [params[n] for n in names]
    if any(hasattr(p, "ds_tensor") for p in sel):
        import deepspeed

        with deepspeed.zero.GatheredParameters(sel, modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in zip(names, sel)}
    out = {}
    for n, p in zip(names, sel):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().cpu().clone()
    return out


def full_masters(model, names):
    """Full copies of the optimizer's fp32 master weights of the named parameters (DeepSpeed mixed precision:
    ``safe_get_full_fp32_param``, a collective under ZeRO-1/2/3, called on every process; test code only)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(model.named_parameters())
    out = {}
    for n in names:
        m = safe_get_full_fp32_param(params[n])
        if m is None:
            raise RuntimeError(f"no fp32 master weights for {n}")
        out[n] = m.detach().to("cpu", torch.float32).clone()
    return out


class Recorder(TrainerCallback):
    """Full parameters at the step training starts from (0, or the resumed step) and at steps ``1..until``; with
    ``masters``, the fp32 master weights too."""

    def __init__(self, until, masters=False):
        self.until = until
        self.snaps = {}
        self.masters = {} if masters else None
        self.names = None

    def _record(self, model, step):
        self.snaps[step] = full_params(model, self.names)
        if self.masters is not None:
            self.masters[step] = full_masters(model, self.names)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._record(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if 0 < state.global_step <= self.until:
            self._record(model, state.global_step)


class Corrupt(TrainerCallback):
    """Fault injection on ONE process (``rank``, ZeRO-3), right after the optimizer step ``step``: ``freeze`` puts
    back that process's partition ``ds_tensor`` of every parameter as it was before the step (a slice that did not
    move); ``nan`` writes a NaN into its partition of the first parameter whose name contains ``target``. The
    partitions are what ZeRO-3 gathers the parameters from; the test records them (``--record-partitions``)."""

    def __init__(self, rank, step, kind, target):
        self.rank, self.step, self.kind, self.target, self.saved = rank, step, kind, target, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self.kind == "freeze" and state.global_step + 1 == self.step and dist.get_rank() == self.rank:
            self.saved = {n: p.ds_tensor.detach().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step + 1 != self.step or dist.get_rank() != self.rank:
            return
        with torch.no_grad():
            for n, p in model.named_parameters():
                if self.kind == "freeze":
                    p.ds_tensor.copy_(self.saved[n])
                elif self.target in n:
                    p.ds_tensor.view(-1)[0] = float("nan")
                    break


def gather_partitions(model, names):
    """Full parameters assembled from every process's ZeRO-3 partition ``ds_tensor`` (all_gather, test code only)."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n]
        parts = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p.ds_tensor.detach().contiguous())
        out[n] = torch.cat([x.reshape(-1) for x in parts])[: int(p.ds_numel)].reshape(tuple(p.ds_shape)).cpu().clone()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tcut", type=int, default=6)
    ap.add_argument("--horizons", default="12,20")
    ap.add_argument("--fsdp2", action="store_true", help="shard with torch's fully_shard before training")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=0, help="stop earlier (resume tests); 0: run to tcut")
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--exclude", default=None, help="regex of parameters not to track (written as trained)")
    ap.add_argument("--validate", action="store_true", help="validation mode: train on past tcut to --max-steps")
    ap.add_argument("--fail-write-rank", type=int, default=None,
                    help="this process's writes of checkpoint shards fail with ENOSPC (fault injection)")
    ap.add_argument("--fail-solve-rank", type=int, default=None,
                    help="this process's Gram pass at tcut raises a CUDA-like RuntimeError (fault injection)")
    ap.add_argument("--eval", action="store_true", help="an eval set; the callback scores the horizons")
    ap.add_argument("--buffer-slots", type=int, default=None, help="ring slots (below the window: the buffer folds)")
    ap.add_argument("--fold-rank", type=int, default=None)
    ap.add_argument("--storage", default="host")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--corrupt", default=None, help="RANK:STEP:freeze|nan[:NAME] fault injection (see Corrupt)")
    ap.add_argument("--on-nonfinite", default="error")
    ap.add_argument("--record-partitions", action="store_true", help="record ZeRO-3 partitions (see Corrupt)")
    ap.add_argument("--record-until", type=int, default=None, help="record full parameters up to this step (default: "
                    "tcut, or --max-steps with --validate; 0: only the start)")
    ap.add_argument("--hidden-layers", type=int, default=1)
    ap.add_argument(
        "--nan-base",
        default=None,
        help="NAME[:RANK][@I]: a NaN in element I (default 0) of this "
        "process's piece of parameter NAME before training (every process, or only RANK): a non-finite base",
    )
    ap.add_argument("--catch", action="store_true", help="an exception is written to rank-<r>.json (exit code 3)")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (with an accelerate config that sets it)")
    ap.add_argument("--record-masters", action="store_true", help="also record DeepSpeed's fp32 master weights")
    ap.add_argument("--buffer-dtype", default="float32", help="the callback's trajectory buffer dtype")
    a = ap.parse_args()
    rank_env = int(os.environ.get("RANK", "0"))
    if a.fail_solve_rank is not None and rank_env == a.fail_solve_rank:
        os.environ["RELEX_DISABLE_TRITON"] = "1"
        from relex_callback.core.kernels import reference

        def broken_gram(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

        reference.gram_reference = broken_gram
    if a.fail_write_rank is not None and rank_env == a.fail_write_rank:
        import errno

        from relex_callback.files import checkpoints

        real = checkpoints.write_tensor_file

        def full_disk(path, *args, **kw):
            if os.path.basename(path).startswith("model"):  # the horizon's shards; the state file still fits
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(path, *args, **kw)

        checkpoints.write_tensor_file = full_disk

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=a.hidden, layers=a.hidden_layers, heads=2, kv_heads=1, seed=0)
    if a.fsdp2:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if a.nan_base:
        spec, _, at = a.nan_base.partition("@")
        name, *only = spec.split(":")
        if not only or int(only[0]) == rank_env:
            with torch.no_grad():  # FSDP2: the local shard (to_local() is a view of it); else the whole tensor
                p = dict(model.named_parameters())[name]
                (p.to_local() if hasattr(p, "to_local") else p).view(-1)[int(at or 0)] = float("nan")
    ds = Dataset.from_list(arithmetic_problems(64, seed=0))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(
        output_dir=a.out,
        per_device_train_batch_size=4,
        num_generations=4 if world == 1 else 2 * world,
        max_completion_length=4,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        max_steps=a.max_steps or 100,
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        use_cpu=True,
        seed=0,
        data_seed=0,
        bf16=a.bf16,
        disable_tqdm=True,
        temperature=1.0,
        per_device_eval_batch_size=4 if world == 1 else 2,
    )
    relex = RelexCallback(tcut=a.tcut, horizons=a.horizons, dtype=a.buffer_dtype, storage=a.storage,
                          buffer_slots=a.buffer_slots, fold_rank=a.fold_rank, on_nonfinite=a.on_nonfinite,
                          output_dir=os.path.join(a.out, "relex"), exclude=[a.exclude] if a.exclude else None,
                          stop_training=not a.validate, evaluate_horizons=a.eval)
    rec = Recorder(a.record_until if a.record_until is not None else (a.max_steps if a.validate else a.tcut),
                   masters=a.record_masters)
    extra_callbacks = []
    if a.corrupt:
        r, st, kind, *name = a.corrupt.split(":")
        extra_callbacks.append(Corrupt(int(r), int(st), kind, name[0] if name else "q_proj"))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=ones_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[relex, rec, *extra_callbacks],
        eval_dataset=Dataset.from_list(arithmetic_problems(8, seed=2)) if a.eval else None,
    )
    evaluated = []
    if a.eval:
        real_evaluate = trainer.evaluate

        def recording_evaluate(*args, **kwargs):  # test instrumentation: what the model holds when it is evaluated
            evaluated.append(
                full_params(trainer.model, [n for n, p in trainer.model.named_parameters() if p.requires_grad])
            )
            return real_evaluate(*args, **kwargs)

        trainer.evaluate = recording_evaluate
    if a.fsdp2:
        # accelerate has no FSDP2 on CPU (an accelerate config with use_cpu drops FSDP) and would wrap the already
        # fully_shard-ed model in DDP; the model shards and reduces gradients itself, so hand it over unchanged
        trainer.accelerator.prepare_model = lambda model, *args, **kwargs: model
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=True if a.resume else None)
    except Exception as e:
        if a.fail_write_rank is None and a.fail_solve_rank is None and not a.corrupt and not a.catch and not a.nan_base:
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        path = os.path.join(a.out, f"rank-{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": rank, "error": type(e).__name__, "message": str(e),
                       "global_step": trainer.state.global_step}, f)
        os.replace(path + ".tmp", path)
        # the launcher stops every process once one exits non-zero: wait (a while, no collective) for the others'
        # files, so that a process slower to reach its own error is not killed before it has written it
        world = int(os.environ.get("WORLD_SIZE", "1"))
        deadline = time.time() + 120
        while time.time() < deadline and not all(
                os.path.isfile(os.path.join(a.out, f"rank-{r}.json")) for r in range(world)):
            time.sleep(0.1)
        return 3
    wall = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = relex.report or {}
    info = {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "mode": relex.topology.mode if relex.topology is not None else None,
        "buffer_bytes": report.get("buffer_bytes"),
        "buffer_bytes_per_rank": report.get("buffer_bytes_per_rank"),
        "solve_seconds": report.get("solve_seconds"),
        "gather_seconds": report.get("gather_seconds"),
        "write_seconds": report.get("write_seconds"),
        "end_of_window_seconds": getattr(relex, "end_of_window_seconds", None),
        "tracked_elements_this_rank": sum(t.spec.local_numel for t in relex.tracked),
        "tracked_elements_total": sum(t.spec.numel for t in relex.tracked) if relex.topology.mode != "replicated"
        else None,
        "global_step": trainer.state.global_step,
        "validation": report.get("validation"),
        "horizon_eval": report.get("horizon_eval"),
        "best_horizon": report.get("best_horizon"),
        "train_seconds": wall,
        "steps": report.get("steps"),
        "folds": report.get("folds"),
        "fold_rank": report.get("fold_rank"),
        "skipped_unchanged_steps": report.get("skipped_unchanged_steps"),
        "recorded": report.get("recorded"),
    }
    with open(os.path.join(a.out, f"rank-{rank}.json"), "w") as f:
        json.dump(info, f, indent=1)
    if evaluated:
        torch.save(evaluated, os.path.join(a.out, f"evaluated-rank-{rank}.pt"))
    if rank == 0 and rec.snaps:
        torch.save({"names": rec.names, "snaps": rec.snaps, **({"masters": rec.masters} if rec.masters else {})},
                   os.path.join(a.out, "trajectory.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from _exit import exit_without_finalization

    exit_without_finalization(main())
