"""Checks of the Swift package (ios/) that need no Swift toolchain.

There is no Swift compiler or Apple hardware here, so the Swift code is read
with tree-sitter's Swift grammar:

- every .swift file parses with no ERROR or MISSING node;
- the parameter names MobileMoE.swift / MobileLLMPro.swift declare (module keys
  from @ModuleInfo(key:) / @ParameterInfo(key:), else property names, walked
  from the model class down) equal the parameter names of the Python model
  loaded from converted models (QAT and bf16, quantized and not) and of
  dense.py's quantized model, fused or not, loading the way mlx-swift-lm's
  loadWeights does (a Quantizable layer is swapped for its quantized form
  exactly when the weights carry its `.scales`; an optional module, such as
  the fused qkv_proj or the separate q_proj, is there when the weights carry
  tensors under it);
- the Swift results types' JSON keys (CodingKeys raw values, else property
  names) cover bench/schema.py's keys.

MOBILEMOE_IOS_DIR points the checks at another copy of ios/ (used to show
that they fail on a renamed key, a renamed field or a missing brace).
"""

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Set

import mlx.nn as nn
import pytest
import tree_sitter as ts  # the `dev` extra: tree-sitter and tree-sitter-swift
import tree_sitter_swift
from mlx.utils import tree_flatten

from bench import schema

ROOT = Path(__file__).resolve().parents[1]
IOS = Path(os.environ.get("MOBILEMOE_IOS_DIR", ROOT / "ios"))
PARSER = ts.Parser(ts.Language(tree_sitter_swift.language()))

# mlx-swift's MLXNN layers the models use, with the parameters each holds
# (Source/MLXNN/Linear.swift, Embedding.swift, Normalization.swift, Quantized.swift
# at 0.31.6). Linear's optional bias is absent: every Linear here is built with
# `bias: false` (checked below).
MLXNN_PARAMS = {"Linear": ["weight"], "Embedding": ["weight"], "RMSNorm": ["weight"]}
MLXNN_QUANTIZED = {"Linear": ["weight", "scales", "biases"],
                   "Embedding": ["weight", "scales", "biases"]}


def swift_files() -> List[Path]:
    """The package's own Swift files: not SwiftPM's build folder (.build, which
    holds the checked-out dependencies after a `swift build`) or .swiftpm."""
    return sorted(p for p in IOS.rglob("*.swift")
                  if not {".build", ".swiftpm"} & set(p.relative_to(IOS).parts))


def parse(path: Path):
    return PARSER.parse(path.read_bytes())


def syntax_problems(path: Path) -> List[str]:
    src = path.read_bytes()
    out = []

    def walk(node):
        if node.type == "ERROR" or node.is_missing:
            kind = f"MISSING {node.type}" if node.is_missing else "ERROR"
            text = src[node.start_byte:node.end_byte][:40].decode(errors="replace")
            out.append(f"{path.name}:{node.start_point[0] + 1}: {kind} {text!r}")
            return
        for child in node.children:
            walk(child)

    walk(parse(path).root_node)
    return out


# ------------------------------------------------------------ extraction ----

def _text(node, src: bytes) -> str:
    return src[node.start_byte:node.end_byte].decode()


class SwiftType:
    """A class, struct or enum: its bases and stored properties (key, type)."""

    def __init__(self, name: str, bases: List[str]):
        self.name, self.bases = name, bases
        self.properties: List[tuple] = []  # (json or parameter key, type name, is_array)
        self.optional: Set[str] = set()  # keys of the properties of optional type
        self.coding_keys: Optional[List[str]] = None


def _is_optional(type_annotation) -> bool:
    named = type_annotation.named_children
    return bool(named) and named[0].type == "optional_type"


def _type_of(node, src) -> tuple:
    """(innermost type name, is an array) of a type annotation's type."""
    is_array = False
    while node.type in ("optional_type", "array_type", "type_annotation"):
        if node.type == "array_type":
            is_array = True
        named = [c for c in node.named_children]
        if not named:
            break
        node = named[0]
    if node.type == "user_type":
        ids = [c for c in node.named_children if c.type == "type_identifier"]
        return (_text(ids[-1], src) if ids else _text(node, src)), is_array
    return node.type, is_array


def _property(node, src) -> Optional[tuple]:
    """(key, type, is_array) of a stored instance property, None otherwise."""
    if any(c.type == "computed_property" for c in node.named_children):
        return None
    key, type_node, name = None, None, None
    for c in node.named_children:
        if c.type == "modifiers":
            if "static" in _text(c, src).split():
                return None
            for attr in (a for a in c.named_children if a.type == "attribute"):
                wrapper = _text(attr.named_children[0], src)
                labels = [_text(x, src) for x in attr.named_children
                          if x.type == "simple_identifier"]
                strings = [x for x in attr.named_children if x.type == "line_string_literal"]
                if wrapper in ("ModuleInfo", "ParameterInfo") and "key" in labels and strings:
                    key = _text(strings[0], src).strip('"')
        elif c.type == "pattern":
            name = _text(c, src)
        elif c.type == "type_annotation":
            type_node = c
    if name is None or type_node is None:
        return None
    type_name, is_array = _type_of(type_node, src)
    return key or name, type_name, is_array


def swift_types(paths) -> Dict[str, SwiftType]:
    """Every type declared in `paths`, by name (nested CodingKeys attach to their parent)."""
    types: Dict[str, SwiftType] = {}

    def visit(node, src, parent: Optional[SwiftType]):
        for c in node.named_children:
            if c.type in ("class_declaration", "protocol_declaration"):
                name_node = c.child_by_field_name("name")
                name = _text(name_node, src)
                bases = [_text(b, src) for spec in c.named_children
                         if spec.type == "inheritance_specifier" for b in spec.named_children]
                body = c.child_by_field_name("body")
                if name == "CodingKeys" and parent is not None and body is not None:
                    parent.coding_keys = _coding_keys(body, src)
                    continue
                t = SwiftType(name, [b.split(".")[-1] for b in bases])
                types[name] = t
                if body is not None:
                    for member in body.named_children:
                        if member.type == "property_declaration":
                            prop = _property(member, src)
                            if prop:
                                t.properties.append(prop)
                                annotation = next((x for x in member.named_children
                                                   if x.type == "type_annotation"), None)
                                if annotation is not None and _is_optional(annotation):
                                    t.optional.add(prop[0])
                    visit(body, src, t)
            elif c.type not in ("function_declaration", "init_declaration"):
                visit(c, src, parent)

    for path in paths:
        src = path.read_bytes()
        visit(PARSER.parse(src).root_node, src, None)
    return types


def _coding_keys(body, src) -> List[str]:
    keys = []
    for entry in body.named_children:
        if entry.type != "enum_entry":
            continue
        names = [c for c in entry.named_children if c.type == "simple_identifier"]
        raw = entry.child_by_field_name("raw_value")
        if raw is not None:  # `case a = "raw"`: one name, its raw value
            keys.append(_text(raw, src).strip('"'))
        else:  # `case a, b`: the names themselves
            keys += [_text(n, src) for n in names]
    return keys


def json_keys(t: SwiftType) -> Set[str]:
    """The keys a Codable type reads and writes."""
    return set(t.coding_keys) if t.coding_keys is not None else {p[0] for p in t.properties}


class ModelTree:
    """The parameter names a Swift model class holds after mlx-swift-lm's loader
    has quantized the layers whose `.scales` the weights carry."""

    def __init__(self, types: Dict[str, SwiftType], layers: int):
        self.types, self.layers = types, layers

    def is_module(self, name: str) -> bool:
        if name in MLXNN_PARAMS or name == "Module":
            return True
        t = self.types.get(name)
        return t is not None and any(self.is_module(b) for b in t.bases)

    def is_quantizable(self, name: str) -> bool:
        t = self.types.get(name)
        return name in MLXNN_QUANTIZED or (t is not None and "Quantizable" in t.bases)

    def quantized_form(self, name: str) -> List[str]:
        """Parameters of what Quantizable `name` turns into (its Quantized subclass)."""
        if name in MLXNN_QUANTIZED:
            return MLXNN_QUANTIZED[name]
        subclasses = [t for t in self.types.values() if name in t.bases and "Quantized" in t.bases]
        assert len(subclasses) == 1, f"{name} needs exactly one Quantized subclass"
        return self.own_params(subclasses[0].name)

    def own_params(self, name: str) -> List[str]:
        """MLXArray properties of a class and its bases (underscored ones are not parameters)."""
        if name in MLXNN_PARAMS:
            return MLXNN_PARAMS[name]
        t = self.types[name]
        inherited = [p for b in t.bases if b in self.types for p in self.own_params(b)]
        own = [k for k, ty, arr in t.properties if ty == "MLXArray" and not k.startswith("_")]
        return inherited + own

    def names(self, root: str, weights: Set[str]) -> Set[str]:
        out: Set[str] = set()
        self._walk(root, "", weights, out)
        return out

    def _walk(self, name: str, prefix: str, weights: Set[str], out: Set[str]) -> None:
        if self.is_quantizable(name) and f"{prefix}scales" in weights:
            out.update(prefix + p for p in self.quantized_form(name))
            return
        out.update(prefix + p for p in self.own_params(name))
        t = self.types.get(name)
        for key, type_name, is_array in (t.properties if t else []):
            if key.startswith("_") or not self.is_module(type_name):
                continue
            if key in t.optional and not any(w.startswith(f"{prefix}{key}.") for w in weights):
                continue  # an optional module the weights leave out (fused or separate)
            if is_array:  # the decoder layers
                for i in range(self.layers):
                    self._walk(type_name, f"{prefix}{key}.{i}.", weights, out)
            else:
                self._walk(type_name, f"{prefix}{key}.", weights, out)


def model_tree(layers: int) -> ModelTree:
    return ModelTree(swift_types(sorted((IOS / "Sources" / "MobileMoE").glob("*.swift"))), layers)


# ----------------------------------------------------------------- tests ----

def test_every_swift_file_parses_without_errors():
    files = swift_files()
    assert len(files) >= 10, f"expected the Swift package under {IOS}"
    problems = [p for f in files for p in syntax_problems(f)]
    assert not problems, "Swift syntax errors:\n" + "\n".join(problems)


def test_every_swift_linear_is_built_without_bias():
    # MLXNN_PARAMS leaves Linear's bias out; a Linear with a bias would hold one more tensor.
    src = "\n".join(p.read_text() for p in (IOS / "Sources" / "MobileMoE").glob("*.swift"))
    calls = re.findall(r"\bLinear\(([^()]*)\)", src)
    assert calls and all("bias: false" in c for c in calls), calls


def _loaded_names(converted) -> Set[str]:
    """The parameter names of the Python model loaded from `converted`: the
    file's tensors after model/mobilemoe.py's sanitize (q/k/v and shared gate/up fused
    when quantized), which the Swift model's sanitize must reproduce."""
    return {k for k, _ in tree_flatten(converted.model().parameters())}


@pytest.mark.parametrize("fixture", ["qat_int4", "bf16_int4", "qat_dense", "bf16_dense"])
def test_swift_mobilemoe_parameters_equal_loaded_python_names(fixture, request):
    converted = request.getfixturevalue(fixture)
    names = _loaded_names(converted)
    tree = model_tree(converted.config["num_hidden_layers"])
    declared = tree.names("MobileMoEModel", names)
    assert declared == names, (f"only in Swift: {sorted(declared - names)[:8]}; "
                               f"only in Python: {sorted(names - declared)[:8]}")


def test_swift_attention_declares_fused_and_separate_projections():
    # Fusion changes the names: quantized directories load as qkv_proj and
    # gate_up_proj (model/mobilemoe.py), float ones keep q/k/v and gate/up; the Swift
    # modules must be able to hold either.
    tree = model_tree(1)
    for swift_type, fused, parts in [("Attention", "qkv_proj", {"q_proj", "k_proj", "v_proj"}),
                                     ("SwiGLU", "gate_up_proj", {"gate_proj", "up_proj"})]:
        t = tree.types[swift_type]
        assert {fused} | parts <= t.optional, (swift_type, t.optional)


def test_swift_router_is_never_quantized(qat_int4):
    # The router and expert bias stay float32: no quantizable Swift layer under them.
    tree = model_tree(1)
    moe = tree.types["MoEBlock"]
    router_type = next(ty for key, ty, _ in moe.properties if key == "router")
    assert not tree.is_quantizable(router_type)
    assert ("expert_bias", "MLXArray", False) in moe.properties


def dense_python_names(config: dict, fuse: bool) -> Set[str]:
    """dense.py's model quantized as the benchmark quantizes it (router
    excepted), fused as `bench run` runs it or not."""
    from bench.dense import Model, ModelArgs
    from bench.models import _not_router

    model = Model(ModelArgs.from_dict(config))
    nn.quantize(model, group_size=32, bits=4, class_predicate=_not_router)
    if fuse:
        model.fuse_projections()
    return {k for k, _ in tree_flatten(model.parameters())}


@pytest.mark.parametrize("quantized, fuse", [(True, True), (True, False), (False, False)])
def test_swift_dense_parameters_equal_dense_py(quantized, fuse):
    from bench.dense import Model, ModelArgs
    from bench.models import tiny_pro_config

    config = tiny_pro_config()
    if quantized:
        names = dense_python_names(config, fuse)
    else:
        names = {k for k, _ in tree_flatten(Model(ModelArgs.from_dict(config)).parameters())}
    assert any("qkv_proj" in n for n in names) == fuse
    declared = model_tree(config["num_hidden_layers"]).names("MobileLLMProModel", names)
    assert declared == names, (f"only in Swift: {sorted(declared - names)[:8]}; "
                               f"only in dense.py: {sorted(names - declared)[:8]}")


def results_types() -> Dict[str, SwiftType]:
    return swift_types([IOS / "Sources" / "MobileMoEBench" / "Results.swift"])


@pytest.mark.parametrize("swift_type, keys, exact", [
    ("BenchResults", schema.TOP_KEYS, False),
    ("ModelRecord", schema.MODEL_KEYS, False),
    ("PrefillEntry", schema.PREFILL_KEYS, False),
    ("DecodeEntry", schema.DECODE_KEYS, False),
    ("Stats", schema.STATS_KEYS, True),
])
def test_swift_results_fields_match_schema(swift_type, keys, exact):
    got = json_keys(results_types()[swift_type])
    assert set(keys) <= got, f"{swift_type} lacks {sorted(set(keys) - got)}"
    if exact:
        assert got == set(keys)


def _package_names() -> Set[str]:
    """Every target and product name Package.swift declares."""
    src = (IOS / "Package.swift").read_text()
    return set(re.findall(
        r"\.(?:target|executableTarget|testTarget|library|executable)\(\s*name:\s*\"([^\"]+)\"",
        src))


def _readme_app_target() -> str:
    match = re.search(r"File > New > Project > iOS > App, name it\s+`([^`]+)`",
                      (IOS / "README.md").read_text())
    assert match, "ios/README.md's iOS steps name the app target"
    return match.group(1)


def test_app_target_name_cannot_collide():
    # The Xcode app target's name is its module's name: if it equals the library
    # the app imports (MobileMoEBench), `import MobileMoEBench` is ignored and
    # every Bench* type is "not found"; if it equals a type the app declares,
    # that type's name is ambiguous.
    name = _readme_app_target()
    app = swift_types(sorted((IOS / "App").glob("*.swift")))
    structs = set(re.findall(r"\b(?:struct|class|enum)\s+(\w+)",
                             "\n".join(p.read_text() for p in (IOS / "App").glob("*.swift"))))
    package = _package_names()
    assert {"MobileMoE", "MobileMoEBench", "mobilemoe-bench"} <= package
    assert name not in package, f"app target {name} collides with a package target"
    assert name not in set(app) | structs, f"app target {name} is also a type in App/"
