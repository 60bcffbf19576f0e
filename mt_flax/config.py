"""Experiment configs: Python files with ``get_config()`` plus ``--config.key=value`` overrides."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file or override is wrong; the message is one line for the user."""


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_flat_keys(v, prefix + k + "."))
  return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false")
  if isinstance(current, (int, float)) and not isinstance(current, bool):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ConfigError(f"--config.{key}={text}: expected a number") from None
    if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
      raise ConfigError(f"--config.{key}={text}: expected an integer")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ConfigError(f"--config.{key}={text}: expected a number")
    return type(current)(value)
  if isinstance(current, str) or current is None:
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{key}={text}: expected a Python literal like {current!r}") from None


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies ``key.sub=value`` (or ``--config.key.sub=value``) strings to ``cfg`` in place."""
  known = _flat_keys(cfg)
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r}: expected --config.key=value")
    key, value = text.split("=", 1)
    if key not in known:
      near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      hint = f"; did you mean {', '.join(near)}?" if near else f"; known keys: {', '.join(known)}"
      raise ConfigError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = _parse_value(key, value, node[leaf])
  return cfg


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from the Python file ``path`` and applies ``overrides``."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; expected a Python file such as "
                      "experiments/bible_en_es_tiny.py")
  spec = importlib.util.spec_from_file_location("mt_flax_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  cfg = module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() in {path!r} returned {type(cfg).__name__}, "
                      "expected an ml_collections.ConfigDict")
  return apply_overrides(cfg, overrides)


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """Splits argv into (config path, ``--config.x=y`` overrides, remaining args)."""
  path, overrides, rest = None, [], []
  it = iter(argv)
  for arg in it:
    if arg == "--config":
      path = next(it, None)
      if path is None:
        raise ConfigError("--config needs a path to a config file")
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      if "=" not in arg:
        value = next(it, None)
        if value is None:
          raise ConfigError(f"{arg} needs a value")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      rest.append(arg)
  return path, overrides, rest
