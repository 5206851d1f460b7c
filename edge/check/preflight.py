"""Checks before heavy work: what a recipe's build will need, each failure one line saying what to do.

`check_tools` runs first in the build, before the source is opened: the profile's execution provider
(a QNN recipe without onnxruntime-qnn fails here, not after minutes of export and calibration) and the
recipe's backend package. `check_resources` runs once the source's hyper-parameters are known, before
anything is exported: free disk space for the artifact and its scratch files, and the profile's memory
budget against the weights and KV cache the artifact will need on the device.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.config import QwenConfig
from edge.recipe import Profile, Recipe
from qwen_edge.errors import QwenEdgeError, RuntimeMissingError

if TYPE_CHECKING:
    from edge.graph.plan import WeightPlan

_MB = 1 << 20
_DISK_MARGIN = 1.1  # the graph file, tokenizer and rounding on top of the weights


class PreflightError(QwenEdgeError):
    """A build that cannot succeed on this machine or for this profile, found before any heavy work."""


@dataclass(frozen=True)
class Needs:
    """What a build will take: the artifact's weight bytes, its on-device memory and the disk it needs here."""

    weight_bytes: int
    device_bytes: int
    disk_bytes: int


def check_tools(recipe: Recipe, profile: Profile) -> None:
    """The execution provider the profile names and the backend the recipe names are installed and usable.
    Imports nothing heavy (the graph modules are left to `check_resources`), so it answers in well under a second.
    """
    if profile.execution_provider == "qnn":
        from qwen_edge.session import qnn_devices, qnn_options

        try:
            qnn_devices()
            qnn_options(profile.provider_options)
        except RuntimeMissingError as e:
            raise RuntimeMissingError(
                f"recipe {recipe.name!r} (profile {profile.name}) compiles for the QNN NPU: {e}; nothing was built"
            ) from None
    if recipe.backend != "native":
        from edge.backends import load_backend

        load_backend(recipe.backend)  # BackendMissingError names the extra to install


def _storage_bytes(storage, rows: int, cols: int) -> int:
    """Bytes of one [rows, cols] weight stored as `storage` (fp32 / fp16 / a QuantSpec with fp32 scales)."""
    if isinstance(storage, str):
        return rows * cols * (4 if storage == "fp32" else 2)
    blocks = rows * -(-cols // storage.block_size)
    zero_points = 0 if storage.symmetric else -(-blocks * storage.bits // 8)
    return rows * cols * storage.bits // 8 + 4 * blocks + zero_points


def weight_bytes(plan: WeightPlan, config: QwenConfig) -> int:
    """Bytes of the quantized weights the plan gives the model (the norms and biases are negligible)."""
    from edge.graph.plan import LINEAR_PARTS
    from edge.quantize.blockwise import QuantSpec

    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (config.intermediate_size, h),
        "mlp.up_proj": (config.intermediate_size, h),
        "mlp.down_proj": (h, config.intermediate_size),
    }
    total = 0
    for i in range(config.num_layers):
        for part in LINEAR_PARTS:
            total += _storage_bytes(plan.for_linear([f"model.layers.{i}.{part}.weight"]), *shapes[part])
    vocab = config.vocab_size
    total += _storage_bytes(plan.embedding, vocab, h)
    if not plan.lm_head_shares_embedding(config.tie_word_embeddings):
        rows = plan.lm_head_int8_rows
        if rows and not isinstance(plan.lm_head, str):
            total += _storage_bytes(QuantSpec(8, plan.lm_head.block_size), rows, h)
        total += _storage_bytes(plan.lm_head, vocab - rows, h)
    return total


def needs(recipe: Recipe, profile: Profile, config: QwenConfig) -> Needs:
    """Estimate what the build and the artifact will take (see `Needs`)."""
    from edge.graph.plan import WeightPlan, weight_plan

    fp32 = weight_bytes(WeightPlan("fp32", "fp32", "fp32"), config)
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * recipe.context_length * 4
    if profile.graph == "static":
        # per-channel int8/int4 QDQ weights; the fp32 graphs, the QDQ graphs and the compiled binaries (and an
        # unshared twin of a shared binary, for the host's check) are on disk at the same time
        weights = fp32 // {"int4": 8, "int8": 4}[recipe.precision.weights]
        disk = fp32 + weights * (3 if profile.share_weights else 2)
    else:
        precision = recipe.precision
        if precision.method == "dynamic":  # Optimum's int8 preset stores per-channel int8: rtn int8 is the size
            precision = precision.model_copy(update={"method": "rtn"})
        if precision.method == "gguf":  # the GGUF's types are read later; none of them is stored above int8
            wide = precision.weights if precision.weights in ("fp16", "fp32") else "int8"
            update = {"method": "rtn", "weights": wide, "embedding": wide, "lm_head": wide}
            precision = precision.model_copy(update=update)
        weights = weight_bytes(weight_plan(precision, config), config)
        # other backends read an fp32 copy of the model and write their own fp32 graph first
        disk = weights if recipe.backend == "native" else weights + 2 * fp32
    return Needs(weights, weights + kv_bytes, int(disk * _DISK_MARGIN))


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_resources(recipe: Recipe, profile: Profile, config: QwenConfig, out_dir: Path) -> Needs:
    """The profile's memory budget holds the artifact's weights and KV cache, and `out_dir`'s file system has
    room for the build; returns the estimate."""
    n = needs(recipe, profile, config)
    budget = profile.memory_budget_mb * _MB
    if n.device_bytes > budget:
        raise PreflightError(
            f"recipe {recipe.name!r}: the artifact needs about {n.device_bytes // _MB} MB on the device "
            f"({n.weight_bytes // _MB} MB of weights + the KV cache of {recipe.context_length} tokens), over the "
            f"{profile.memory_budget_mb} MB memory budget of profile {profile.name}; lower the precision or "
            "context_length, or use a smaller model or a profile with more memory"
        )
    where = _existing_parent(Path(out_dir).parent)
    free = shutil.disk_usage(where).free
    if n.disk_bytes > free:
        raise PreflightError(
            f"building {recipe.name!r} needs about {n.disk_bytes // _MB} MB of disk in {where}, which has "
            f"{free // _MB} MB free; free up space or pass --out on another disk"
        )
    return n
