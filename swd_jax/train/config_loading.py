"""Run configs: load by name or by path from any directory, apply `--config.FIELD=VALUE` overrides strictly.

    load_config("sd35_medium")              # a config shipped in the repository's configs/ folder
    load_config("/path/to/my_config.py")    # any file with get_config(); may `from configs.common import ...`
    apply_overrides(c, ["--config.train.steps=10", "--config.schedule.scales=8,12,16"])

Overrides replace a field's value, never extend it (a tuple given twice keeps the last one), are parsed to the
field's type, and an unknown field is an error naming the closest fields. `describe_fields(c)` lists every field
with its value for `--help`. The configs folder is the repository's `configs/` next to the package (editable
installs and checkouts) or `$SWD_CONFIGS`.
"""
from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import os
import sys

import ml_collections


class ConfigError(ValueError):
    """A problem with the user's config or overrides: printed as one line by the command lines."""


def configs_dir() -> str:
    """The folder of shipped configs: $SWD_CONFIGS, else the repository's configs/ beside the package."""
    env = os.environ.get("SWD_CONFIGS")
    if env:
        return os.path.abspath(env)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def config_names() -> list[str]:
    """Names loadable with `--config NAME` (every configs/*.py with a get_config, except common.py)."""
    files = glob.glob(os.path.join(configs_dir(), "*.py"))
    return sorted(os.path.basename(f)[:-3] for f in files if os.path.basename(f) not in ("__init__.py", "common.py"))


def resolve_config_path(spec: str) -> str:
    """A config name (`sd35_medium`) or a path to a .py file -> that file's absolute path."""
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            shipped = os.path.join(configs_dir(), os.path.basename(spec))
            if not os.path.isabs(spec) and os.path.isfile(shipped):
                return shipped  # `configs/tiny.py` from outside the repository: the shipped file of that name
            raise ConfigError(f"config file {spec!r} not found (names shipped: {', '.join(config_names())})")
        return path
    path = os.path.join(configs_dir(), spec + ".py")
    if not os.path.isfile(path):
        close = difflib.get_close_matches(spec, config_names(), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"no config named {spec!r}{hint} (known: {', '.join(config_names())}; or give a path)")
    return path


def _register_configs_package() -> None:
    """Make `import configs.common` (used by the config files) resolve to the shipped configs folder."""
    folder = configs_dir()
    existing = sys.modules.get("configs")
    if existing is not None and folder in list(getattr(existing, "__path__", [])):
        return
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("configs", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["configs"] = module
    spec.loader.exec_module(module)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `get_config()` in the named or given config file."""
    path = resolve_config_path(spec)
    _register_configs_package()
    name = "swd_user_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    return module.get_config()


def flat_fields(c: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{'train.steps': 3000, ...}: every leaf field of the config with its value."""
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def describe_fields(c: ml_collections.ConfigDict) -> str:
    """Every field and its value, one per line, for `--help`."""
    fields = flat_fields(c)
    width = max(len(k) for k in fields)
    return "\n".join(f"  --config.{k:<{width}} = {v!r}" for k, v in fields.items())


def _parse(text: str, current, field: str):
    """`text` converted to the type of the field's current value."""
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            s = text.strip()
            if s in ("", "()", "[]"):
                return ()
            if s[0] in "([":
                value = ast.literal_eval(s)
                return tuple(value) if isinstance(value, (tuple, list)) else (value,)
            items = [x.strip() for x in s.split(",") if x.strip()]
            sample = current[0] if len(current) else None
            if isinstance(sample, str) or not all(_is_number(x) for x in items):
                return tuple(items)
            return tuple(ast.literal_eval(x) for x in items)
        if current is None:
            return ast.literal_eval(text) if _is_literal(text) else text
        return text
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"--config.{field}={text!r}: not a valid {type(current).__name__} ({e})") from None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_literal(s: str) -> bool:
    try:
        ast.literal_eval(s)
        return True
    except (ValueError, SyntaxError):
        return False


def set_field(c: ml_collections.ConfigDict, field: str, text: str) -> None:
    """c.<field> = text parsed to the field's type; an unknown field names the closest known ones."""
    fields = flat_fields(c)
    if field not in fields:
        leaf_name = field.rsplit(".", 1)[-1]
        same_leaf = [f for f in fields if f.rsplit(".", 1)[-1] == leaf_name]
        close = same_leaf + [f for f in difflib.get_close_matches(field, list(fields), n=3, cutoff=0.6)
                             if f not in same_leaf]
        close = close[:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else "; `--help` lists every field"
        raise ConfigError(f"unknown config field {field!r}{hint}")
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    value = _parse(text, fields[field], field)
    try:
        with c.unlocked():
            node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"--config.{field}={text!r}: {e}") from None


def apply_overrides(c: ml_collections.ConfigDict, args: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=v` / `--config.a.b v` arguments in order (later ones replace earlier ones)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r} (config fields are set as --config.FIELD=VALUE)")
        body = arg[len("--config."):]
        if "=" in body:
            field, text = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value (--config.FIELD=VALUE)")
            field, text = body, args[i + 1]
            i += 1
        set_field(c, field, text)
        i += 1
    return c
