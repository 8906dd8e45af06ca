"""Which attributes does a bundled model see? Greedy captions ("describe the image") against the truth.

    python scripts/caption_check.py --model src/lightkv/models/tiny-llava-shapes --images 40

Prints a few captions, the share of exactly right captions, and the accuracy of each word slot
(size, color, shape, quadrant) over objects of captions with the right object count.
"""

from __future__ import annotations

import argparse

import torch

from lightkv.evaluation.harness import load_model, prompt_for
from lightkv.evaluation.shapes import describe, make_split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="src/lightkv/models/tiny-llava-shapes")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--show", type=int, default=4)
    args = ap.parse_args()
    model, processor = load_model(args.model)
    prompt = prompt_for(processor)
    end = processor.tokenizer.eos_token
    exact, slots, slot_total = 0, [0, 0, 0, 0], 0
    for i, (scene, _) in enumerate(make_split("val", args.images, 0)):
        inputs = processor(images=[scene.image], text=[prompt("describe the image")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        words = processor.tokenizer.convert_ids_to_tokens(out[0, inputs["input_ids"].shape[1]:].tolist())
        pred = " ".join(words[: words.index(end)] if end in words else words)
        gold = describe(scene)
        exact += pred == gold
        p_objs, g_objs = [o.split() for o in pred.split(" ; ")], [o.split() for o in gold.split(" ; ")]
        if len(p_objs) == len(g_objs):
            for p, g in zip(p_objs, g_objs):
                slot_total += 1
                for k in range(4):
                    slots[k] += len(p) == 4 and p[k] == g[k]
        if i < args.show:
            print(f"model: {pred}\ntruth: {gold}")
    print(f"exact captions: {exact}/{args.images}; objects in captions with the right count: {slot_total}; "
          "slot accuracy: " + " ".join(f"{name} {s / max(1, slot_total):.3f}"
                                      for name, s in zip(("size", "color", "shape", "quadrant"), slots)))


if __name__ == "__main__":
    main()
