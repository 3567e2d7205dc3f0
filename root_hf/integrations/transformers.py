"""ROOT in the Hugging Face `Trainer`: `optim="root"`, `RootTrainer`, a factory, `optim_args` parsing.

Four ways to train with ROOT, from the most to the least integrated:

1. `TrainingArguments(optim="root", optim_args="momentum=0.95,clip_quantile=0.9")` with the **stock**
   `transformers.Trainer` or TRL's `SFTTrainer` (`SFTConfig(optim="root")`), `--optim root` on the command
   line of any `HfArgumentParser` script or `trl sft`, `optim: root` in YAML / JSON configs. The installed
   startup hook registers the name in every process with no import (`ROOT_HF_AUTOLOAD=0` switches it off; then
   `import root_hf` registers it): see `_root_hf_autoload`. `optim_args="diagnostics_steps=N"` puts ROOT's
   diagnostics in the logs.
2. `RootTrainer`, or `RootTrainerMixin` in front of any `Trainer` subclass (e.g. TRL's): always ROOT,
   no registration needed, and ROOT's diagnostics in the logs.
3. `Trainer(..., optimizer_cls_and_kwargs=(RootOptimizerFactory, {"lr": 3e-4}))`: no registration needed.
4. `create_root_optimizer`: builds the optimizer from a model (and optionally `TrainingArguments`), for
   `Trainer(optimizers=(opt, None))` or a custom loop.

All of them route parameters with `root_hf.integrations.routing.route_parameters` (hidden matrices and PEFT
LoRA factors to ROOT, as `lora_policy` allows: `lora_B` only by default; embeddings, LM head, norms, biases, PEFT
extras to AdamW; or `optim_target_modules`), train PEFT models' adapters only (frozen weights get no state), log a
one-line routing summary, honour `learning_rate`, `weight_decay`, `adam_beta1/2` and `adam_epsilon`, and refuse
setups that hand the optimizer flattened parameters (DeepSpeed ZeRO, FSDP1).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from _root_hf_autoload.patches import OPTIM_NAME

from ..optim.hyperparams import HYPERPARAMS, Hyperparam, parse_optim_args
from ..optim.root import ROOT
from .callbacks import RootDiagnosticsCallback, _find_root, add_root_diagnostics
from .routing import DEFAULT_FUSED_PROJECTIONS, DEFAULT_LORA_POLICY, DEFAULT_ROUTER_BRANCH, route_parameters

__all__ = [
    "OPTIM_ARGS",
    "RootOptimizerFactory",
    "RootTrainer",
    "RootTrainerMixin",
    "attach_root_diagnostics",
    "check_root_compatible",
    "create_root_optimizer",
    "ddp_process_group_kwargs",
    "fsdp_version",
    "parse_root_optim_args",
    "root_optimizer_cls_and_kwargs",
    "runs_ddp",
]

logger = logging.getLogger(__name__)

# FSDP2 and every mesh accelerate's ParallelismConfig builds (HSDP, tensor parallel, FSDP + TP, context parallel on
# the FSDP mesh: DTensor params) are supported by ROOT's sharded Newton-Schulz (root_hf.optim.distributed: whole
# matrices are gathered to an owner rank, orthogonalized and re-sharded); FSDP1 and DeepSpeed ZeRO (also DeepSpeed's
# Ulysses sequence parallelism) hand over flat shards and stay refused.
FSDP2_SUPPORTED = True

# --------------------------------------------------------------------------------------------------------------------
# optim_args
# --------------------------------------------------------------------------------------------------------------------


# The optim_args keys: those of the one hyperparameter table (root_hf.optim.hyperparams) that optim_args may set.
OPTIM_ARGS: dict[str, Hyperparam] = {name: hp for name, hp in HYPERPARAMS.items() if hp.optim_args}

# ROOT's own keyword arguments, read from its signature (a second list here missed ns_method when it was added).
_ROOT_KWARGS = tuple(name for name in inspect.signature(ROOT).parameters if name != "params")
_EXTRA_KWARGS = (
    "adamw_beta1",
    "adamw_beta2",
    "adamw_lr",
    "adamw_weight_decay",
    "target_modules",
    "decay_parameter_names",
    "diagnostics_steps",
    "lora_policy",
    "lora_adjust_lr_fn",
    "router_branch",
    "fused_projections",
)


def parse_root_optim_args(optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse `TrainingArguments.optim_args` (`"key=value,key=value"`) for ROOT, with typed values.

    Delegates to `root_hf.optim.hyperparams.parse_optim_args`; the keys are those of `OPTIM_ARGS`. Spaces are ignored
    (as `transformers` does); `none` means None where allowed; booleans are `true/false` (also `1/0`, `yes/no`).

    Raises:
        ValueError: an unknown key (the message lists the valid ones), a malformed entry or a bad value (the message
            says what the key accepts).

    Example:
        >>> parse_root_optim_args("momentum=0.9, nesterov=false, clip_quantile=none, ns_coefficients=muon")
        {'momentum': 0.9, 'nesterov': False, 'clip_quantile': None, 'ns_coefficients': 'muon'}
    """
    return parse_optim_args(optim_args)


# --------------------------------------------------------------------------------------------------------------------
# Refusing setups that hand the optimizer flattened parameters
# --------------------------------------------------------------------------------------------------------------------

_DDP_FIX = "use DDP (plain multi-process data parallel, no fsdp / deepspeed)"
_FIX = (
    f"Use FSDP2 (fsdp_version=2; or a ParallelismConfig: dp_replicate_size / dp_shard_size / tp_size / cp_size) or "
    f"{_DDP_FIX}."
    if FSDP2_SUPPORTED
    else f"Instead, {_DDP_FIX}."
)


def _sequence_parallel_error() -> ValueError:
    return ValueError(
        "ROOT cannot run with ParallelismConfig(sp_size > 1, sp_backend='deepspeed'): DeepSpeed's Ulysses sequence "
        "parallelism runs under DeepSpeed ZeRO, which hands the optimizer flattened 1-D parameter shards. For long "
        "sequences use context parallelism instead (cp_size > 1, cp_backend='torch', on FSDP2), which ROOT supports."
    )


def _parallelism_config(args: Any | None) -> Any:
    """The `ParallelismConfig` of this run: from the `TrainingArguments`, else accelerate's state (the accelerate
    config file's `parallelism_config` keys), else None."""
    pc = getattr(args, "parallelism_config", None) if args is not None else None
    return pc if pc is not None else _accelerate_state().get("parallelism_config")


def _deepspeed_error() -> ValueError:
    return ValueError(
        "ROOT cannot run under DeepSpeed: ZeRO hands the optimizer flattened 1-D parameter shards, on which "
        f"Newton-Schulz orthogonalization is impossible (and DeepSpeed replaces the optimizer step). {_FIX}"
    )


def _fsdp_error(version: int) -> ValueError:
    if version == 2:
        return ValueError(
            "ROOT does not support FSDP2 yet in this release of root_hf: Newton-Schulz needs whole matrices, and "
            f"orthogonalizing each DTensor shard alone is wrong. {_FIX}"
        )
    return ValueError(
        "ROOT cannot run under FSDP1: it hands the optimizer flat 1-D shards (FlatParameter / use_orig_params "
        f"views), on which Newton-Schulz orthogonalization is impossible. {_FIX}"
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _accelerate_state() -> dict[str, Any]:
    """accelerate's shared process state (`PartialState` then `AcceleratorState`, which wins), read without
    creating it: empty when accelerate is not imported or no state exists. `TrainingArguments` resets it, so it
    describes the current run, never an earlier one."""
    module = sys.modules.get("accelerate.state")
    merged: dict[str, Any] = {}
    for name in ("PartialState", "AcceleratorState"):
        shared = getattr(getattr(module, name, None), "_shared_state", None)
        if shared:
            merged.update(shared)
    return merged


def _distributed_type(state: Mapping[str, Any]) -> str:
    value = state.get("distributed_type")
    return str(getattr(value, "value", value) or "NO")


def fsdp_version(args: Any | None = None) -> int | None:
    """The FSDP version this run uses (1 or 2), or None without FSDP.

    Read from the `TrainingArguments` first (`fsdp` set: `fsdp_config["version"]`, transformers' default 2),
    else from accelerate's state (`distributed_type` FSDP: `fsdp_plugin.fsdp_version`, as `accelerate launch`
    with an FSDP config sets it). Never from environment variables: accelerate sets `ACCELERATE_USE_FSDP=true`
    without `FSDP_VERSION` for FSDP2 too, and leaves it set after the run.

    Example:
        >>> fsdp_version(None) is None
        True
    """
    if args is not None and getattr(args, "fsdp", None):
        plugin_args = getattr(args, "fsdp_plugin_args", None)
        if isinstance(plugin_args, Mapping) and plugin_args.get("fsdp_version") is not None:
            return int(plugin_args["fsdp_version"])
        config = args.fsdp_config if isinstance(getattr(args, "fsdp_config", None), Mapping) else {}
        return int(config.get("version", 2))
    state = _accelerate_state()
    if _distributed_type(state) == "FSDP":
        return int(getattr(state.get("fsdp_plugin"), "fsdp_version", None) or 1)
    return None


def runs_ddp() -> bool:
    """Whether accelerate runs plain multi-process data parallelism (`MULTI_CPU`, `MULTI_GPU`, `MULTI_XPU`, ...
    with more than one process): every rank then holds identical gradients at `step()`, so ROOT may split its
    Newton-Schulz work over the ranks.

    Example:
        >>> runs_ddp()  # no accelerate state in this process
        False
    """
    state = _accelerate_state()
    return _distributed_type(state).startswith("MULTI_") and int(state.get("num_processes", 1) or 1) > 1


def _root_accepts_default_group() -> bool:
    """Whether this ROOT understands `process_group="default"` (the redesign of contract.md, whose default is None);
    the earlier ROOT split the work by itself (`process_group="auto"`) and would reject the string."""
    parameter = inspect.signature(ROOT.__init__).parameters.get("process_group")
    return parameter is not None and parameter.default is None


def ddp_process_group_kwargs() -> dict[str, Any]:
    """`{"process_group": "default"}` when the run is DDP (see `runs_ddp`) and ROOT accepts it, else `{}`.

    Passed by the `Trainer` handler, `RootTrainerMixin` and `create_root_optimizer(model, args)`, so that under
    DDP each rank orthogonalizes its share of the matrices and diagnostics are reduced over all of them.
    """
    if runs_ddp() and _root_accepts_default_group():
        return {"process_group": "default"}
    return {}


def check_root_compatible(args: Any | None = None, model: nn.Module | None = None) -> None:
    """Raise a `ValueError` naming the fix if ROOT cannot work in this setup: DeepSpeed or FSDP1.

    Checks the `TrainingArguments` (`deepspeed`, `fsdp` and `fsdp_config["version"]`), accelerate's state when
    one exists (`AcceleratorState.distributed_type` and `fsdp_plugin.fsdp_version`; see `fsdp_version`),
    `ACCELERATE_USE_DEEPSPEED`, the `ParallelismConfig` (DeepSpeed's Ulysses `sp_size` is refused), and the model's
    parameters (DeepSpeed's `ds_id`, FSDP1's `FlatParameter`). FSDP2 and the meshes a `ParallelismConfig` builds
    (HSDP, tensor parallel, FSDP + TP, context parallel; DTensor parameters) are accepted.

    Example:
        >>> check_root_compatible(None, torch.nn.Linear(4, 4))  # nothing to refuse
    """
    if args is not None and getattr(args, "deepspeed", None):
        raise _deepspeed_error()
    if args is not None and getattr(args, "hf_deepspeed_config", None) is not None:
        raise _deepspeed_error()
    pc = _parallelism_config(args)
    if pc is not None and getattr(pc, "sp_enabled", False) and getattr(pc, "sp_backend", None) == "deepspeed":
        raise _sequence_parallel_error()
    if _env_flag("ACCELERATE_USE_DEEPSPEED") or _distributed_type(_accelerate_state()) == "DEEPSPEED":
        raise _deepspeed_error()
    version = fsdp_version(args)
    if version is not None and (version != 2 or not FSDP2_SUPPORTED):
        raise _fsdp_error(version)
    if model is not None:
        for name, p in model.named_parameters():
            if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                raise _deepspeed_error()
            if "_flat_param" in name or type(p).__name__ == "FlatParameter":
                raise _fsdp_error(1)
            if not FSDP2_SUPPORTED and any(c.__name__ == "DTensor" for c in type(p).__mro__):
                raise _fsdp_error(2)


# --------------------------------------------------------------------------------------------------------------------
# Building the optimizer
# --------------------------------------------------------------------------------------------------------------------


def _kwargs_from_args(args: Any) -> dict[str, Any]:
    """ROOT keyword arguments from `TrainingArguments`: lr, decay, AdamW betas/eps, target modules, optim_args."""
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "adamw_eps": args.adam_epsilon,
        "target_modules": getattr(args, "optim_target_modules", None),
    }
    kwargs.update(parse_root_optim_args(args.optim_args))
    kwargs.update(ddp_process_group_kwargs())
    return kwargs


def create_root_optimizer(model: nn.Module, args: Any | None = None, **overrides: Any) -> ROOT:
    """Build a `root_hf.ROOT` optimizer for `model` with name/role-based routing.

    Args:
        model: the model to train (a `transformers` / PEFT / plain torch model). Frozen parameters are left out.
        args: optional `TrainingArguments` (or `SFTConfig`, ...): `learning_rate`, `weight_decay`,
            `adam_beta1/2`, `adam_epsilon`, `optim_target_modules` and `optim_args` (keys in
            `OPTIM_ARGS`) are honoured; also refuses DeepSpeed / FSDP1 setups.
        **overrides: win over `args`: any ROOT argument (`lr`, `weight_decay`, `momentum`, `nesterov`,
            `clip_quantile`, `ns_steps`, `ns_coefficients`, `eps`, `adjust_lr_fn`, `ns_dtype`, `betas`,
            `adamw_eps`, `nonfinite_grads`, `process_group`), and `adamw_beta1`, `adamw_beta2`, `adamw_lr`,
            `adamw_weight_decay`, `target_modules` (as `optim_target_modules`), `decay_parameter_names`,
            `diagnostics_steps` (read by `root_hf.RootDiagnosticsCallback`), and for PEFT models
            `lora_policy` (`"b_only"`, the default, `"both"` or `"none"`: which LoRA factors take the ROOT
            branch) and
            `lora_adjust_lr_fn` (`"inherit"` or an `adjust_lr_fn` value for the LoRA factors); see
            `docs/guides/peft.md`; for MoE and fused-projection models `router_branch` (`"adamw"`, the
            default, or `"root"`) and `fused_projections` (`"split"`, the default, or `"whole"`); see
            `docs/models.md`.

    Returns:
        The optimizer, with `routing_summary` (the logged line) and `diagnostics_steps` attributes.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> opt = create_root_optimizer(model, lr=1e-3, clip_quantile=0.9)
        >>> opt.routing_summary.split(";")[0]
        'ROOT: 7 tensors / 9,216 params (hidden_matrix 7)'
    """
    unknown = set(overrides) - set(_ROOT_KWARGS) - set(_EXTRA_KWARGS)
    if unknown:
        raise ValueError(
            f"Invalid create_root_optimizer argument(s): {sorted(unknown)}. "
            f"Valid: {', '.join(_ROOT_KWARGS + _EXTRA_KWARGS)}."
        )
    check_root_compatible(args, model)
    kwargs = _kwargs_from_args(args) if args is not None else {}
    kwargs.update(overrides)
    beta1, beta2 = kwargs.pop("betas", (0.9, 0.95))
    betas = (kwargs.pop("adamw_beta1", beta1), kwargs.pop("adamw_beta2", beta2))
    adamw_lr = kwargs.pop("adamw_lr", None)
    adamw_weight_decay = kwargs.pop("adamw_weight_decay", None)
    target_modules = kwargs.pop("target_modules", None)
    decay_names = kwargs.pop("decay_parameter_names", None)
    diagnostics_steps = kwargs.pop("diagnostics_steps", None)
    if diagnostics_steps is not None and not (
        isinstance(diagnostics_steps, int) and not isinstance(diagnostics_steps, bool) and diagnostics_steps >= 0
    ):
        raise ValueError(f"Invalid diagnostics_steps: {diagnostics_steps!r}. Must be an integer >= 0 (0: off).")

    lora_policy = kwargs.pop("lora_policy", DEFAULT_LORA_POLICY)
    lora_adjust_lr_fn = kwargs.pop("lora_adjust_lr_fn", "inherit")
    router_branch = kwargs.pop("router_branch", DEFAULT_ROUTER_BRANCH)
    fused_projections = kwargs.pop("fused_projections", DEFAULT_FUSED_PROJECTIONS)

    routing = route_parameters(
        model,
        target_modules,
        decay_parameter_names=decay_names,
        lora_policy=lora_policy,
        router_branch=router_branch,
        fused_projections=fused_projections,
    )
    if not routing.params:
        raise ValueError("create_root_optimizer: the model has no trainable parameters (all require_grad=False).")
    groups = routing.param_groups(
        weight_decay=kwargs.get("weight_decay"),
        adamw_lr=adamw_lr,
        adamw_weight_decay=adamw_weight_decay,
        lora_adjust_lr_fn=lora_adjust_lr_fn,
    )
    optimizer = ROOT(groups, betas=betas, **kwargs)
    optimizer.routing_summary = routing.summary()  # type: ignore[attr-defined]
    optimizer.diagnostics_steps = diagnostics_steps  # type: ignore[attr-defined]
    routing.log_summary(logger)  # WARNING level: visible at a stock script's default verbosity
    return optimizer


class RootOptimizerFactory:
    """Builds ROOT from a model: for `Trainer(optimizer_cls_and_kwargs=(RootOptimizerFactory, {...}))`.

    `Trainer` instantiates the class with no arguments, then calls it with the model and the kwargs (any keyword of
    `create_root_optimizer`). Give `lr` here: `Trainer` does not pass `learning_rate` on this path (the
    scheduler then scales it as usual). Needs no registration, so it works even where `optim="root"` cannot be.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> opt = RootOptimizerFactory()(model, lr=3e-4, momentum=0.9)
        >>> type(opt).__name__, opt.param_groups[0]["momentum"]
        ('ROOT', 0.9)
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> ROOT:
        return create_root_optimizer(model, **kwargs)


def root_optimizer_cls_and_kwargs(
    args: Any, model: nn.Module | None = None
) -> tuple[type[RootOptimizerFactory], dict[str, Any]]:
    """`Trainer.get_optimizer_cls_and_kwargs` for `optim="root"`: `(RootOptimizerFactory, kwargs)`.

    What the `"root"` handler and the wrapped `Trainer.get_optimizer_cls_and_kwargs` return (through
    `root_hf.integrations.optim_root_hook`). `kwargs` come from `args` (see `create_root_optimizer`); errors in
    `optim_args` and refused setups raise here, when the `Trainer` builds its optimizer.

    Example:
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", optim="root", optim_args="momentum=0.9", report_to="none")
        >>> cls, kwargs = root_optimizer_cls_and_kwargs(args)
        >>> cls.__name__, kwargs["momentum"]
        ('RootOptimizerFactory', 0.9)
    """
    check_root_compatible(args, model)
    return RootOptimizerFactory, _kwargs_from_args(args)


def attach_root_diagnostics(trainer: Any, optimizer: Any | None = None) -> RootDiagnosticsCallback | None:
    """Give `trainer` a `root_hf.RootDiagnosticsCallback` when its optimizer asks for diagnostics.

    Called by the stock `Trainer.create_optimizer` once root_hf is registered (through `optim_root_hook`): when the
    optimizer (`optimizer`, else `trainer.optimizer`; accelerate's wrapper is looked through) is a ROOT built by
    root_hf with `diagnostics_steps` > 0 (`optim_args="diagnostics_steps=N"`), the callback goes first in the
    callbacks, before the reporting integrations, so the statistics reach `log_history`, `trainer_state.json` and
    every tracker through the normal `Trainer.log` path. Idempotent; does nothing otherwise.

    Returns:
        The callback, or None when nothing was asked for.
    """
    root = _find_root(optimizer if optimizer is not None else getattr(trainer, "optimizer", None))
    steps = getattr(root, "diagnostics_steps", None)
    if root is None or isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        return None
    return add_root_diagnostics(trainer)


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class RootTrainerMixin:
    """Makes any `transformers.Trainer` subclass train with ROOT, without registration: `class MySFTTrainer(
    RootTrainerMixin, SFTTrainer)`.

    - `create_optimizer` builds ROOT from `args` (`learning_rate`, `weight_decay`, `adam_beta1/2`,
      `adam_epsilon`, `optim_target_modules`, ROOT keys in `optim_args`) with routing by role, whatever
      `args.optim` says; weight decay follows `self.get_decay_parameter_names`. Optimizers passed through
      `optimizers=` or `optimizer_cls_and_kwargs=` are used as given.
    - ROOT's diagnostics go into the training logs every `diagnostics_steps` (an `optim_args` key; default: every
      logging step; `0` turns them off), through a `root_hf.RootDiagnosticsCallback` placed before the
      reporting callbacks, so TensorBoard / W&B / trackio receive them.
    - `optim_args` is validated at construction: an unknown key raises at once, not at `train()`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        training_args = self.args  # type: ignore[attr-defined]
        parsed = parse_root_optim_args(training_args.optim_args)
        fields = getattr(type(training_args), "__dataclass_fields__", {})
        default_optim = fields["optim"].default if "optim" in fields else None
        optim = getattr(training_args.optim, "value", training_args.optim)
        if optim not in (OPTIM_NAME, getattr(default_optim, "value", default_optim)):
            logger.warning("%s trains with ROOT; optim=%r is ignored.", type(self).__name__, optim)
        if parsed.get("diagnostics_steps", None) != 0:
            add_root_diagnostics(self, parsed.get("diagnostics_steps"))  # type: ignore[arg-type]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build ROOT (see the class docstring) unless an optimizer or `optimizer_cls_and_kwargs` was given."""
        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:  # type: ignore
            opt_model = self.model if model is None else model  # type: ignore[attr-defined]
            self.optimizer = create_root_optimizer(  # type: ignore[attr-defined]
                opt_model,
                self.args,  # type: ignore[attr-defined]
                decay_parameter_names=self.get_decay_parameter_names(opt_model),  # type: ignore[attr-defined]
            )
            return self.optimizer
        return super().create_optimizer(model)  # type: ignore[misc]


class RootTrainer(RootTrainerMixin, Trainer):
    """`transformers.Trainer` that trains with ROOT: see `RootTrainerMixin`. Needs no registration.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> data = [{"input_ids": torch.arange(16) % 128, "labels": torch.arange(16) % 128}] * 8
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        ...                          report_to="none", logging_steps=1, optim_args="diagnostics_steps=1")
        >>> trainer = RootTrainer(model=model, args=args, train_dataset=data)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'loss': ...}
        >>> "root/clip_fraction" in trainer.state.log_history[0]
        True
    """
