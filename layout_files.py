"""
Layout files: what `sample.py --layout` reads and `evaluate.py heldout` writes, checked entry by entry.

JSON: one layout or a list of them, each
  {"caption": "optional text", "objects": [{"label": "red circle", "bbox": [x, y, w, h]}, ...]}
Text (the original's demo format): one layout per file, one "x, y, w, h, class name" line per
object; blank lines are skipped and the class name is everything after the 4th comma.
An empty object list is a valid layout (it asks for an unconditional image). Keys other than
caption/objects/label/bbox are ignored, so a training folder can add e.g. "image": "0001.png".
Any problem is a LayoutError whose one-line message names the file, layout, object and field.

    layouts = load_layouts("layouts.json", class_names, max_objects=8)   # [{"caption", "objects"}, ...]
    save_layouts("out.json", layouts, class_names)
"""
import difflib
import json
import math
from pathlib import Path

from config import UserError


class LayoutError(UserError, ValueError):
    """A layout file that cannot be used; the message names the file, layout, object and field."""


SLACK = 1e-6  # boxes may poke out of [0, 1] by float rounding, e.g. 0.1 + 0.9 = 1.0000000000000002


def short(value) -> str:
    # the offending value, cut short so a message stays one readable line
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _label_index(name, where: str, class_names: list[str]) -> int:
    """Class index of a label name; an unknown name lists the closest known ones (typos)."""
    if not isinstance(name, str):
        raise LayoutError(f"{where}, field 'label': expected a class name string, got {short(name)}")
    name = name.strip()
    if name in class_names:
        return class_names.index(name)
    close = difflib.get_close_matches(name, class_names, n=3, cutoff=0.5)
    if close:
        hint = f"closest known labels: {', '.join(map(repr, close))}"
    else:  # still show what a label looks like, e.g. for a file written for another dataset
        examples = ", ".join(map(repr, class_names[:3]))
        hint = f"no close match among the {len(class_names)} known labels, e.g. {examples}"
    raise LayoutError(f"{where}, field 'label': unknown label {name!r}; {hint}")


def finite_number(v) -> bool:
    """A finite JSON number: bool is an int subclass in Python, but `true` is surely a mistake in a
    box or a size; json.loads accepts NaN and Infinity, which would silently poison the boxes; an
    integer too large for a float is none either."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def _check_bbox(bbox, where: str) -> tuple[float, float, float, float]:
    """Validate [x, y, w, h] (fractions, inside the image) and return it as floats."""
    where = f"{where}, field 'bbox'"
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise LayoutError(f"{where}: expected a list of 4 numbers [x, y, w, h], got {short(bbox)}")
    for k, v in enumerate(bbox):
        if not finite_number(v):
            raise LayoutError(f"{where}: expected a finite number at position {k} of [x, y, w, h], got {short(v)}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise LayoutError(f"{where}: expected width and height > 0, got w={w}, h={h}")
    # pixel coordinates (e.g. [10, 20, 30, 40]) are the likely mistake this catches
    for name, v in (("x", x), ("y", y), ("x + w", x + w), ("y + h", y + h)):
        if not -SLACK <= v <= 1 + SLACK:
            raise LayoutError(f"{where}: expected {name} in [0, 1] (fractions of the image size), got {v}")
    # clip the slack away so nothing downstream sees a box outside the image
    x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    w, h = min(w, 1.0 - x), min(h, 1.0 - y)
    if w <= 0 or h <= 0:  # e.g. x = 1 with a tiny width, inside the slack: nothing of it in the image
        raise LayoutError(f"{where}: expected a box with an area inside the image, got x={x}, y={y} with nothing "
                          f"left of it after clipping to [0, 1]")
    return x, y, w, h


def _check_count(n: int, where: str, max_objects: int) -> None:
    if n > max_objects:
        raise LayoutError(f"{where}, field 'objects': {n} objects, expected at most max_objects={max_objects}")


def parse_json_layout(layout, where: str, class_names: list[str], max_objects: int) -> dict:
    """One layout of a JSON file; `where` ("FILE: layout i") starts every error message."""
    if not isinstance(layout, dict):
        raise LayoutError(f'{where}: expected an object {{"caption": ..., "objects": [...]}}, got {short(layout)}')
    caption = layout.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise LayoutError(f"{where}, field 'caption': expected a string or null, got {short(caption)}")
    if "objects" not in layout:
        raise LayoutError(f"{where}: missing field 'objects' (a list of label/bbox objects; [] for none)")
    objs = layout["objects"]
    if not isinstance(objs, list):
        raise LayoutError(f"{where}, field 'objects': expected a list, got {short(objs)}")
    _check_count(len(objs), where, max_objects)  # the model's padded N cannot hold more
    objects = []
    for j, obj in enumerate(objs):
        at = f"{where}, object {j}"
        if not isinstance(obj, dict):
            raise LayoutError(f'{at}: expected an object {{"label": ..., "bbox": [x, y, w, h]}}, got {short(obj)}')
        for key in ("label", "bbox"):
            if key not in obj:
                raise LayoutError(f"{at}: missing field '{key}'")
        objects.append((_label_index(obj["label"], at, class_names), _check_bbox(obj["bbox"], at)))
    return {"caption": caption, "objects": objects}


def _parse_text_layout(text: str, path: Path, class_names: list[str], max_objects: int) -> dict:
    """The original's text format: the whole file is one layout, errors name the line."""
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{path}: line {lineno} (layout 0, object {len(objects)})"
        parts = line.split(",", 4)  # at most 5 parts: commas after the 4th belong to the class name
        if len(parts) < 5:
            raise LayoutError(f"{at}: expected 'x, y, w, h, class name', got {short(line)}")
        bbox = []
        for k, part in enumerate(parts[:4]):
            try:
                bbox.append(float(part))
            except ValueError:
                raise LayoutError(f"{at}, field 'bbox': expected a number at position {k} of x, y, w, h, "
                                  f"got {short(part.strip())}") from None
        _check_count(len(objects) + 1, at, max_objects)
        objects.append((_label_index(parts[4], at, class_names), _check_bbox(bbox, at)))
    return {"caption": None, "objects": objects}


def load_layouts(path: str | Path, class_names: list[str], max_objects: int) -> list[dict]:
    """Read and validate a layout file (JSON, or the original's text format).

    Returns a list of {"caption": str | None, "objects": [(label_index, (x, y, w, h)), ...]};
    raises LayoutError with a one-line message on any problem."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: layout file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved by Windows editors start with a BOM
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # JSON by extension or by its first character; anything else is the text format
    if path.suffix.lower() != ".json" and text.lstrip()[:1] not in ("{", "["):
        return [_parse_text_layout(text, path, class_names, max_objects)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(data, dict):
        data = [data]  # a single layout
    elif not isinstance(data, list):
        raise LayoutError(f"{path}: expected a layout object or a list of them at the top level, got {short(data)}")
    if not data:  # surely a mistake, and sample.py would quietly write nothing
        raise LayoutError(f"{path}: expected at least one layout, got an empty list")
    return [parse_json_layout(layout, f"{path}: layout {i}", class_names, max_objects)
            for i, layout in enumerate(data)]


def save_layouts(path: str | Path, layouts: list[dict], class_names: list[str]) -> None:
    """Write layouts as a JSON layout file (labels as class names); load_layouts reads it back."""
    # by hand rather than json.dumps(indent=...), which would put every number on its own line:
    # one object per line keeps a file of held-out layouts easy to read and edit
    entries = []
    for layout in layouts:
        objects = [json.dumps({"label": class_names[label], "bbox": [round(v, 6) for v in box]})
                   for label, box in layout["objects"]]
        body = "[\n" + ",\n".join("   " + o for o in objects) + "\n  ]" if objects else "[]"
        entries.append(f' {{"caption": {json.dumps(layout.get("caption"))},\n  "objects": {body}}}')
    Path(path).write_text("[\n" + ",\n".join(entries) + "\n]\n", encoding="utf-8")
