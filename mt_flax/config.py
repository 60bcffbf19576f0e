"""Experiment configs: Python files with ``get_config()`` plus ``--config.key=value`` overrides."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import traceback
from typing import Any, Iterable, Sequence

import ml_collections

from mt_flax import default_config
from mt_flax.errors import ConfigError


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
      hint = f"did you mean {', '.join(near)}?" if near else "no similar key exists"
      raise ConfigError(f"{item}: unknown config key {key!r}; {hint}")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = _parse_value(key, value, node[leaf])
  return cfg


def _check_known_keys(cfg: ml_collections.ConfigDict, where: str) -> None:
  """Every key of ``cfg`` must exist in the default config (:mod:`mt_flax.default_config`)."""
  known = _flat_keys(default_config.get_config())
  for key in _flat_keys(cfg):
    if key not in known:
      near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      hint = f"did you mean {', '.join(near)}?" if near else "no similar key exists"
      raise ConfigError(f"{where}: unknown config key {key!r}; {hint} "
                        "(every key is listed in mt_flax/default_config.py)")


def with_defaults(cfg: ml_collections.ConfigDict | dict, where: str = "config"
                  ) -> ml_collections.ConfigDict:
  """The default config updated with ``cfg`` (a ConfigDict or a saved ``config.json``
  dict): keys ``cfg`` lacks take their default, unknown keys are an error."""
  cfg = ml_collections.ConfigDict(cfg if isinstance(cfg, dict) else cfg.to_dict())
  _check_known_keys(cfg, where)
  full = default_config.get_config()

  def fill(node: ml_collections.ConfigDict, values: ml_collections.ConfigDict) -> None:
    for key, value in values.items():
      if isinstance(value, ml_collections.ConfigDict):
        fill(node[key], value)
      else:
        with node.ignore_type():
          node[key] = value
  fill(full, cfg)
  return full


def _line_in(path: str, error: BaseException) -> str:
  """`` line N`` of the last frame of ``error``'s traceback in the file ``path``, or ""."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f" line {lines[-1]}" if lines else ""


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` (or ``get_config(variant)`` for ``FILE:variant``) and applies
  ``overrides``; every key must be one of the default config's."""
  path, _, variant = str(path).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; expected a Python file such as "
                      "experiments/bible_en_es_tiny.py (optionally FILE:variant)")
  spec = importlib.util.spec_from_file_location("mt_flax_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r} line {e.lineno}: syntax error ({e.msg})") from None
  except Exception as e:  # pylint: disable=broad-except  (the user's code: one line naming it)
    raise ConfigError(f"config file {path!r}{_line_in(path, e)}: loading it raised "
                      f"{type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  try:
    cfg = module.get_config(variant) if variant else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    call = f"get_config({variant!r})" if variant else "get_config()"
    raise ConfigError(f"config file {path!r}{_line_in(path, e)}: {call} raised "
                      f"{type(e).__name__}: {e}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() in {path!r} returned {type(cfg).__name__}, "
                      "expected an ml_collections.ConfigDict")
  return apply_overrides(with_defaults(cfg, path), overrides)
