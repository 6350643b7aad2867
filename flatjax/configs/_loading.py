"""Config files: loading ``path.py[:arg]`` and overriding fields by dotted name.

The conventions of ``ml_collections.config_flags`` (as in the flax
examples): a config file defines ``get_config(arg)``; ``--config
path.py:arg`` builds it and ``--config.key=value`` (or ``--set key=value``)
overrides a field, the value parsed to the type of the field it replaces.
A packaged config (``flatjax/configs/<name>.py``) is found by name from any
working directory.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["load_config", "apply_overrides", "parse_value", "packaged_configs", "configs_help",
           "config_flag_overrides", "PACKAGED_CONFIGS"]


def _import_config_module(path: Path):
    """Imports a config file; inside a package (``flatjax/configs``) by its dotted name.

    Importing by dotted name lets config files share a base with ordinary
    imports (``from flatjax.configs import common``), as they do under
    ``ml_collections.config_flags`` when run from the repository root.
    """
    path = path.resolve()
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module(".".join(parts))
    spec = importlib.util.spec_from_file_location(f"_flatjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PACKAGED_CONFIGS = Path(__file__).resolve().parent


def packaged_configs() -> dict[str, str]:
    """The config files that ship with flatjax: ``{name: first line of its docstring}``."""
    import ast

    out = {}
    for path in sorted(PACKAGED_CONFIGS.glob("*.py")):
        if path.stem.startswith("_") or path.stem == "common":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _resolve_config_path(path_text: str) -> Path:
    """A config file: the path as given, else the packaged config of that name.

    ``mnist5k``, ``mnist5k.py`` and ``flatjax/configs/mnist5k.py`` all name
    the packaged ``flatjax/configs/mnist5k.py`` from any working directory.
    """
    path = Path(path_text)
    if path.is_file():
        return path
    name = path.name if path.suffix else f"{path.name}.py"
    packaged = PACKAGED_CONFIGS / name
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"config file not found: {path_text!r} (neither a file nor one of the packaged "
        f"configs {', '.join(packaged_configs())}; `flatjax train --help` lists them)"
    )


def _config_tokens(name: str) -> str:
    """The tokens ``get_config`` of a packaged config accepts, from its own error message."""
    try:
        module = _import_config_module(PACKAGED_CONFIGS / name)
        module.get_config("\x00")
    except ValueError as error:
        text = str(error)
        if "expected comma-separated tokens from (" in text:
            return text.split("tokens from (", 1)[1].rsplit(")", 1)[0] + "; quick"
    except Exception:  # noqa: BLE001 - help must print even if a config is broken
        return "?"
    return "quick"


def configs_help() -> str:
    """The help text listing the packaged configs, their purpose and their tokens."""
    lines = ["packaged configs (--config NAME.py:TOKEN,TOKEN,... from any folder):"]
    for name, doc in packaged_configs().items():
        lines.append(f"  {name:12s} {doc}")
        lines.append(f"  {'':12s} tokens: {_config_tokens(name)}")
    lines.append("override any field with --config.KEY=VALUE (or --set KEY=VALUE), e.g. "
                 "--config.num_epochs=1 --config.esgd.inner_steps=10")
    return "\n".join(lines)


def config_flag_overrides(argv: list[str]) -> list[str]:
    """``ml_collections.config_flags`` overrides (``--config.key=value``) as ``--set key=value``.

    Example:
      >>> config_flag_overrides(["train", "--config.num_epochs=1", "--config.esgd.noise", "0"])
      ['train', '--set', 'num_epochs=1', '--set', 'esgd.noise=0']
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and len(arg) > len("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg}: expected {arg}=VALUE or {arg} VALUE")
                value, i = argv[i + 1], i + 1
            out += ["--set", f"{key}={value}"]
        else:
            out.append(arg)
        i += 1
    return out


def load_config(spec: str):
    """Builds the config named by ``PATH[:ARG]``: ``get_config(ARG)`` of the Python file PATH.

    Args:
      spec: a path to a config file, optionally followed by ``:`` and the
        argument its ``get_config`` takes (e.g. ``cifar.py:cifar10,resnet18,esgd``).

    Returns:
      The ``ml_collections.ConfigDict``, locked (new keys raise, values can change).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file has no ``get_config`` or it returned no ConfigDict.

    Example:
      >>> config = load_config("flatjax/configs/mnist5k.py:rsgd")  # doctest: +SKIP
      >>> config.algorithm  # doctest: +SKIP
      'replicated_sgd'
    """
    import ml_collections

    path_text, sep, arg = spec.partition(":")
    path = _resolve_config_path(path_text)
    if path.suffix != ".py":
        raise ValueError(
            f"{path_text!r} is not a config file: expected a Python file defining "
            "get_config(), e.g. flatjax/configs/mnist5k.py:esgd"
        )
    try:
        module = _import_config_module(path)
    except (SyntaxError, ImportError) as error:
        raise ValueError(f"config file {path_text!r} cannot be imported: {error}") from error
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {path_text!r} defines no get_config() function")
    try:
        config = get_config(arg) if sep else get_config()
    except AttributeError as error:  # a typo'd key in the config file (the base is locked)
        raise ValueError(f"{path_text}: {error}") from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"{path_text}: get_config() must return an ml_collections.ConfigDict, "
            f"got {type(config).__name__}"
        )
    config.lock()
    return config


def _flat_keys(config, prefix: str = "") -> list[str]:
    import ml_collections

    keys = []
    for key, value in config.items():
        name = prefix + key
        keys.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(text: str, current, key: str = "value"):
    """Parses the command-line ``text`` to the type of the field's ``current`` value.

    bool: ``true/false/yes/no/on/off/1/0``; int and float: Python literals
    (an int field rejects ``0.5``, a float field accepts ``1``); str: the text
    as given; list/tuple: ``[a, b]`` or ``a,b``, elements typed like the
    current first element; dict: a Python literal. ``none``/``null`` sets
    None. A field whose value is None takes any Python literal, else the text.

    Example:
      >>> parse_value("3", 10.0), parse_value("no", True), parse_value("0.01,0.1", [0.0])
      (3.0, False, [0.01, 0.1])
    """
    import ml_collections

    if text.strip().lower() in ("none", "null"):
        return None
    expected = None
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        expected = "true or false"
    elif isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            expected = "an integer"
    elif isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            expected = "a number"
    elif isinstance(current, str):
        return text
    elif isinstance(current, (list, tuple)):
        value = _literal(text)
        if not isinstance(value, (list, tuple)):
            value = [item.strip() for item in text.split(",") if item.strip()]
        if current:
            value = [parse_value(str(item), current[0], key) for item in value]
        return type(current)(value)
    elif isinstance(current, (dict, ml_collections.ConfigDict)):
        value = _literal(text)
        if isinstance(value, dict):
            return value
        expected = "a dict literal such as {'width': 8}"
    else:
        return _literal(text)
    raise ValueError(f"--set {key}={text}: expected {expected} (the field is {current!r})")


def apply_overrides(config, overrides: Sequence[str]):
    """Applies ``key=value`` overrides (dotted keys) to ``config`` in place.

    Args:
      config: an ``ml_collections.ConfigDict``.
      overrides: strings ``"a.b=value"``; values parsed by :func:`parse_value`.

    Returns:
      ``config``.

    Raises:
      ValueError: a malformed override, an unknown key (the message lists
        close matches) or a value of the wrong type.

    Example:
      >>> import ml_collections
      >>> config = ml_collections.ConfigDict({"lr": 0.1, "esgd": {"inner_steps": 5}})
      >>> apply_overrides(config, ["lr=0.05", "esgd.inner_steps=10"]).esgd.inner_steps
      10
      >>> apply_overrides(config, ["esgd.inner_step=3"])
      Traceback (most recent call last):
      ...
      ValueError: unknown config key 'esgd.inner_step'; did you mean: esgd.inner_steps?
    """
    import ml_collections

    keys = _flat_keys(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=4, cutoff=0.6)
            if not close:
                last = key.rsplit(".", 1)[-1]
                close = [k for k in keys if k.rsplit(".", 1)[-1] == last][:4]
            hint = f"did you mean: {', '.join(close)}?" if close else "see the config file for keys"
            raise ValueError(f"unknown config key {key!r}; {hint}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        current = node[leaf]
        value = parse_value(text, current, key)
        if isinstance(current, ml_collections.ConfigDict):
            value = ml_collections.ConfigDict(value)
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(
                f"--set {key}={text}: cannot store {value!r} in a field of type "
                f"{type(current).__name__}"
            ) from error
    return config
