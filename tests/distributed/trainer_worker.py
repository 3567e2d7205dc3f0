"""Run under `torchrun --nproc_per_node 4 trainer_worker.py OUT_DIR LAYOUT` on a machine with 4 GPUs: the `Trainer`
with `optim="root"` and `TrainingArguments(parallelism_config=ParallelismConfig(...))`, as a user writes it.

accelerate refuses a `parallelism_config` on CPU ("only compatible DistributedType.FSDP (version 2)"), so this is the
multi-GPU half of the evidence (`benchmarks/multi_gpu_check.sh`); `mesh_worker.py` checks the same layouts on CPU below
the Trainer. LAYOUT: `hsdp` (dp_replicate 2 x dp_shard 2), `fsdp_tp` (dp_shard 2 x tp 2; the model loaded with
`tp_plan="auto"`), `tp` (tp 4). Rank 0 writes OUT_DIR/trainer_LAYOUT.json: the strategy, the placements ROOT saw, the
losses, and whether they are finite and decreasing.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate.parallelism_config import ParallelismConfig
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

LAYOUTS = {
    "hsdp": dict(dp_replicate_size=2, dp_shard_size=2),
    "fsdp_tp": dict(dp_shard_size=2, tp_size=2),
    "tp": dict(tp_size=4),
}
CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=683,  # uneven over every mesh dim
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=False,
)


def main() -> None:
    out_dir, layout = sys.argv[1], sys.argv[2]
    pc_kwargs = LAYOUTS[layout]
    checkpoint = os.path.join(out_dir, "tiny_llama")
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.isdir(checkpoint):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(checkpoint)
    if not dist.is_initialized():
        dist.init_process_group(os.environ.get("ROOT_DIST_BACKEND", "nccl"))
    dist.barrier()
    if pc_kwargs.get("tp_size", 1) > 1:  # sharded at load time by transformers (TP, and FSDP2 on the other dim)
        from transformers.distributed.configuration_utils import DistributedConfig

        sizes = dict(tp_size=pc_kwargs["tp_size"], fsdp_size=pc_kwargs.get("dp_shard_size", 1))
        model = LlamaForCausalLM.from_pretrained(
            checkpoint, distributed_config=DistributedConfig(tp_plan="auto", **sizes)
        )
    else:
        model = LlamaForCausalLM.from_pretrained(checkpoint)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (64, 64), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    fsdp = pc_kwargs.get("dp_shard_size", 1) > 1 and pc_kwargs.get("tp_size", 1) == 1  # accelerate's fully_shard
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"run_{layout}"),
        optim="root",
        optim_args="ns_dtype=float32",
        learning_rate=0.02,
        per_device_train_batch_size=4,
        max_steps=8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        parallelism_config=ParallelismConfig(**pc_kwargs),
        fsdp="full_shard" if fsdp else "",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if fsdp else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    placements = sorted(
        {str(tuple(p.placements)) for group in inner.param_groups for p in group["params"] if hasattr(p, "placements")}
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "layout": layout,
        "strategy": inner.distributed_strategy,
        "placements": placements,
        "losses": losses,
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "decreasing": len(losses) > 1 and losses[-1] < losses[0],
    }
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"trainer_{layout}.json"), "w") as f:
            json.dump(result, f)
        print(json.dumps(result))
    del trainer, opt, inner, model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
