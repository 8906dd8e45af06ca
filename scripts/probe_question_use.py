"""Does a bundled model read the question's object words, or answer from the image and priors alone?

    python scripts/probe_question_use.py --model src/lightkv/models/tiny-llava-shapes

Prints (1) accuracy per family split by the number of objects in the scene (val split): a model that never looks
up the named object gets location right about 1/n of the time with n objects; (2) how much the answer
distribution moves when only the object word of the question changes ("circle" -> "cross", "red circle" ->
"blue square"), against when the question type changes ("color" -> "size"), as the mean total-variation
distance over images.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from lightkv.evaluation.harness import load_model, prompt_for
from lightkv.evaluation.shapes import SPLIT_SEEDS, make_questions, make_scene

SWAPS = [("is there a red circle ?", "is there a blue square ?"),
         ("what color is the circle ?", "what color is the cross ?"),
         ("where is the circle ?", "where is the triangle ?"),
         ("what color is the circle ?", "what size is the circle ?")]


@torch.no_grad()
def last_logits(model, processor, texts, images):
    fmt = prompt_for(processor)
    inputs = processor(images=images, text=[fmt(t) for t in texts], return_tensors="pt", padding=True)
    return model(**inputs, logits_to_keep=1).logits[:, -1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="src/lightkv/models/tiny-llava-shapes", help="a bundled model folder")
    ap.add_argument("--images", type=int, default=400)
    args = ap.parse_args()
    model, processor = load_model(args.model)
    tokenizer = processor.tokenizer
    print("accuracy by number of objects (val split; (accuracy, questions))")
    for family in ("attribute", "existence", "spatial", "location"):
        items = []
        for i in range(args.images):
            rng = np.random.default_rng(SPLIT_SEEDS["val"] + 9000 + i)
            scene = make_scene(rng)
            questions = make_questions(scene, rng, 1, families=(family,))
            if questions:
                items.append((scene, questions[0]))
        hits = defaultdict(list)
        for j in range(0, len(items), 50):
            chunk = items[j : j + 50]
            logits = last_logits(model, processor, [q.question for _, q in chunk], [s.image for s, _ in chunk])
            for pred, (scene, q) in zip(tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), chunk):
                hits[len(scene.objects)].append(pred == q.answer)
        print(f"  {family:9s}", {n: (round(float(np.mean(v)), 2), len(v)) for n, v in sorted(hits.items())})
    print("answer change when one question word changes (mean total variation over 16 val images)")
    rng = np.random.default_rng(SPLIT_SEEDS["val"] + 5)
    images = [make_scene(rng).image for _ in range(16)]
    for a, b in SWAPS:
        pa = last_logits(model, processor, [a] * len(images), images).softmax(-1)
        pb = last_logits(model, processor, [b] * len(images), images).softmax(-1)
        tv = 0.5 * (pa - pb).abs().sum(-1).mean().item()
        print(f"  {a!r} -> {b!r}: {tv:.4f}")


if __name__ == "__main__":
    main()
