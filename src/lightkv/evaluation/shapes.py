"""A procedural visual-QA set ("shapes"): scenes of a few objects on noisy, textured backgrounds.

Deterministic by seed (numpy + Pillow only). Every answer is one word; scoring is exact match.
Question families and their chance levels (uniform guessing over the family's answers):
  attribute  "what color is the circle ?" / "what shape is the red object ?" / "what size is the cross ?"
  existence  "is there a blue square ?" (yes/no, balanced, hard negatives differ in one attribute)
  counting   "how many objects are there ?" (one..four)
  spatial    "where is the circle relative to the square ?" (left/right/above/below)
  location   "where is the triangle ?" (top-left/top-right/bottom-left/bottom-right)
Splits: train, val and test draw from disjoint seed ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "COLORS", "SIZES", "FAMILIES", "CHANCE", "Scene", "Question", "make_scene", "describe", "object_mask",
           "make_questions", "make_split", "vocabulary", "quadrant", "IMAGE_SIZE", "SPLIT_SEEDS"]

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 225),
    "yellow": (235, 215, 40), "purple": (150, 60, 195), "orange": (245, 140, 30),
}
SIZES = {"small": 11, "large": 18}
COUNT_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
FAMILIES = ("attribute", "existence", "counting", "spatial", "location")
CHANCE = {"attribute": (1 / 6 + 1 / 4 + 1 / 2) / 3, "existence": 0.5, "counting": 0.25, "spatial": 0.25,
          "location": 0.25}
# disjoint seed ranges per split
SPLIT_SEEDS = {"train": 0, "val": 10_000_000, "test": 20_000_000}


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float


@dataclass
class Scene:
    objects: list[Obj]
    image: Image.Image = field(repr=False)


@dataclass
class Question:
    family: str
    question: str
    answer: str


def _background(rng: np.random.Generator) -> np.ndarray:
    """Gray-ish base, a smooth gradient or stripes, and pixel noise: mostly redundant, never flat."""
    s = IMAGE_SIZE
    base = rng.uniform(70, 170)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    kind = rng.integers(3)
    if kind == 0:
        angle = rng.uniform(0, 2 * math.pi)
        tex = 25 * (np.cos(angle) * xx + np.sin(angle) * yy)
    elif kind == 1:
        freq = rng.uniform(3, 8)
        angle = rng.uniform(0, math.pi)
        tex = 10 * np.sin(2 * math.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    else:
        tex = np.zeros_like(xx)
    tint = rng.uniform(-12, 12, size=3)
    img = base + tex[..., None] + tint[None, None, :] + rng.normal(0, 9, size=(s, s, 3))
    return np.clip(img, 0, 255)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill=None) -> None:
    r = SIZES[obj.size] / 2
    x, y = obj.x, obj.y
    fill = COLORS[obj.color] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        q = r * 0.85
        draw.rectangle([x - q, y - q, x + q, y + q], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    else:  # cross
        t = r * 0.38
        draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
        draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)


def make_scene(rng: np.random.Generator) -> Scene:
    """1-4 objects of distinct shapes, random colors and sizes, non-overlapping, away from the centre lines."""
    n = int(rng.integers(1, 5))
    shapes = rng.permutation(len(SHAPES))[:n]
    objects: list[Obj] = []
    margin = 10
    for shape_idx in shapes:
        size = ("small", "large")[int(rng.integers(2))]
        for _ in range(200):
            x, y = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
            # keep quadrant questions unambiguous: centres at least 5 px off the middle lines
            if abs(x - IMAGE_SIZE / 2) < 5 or abs(y - IMAGE_SIZE / 2) < 5:
                continue
            if all(math.hypot(x - o.x, y - o.y) > (SIZES[size] + SIZES[o.size]) / 2 + 3 for o in objects):
                break
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        objects.append(Obj(SHAPES[shape_idx], color, size, float(x), float(y)))
    pixels = _background(rng)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return Scene(objects, image)


def object_mask(scene: Scene) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) uint8: 0 on background, i + 1 where object i was drawn (later objects on top)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(scene.objects):
        _draw(draw, obj, fill=i + 1)
    return np.asarray(mask)


def _relation(a: Obj, b: Obj) -> str | None:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(abs(dx) - abs(dy)) < 6:  # ambiguous diagonal
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _existence_text(color: str, shape: str) -> str:
    return f"is there a {color} {shape} ?"


def quadrant(o: Obj) -> str:
    """The object's quadrant of the image by its centre, one of QUADRANTS (the location answers)."""
    top = o.y < IMAGE_SIZE / 2
    left = o.x < IMAGE_SIZE / 2
    return ("top-" if top else "bottom-") + ("left" if left else "right")


def _question(family: str, scene: Scene, rng: np.random.Generator, answer: str | None = None) -> Question | None:
    """One question of ``family`` about the scene, or None when the draw does not fit it; ``answer`` ("yes" or
    "no") fixes the answer of an existence question."""
    objs = scene.objects
    pick = objs[int(rng.integers(len(objs)))]
    if family == "attribute":
        kind = int(rng.integers(3))
        if kind == 0:
            return Question(family, f"what color is the {pick.shape} ?", pick.color)
        if kind == 1:
            if sum(o.color == pick.color for o in objs) > 1:
                return None
            return Question(family, f"what shape is the {pick.color} object ?", pick.shape)
        return Question(family, f"what size is the {pick.shape} ?", pick.size)
    if family == "existence":
        want_yes = rng.random() < 0.5
        if answer is not None:
            want_yes = answer == "yes"
        if want_yes:
            return Question(family, _existence_text(pick.color, pick.shape), "yes")
        present = {(o.color, o.shape) for o in objs}
        for _ in range(20):  # hard negative: change one attribute of a present object
            if rng.random() < 0.5:
                cand = (list(COLORS)[int(rng.integers(len(COLORS)))], pick.shape)
            else:
                cand = (pick.color, SHAPES[int(rng.integers(len(SHAPES)))])
            if cand not in present:
                return Question(family, _existence_text(*cand), "no")
        return None
    if family == "counting":
        return Question(family, "how many objects are there ?", COUNT_WORDS[len(objs)])
    if family == "spatial":
        if len(objs) < 2:
            return None
        i, j = rng.permutation(len(objs))[:2]
        rel = _relation(objs[i], objs[j])
        if rel is None:
            return None
        return Question(family, f"where is the {objs[i].shape} relative to the {objs[j].shape} ?", rel)
    if family == "location":
        return Question(family, f"where is the {pick.shape} ?", quadrant(pick))
    raise ValueError(f"unknown family {family!r}; families are {FAMILIES}")


def describe(scene: Scene) -> str:
    """A dense caption used as an extra training turn: every object's size, color, shape and quadrant,
    in reading order (top to bottom, then left to right by quadrant)."""
    order = sorted(scene.objects, key=lambda o: (QUADRANTS.index(quadrant(o)), o.y, o.x))
    return " ; ".join(f"{o.size} {o.color} {o.shape} {quadrant(o)}" for o in order)


def make_questions(scene: Scene, rng: np.random.Generator, count: int,
                   families: tuple[str, ...] = FAMILIES, existence_answer: str | None = None) -> list[Question]:
    """Up to ``count`` distinct questions about a scene, families drawn uniformly from ``families`` (a family
    listed twice is drawn twice as often), retrying the invalid.

    Existence answers stay balanced: once the scene's yes and no counts differ, the next existence question
    asks for the rarer answer, and none is asked at even counts when every "yes" question has been asked
    (without this, dropping repeated questions drops more "yes" questions, of which a scene has one per
    object, than hard negatives). ``existence_answer`` fixes the answer instead.
    """
    out: list[Question] = []
    seen: set[str] = set()
    yes_no = {"yes": 0, "no": 0}
    for _ in range(count * 8):
        if len(out) == count:
            break
        family = families[int(rng.integers(len(families)))]
        answer = existence_answer
        if family == "existence" and answer is None:
            if yes_no["yes"] != yes_no["no"]:
                answer = min(yes_no, key=yes_no.get)
            elif all(_existence_text(o.color, o.shape) in seen for o in scene.objects):
                continue  # every "yes" question is asked: a "no" now could not be paired
        q = _question(family, scene, rng, answer)
        if q is not None and q.question not in seen:
            seen.add(q.question)
            out.append(q)
            if q.family == "existence":
                yes_no[q.answer] += 1
    return out


def make_split(split: str, num_images: int, questions_per_image: int = 1, start: int = 0
               ) -> list[tuple[Scene, list[Question]]]:
    """Deterministic items of a split: image i uses seed SPLIT_SEEDS[split] + start + i."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    items = []
    for i in range(start, start + num_images):
        rng = np.random.default_rng(SPLIT_SEEDS[split] + i)
        scene = make_scene(rng)
        items.append((scene, make_questions(scene, rng, questions_per_image)))
    return items


def vocabulary() -> list[str]:
    """Every word questions, answers and the chat template can use."""
    words = {"what", "color", "is", "the", "shape", "object", "size", "there", "a", "how", "many", "objects",
             "are", "where", "relative", "to", "?", "USER:", "ASSISTANT:", "describe", "image", ";"}
    words |= set(SHAPES) | set(COLORS) | set(SIZES) | set(COUNT_WORDS) | set(RELATIONS) | set(QUADRANTS)
    words |= {"yes", "no"}
    return sorted(words)
