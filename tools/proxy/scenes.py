"""Deterministic scenes of coloured shapes and edits on them whose right answer is known.

A scene is a background (plain, a 16-pixel checker of two close tones, or a vertical gradient) and 1-4 shapes
(circle, square, triangle, diamond) of named colours, drawn in order (later shapes cover earlier ones). Shapes are
rendered with anti-aliased coverage from their exact signed distance (coverage = clamp(0.5 - d, 0, 1), d in pixels
from the pixel centre), composited in 0..255 floats and rounded half up: the same parameters give the same pixels
(float64 on the CPU; float32 on the GPU for training differs by at most one level at rare edge pixels).

An edit is (source image(s), instruction, target image) plus a mask of the pixels it changes:
- `recolor`: "Make the red circle blue" (the object is fully visible);
- `remove`: "Remove the blue square" (the object overlaps nothing, so the target is the background behind it);
- `add`: "Add a small green square at the top left" (named size small/medium/large, 3×3 named places, the place
  is free);
- `background`: "Change the background to white" (plain backgrounds only);
- `paste` (Edit-Plus, two images): "Put the red circle of picture 1 in picture 2" (the object of picture 1 is
  drawn on top of picture 2 at the same place and size).
Instructions come from templates with paraphrases and synonyms; the referring expression always names exactly one
object of the scene, so the instruction determines the target.

The mask PNG (grey levels): 255 = the edit changes the pixel completely ("core": e.g. the inside of the recoloured
object), 128 = partly (anti-aliased edge), 0 = the pixel must stay as it is.

CLI: `python3 tools/proxy/scenes.py heldout [--out tests/fixtures/proxy/heldout]` writes the held-out set;
`python3 tools/proxy/scenes.py sample --out DIR` writes a few edits of each task to look at.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

SIZE = 128  # image side in pixels (the proxy runs at 128×128: VAE/output area 128², condition area 128²)
MAX_OBJECTS = 5  # slots per scene (4 + one added/pasted)

# Named colours (sRGB). Object colours are chromatic, background colours neutral or dark, so an object never
# disappears into the background. Pairwise CIELAB ΔE76 >= 32 over all 14 colours.
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 170, 70),
    "cyan": (40, 200, 215), "blue": (40, 90, 235), "purple": (150, 50, 175), "pink": (245, 130, 190),
    "white": (245, 245, 240), "black": (25, 25, 30), "gray": (128, 128, 128), "beige": (215, 190, 140),
    "navy": (25, 35, 95), "brown": (120, 72, 40),
}
OBJECT_COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
BG_COLORS = ["white", "black", "gray", "beige", "navy", "brown"]
COLOR_WORDS = {
    "red": ["red"], "orange": ["orange"], "yellow": ["yellow"], "green": ["green"], "cyan": ["cyan", "turquoise"],
    "blue": ["blue"], "purple": ["purple", "violet"], "pink": ["pink"], "white": ["white"], "black": ["black"],
    "gray": ["gray", "grey"], "beige": ["beige"], "navy": ["navy", "navy blue"], "brown": ["brown"],
}
SHAPES = ["circle", "square", "triangle", "diamond"]
SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"],
               "diamond": ["diamond", "rhombus"]}
# Shape size s ("radius"): circle radius s; square half side 0.886 s and diamond half diagonal 1.253 s (the
# circle's area); up-pointing equilateral triangle with circumradius 1.4 s around its centroid.
EXTENT = {"circle": 1.0, "square": 0.886 * math.sqrt(2), "triangle": 1.4, "diamond": 1.253}
ADD_SIZES = {"small": 8.0, "medium": 12.0, "large": 16.0}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["", "medium", "medium-sized"],
              "large": ["large", "big"]}
CELL = [26.0, 64.0, 102.0]  # centres of the 3×3 named places
PLACES = {  # (column, row) -> phrases
    (0, 0): ["at the top left", "in the top left corner", "in the upper left corner", "at the top-left"],
    (1, 0): ["at the top", "at the top center", "at the top centre", "in the top middle"],
    (2, 0): ["at the top right", "in the top right corner", "in the upper right corner", "at the top-right"],
    (0, 1): ["on the left", "at the left", "on the left side", "at the middle left"],
    (1, 1): ["in the center", "in the centre", "in the middle"],
    (2, 1): ["on the right", "at the right", "on the right side", "at the middle right"],
    (0, 2): ["at the bottom left", "in the bottom left corner", "in the lower left corner", "at the bottom-left"],
    (1, 2): ["at the bottom", "at the bottom center", "at the bottom centre", "in the bottom middle"],
    (2, 2): ["at the bottom right", "in the bottom right corner", "in the lower right corner", "at the bottom-right"],
}
BG_KINDS = ["plain", "checker", "gradient"]
CHECKER = 16  # checker cell in pixels
TEXTURE_DELTA = 22.0  # tone difference of checker cells / gradient ends

RECOLOR_TEMPLATES = [
    "Make the {ref} {col}.", "Change the {ref} to {col}.", "Change the colour of the {ref} to {col}.",
    "Change the color of the {ref} to {col}.", "Turn the {ref} {col}.", "Paint the {ref} {col}.",
    "Recolor the {ref} {col}.", "Recolour the {ref} in {col}.", "Color the {ref} {col}.",
    "The {ref} should be {col}.", "Use {col} for the {ref}.", "make the {ref} {col}",
]
REMOVE_TEMPLATES = [
    "Remove the {ref}.", "Delete the {ref}.", "Erase the {ref}.", "Take away the {ref}.", "Get rid of the {ref}.",
    "Remove the {ref} from the image.", "Delete the {ref} from the picture.", "remove the {ref}",
]
ADD_TEMPLATES = [
    "Add {obj} {place}.", "Draw {obj} {place}.", "Put {obj} {place}.", "Place {obj} {place}.",
    "Insert {obj} {place}.", "{Place}, add {obj}.", "add {obj} {place}",
]
BACKGROUND_TEMPLATES = [
    "Change the background to {col}.", "Make the background {col}.", "Set the background color to {col}.",
    "Set the background colour to {col}.", "Paint the background {col}.", "Use a {col} background.",
    "Turn the background {col}.", "Replace the background with {col}.", "make the background {col}",
]
PASTE_TEMPLATES = [
    "Put the {ref} of picture 1 in picture 2.", "Add the {ref} from picture 1 to picture 2.",
    "Copy the {ref} of picture 1 into picture 2.", "Place the {ref} from picture 1 onto picture 2.",
    "Move the {ref} of picture 1 into picture 2.", "Insert the {ref} from picture 1 into picture 2.",
    "Put the {ref} from picture 1 on picture 2.",
]

EDIT_TASKS = ["recolor", "remove", "add", "background"]
PLUS_TASKS = EDIT_TASKS + ["paste"]
SPLITS = {"train": 0, "heldout": 1, "val": 2}
VARIANTS = {"edit": 0, "plus": 1}
DELTA_E_MAX = 10.0  # success rule (docs/quality.md): core colour within this CIELAB ΔE76 of the target's
PSNR_OUTSIDE_MIN = 25.0  # and PSNR over the pixels the edit must not change at least this


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling (numpy; deterministic from the seed)


def _extent(obj) -> float:
    return EXTENT[obj["shape"]] * obj["s"]


def _overlap(a, b, margin=1.0) -> bool:
    return math.hypot(a["x"] - b["x"], a["y"] - b["y"]) < _extent(a) + _extent(b) + margin


def _texture_color(rng, base: str):
    """The second tone of a checker / gradient: `base` lighter (dark colours) or darker (light colours)."""
    rgb = np.array(COLORS[base], float)
    sign = 1.0 if rgb.mean() < 128 else -1.0
    return [float(v) for v in np.clip(rgb + sign * TEXTURE_DELTA * rng.uniform(0.7, 1.0), 0, 255)]


def sample_background(rng, plain: bool = False, color: str | None = None):
    color = color or BG_COLORS[rng.integers(len(BG_COLORS))]
    kind = "plain" if plain else BG_KINDS[rng.choice(3, p=[0.5, 0.25, 0.25])]
    bg = {"kind": kind, "color": color, "rgb": [float(v) for v in COLORS[color]]}
    bg["rgb2"] = bg["rgb"] if kind == "plain" else _texture_color(rng, color)
    return bg


def sample_object(rng, objects, s_range=(8.0, 17.0), allow_overlap=False, tries=60):
    """A new object with a (colour, shape) pair not yet in `objects`, placed inside the image; without
    `allow_overlap`, away from the others. None if no place was found."""
    used = {(o["color"], o["shape"]) for o in objects}
    for _ in range(tries):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = OBJECT_COLORS[rng.integers(len(OBJECT_COLORS))]
        if (color, shape) in used:
            continue
        s = float(rng.uniform(*s_range))
        e = EXTENT[shape] * s
        x = float(rng.uniform(e + 2, SIZE - e - 2))
        y = float(rng.uniform(e + 2, SIZE - e - 2))
        obj = {"shape": shape, "color": color, "x": round(x, 2), "y": round(y, 2), "s": round(s, 2)}
        if allow_overlap or not any(_overlap(obj, o, 2.0) for o in objects):
            return obj
    return None


def sample_scene(rng, n_min=1, n_max=4, plain=False, p_overlap=0.3):
    bg = sample_background(rng, plain=plain)
    n = int(rng.integers(n_min, n_max + 1))
    objects = []
    for _ in range(n):
        obj = sample_object(rng, objects, allow_overlap=rng.random() < p_overlap)
        if obj is not None:
            objects.append(obj)
    return {"bg": bg, "objects": objects}


def _words(rng, options):
    return options[rng.integers(len(options))]


def refer(rng, objects, i) -> str:
    """A phrase naming objects[i] and no other object of the list."""
    o = objects[i]
    same_shape = sum(p["shape"] == o["shape"] for p in objects) == 1
    same_color = sum(p["color"] == o["color"] for p in objects) == 1
    col, shp = _words(rng, COLOR_WORDS[o["color"]]), _words(rng, SHAPE_WORDS[o["shape"]])
    options = [f"{col} {shp}"] * 3
    if same_shape:
        options.append(shp)
    if same_color:
        options += [f"{col} shape", f"{col} object"]
    return _words(rng, options)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _capital(s: str) -> str:
    return s[0].upper() + s[1:]


def _visible(objects, i) -> bool:
    """No later object covers objects[i]."""
    return not any(_overlap(objects[i], o) for o in objects[i + 1:])


def _isolated(objects, i) -> bool:
    return not any(_overlap(objects[i], o) for j, o in enumerate(objects) if j != i)


def sample_edit(rng, task: str):
    """One edit: {task, instruction, sources: [scene...], target: scene, edited: what the mask covers,
    requested: colour name or None}. Resamples until the task's conditions hold."""
    while True:
        e = _try_edit(rng, task)
        if e is not None:
            return e


def _try_edit(rng, task):
    if task == "paste":
        pic1 = sample_scene(rng, 1, 2, plain=True, p_overlap=0.0)
        pic2 = sample_scene(rng, 1, 3)
        if not pic1["objects"]:
            return None
        i = int(rng.integers(len(pic1["objects"])))
        obj = dict(pic1["objects"][i])
        if len(pic1["objects"]) == 1:
            ref = _words(rng, ["shape", "object"] * 2 + [refer(rng, pic1["objects"], i)])
        else:
            ref = refer(rng, pic1["objects"], i)
        target = {"bg": pic2["bg"], "objects": pic2["objects"] + [obj]}
        text = _words(rng, PASTE_TEMPLATES).format(ref=ref)
        return {"task": task, "instruction": text, "sources": [pic1, pic2], "target": target,
                "edited": ("object", len(target["objects"]) - 1, "target"), "requested": obj["color"]}
    scene = sample_scene(rng, 1, 4, plain=(task == "background"))
    objects = scene["objects"]
    if task == "recolor":
        cands = [i for i in range(len(objects)) if _visible(objects, i)]
        if not cands:
            return None
        i = cands[rng.integers(len(cands))]
        new = _words(rng, [c for c in OBJECT_COLORS if c != objects[i]["color"]])
        ref = refer(rng, objects, i)
        target = {"bg": scene["bg"], "objects": [dict(o) for o in objects]}
        target["objects"][i]["color"] = new
        text = _words(rng, RECOLOR_TEMPLATES).format(ref=ref, col=_words(rng, COLOR_WORDS[new]))
        return {"task": task, "instruction": text, "sources": [scene], "target": target,
                "edited": ("object", i, "target"), "requested": new}
    if task == "remove":
        cands = [i for i in range(len(objects)) if _isolated(objects, i)]
        if not cands:
            return None
        i = cands[rng.integers(len(cands))]
        ref = refer(rng, objects, i)
        target = {"bg": scene["bg"], "objects": [dict(o) for j, o in enumerate(objects) if j != i]}
        text = _words(rng, REMOVE_TEMPLATES).format(ref=ref)
        return {"task": task, "instruction": text, "sources": [scene], "target": target,
                "edited": ("object", i, "source"), "requested": None}
    if task == "add":
        size = ["small", "medium", "large"][rng.integers(3)]
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = OBJECT_COLORS[rng.integers(len(OBJECT_COLORS))]
        s = ADD_SIZES[size]
        new = {"shape": shape, "color": color, "s": s}
        free = []
        for (cx, cy) in PLACES:
            cand = dict(new, x=CELL[cx], y=CELL[cy])
            if not any(_overlap(cand, o, 3.0) for o in objects):
                free.append((cx, cy))
        if not free:
            return None
        cx, cy = free[rng.integers(len(free))]
        new.update(x=CELL[cx], y=CELL[cy])
        size_word = _words(rng, SIZE_WORDS[size])
        phrase = " ".join(w for w in [size_word, _words(rng, COLOR_WORDS[color]), _words(rng, SHAPE_WORDS[shape])]
                          if w)
        place = _words(rng, PLACES[(cx, cy)])
        text = _words(rng, ADD_TEMPLATES).format(obj=_article(phrase), place=place, Place=_capital(place))
        target = {"bg": scene["bg"], "objects": [dict(o) for o in objects] + [new]}
        return {"task": task, "instruction": text, "sources": [scene], "target": target,
                "edited": ("object", len(objects), "target"), "requested": color}
    if task == "background":
        new = _words(rng, [c for c in BG_COLORS if c != scene["bg"]["color"]])
        target = {"bg": sample_background(rng, plain=True, color=new), "objects": [dict(o) for o in objects]}
        text = _words(rng, BACKGROUND_TEMPLATES).format(col=_words(rng, COLOR_WORDS[new]))
        return {"task": task, "instruction": text, "sources": [scene], "target": target,
                "edited": ("background", -1, "target"), "requested": new}
    raise ValueError(task)


def edit_rng(split: str, variant: str, index: int) -> np.random.Generator:
    """The generator of edit `index` of a split: seeds never overlap between splits and variants."""
    return np.random.default_rng([SPLITS[split], VARIANTS[variant], index])


def make_edit(split: str, variant: str, index: int, task: str | None = None):
    """Edit `index` of a split. Held-out and validation sets cycle through the tasks; training picks one at random
    (paste on half of the Edit-Plus edits)."""
    rng = edit_rng(split, variant, index)
    tasks = EDIT_TASKS if variant == "edit" else PLUS_TASKS
    if task is None:
        if split == "train":
            if variant == "plus":
                task = "paste" if rng.random() < 0.4 else EDIT_TASKS[rng.integers(4)]
            else:
                task = tasks[rng.integers(len(tasks))]
        else:
            task = tasks[index % len(tasks)]
    e = sample_edit(rng, task)
    e["seed"] = [SPLITS[split], VARIANTS[variant], index]
    return e


# ---------------------------------------------------------------------------------------------------------------
# Rendering (torch, batched)

SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}
BG_ID = {k: i for i, k in enumerate(BG_KINDS)}


def scenes_to_arrays(scenes, k=MAX_OBJECTS):
    """Packs scenes into arrays: obj [n, k, 7] = (shape id or -1, x, y, s, r, g, b), bg [n, 7] = (kind, rgb, rgb2)."""
    obj = np.zeros((len(scenes), k, 7), np.float32)
    obj[:, :, 0] = -1
    bg = np.zeros((len(scenes), 7), np.float32)
    for n, sc in enumerate(scenes):
        for j, o in enumerate(sc["objects"]):
            obj[n, j] = [SHAPE_ID[o["shape"]], o["x"], o["y"], o["s"], *COLORS[o["color"]]]
        b = sc["bg"]
        bg[n] = [BG_ID[b["kind"]], *b["rgb"], *b["rgb2"]]
    return obj, bg


def _coverage(obj, px, py):
    """Anti-aliased coverage [n, k, H, W] of every object slot (0 for empty slots)."""
    shape = obj[..., 0, None, None]
    dx = px - obj[..., 1, None, None]
    dy = py - obj[..., 2, None, None]
    s = obj[..., 3, None, None]
    circle = torch.sqrt(dx * dx + dy * dy) - s
    square = torch.maximum(dx.abs(), dy.abs()) - 0.886 * s
    diamond = (dx.abs() + dy.abs() - 1.253 * s) / math.sqrt(2.0)
    r = 1.4 * s
    c30 = math.sqrt(3.0) / 2
    triangle = torch.maximum(torch.maximum(dy - r / 2, c30 * dx - 0.5 * dy - r / 2), -c30 * dx - 0.5 * dy - r / 2)
    d = torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, triangle, diamond)))
    a = (0.5 - d).clamp(0.0, 1.0)
    return torch.where(shape >= 0, a, torch.zeros_like(a))


def render(obj, bg, size=SIZE, weights=False):
    """Renders packed scenes (torch tensors from `scenes_to_arrays`, any device / float dtype) to float images
    [n, 3, H, W] in 0..255 (rounded half up) and, with `weights`, the share of every pixel that each object slot
    and the background contribute [n, k + 1, H, W] (background last)."""
    dt = obj.dtype
    coords = torch.arange(size, device=obj.device, dtype=dt) + 0.5
    py, px = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    cov = _coverage(obj, px, py)
    n = obj.shape[0]
    kind = bg[:, 0].view(n, 1, 1, 1)
    rgb1, rgb2 = bg[:, 1:4].view(n, 3, 1, 1), bg[:, 4:7].view(n, 3, 1, 1)
    yy, xx = py.view(1, 1, size, 1), px.view(1, 1, 1, size)
    checker = ((torch.floor(xx / CHECKER) + torch.floor(yy / CHECKER)) % 2).expand(n, 1, size, size)
    t = (yy / size).expand(n, 1, size, size)
    img = torch.where(kind == 0, rgb1.expand(n, 3, size, size),
                      torch.where(kind == 1, rgb1 + (rgb2 - rgb1) * checker, rgb1 + (rgb2 - rgb1) * t))
    keep = torch.ones(n, 1, size, size, device=obj.device, dtype=dt)
    shares = []
    for j in range(obj.shape[1]):
        a = cov[:, j:j + 1]
        col = obj[:, j, 4:7].view(n, 3, 1, 1)
        img = img * (1 - a) + col * a
        if weights:
            shares = [w * (1 - a) for w in shares]
            shares.append(a)
        keep = keep * (1 - a)
    img = torch.floor(img + 0.5).clamp(0, 255)
    if not weights:
        return img
    return img, torch.cat(shares + [keep], 1)


def render_scenes(scenes, weights=False):
    """numpy uint8 HWC images (and shares) of a list of scenes, float64 on the CPU (the held-out renderer)."""
    obj, bg = scenes_to_arrays(scenes)
    out = render(torch.from_numpy(obj).double(), torch.from_numpy(bg).double(), weights=weights)
    if weights:
        img, w = out
        return img.permute(0, 2, 3, 1).numpy().astype(np.uint8), w.numpy()
    return out.permute(0, 2, 3, 1).numpy().astype(np.uint8)


def edit_images(e):
    """Renders an edit: (sources [uint8 HWC], target uint8 HWC, mask uint8 HW with 0/128/255)."""
    imgs, shares = render_scenes(e["sources"] + [e["target"]], weights=True)
    kind, idx, which = e["edited"]
    w = shares[-1] if which == "target" else shares[len(e["sources"]) - 1]
    share = w[-1] if kind == "background" else w[idx]
    mask = np.where(share >= 1.0 - 1e-9, 255, np.where(share > 1e-9, 128, 0)).astype(np.uint8)
    return list(imgs[:-1]), imgs[-1], mask


# ---------------------------------------------------------------------------------------------------------------
# Colour and the success rule (docs/quality.md)


def srgb_to_lab(rgb):
    """CIELAB (D65) of sRGB values in 0..255, [..., 3]."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def psnr(a, b, sel=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if sel is not None:
        a, b = a[sel], b[sel]
    if a.size == 0:
        return float("nan")
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def score(output, target, mask, core_rgb=None):
    """Per-edit metrics and the success rule. output/target uint8 HWC, mask uint8 HW (0/128/255)."""
    inside, outside, core = mask > 0, mask == 0, mask == 255
    if core_rgb is None:
        core_rgb = target[core].reshape(-1, 3).astype(np.float64).mean(0)
    out_rgb = output[core].reshape(-1, 3).astype(np.float64).mean(0)
    delta_e = float(np.linalg.norm(srgb_to_lab(out_rgb) - srgb_to_lab(np.asarray(core_rgb, np.float64))))
    p_out = psnr(output, target, outside)
    return {
        "psnr": psnr(output, target), "psnr_inside": psnr(output, target, inside), "psnr_outside": p_out,
        "delta_e": delta_e, "success": bool(delta_e <= DELTA_E_MAX and p_out >= PSNR_OUTSIDE_MIN),
    }


# ---------------------------------------------------------------------------------------------------------------
# Files


HELDOUT_COUNTS = {"edit": {t: 80 for t in EDIT_TASKS},
                  "plus": {"recolor": 25, "remove": 25, "add": 25, "background": 25, "paste": 100}}


def heldout_edits():
    """The held-out set: (variant, index, edit) with fixed seeds (split 'heldout')."""
    out = []
    for variant, counts in HELDOUT_COUNTS.items():
        tasks = [t for t, n in counts.items() for _ in range(n)]
        for i, task in enumerate(tasks):
            out.append((variant, i, make_edit("heldout", variant, i, task)))
    return out


def _save_png(path: Path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path, optimize=True)


def write_set(folder: Path, edits):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for variant, i, e in edits:
        eid = f"{variant}_{i:04d}"
        sources, target, mask = edit_images(e)
        names = []
        for k, s in enumerate(sources):
            names.append(f"images/{eid}_src{k + 1}.png" if len(sources) > 1 else f"images/{eid}_src.png")
            _save_png(folder / names[-1], s)
        _save_png(folder / f"images/{eid}_tgt.png", target)
        _save_png(folder / f"images/{eid}_mask.png", mask)
        core = mask == 255
        lines.append({
            "id": eid, "variant": variant, "task": e["task"], "instruction": e["instruction"], "sources": names,
            "target": f"images/{eid}_tgt.png", "mask": f"images/{eid}_mask.png",
            "requested_color": e["requested"],
            "requested_rgb": list(COLORS[e["requested"]]) if e["requested"] else None,
            "core_rgb": [round(float(v), 3) for v in target[core].reshape(-1, 3).astype(np.float64).mean(0)],
            "core_pixels": int(core.sum()), "edited_pixels": int((mask > 0).sum()),
            "seed": e["seed"], "scenes": {"sources": e["sources"], "target": e["target"]},
        })
    with open(folder / "manifest.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["heldout", "sample"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[2]
    if args.what == "heldout":
        out = args.out or root / "tests/fixtures/proxy/heldout"
        lines = write_set(out, heldout_edits())
        print(f"{len(lines)} edits -> {out}")
    else:
        edits = [(v, i, make_edit("val", v, i)) for v in ["edit", "plus"] for i in range(10)]
        lines = write_set(args.out, edits)
        for line in lines:
            print(line["id"], line["task"], "|", line["instruction"])


if __name__ == "__main__":
    main()
