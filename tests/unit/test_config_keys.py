"""Every key of the config tree does something, or says at load why it cannot.

Two walks over every (section, key) of `Config`:
1. read: the key is read by the package's code outside validation (config.py's `validate`, a
   section's own `check`), found in its syntax tree (`cfg.section.key`, or `x.key` where `x` was
   bound to `cfg.section` or is a parameter named or typed as the section, or `self.key` inside
   the section's own class, wherever its owner defines it);
2. refused: every key that acts only in some runs (config.CONDITIONAL_KEYS), set to a value other
   than its default in a shipped config where it would do nothing, is refused at load, naming the
   key and the reason.
"""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from real_megatron import config as config_module
from real_megatron.config import CONDITIONAL_KEYS, Config, ConfigError, key_default, load_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "real_megatron"
SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
ALL_KEYS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
CLASS_SECTION = {cls.__name__: s for s, cls in SECTIONS.items()}


def _section_of(node, aliases) -> str | None:
    """The section `node` (an expression) stands for, if any."""
    if isinstance(node, ast.Attribute) and node.attr in SECTIONS:
        return node.attr
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    return None


def _reads_in(scope: ast.AST, outer: dict) -> set[str]:
    aliases = dict(outer)
    for node in ast.walk(scope):  # parameters first: assignments may rebind them
        if isinstance(node, ast.arg):
            annotation = ast.unparse(node.annotation) if node.annotation is not None else ""
            if node.arg in SECTIONS:
                aliases[node.arg] = node.arg
            elif annotation in CLASS_SECTION:
                aliases[node.arg] = CLASS_SECTION[annotation]
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (
                    zip(target.elts, node.value.elts)
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                    else [(target, node.value)]
                )
                for name, value in pairs:
                    if isinstance(name, ast.Name) and _section_of(value, aliases):
                        aliases[name.id] = _section_of(value, aliases)
    reads = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.Attribute):
            section = _section_of(node.value, aliases)
            if section and f"{section}.{node.attr}" in ALL_KEYS:
                reads.add(f"{section}.{node.attr}")
    return reads


def package_reads() -> set[str]:
    reads = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if path.name == "config.py" and isinstance(node, ast.FunctionDef) and node.name == "validate":
                continue  # validation refuses values; it does not make them act
            if isinstance(node, ast.ClassDef) and node.name in CLASS_SECTION:  # a section, beside its owner
                for item in node.body:  # properties such as dp; its own checks refuse values, like validate
                    if not (isinstance(item, ast.FunctionDef) and item.name == "check"):
                        reads |= _reads_in(item, {"self": CLASS_SECTION[node.name]})
                continue
            if path.name == "config.py" and isinstance(node, ast.Assign):
                continue  # the table of conditional keys names keys; it does not read them
            reads |= _reads_in(node, {})
    return reads


def test_every_key_is_read_by_the_code():
    unread = sorted(set(ALL_KEYS) - package_reads())
    assert not unread, f"keys nothing reads (use them or remove them): {unread}"


def test_the_walk_sees_a_read_and_misses_an_unread_key(tmp_path):
    """The walker itself: aliases, tuple bindings and typed parameters count; a name never read does not."""
    code = (
        "def f(cfg, optim: OptimConfig):\n    t, r = cfg.train, cfg.rollout\n    x = r.top_p + optim.lr\n"
        "    return t.steps + cfg.eval.k\n"
    )
    assert _reads_in(ast.parse(code), {}) == {"rollout.top_p", "optim.lr", "train.steps", "eval.k"}


def _other_value(key: str):
    """A valid value other than the key's default."""
    section, name = key.split(".")
    tp = typing.get_type_hints(SECTIONS[section])[name]
    default = key_default(key)
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return next(v for v in typing.get_args(tp) if v != default)
    if options and len(options) < len(typing.get_args(tp)):  # Optional[...]: null, or a value when null is the default
        if default is not None:
            return None
        tp = options[0]
    origin = typing.get_origin(tp)
    if tp is bool:
        return not default
    if tp is int:
        return (default or 0) + 3
    if tp is float:
        return (default or 0.0) * 2 + 0.25
    if tp is str:
        return (default or "") + "other"
    if origin is list:
        return [0.1, 0.2] if typing.get_args(tp)[0] is float else [1] if typing.get_args(tp)[0] is int else ["x"]
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[0]
    if origin is dict:
        return {"x": 1}
    raise AssertionError(f"no other value for {key} ({tp})")


BASES = [
    (ROOT / "configs" / name, overrides)
    for name, overrides in (
        ("quickstart.yaml", []),
        ("real_r1distill_qwen_1p5b.yaml", []),
        ("baseline_grpo_r1distill_qwen_1p5b.yaml", []),
        ("quickstart.yaml", ["rollout.use_engine_logprobs=true"]),
        ("quickstart.yaml", ["rollout.environment=my_pkg.envs:MyEnv"]),  # rollout.tools inert beside it
    )
]
CONDITIONAL = [(key, acts, why) for keys, acts, why in CONDITIONAL_KEYS for key in keys]


@pytest.mark.parametrize("key,acts,why", CONDITIONAL, ids=[c[0] for c in CONDITIONAL])
def test_a_key_that_would_do_nothing_is_refused_at_load(key, acts, why):
    base, overrides = next(((b, o) for b, o in BASES if not acts(load_config(b, o))), (None, None))
    assert base is not None, f"no shipped config where {key} is inert: add one to BASES"
    value = _other_value(key)
    with pytest.raises(ConfigError) as err:
        load_config(
            base,
            overrides + [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"],
        )
    assert f"{key}=" in str(err.value) and why in str(err.value), str(err.value)
    assert key in ALL_KEYS and config_module.key_value(load_config(base, overrides), key) == key_default(key)


def test_a_key_that_acts_is_accepted_where_it_acts():
    """The same refusals do not fire where the key has an effect."""
    load_config(BASES[0][0], ["algorithm.kl=reference", "algorithm.kl_coef=0.01", "actor.reference_offload=true"])
    load_config(BASES[0][0], ["algorithm.name=grpo", "algorithm.clip_high=0.3"])
    load_config(BASES[1][0], ["data.verifier_timeout_s=9"])
    load_config(BASES[0][0], ["algorithm.importance_correction=tis", "algorithm.is_cap=3"])
    assert load_config(BASES[1][0], ["parallel.cp=2", "parallel.gpus_per_node=8"]).parallel.cp == 2
    with pytest.raises(ConfigError, match="parallel.cp=2 needs actor.pack_sequences"):
        load_config(BASES[1][0], ["parallel.cp=2", "parallel.gpus_per_node=8", "actor.pack_sequences=false"])
