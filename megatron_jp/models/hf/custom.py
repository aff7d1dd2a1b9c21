"""Any architecture no native class fits (e.g. RetrievaBERT: learned positions + pre-norm + SwiGLU)
-> self-contained modeling code loaded through `auto_map` with trust_remote_code=True.

The code is generated from our own modules (parts()), so the export cannot drift from the model we
train: the pure-torch reference ops, the model's configuration (models/config.py and the field
types it checks with, as they are), the attention layouts, the encoder and the transformers wrapper,
with their megatron_jp imports removed through the syntax tree (any import form, multi-line ones too).
Every name those imports bound must be defined in the generated file, and the file must compile:
both are checked at export time, not when a user loads the folder.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass

from megatron_jp import config_fields as fields_module
from megatron_jp.models import config as model_config_module
from megatron_jp.models.config import ModelConfig
from megatron_jp.models import attention as attention_module
from megatron_jp.models import encoder as encoder_module
from megatron_jp.models import linear as linear_module
from megatron_jp.models.hf import remote_wrapper
from megatron_jp.models.hf.keymap import Entry, one
from megatron_jp.ops import glu as glu_module
from megatron_jp.ops import qkv_rope as qkv_module
from megatron_jp.ops import rope as rope_module

ARCHITECTURE = "MegatronJpForMaskedLM"
MODEL_TYPE = "megatron_jp_encoder"
MODELING_FILE = "modeling_megatron_jp.py"


def unsupported(cfg: ModelConfig) -> str | None:
    return None  # the encoder itself: every configuration fits


def hf_config(cfg: ModelConfig, special: dict) -> dict:
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.MegatronJpConfig",
                     "AutoModel": f"{MODELING_FILE[:-3]}.MegatronJpModel",
                     "AutoModelForMaskedLM": f"{MODELING_FILE[:-3]}.MegatronJpForMaskedLM"},
        "encoder": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "preset"},
        "pad_token_id": special.get("pad", 0),
    }


def model_config(hf: dict) -> ModelConfig:
    return ModelConfig(**hf["encoder"])


def entries(cfg: ModelConfig) -> list[Entry]:
    """Our own names under `encoder.`; the tied decoder is written too, so nothing is missing on load."""
    names = encoder_module.build_encoder(cfg, device="meta").state_dict().keys()
    return [one(name, f"encoder.{name}") for name in names]


# ----------------------------------------------------------------------------- the generated file


@dataclass(frozen=True)
class Part:
    """A module whose code goes into the file: the named top-level definitions, or all of it."""

    module: str
    source: str
    names: tuple[str, ...] = ()


def _source(module) -> str:
    with open(module.__file__, encoding="utf-8") as f:
        return f.read()


def parts() -> list[Part]:
    """In dependency order. The encoder imports `glu` and `qkv_rope`: ALIASES binds them to the
    reference ops (an exported model runs anywhere transformers does, without our kernels)."""
    return [Part(rope_module.__name__, _source(rope_module),
                 ("inverse_frequencies", "rope_cos_sin", "rotate_half", "rope_reference")),
            Part(glu_module.__name__, _source(glu_module), ("glu_reference",)),
            Part(qkv_module.__name__, _source(qkv_module), ("qkv_rope_reference",)),
            Part(fields_module.__name__, _source(fields_module)),
            Part(model_config_module.__name__, _source(model_config_module)),
            Part(attention_module.__name__, _source(attention_module)),
            Part(linear_module.__name__, _source(linear_module), ("linear",)),
            Part(encoder_module.__name__, _source(encoder_module)),
            Part(remote_wrapper.__name__, _source(remote_wrapper))]


ALIASES = {"glu": "glu_reference", "qkv_rope": "qkv_rope_reference"}


def _is_ours(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.module is not None and (node.module == "__future__" or node.module.startswith("megatron_jp"))
    return isinstance(node, ast.Import) and any(a.name.startswith("megatron_jp") for a in node.names)


def _bound(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)}


def _segment(lines: list[str], node: ast.stmt) -> str:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[first - 1:node.end_lineno])


def _split(part: Part):
    """(candidate imports, kept statements with their text, names bound by dropped megatron_jp imports)."""
    tree, lines = ast.parse(part.source), part.source.splitlines(keepends=True)
    imports, code, ours = [], [], set()
    for i, node in enumerate(tree.body):
        if _is_ours(node):
            ours |= _bound(node) - {"annotations"}  # from __future__ import annotations: written once
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        elif not part.names or _bound(node) & set(part.names):
            code.append((node, _segment(lines, node)))
    return imports, code, ours


def _used(node: ast.AST) -> set[str]:
    """Names the code reads at run time. Annotations are left out: under `from __future__ import
    annotations` they stay strings, resolved only by the config's field checks."""
    names, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Name):
            names.add(n.id)
        for key, child in ast.iter_fields(n):
            if key in ("annotation", "returns"):
                continue
            todo += [c for c in (child if isinstance(child, list) else [child]) if isinstance(c, ast.AST)]
    return names


def modeling_source(sources: dict[str, str] | None = None) -> str:
    """The file written next to an exported model. `sources` replaces modules' source text by module
    name (tests use it to check that any import form is handled)."""
    body, used, defined, needed, imports = [], set(), set(ALIASES), {}, {}
    for part in parts():
        if sources and part.module in sources:
            part = dataclasses.replace(part, source=sources[part.module])
        part_imports, code, ours = _split(part)
        for node in part_imports:
            imports.setdefault(ast.unparse(node), node)
        for node, text in code:
            defined |= _bound(node)
            reads = _used(node)
            used |= reads
            for name in ours & reads:
                needed.setdefault(name, part.module)
            body.append(text)
        if part.module == qkv_module.__name__:
            body.append("".join(f"{name} = {target}\n" for name, target in ALIASES.items()))
    missing = [f"{name} (imported by {module})" for name, module in needed.items() if name not in defined]
    if missing:
        raise RuntimeError(f"the custom-code export lacks {', '.join(missing)}: add its definition to "
                           f"megatron_jp.models.hf.custom.parts()")
    header = [text for text, node in imports.items() if _bound(node) & used]
    text = "\n".join(['"""Generated by megatron_jp (tools/convert_to_hf.py) from its encoder source; do not edit."""',
                      "from __future__ import annotations\n", *header, "", *body])
    compile(text, MODELING_FILE, "exec")  # a broken file is refused here, not when a user loads it
    return text
