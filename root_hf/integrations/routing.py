"""Which parameter goes to which branch of `ROOT`, and how ROOT views it: routing by module and role, not by ndim.

ROOT orthogonalizes the *hidden* weight matrices of a network. Everything else is trained by the AdamW branch of the
same optimizer. The roles, the branch each takes and why (docs/models.md has the evidence):

| role | examples | branch | matrix view |
|---|---|---|---|
| `hidden_matrix` | `q_proj`, `up_proj`, dense conv kernels, GPT-2 `Conv1D` | ROOT | flatten `(out, -1)` |
| `expert_matrix` | fused MoE experts `experts.gate_up_proj (E, 2I, H)` | ROOT | batched: one matrix per expert |
| `router` | `mlp.gate.weight (E, H)`, `mlp.router.weight` | `router_branch` (AdamW) | flatten |
| `lora_B` / `lora_A` | PEFT LoRA factors | `lora_policy` (`lora_B` only) | flatten |
| `expert_bias` | GPT-OSS `experts.gate_up_proj_bias (E, 2I)` | AdamW, no decay | - |
| `depthwise_conv` | Mamba / gated delta-net `conv1d (C, 1, K)` | AdamW | - |
| `embedding`, `lm_head` | token embeddings, LM / classifier heads | AdamW | - |
| `norm`, `bias`, `vector` | norms, biases, other 1-D parameters | AdamW (norms, biases: no decay) | - |
| `lora_embedding`, `dora_magnitude`, `modules_to_save` | PEFT extras | AdamW | - |

Fused projections (a fused MoE `gate_up_proj`, Phi-3 `qkv_proj` / `gate_up_proj`, GPT-2 `c_attn`) are one tensor
holding several logical matrices; `fused_projections="split"` orthogonalizes each block as its own matrix (group key
`matrix_split`), `"whole"` orthogonalizes the fused tensor as one matrix. Frozen parameters get no group at all.

Experts are recognised from the module that holds the parameter (transformers' `use_experts_implementation` expert
classes and their layout flags, expert module classes, PEFT's `ParamWrapper`), never from shapes alone.

The result is a `ParamRouting`: one `RoutedParam` per trainable parameter with its role, branch and view, from which
`ParamRouting.param_groups` builds the optimizer's groups (plain data: the group keys `use_root`, `matrix_view`,
`matrix_split` of the contract) and `ParamRouting.summary` the one-line log message. This module needs only torch.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..optim.hyperparams import FUSED_PROJECTIONS, LORA_ADJUST_LR_FNS, LORA_POLICIES, ROUTER_BRANCHES

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_FUSED_PROJECTIONS",
    "DEFAULT_LORA_POLICY",
    "DEFAULT_ROUTER_BRANCH",
    "FUSED_PROJECTIONS",
    "HEAD_MODULE_NAMES",
    "LORA_ADJUST_LR_FNS",
    "LORA_POLICIES",
    "ROUTER_BRANCHES",
    "Branch",
    "FusedProjections",
    "LoraPolicy",
    "ParamRouting",
    "Role",
    "RoutedParam",
    "RouterBranch",
    "parse_target_modules",
    "route_parameters",
]

logger = logging.getLogger(__name__)

Branch = Literal["root", "adamw"]
Role = Literal[
    "hidden_matrix",  # a weight matrix (or dense conv kernel) inside the network: ROOT, flatten view
    "expert_matrix",  # a fused MoE expert tensor (E, out, in) (or a DBRX-style (E*out, in) stack): ROOT, per expert
    "router",  # the MoE router / gate (E, H): router_branch
    "lora_A",  # PEFT LoRA down-projection (r, in): lora_policy
    "lora_B",  # PEFT LoRA up-projection (out, r), zero-initialized: lora_policy
    "embedding",  # token / position embeddings (the model's input embeddings, any nn.Embedding): AdamW
    "lm_head",  # the model's output embeddings (tied or not) or a classifier head: AdamW
    "expert_bias",  # per-expert biases (E, out) (GPT-OSS): AdamW, no weight decay
    "depthwise_conv",  # depthwise convolution kernels (C, 1, K...): AdamW
    "lora_embedding",  # PEFT lora_embedding_A / lora_embedding_B: AdamW
    "dora_magnitude",  # PEFT DoRA lora_magnitude_vector: AdamW
    "modules_to_save",  # PEFT trainable copy of a whole module (usually a head): AdamW
    "norm",  # weights and biases of normalization layers: AdamW, no weight decay
    "bias",  # biases: AdamW, no weight decay
    "vector",  # any other parameter with fewer than 2 dims: AdamW
]
MatrixView = Literal["flatten", "batched"]
# A group's `matrix_split` (contract): [axis, [size, ...]] cuts each matrix of the view into independent blocks.
MatrixSplit = tuple[int, tuple[int, ...]]

# Roles that the default routing sends to the ROOT branch; every other role goes to AdamW (the router and the LoRA
# factors follow router_branch and lora_policy).
ROOT_ROLES: frozenset[str] = frozenset({"hidden_matrix", "expert_matrix", "lora_A", "lora_B"})
LORA_ROLES: frozenset[str] = frozenset({"lora_A", "lora_B"})
# Roles that stay on AdamW even when target_modules names their module: vectors stacked per expert, not matrices.
_NEVER_ROOT: frozenset[str] = frozenset({"expert_bias", "lora_embedding", "dora_magnitude"})
_NO_DECAY_ROLES: frozenset[str] = frozenset({"norm", "bias", "expert_bias"})

# Which LoRA factors take the ROOT branch: "both" (lora_A and lora_B), "b_only" (lora_B; lora_A to AdamW, as
# arXiv 2508.17901 recommends for Muon) or "none" (both factors to AdamW). The default "b_only" is a measured choice
# (benchmarks/lora.py, SmolLM2-135M-Instruct LoRA, 4 seeds: lowest eval loss at 40 and at 120 steps; at 120 steps
# 0.025 below "both" at every seed): see docs/guides/peft.md.
LoraPolicy = Literal["both", "b_only", "none"]
DEFAULT_LORA_POLICY: LoraPolicy = "b_only"
_LORA_POLICY_ROOT_ROLES: dict[str, frozenset[str]] = {
    "both": frozenset({"lora_A", "lora_B"}),
    "b_only": frozenset({"lora_B"}),
    "none": frozenset(),
}

# Where the MoE router weight (E, H) goes. Measured (benchmarks/moe.py, docs/models.md): see DEFAULT_ROUTER_BRANCH.
RouterBranch = Literal["adamw", "root"]
# The router reads out one score per expert, like a classifier head over experts. benchmarks/moe.py (tiny OLMoE-style
# byte LM, 2 seeds): held-out loss 1.3437 with the router on AdamW vs 1.3467 on ROOT, no measurable difference, so it
# stays with the other read-out layers on AdamW (docs/models.md, "router").
DEFAULT_ROUTER_BRANCH: RouterBranch = "adamw"

# Fused projections: orthogonalize each logical block ("split") or the fused tensor as one matrix ("whole").
FusedProjections = Literal["split", "whole"]
# benchmarks/moe.py --study fused, 2 seeds: split beats whole at every seed, held-out loss 1.425 vs 1.639 on a tiny
# Phi-3 (qkv_proj, gate_up_proj) and 1.344 vs 1.372 on the MoE experts' gate_up_proj (docs/models.md).
DEFAULT_FUSED_PROJECTIONS: FusedProjections = "split"

# Leaf module names of output heads that models do not report through `get_output_embeddings()`: GPT-NeoX's
# `embed_out`, the sequence-classification `score` (Llama, Mistral, ...), `classifier` (BERT family) and
# `qa_outputs` (question answering). Muon practice: output layers are trained with AdamW.
HEAD_MODULE_NAMES: tuple[str, ...] = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")

# `target_modules="all-linear"`: every `nn.Linear` / GPT-2 `Conv1D` weight and every fused expert tensor, except
# heads and modules_to_save copies (as PEFT's "all-linear", which leaves the output layer out).
ALL_LINEAR = "all-linear"

# A module name component that names a norm: "norm", "input_layernorm", "q_norm", "layer_norm", "norm1", ...
_NORM_NAME = re.compile(r"(?:^|[._])(?:layer_?|rms_?)?norm(?:$|[._\d])", re.IGNORECASE)
# A plain module name (no regex syntax beyond the dots of a dotted name): "mlp", "self_attn.q_proj", "layers.0".
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# Leaf names of router modules that are plain nn.Linear layers (older MoE code, Qwen2-MoE's shared_expert_gate).
_ROUTER_LEAF_NAMES = ("gate", "router", "shared_expert_gate")


@dataclass(frozen=True)
class RoutedParam:
    """One trainable parameter and the routing decision for it.

    Attributes:
        name: the qualified name from `model.named_parameters()`.
        param: the parameter itself.
        role: what the parameter is (see `Role`).
        branch: `"root"` or `"adamw"`.
        decay: whether weight decay applies (False for biases, expert biases and norm parameters, as
            `transformers.Trainer`).
        matrix_view: how the ROOT branch views the tensor: `"flatten"` (one `(shape[0], -1)` matrix) or `"batched"`
            (leading dims index independent `(out, in)` matrices: fused experts).
        matrix_split: None, or `(axis, (size, ...))`: each matrix of the view is cut into blocks orthogonalized as
            matrices of their own (fused projections, DBRX-style expert stacks, PEFT LoRA factors of expert tensors).
    """

    name: str
    param: torch.Tensor = field(repr=False, compare=False)
    role: Role
    branch: Branch
    decay: bool
    matrix_view: MatrixView = "flatten"
    matrix_split: MatrixSplit | None = None

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def view_keys(self) -> dict[str, Any]:
        """The group keys of this parameter's matrix view: `{"matrix_view": ..., "matrix_split": ...}` (plain data)."""
        split = None if self.matrix_split is None else [self.matrix_split[0], list(self.matrix_split[1])]
        return {"matrix_view": self.matrix_view, "matrix_split": split}


@dataclass
class ParamRouting:
    """The routing of a model's trainable parameters between the ROOT and AdamW branches.

    Attributes:
        params: one `RoutedParam` per trainable parameter, in `named_parameters()` order.
        frozen: names of the parameters left out because they do not require grad.
        target_modules: the `target_modules` override that produced this routing, or None (routing by role).
        lora_policy: which LoRA factors were allowed on the ROOT branch (see `LoraPolicy`).
        router_branch: where MoE routers went (see `RouterBranch`).
        fused_projections: whether fused projections were split into their logical blocks (see `FusedProjections`).
    """

    params: list[RoutedParam]
    frozen: list[str] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    lora_policy: LoraPolicy = DEFAULT_LORA_POLICY
    router_branch: RouterBranch = DEFAULT_ROUTER_BRANCH
    fused_projections: FusedProjections = DEFAULT_FUSED_PROJECTIONS

    def branch(self, branch: Branch) -> list[RoutedParam]:
        """The parameters routed to `branch` (`"root"` or `"adamw"`)."""
        if branch not in ("root", "adamw"):
            raise ValueError(f"Invalid branch: {branch!r}. Must be 'root' or 'adamw'.")
        return [r for r in self.params if r.branch == branch]

    def names(self, branch: Branch) -> list[str]:
        """Names of the parameters routed to `branch`."""
        return [r.name for r in self.branch(branch)]

    def table(self) -> dict[str, tuple[str, str, str, MatrixSplit | None]]:
        """`{name: (role, branch, matrix_view, matrix_split)}`: the whole routing as plain data."""
        return {r.name: (r.role, r.branch, r.matrix_view, r.matrix_split) for r in self.params}

    def counts(self) -> dict[str, tuple[int, int]]:
        """`{"root": (tensors, elements), "adamw": (tensors, elements)}`."""
        return {b: (len(rs), sum(r.numel for r in rs)) for b in ("root", "adamw") for rs in [self.branch(b)]}

    def summary(self) -> str:
        """One line: how many tensors and parameters each branch got, by role.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            >>> route_parameters(model).summary()
            'ROOT: 1 tensors / 16 params (hidden_matrix 1); AdamW: 4 tensors / 52 params (embedding 1, bias 1, norm 2)'
        """
        parts = []
        for branch, label in (("root", "ROOT"), ("adamw", "AdamW")):
            members = self.branch(branch)  # type: ignore[arg-type]
            roles = Counter(r.role for r in members)
            detail = ", ".join(f"{role} {n}" for role, n in roles.items())
            tensors, numel = len(members), sum(r.numel for r in members)
            parts.append(f"{label}: {tensors} tensors / {numel:,} params" + (f" ({detail})" if detail else ""))
        root = self.branch("root")
        batched = sum(r.matrix_view == "batched" for r in root)
        split = sum(r.matrix_split is not None for r in root)
        if batched or split:
            parts.append(f"views: batched {batched}, split {split} (fused_projections={self.fused_projections!r})")
        if any(r.role == "router" for r in self.params):
            parts.append(f"router_branch={self.router_branch!r}")
        if self.frozen:
            parts.append(f"frozen: {len(self.frozen)} tensors")
        if self.target_modules is not None:
            parts.append(f"target_modules={self.target_modules!r}")
        if any(r.role in LORA_ROLES for r in self.params):
            parts.append(f"lora_policy={self.lora_policy!r}")
        return "; ".join(parts)

    def log_summary(self, log: logging.Logger | None = None) -> None:
        """Log `summary()` at WARNING level (visible at a stock script's default verbosity), and warn when the ROOT
        branch is empty (every parameter then trains with AdamW)."""
        log = logger if log is None else log
        log.warning("ROOT routing: %s", self.summary())
        if self.params and not self.branch("root"):
            hint = (
                f" target_modules={self.target_modules!r} matched only parameters that stay on AdamW"
                if self.target_modules is not None
                else " the model has no trainable hidden matrices"
            )
            log.warning("ROOT routing: the ROOT branch is empty, every parameter trains with AdamW:%s.", hint)

    def param_groups(
        self,
        *,
        weight_decay: float | None = None,
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        lora_adjust_lr_fn: str | None = "inherit",
    ) -> list[dict[str, Any]]:
        """Param groups for `ROOT`: ROOT matrices (one group per matrix view), ROOT LoRA factors, AdamW.

        Args:
            weight_decay: decay of the ROOT branch and of the AdamW parameters that decay (default: the optimizer's).
            adamw_lr: a separate learning rate for the AdamW branch (default: the optimizer's `lr`).
            adamw_weight_decay: a separate decay for the AdamW parameters that decay (default: `weight_decay`).
            lora_adjust_lr_fn: scale of the orthogonalized update of the LoRA factors on the ROOT branch:
                `"inherit"` (default: the optimizer's `adjust_lr_fn`), or one of ROOT's `adjust_lr_fn` values
                (`"match_rms_adamw"`, `"original"`, None), set on their groups.

        Returns:
            A list of group dicts. ROOT groups carry `use_root=True`, `matrix_view` and `matrix_split`; parameters
            with different views get different groups. LoRA factors on the ROOT branch get groups of their own, after
            those of the other matrices, so that they can carry their own settings. Empty groups are left out. Groups
            hold plain values only, so `torch.load(weights_only=True)` reloads them.
        """
        if lora_adjust_lr_fn not in LORA_ADJUST_LR_FNS:
            raise ValueError(f"Invalid lora_adjust_lr_fn: {lora_adjust_lr_fn!r}. Must be one of {LORA_ADJUST_LR_FNS}.")
        groups: list[dict[str, Any]] = []
        adamw_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
        # (branch, LoRA factors or not, decay); the AdamW branch does not separate LoRA factors.
        kinds = [("root", False, True), ("root", False, False), ("root", True, True), ("root", True, False)]
        kinds += [("adamw", None, True), ("adamw", None, False)]
        for branch, lora, decay in kinds:
            members = [
                r
                for r in self.params
                if r.branch == branch and r.decay == decay and lora in (None, r.role in LORA_ROLES)
            ]
            by_view: dict[tuple[str, MatrixSplit | None], list[torch.Tensor]] = {}
            for r in members:
                key = (r.matrix_view, r.matrix_split) if branch == "root" else ("flatten", None)
                by_view.setdefault(key, []).append(r.param)
            for (view, split), params in by_view.items():
                group: dict[str, Any] = {"params": params, "use_root": branch == "root"}
                if branch == "root":
                    group["matrix_view"] = view
                    group["matrix_split"] = None if split is None else [split[0], list(split[1])]
                wd = weight_decay if branch == "root" else adamw_decay
                if not decay:
                    group["weight_decay"] = 0.0
                elif wd is not None:
                    group["weight_decay"] = wd
                if branch == "adamw" and adamw_lr is not None:
                    group["lr"] = adamw_lr
                if lora and lora_adjust_lr_fn != "inherit":
                    group["adjust_lr_fn"] = lora_adjust_lr_fn
                groups.append(group)
        return groups


# --------------------------------------------------------------------------------------------------------------------
# Recognising modules
# --------------------------------------------------------------------------------------------------------------------


def _role_by_name(parts: Sequence[str]) -> Role | None:
    """PEFT roles, read from the dotted components of a parameter name."""
    if "modules_to_save" in parts:
        return "modules_to_save"
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        return "lora_embedding"
    if "lora_magnitude_vector" in parts:
        return "dora_magnitude"
    if "lora_A" in parts:
        return "lora_A"
    if "lora_B" in parts:
        return "lora_B"
    return None


def _embedding_weights(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of the input and output embedding tensors, from transformers' `get_input/output_embeddings()`."""
    found: list[set[int]] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        ids: set[int] = set()
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
        found.append(ids)
    return found[0], found[1]


def _is_norm(module: nn.Module | None, name: str) -> bool:
    if module is not None and "norm" in type(module).__name__.lower():
        return True
    return _NORM_NAME.search(name.rsplit(".", 1)[0] if "." in name else "") is not None


def _is_experts(module: nn.Module | None) -> bool:
    """A module that holds the weights of several experts as stacked tensors.

    transformers' `use_experts_implementation` decorator (Qwen3-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V3, ... in
    transformers 5) sets `is_transposed` / `is_concatenated` on every instance; other expert classes
    (`Llama4TextExperts`, `JetMoeParallelExperts`, DBRX's `DbrxExpertGLU`) are recognised by class name.
    """
    if module is None or isinstance(module, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)):
        return False
    if hasattr(module, "is_transposed") and hasattr(module, "is_concatenated"):
        return True
    return "expert" in type(module).__name__.lower()


def _num_experts(module: nn.Module) -> int | None:
    for attr in ("num_experts", "moe_num_experts", "num_local_experts"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    for attr in ("num_experts", "moe_num_experts", "num_local_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_router(module: nn.Module | None, module_name: str, modules: dict[str, nn.Module]) -> bool:
    """The router (gate) of a mixture-of-experts block: a router / gating class (`Qwen3MoeTopKRouter`,
    `GptOssTopKRouter`, `JetMoeTopKGating`, `HunYuanMoEV1Gate`, ...) or a linear layer inside one (`DbrxRouter`,
    HunYuan's `gate.wg`), or a linear `gate` / `router` next to an experts module."""
    if module is None:
        return False
    names = [module_name]
    if isinstance(module, nn.Linear):  # a Linear held by a router class, or by a `gate` module next to the experts
        names.append(module_name.rpartition(".")[0])
    for name in names:
        m = modules.get(name) if name != module_name else module
        cls = type(m).__name__.lower() if m is not None else ""
        if "router" in cls or "gating" in cls or cls.endswith("gate"):
            return True
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        if leaf in _ROUTER_LEAF_NAMES and parent is not None and any(_is_experts(c) for c in parent.children()):
            return True
    return False


def _is_depthwise_conv(module: nn.Module | None, param: torch.Tensor) -> bool:
    """A depthwise convolution kernel `(C, 1, K...)`: `groups == in_channels > 1` (Mamba, ConvNeXt, ...)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels
        and param.dim() >= 3
        and param.shape[1] == 1
    )


def _expert_layout(module: nn.Module, leaf: str, param: torch.Tensor) -> tuple[MatrixView, MatrixSplit | None]:
    """View and per-expert split of a parameter held by an expert module (role `expert_matrix`)."""
    if param.dim() >= 3:
        return "batched", None
    # DBRX: (E * out, in) stacks, one block of rows per expert.
    experts = _num_experts(module)
    if experts and experts > 1 and param.shape[0] % experts == 0:
        return "flatten", (0, (param.shape[0] // experts,) * experts)
    return "flatten", None


def _fused_split(
    module: nn.Module | None, module_name: str, leaf: str, param: torch.Tensor, modules: dict[str, nn.Module]
) -> MatrixSplit | None:
    """The logical blocks of a fused projection, where the model's code fixes them; None elsewhere.

    Covered layouts (each read from the module, never guessed from the shape alone):
    - expert `gate_up_proj` of transformers' expert classes declared `is_concatenated=True` (`[gate; up]`, split
      along the output dim: rows, or columns when `is_transposed`); GPT-OSS declares an interleaved layout
      (`is_concatenated=False`: gate and up alternate), which contiguous blocks cannot express: kept whole;
    - `nn.Linear` `gate_up_proj` (Phi-3, GLM, Dia, Zamba2, ...: `chunk(2, dim=-1)` of the output): rows in halves;
    - Phi-3 / Phi-4 `qkv_proj`: rows `[heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]`;
    - GPT-2-style `Conv1D` `c_attn` with a parent `split_size` (GPT-2, OpenAI GPT, ImageGPT, ...): the weight is
      `(in, 3 * out)`, so three column blocks.
    """
    if module is None:
        return None
    if _is_experts(module) and leaf == "gate_up_proj" and param.dim() == 3:
        if getattr(module, "is_concatenated", False) and getattr(module, "has_gate", True):
            axis = 1 if getattr(module, "is_transposed", False) else 0
            size = param.shape[1 + axis]
            if size % 2 == 0:
                return axis, (size // 2, size // 2)
        return None
    parent = modules.get(module_name.rpartition(".")[0])
    short = module_name.rpartition(".")[2]
    if isinstance(module, nn.Linear) and short == "gate_up_proj" and module.out_features % 2 == 0:
        return 0, (module.out_features // 2,) * 2
    if isinstance(module, nn.Linear) and short == "qkv_proj" and type(parent).__name__.startswith("Phi"):
        config = getattr(parent, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None)
        head_dim = getattr(parent, "head_dim", None)
        if all(isinstance(v, int) for v in (heads, kv_heads, head_dim)):
            sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)  # type: ignore[operator]
            if sum(sizes) == module.out_features:
                return 0, sizes
        return None
    if type(module).__name__ == "Conv1D" and short == "c_attn" and param.dim() == 2:
        split_size = getattr(parent, "split_size", None)
        if isinstance(split_size, int) and split_size > 0 and param.shape[1] % split_size == 0:
            return 1, (split_size,) * (param.shape[1] // split_size)
    return None


def _peft_expert_split(role: str, name: str, param: torch.Tensor, modules: dict[str, nn.Module]) -> MatrixSplit | None:
    """LoRA factors of an expert tensor (PEFT `ParamWrapper`, `LoraConfig(target_parameters=...)`).

    PEFT stores expert `e`'s factors as `A_e = lora_A.reshape(E, r, in)[e]` (contiguous row blocks: split them) and
    `B_e = lora_B.reshape(out, r, E)[:, :, e]` (interleaved columns). Orthogonalization commutes with a column
    permutation, so the interleaved `lora_B` is orthogonalized whole, as the concatenation `[B_1 | ... | B_E]`.
    """
    if role != "lora_A":
        return None
    wrapper = modules.get(name.split(".lora_A.", 1)[0])
    experts = getattr(wrapper, "num_experts", 1)
    if type(wrapper).__name__ != "ParamWrapper" or not isinstance(experts, int) or experts <= 1:
        return None
    if param.dim() != 2 or param.shape[0] % experts:
        return None
    return 0, (param.shape[0] // experts,) * experts


def _role(
    name: str,
    param: torch.Tensor,
    module: nn.Module | None,
    inputs: set[int],
    outputs: set[int],
    modules: dict[str, nn.Module],
) -> Role:
    parts = name.split(".")
    module_name = name.rsplit(".", 1)[0] if "." in name else ""
    by_name = _role_by_name(parts)
    if by_name in ("modules_to_save", "lora_embedding", "dora_magnitude"):
        return by_name
    if param.dim() < 2:
        if _is_norm(module, name):
            return "norm"
        return "bias" if parts[-1] == "bias" else "vector"
    if by_name is not None:
        return by_name
    if _is_experts(module):
        return "expert_bias" if "bias" in parts[-1] else "expert_matrix"
    if id(param) in inputs or isinstance(module, nn.Embedding):
        return "embedding"
    leaf_module = parts[-2] if len(parts) >= 2 else ""
    if id(param) in outputs or leaf_module in HEAD_MODULE_NAMES:
        return "lm_head"
    if _is_router(module, module_name, modules):
        return "router"
    if _is_depthwise_conv(module, param):
        return "depthwise_conv"
    return "hidden_matrix"


# --------------------------------------------------------------------------------------------------------------------
# target_modules (TrainingArguments.optim_target_modules)
# --------------------------------------------------------------------------------------------------------------------


def parse_target_modules(target_modules: Any) -> str | list[str] | None:
    """Normalize `optim_target_modules`: None, `"all-linear"`, a regex string, or a list of module names.

    A string of comma-separated plain names (`"q_proj,v_proj"`, the command-line form: `HfArgumentParser` passes
    `--optim_target_modules` as one string) becomes a list; a single plain name (`"mlp"`) becomes a one-element list,
    so that it matches module-name components as the list form does (transformers would only full-match it as a
    regex, which matches no real module name). Any other string is a regex, full-matched against module names.

    Raises:
        ValueError: not a string or a list of strings, an empty list, or an invalid regex.

    Example:
        >>> parse_target_modules("q_proj, v_proj"), parse_target_modules("mlp"), parse_target_modules(r".*\\.q_proj")
        (['q_proj', 'v_proj'], ['mlp'], '.*\\\\.q_proj')
    """
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        text = target_modules.strip()
        if text.replace("_", "-") == ALL_LINEAR:
            return ALL_LINEAR
        names = [t.strip() for t in text.split(",")]
        if text and all(_PLAIN_NAME.fullmatch(t) for t in names):
            return names
        try:
            re.compile(text)
        except re.error as e:
            raise ValueError(f"Invalid target_modules: {target_modules!r} is not a valid regex ({e}).") from None
        return text
    if isinstance(target_modules, Sequence) and target_modules and all(isinstance(t, str) for t in target_modules):
        return list(target_modules)
    raise ValueError(
        f"Invalid target_modules: {target_modules!r}. Must be None (route by role), 'all-linear', a regex string "
        "matched against module names, a list of module names, or a comma-separated string of module names."
    )


def _matches(target_modules: str | Sequence[str], candidate: str) -> bool:
    """transformers' `optim_target_modules` semantics (`trainer_utils.check_target_module_exists`): a string is a
    regex full-matched against the name; a list entry matches a name equal to it, containing it, or full-matching it
    as a regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, candidate) is not None
    return any(t == candidate or t in candidate or re.fullmatch(t, candidate) for t in target_modules)


def _no_match_error(target_modules: str | list[str], candidates: list[str]) -> ValueError:
    shown = sorted(set(candidates), key=candidates.index)
    examples = ", ".join(shown[:8]) + (f", ... ({len(shown)} in all)" if len(shown) > 8 else "")
    return ValueError(
        f"optim_target_modules={target_modules!r} matched no trainable parameter's module. It is matched against "
        f"module names such as: {examples}. A list entry (or a comma-separated string of names) matches a name that "
        "contains it; any other string is a regex that must match a whole module name."
    )


# --------------------------------------------------------------------------------------------------------------------
# route_parameters
# --------------------------------------------------------------------------------------------------------------------


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> Any:
    if value not in accepted:
        raise ValueError(f"Invalid {name}: {value!r}. Must be one of {accepted}.")
    return value


def route_parameters(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    *,
    decay_parameter_names: Collection[str] | None = None,
    lora_policy: LoraPolicy = DEFAULT_LORA_POLICY,
    router_branch: RouterBranch = DEFAULT_ROUTER_BRANCH,
    fused_projections: FusedProjections = DEFAULT_FUSED_PROJECTIONS,
) -> ParamRouting:
    """Route the trainable parameters of `model` between the ROOT and AdamW branches, with their matrix views.

    By default routing is by role (see the module docstring's table): hidden weight matrices, fused expert tensors
    (each expert its own matrix: `matrix_view="batched"`) and the LoRA factors that `lora_policy` allows go to ROOT;
    the MoE router goes where `router_branch` says; token embeddings, the LM head (tied or not; found with
    `get_input_embeddings()` / `get_output_embeddings()` when the model has them, else by type and name),
    classifier heads, per-expert biases, depthwise convolutions, norms, biases, other 1-D parameters, PEFT
    `lora_embedding_A/B`, DoRA magnitudes and `modules_to_save` copies go to AdamW.

    Args:
        model: any `nn.Module` (a `transformers` model, a PEFT model, a plain torch model).
        target_modules: override the default (`TrainingArguments.optim_target_modules`, see
            `parse_target_modules`): exactly the matrices of the matching modules go to ROOT, everything else to
            AdamW. `"all-linear"`: every `nn.Linear` / `Conv1D` weight and fused expert tensor except heads and
            `modules_to_save` copies (the router only with `router_branch="root"`); a list (or a comma-separated
            string) of names: a module whose name equals, contains or full-matches (as a regex) an entry; any other
            string: a regex full-matched against module names. Fused expert tensors are parameters, not modules, so
            their own names (`...experts.gate_up_proj`) are matched too. Matching parameters with fewer than 2 dims
            and per-expert biases stay in AdamW. Matching no trainable parameter is a `ValueError`.
        decay_parameter_names: names of the parameters that get weight decay (e.g. `Trainer.get_decay_parameter_
            names(model)`); default: every parameter except biases, expert biases and norm parameters. Expert biases
            never decay.
        lora_policy: which PEFT LoRA factors may take the ROOT branch: `"b_only"` (default: `lora_B` to ROOT,
            `lora_A` to AdamW), `"both"` or `"none"` (both to AdamW). Applies after `target_modules` too.
        router_branch: `"adamw"` (default, measured: docs/models.md) or `"root"`: where MoE router weights go.
        fused_projections: `"split"` (default, measured: docs/models.md) orthogonalizes each logical block of a
            fused projection as its own matrix; `"whole"` orthogonalizes the fused tensor as one matrix.

    Returns:
        A `ParamRouting`.

    Raises:
        ValueError: an invalid option, or `target_modules` that matches no trainable parameter (the message shows
            the module names it was matched against).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> routing = route_parameters(model)
        >>> routing.names("root"), routing.names("adamw")
        (['1.weight'], ['0.weight', '1.bias', '2.weight', '2.bias'])
        >>> route_parameters(model, target_modules=["0"]).names("root")
        ['0.weight']
    """
    target_modules = parse_target_modules(target_modules)
    lora_to_root = _LORA_POLICY_ROOT_ROLES[_choice("lora_policy", lora_policy, LORA_POLICIES)]
    _choice("router_branch", router_branch, ROUTER_BRANCHES)
    _choice("fused_projections", fused_projections, FUSED_PROJECTIONS)
    modules: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    owners: dict[str, nn.Module] = {}
    for module_name, module in modules.items():
        for param_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(f"{module_name}.{param_name}" if module_name else param_name, module)
    inputs, outputs = _embedding_weights(model)
    decay_names = set(decay_parameter_names) if decay_parameter_names is not None else None

    routed: list[RoutedParam] = []
    frozen: list[str] = []
    candidates: list[str] = []
    matched_any = False
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen.append(name)
            continue
        module = owners.get(name)
        module_name, _, leaf = name.rpartition(".")
        role = _role(name, param, module, inputs, outputs, modules)
        if target_modules is None:
            to_root = role in ROOT_ROLES or (role == "router" and router_branch == "root")
        elif target_modules == ALL_LINEAR:
            linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
            to_root = (
                param.dim() >= 2
                and role not in ("lm_head", "modules_to_save", "embedding", *_NEVER_ROOT)
                and (linear or role == "expert_matrix")
                and (role != "router" or router_branch == "root")
            )
        else:
            names = [module_name, name] if role in ("expert_matrix", "expert_bias") else [module_name]
            candidates.append(module_name)
            matched = any(_matches(target_modules, n) for n in names)
            matched_any |= matched
            to_root = matched and param.dim() >= 2 and role not in _NEVER_ROOT
        if role in LORA_ROLES and role not in lora_to_root:
            to_root = False
        if decay_names is not None:
            decay = name in decay_names and role != "expert_bias"
        else:
            decay = role not in _NO_DECAY_ROLES
        view: MatrixView = "flatten"
        split: MatrixSplit | None = None
        if to_root:
            if role == "expert_matrix" and module is not None:
                view, split = _expert_layout(module, leaf, param)
            if role in LORA_ROLES:
                split = _peft_expert_split(role, name, param, modules)
            elif split is None and fused_projections == "split":
                split = _fused_split(module, module_name, leaf, param, modules)
        routed.append(RoutedParam(name, param, role, "root" if to_root else "adamw", decay, view, split))
    if target_modules not in (None, ALL_LINEAR) and candidates and not matched_any:
        raise _no_match_error(target_modules, candidates)  # type: ignore[arg-type]
    return ParamRouting(routed, frozen, target_modules, lora_policy, router_branch, fused_projections)
