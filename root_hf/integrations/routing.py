"""Which parameter goes to which branch of :class:`~root_hf.ROOT`: routing by name and role, not only by ndim.

ROOT orthogonalizes the *hidden* weight matrices of a network. Everything else is trained by the AdamW branch of the
same optimizer: token embeddings and LM / classifier heads (matrices whose rows are looked up or read out one token or
class at a time, where an orthogonalized update makes no sense), norms, biases and every other 1-D parameter. PEFT
adds its own roles: ``lora_B`` factors are matrices on the ROOT branch and ``lora_A`` factors go to AdamW by default
(``lora_policy="b_only"``, the measured choice; ``"both"`` puts both factors on ROOT, ``"none"`` neither);
``lora_embedding_A/B``, DoRA's ``lora_magnitude_vector`` and ``modules_to_save`` copies (full trainable copies of,
typically, the LM head or a classifier) go to AdamW. Frozen parameters (``requires_grad=False``) get no group at all.

The result is a :class:`ParamRouting`: one :class:`RoutedParam` per trainable parameter with its *role* (what it is)
and its *branch* (where it goes), from which :meth:`ParamRouting.param_groups` builds the optimizer's groups and
:meth:`ParamRouting.summary` the one-line log message. This module needs only torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..optim.root import ADJUST_LR_FNS

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_LORA_POLICY",
    "HEAD_MODULE_NAMES",
    "LORA_ADJUST_LR_FNS",
    "LORA_POLICIES",
    "Branch",
    "LoraPolicy",
    "ParamRouting",
    "Role",
    "RoutedParam",
    "route_parameters",
]

Branch = Literal["root", "adamw"]
Role = Literal[
    "hidden_matrix",  # a weight matrix (or conv kernel) inside the network: ROOT
    "lora_A",  # PEFT LoRA down-projection (r, in): ROOT
    "lora_B",  # PEFT LoRA up-projection (out, r), zero-initialized: ROOT
    "embedding",  # token / position embeddings (the model's input embeddings, any nn.Embedding): AdamW
    "lm_head",  # the model's output embeddings (tied or not) or a classifier head: AdamW
    "lora_embedding",  # PEFT lora_embedding_A / lora_embedding_B: AdamW
    "dora_magnitude",  # PEFT DoRA lora_magnitude_vector: AdamW
    "modules_to_save",  # PEFT trainable copy of a whole module (usually a head): AdamW
    "norm",  # weights and biases of normalization layers: AdamW, no weight decay
    "bias",  # biases: AdamW, no weight decay
    "vector",  # any other parameter with fewer than 2 dims: AdamW
]

# Roles that the default routing sends to the ROOT branch; every other role goes to AdamW.
ROOT_ROLES: frozenset[str] = frozenset({"hidden_matrix", "lora_A", "lora_B"})
LORA_ROLES: frozenset[str] = frozenset({"lora_A", "lora_B"})

# Which LoRA factors take the ROOT branch: "both" (lora_A and lora_B), "b_only" (lora_B; lora_A to AdamW, as
# arXiv 2508.17901 recommends for Muon) or "none" (both factors to AdamW). The default "b_only" is a measured choice
# (benchmarks/lora.py, SmolLM2-135M-Instruct LoRA, 4 seeds: lowest eval loss at 40 and at 120 steps; at 120 steps
# 0.025 below "both" at every seed): see docs/guides/peft.md.
LoraPolicy = Literal["both", "b_only", "none"]
LORA_POLICIES: tuple[str, ...] = ("both", "b_only", "none")
DEFAULT_LORA_POLICY: LoraPolicy = "b_only"
# Update scale of the LoRA factors on the ROOT branch: "inherit" the optimizer's adjust_lr_fn, or set one of ROOT's.
LORA_ADJUST_LR_FNS: tuple[str | None, ...] = ("inherit", *ADJUST_LR_FNS)
_LORA_POLICY_ROOT_ROLES: dict[str, frozenset[str]] = {
    "both": frozenset({"lora_A", "lora_B"}),
    "b_only": frozenset({"lora_B"}),
    "none": frozenset(),
}

# Leaf module names of output heads that models do not report through ``get_output_embeddings()``: GPT-NeoX's
# ``embed_out``, the sequence-classification ``score`` (Llama, Mistral, ...), ``classifier`` (BERT family) and
# ``qa_outputs`` (question answering). Muon practice: output layers are trained with AdamW.
HEAD_MODULE_NAMES: tuple[str, ...] = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")

# ``target_modules="all-linear"``: every ``nn.Linear`` weight except heads and modules_to_save copies (as PEFT's
# "all-linear", which leaves the output layer out).
ALL_LINEAR = "all-linear"

# A module name component that names a norm: "norm", "input_layernorm", "q_norm", "layer_norm", "norm1", ...
_NORM_NAME = re.compile(r"(?:^|[._])(?:layer_?|rms_?)?norm(?:$|[._\d])", re.IGNORECASE)


@dataclass(frozen=True)
class RoutedParam:
    """One trainable parameter and the routing decision for it.

    Attributes:
        name: the qualified name from ``model.named_parameters()``.
        param: the parameter itself.
        role: what the parameter is (see :data:`Role`).
        branch: ``"root"`` or ``"adamw"``.
        decay: whether weight decay applies (False for biases and norm parameters, as ``transformers.Trainer``).
    """

    name: str
    param: torch.Tensor = field(repr=False, compare=False)
    role: Role
    branch: Branch
    decay: bool

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class ParamRouting:
    """The routing of a model's trainable parameters between the ROOT and AdamW branches.

    Attributes:
        params: one :class:`RoutedParam` per trainable parameter, in ``named_parameters()`` order.
        frozen: names of the parameters left out because they do not require grad.
        target_modules: the ``target_modules`` override that produced this routing, or None (routing by role).
        lora_policy: which LoRA factors were allowed on the ROOT branch (see :data:`LoraPolicy`).
    """

    params: list[RoutedParam]
    frozen: list[str] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    lora_policy: LoraPolicy = DEFAULT_LORA_POLICY

    def branch(self, branch: Branch) -> list[RoutedParam]:
        """The parameters routed to ``branch`` (``"root"`` or ``"adamw"``)."""
        if branch not in ("root", "adamw"):
            raise ValueError(f"Invalid branch: {branch!r}. Must be 'root' or 'adamw'.")
        return [r for r in self.params if r.branch == branch]

    def names(self, branch: Branch) -> list[str]:
        """Names of the parameters routed to ``branch``."""
        return [r.name for r in self.branch(branch)]

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{"root": (tensors, elements), "adamw": (tensors, elements)}``."""
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
        if self.frozen:
            parts.append(f"frozen: {len(self.frozen)} tensors")
        if self.target_modules is not None:
            parts.append(f"target_modules={self.target_modules!r}")
        if any(r.role in LORA_ROLES for r in self.params):
            parts.append(f"lora_policy={self.lora_policy!r}")
        return "; ".join(parts)

    def param_groups(
        self,
        *,
        weight_decay: float | None = None,
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        lora_adjust_lr_fn: str | None = "inherit",
    ) -> list[dict[str, Any]]:
        """Param groups for :class:`~root_hf.ROOT`: ROOT matrices, ROOT LoRA factors, AdamW with and without decay.

        Args:
            weight_decay: decay of the ROOT branch and of the AdamW parameters that decay (default: the optimizer's).
            adamw_lr: a separate learning rate for the AdamW branch (default: the optimizer's ``lr``).
            adamw_weight_decay: a separate decay for the AdamW parameters that decay (default: ``weight_decay``).
            lora_adjust_lr_fn: scale of the orthogonalized update of the LoRA factors on the ROOT branch:
                ``"inherit"`` (default: the optimizer's ``adjust_lr_fn``), or one of ROOT's ``adjust_lr_fn`` values
                (``"match_rms_adamw"``, ``"original"``, None), set on their groups.

        LoRA factors on the ROOT branch get groups of their own, after those of the other matrices, so that they can
        carry their own settings. Empty groups are left out. Groups carry plain values only, so
        ``torch.load(weights_only=True)`` reloads them.
        """
        if lora_adjust_lr_fn not in LORA_ADJUST_LR_FNS:
            raise ValueError(f"Invalid lora_adjust_lr_fn: {lora_adjust_lr_fn!r}. Must be one of {LORA_ADJUST_LR_FNS}.")
        groups: list[dict[str, Any]] = []
        adamw_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
        # (branch, LoRA factors or not, decay); the AdamW branch does not separate LoRA factors.
        kinds = [("root", False, True), ("root", False, False), ("root", True, True), ("root", True, False)]
        kinds += [("adamw", None, True), ("adamw", None, False)]
        for branch, lora, decay in kinds:
            params = [
                r.param
                for r in self.params
                if r.branch == branch and r.decay == decay and lora in (None, r.role in LORA_ROLES)
            ]
            if not params:
                continue
            group: dict[str, Any] = {"params": params, "use_root": branch == "root"}
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
    """ids of the input and output embedding tensors, from transformers' ``get_input/output_embeddings()``."""
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


def _role(name: str, param: torch.Tensor, module: nn.Module | None, inputs: set[int], outputs: set[int]) -> Role:
    parts = name.split(".")
    by_name = _role_by_name(parts)
    if by_name in ("modules_to_save", "lora_embedding", "dora_magnitude"):
        return by_name
    if param.dim() < 2:
        if _is_norm(module, name):
            return "norm"
        return "bias" if parts[-1] == "bias" else "vector"
    if by_name is not None:
        return by_name
    if id(param) in inputs or isinstance(module, nn.Embedding):
        return "embedding"
    module_name = parts[-2] if len(parts) >= 2 else ""
    if id(param) in outputs or module_name in HEAD_MODULE_NAMES:
        return "lm_head"
    return "hidden_matrix"


def _module_matches(target_modules: str | Sequence[str], module_name: str) -> bool:
    """``transformers``' ``optim_target_modules`` semantics: a string is a regex matched against the whole module
    name; a list matches a name equal to an entry, containing an entry, or fully matching an entry as a regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(t == module_name or t in module_name or re.fullmatch(t, module_name) for t in target_modules)


def _validate_target_modules(target_modules: Any) -> str | list[str] | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        if target_modules.replace("_", "-") == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"Invalid target_modules: {target_modules!r} is not a valid regex ({e}).") from None
        return target_modules
    if isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        return list(target_modules)
    raise ValueError(
        f"Invalid target_modules: {target_modules!r}. Must be None (route by role), 'all-linear', a regex string "
        "matched against module names, or a list of module names."
    )


def route_parameters(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    *,
    decay_parameter_names: Collection[str] | None = None,
    lora_policy: LoraPolicy = DEFAULT_LORA_POLICY,
) -> ParamRouting:
    """Route the trainable parameters of ``model`` between the ROOT and AdamW branches.

    By default routing is by role: hidden weight matrices and the LoRA factors that ``lora_policy`` allows (by
    default ``lora_B`` only) go to ROOT; token embeddings, the LM head (tied or not; found with
    ``get_input_embeddings()`` / ``get_output_embeddings()`` when the model has them, else by type and name),
    classifier heads, norms, biases, other 1-D parameters, PEFT ``lora_embedding_A/B``, DoRA magnitudes and
    ``modules_to_save`` copies go to AdamW.

    Args:
        model: any ``nn.Module`` (a ``transformers`` model, a PEFT model, a plain torch model).
        target_modules: override the default: exactly the matrices of the matching modules go to ROOT, everything
            else to AdamW. ``"all-linear"``: every ``nn.Linear`` weight except heads and ``modules_to_save`` copies;
            a string: a regex matched against whole module names; a list: module names (exact, substring or regex),
            as ``TrainingArguments.optim_target_modules``. Matching parameters with fewer than 2 dims stay in AdamW.
        decay_parameter_names: names of the parameters that get weight decay (e.g. ``Trainer.get_decay_parameter_
            names(model)``); default: every parameter except biases and norm parameters.
        lora_policy: which PEFT LoRA factors may take the ROOT branch: ``"b_only"`` (default: ``lora_B`` to ROOT,
            ``lora_A`` to AdamW), ``"both"`` or ``"none"`` (both to AdamW). Applies after ``target_modules`` too.

    Returns:
        A :class:`ParamRouting`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> routing = route_parameters(model)
        >>> routing.names("root"), routing.names("adamw")
        (['1.weight'], ['0.weight', '1.bias', '2.weight', '2.bias'])
        >>> route_parameters(model, target_modules=["0"]).names("root")
        ['0.weight']
    """
    target_modules = _validate_target_modules(target_modules)
    if lora_policy not in LORA_POLICIES:
        raise ValueError(f"Invalid lora_policy: {lora_policy!r}. Must be one of {LORA_POLICIES}.")
    lora_to_root = _LORA_POLICY_ROOT_ROLES[lora_policy]
    owners: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(f"{module_name}.{param_name}" if module_name else param_name, module)
    inputs, outputs = _embedding_weights(model)
    decay_names = set(decay_parameter_names) if decay_parameter_names is not None else None

    routed: list[RoutedParam] = []
    frozen: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen.append(name)
            continue
        module = owners.get(name)
        role = _role(name, param, module, inputs, outputs)
        if target_modules is None:
            to_root = role in ROOT_ROLES
        elif param.dim() < 2:
            to_root = False
        elif target_modules == ALL_LINEAR:
            to_root = isinstance(module, nn.Linear) and role not in ("lm_head", "modules_to_save")
        else:
            to_root = _module_matches(target_modules, name.rsplit(".", 1)[0] if "." in name else "")
        if role in LORA_ROLES and role not in lora_to_root:
            to_root = False
        if decay_names is not None:
            decay = name in decay_names
        else:
            decay = role not in ("norm", "bias")
        routed.append(RoutedParam(name, param, role, "root" if to_root else "adamw", decay))
    return ParamRouting(routed, frozen, target_modules, lora_policy)
