"""
Configuration: config.yaml (or a saved config dict), a preset, and command-line overrides, resolved
into one dataclass per section (ModelConfig in model.py, TrainConfig in train.py, ...).

    cfg = train.load_config(preset="tiny", overrides=["--train.lr=1e-4"])   # {"model": ModelConfig, ...}

Every key must exist in its dataclass and have its type (ints are accepted for floats); anything
else is a UserError naming the file (or "command line") and the key. Also the one exception type
for bad user input: the CLIs print it as one line and exit with code 2; and `replacing`, the one way
every file of ours (checkpoints, caches, images, manifests) is written whole.
"""
import contextlib
import dataclasses
import os
import secrets
import sys
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent


class _Raw(str):
    """A command-line value: parsed as YAML for typed fields, kept verbatim for text fields."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (a traceback only with --debug)."""


def error_summary(e: BaseException, empty: str = "") -> str:
    """An exception as "Type: its first line", cut to 200 characters, for a one-line error message
    (`empty` stands in for a message-less one: an empty file's EOFError)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [empty])[0][:200]}"


@contextlib.contextmanager
def replacing(path: str | Path):
    """Yields a temporary path beside `path` for the body to write, renamed over `path` when the body
    ends and removed when it fails: a kill never leaves a half-written file, and the old one stays
    whole until the new one is. The name is this call's own (a random token: pids repeat across the
    containers of a cluster), so two processes writing one path (two runs building a shared latent
    cache) never share a temporary file, and the last rename wins; it keeps the suffix (PIL picks
    the format from it). The body creates the file, so it gets the umask's permissions."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -----------------------------------------------------------------------------
# config: config.yaml -> preset -> --section.key=value overrides -> one dataclass per section

def check_type(value, tp, where: str):
    """Return value if it fits the dataclass field type tp (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [check_type(v, item, where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads 1e-4 as a string: it wants a dot, as in 1.0e-4
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _merge(cfg: dict, update: dict, source: str, sections: dict):
    for section, values in update.items():
        if section not in sections:
            raise UserError(f"{source}: unknown section {section!r} (expected one of {list(sections)})")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            cfg.setdefault(section, {})[key] = (value, source)


def load_config(sections: dict, path: str | Path, preset: str | None = None,
                overrides: list[str] = (), base: dict | None = None) -> dict:
    """Resolve the config into {section: dataclass}: the YAML file (or `base`, a saved config dict),
    then the preset, then overrides like `--train.lr=1e-4` (values parsed as YAML). Unknown keys and
    wrong types are errors that name the file and the key."""
    raw: dict = {}
    if base is not None:
        _merge(raw, base, "checkpoint config", sections)
    else:
        _merge(raw, _read_yaml(Path(path)), str(path), sections)
    if preset:
        preset_path = Path(preset) if preset.endswith(".yaml") else ROOT / "presets" / f"{preset}.yaml"
        if not preset_path.exists():
            known = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
            raise UserError(f"preset {preset!r}: no file {preset_path} (known presets: {', '.join(known)})")
        _merge(raw, _read_yaml(preset_path), str(preset_path), sections)
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r}: expected --section.key=value")
        section, name = key.split(".", 1)
        _merge(raw, {section: {name: _Raw(value)}}, "command line", sections)
    cfg = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, (value, source) in raw.get(section, {}).items():
            if key not in hints:
                raise UserError(f"{source}: unknown key {section}.{key}")
            if isinstance(value, _Raw):  # a path stays a string; "1e-4", "[1, 2]", "true" get their type
                try:
                    value = str(value) if hints[key] is str else yaml.safe_load(value)
                except yaml.YAMLError:
                    value = str(value)
            kwargs[key] = check_type(value, hints[key], f"{source}: {section}.{key}")
        try:
            cfg[section] = cls(**kwargs)
        except ValueError as e:  # a value outside its allowed set, from any source
            raise UserError(f"config: {e}") from None
    return cfg


def config_to_dict(cfg: dict) -> dict:
    return {section: dataclasses.asdict(c) for section, c in cfg.items()}


def run_cli(fn, *args, debug: bool = False):
    """Run fn(*args) for a command-line entry point: a UserError becomes one line `error: ...` on
    stderr (naming the rank under torchrun) and exit code 2; debug=True keeps the traceback."""
    try:
        return fn(*args)
    except UserError as e:
        if debug:
            raise
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(2)


def read_class_names(path: str) -> list[str]:
    """One class name a line, in label order. A relative path that does not exist from the working
    folder is looked up beside this file (the class lists in presets/)."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (ROOT / p).exists():
        p = ROOT / p
    if not p.is_file():
        raise UserError(f"{path}: class-name file not found")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
