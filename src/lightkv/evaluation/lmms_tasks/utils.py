"""Document functions of the ``lightkv_shapes`` lmms-eval task (exact-match scoring, per-family accuracy).

A document is one row of test.jsonl: question_id, family, question, answer, image (absolute PNG path).
"""

from __future__ import annotations

from PIL import Image

FAMILIES = ("attribute", "existence", "counting", "spatial", "location")


def shapes_doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def shapes_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # the bare question, as the model was trained on it; the plugin adds the image and the chat template
    return doc["question"]


def normalize(prediction: str) -> str:
    return prediction.strip().lower()


def shapes_process_results(doc: dict, results: list) -> dict:
    score = float(normalize(results[0]) == doc["answer"])
    out = {"exact_match": score}
    # every family metric gets every document; the aggregation keeps its own family's scores
    for family in FAMILIES:
        out[family] = {"family": doc["family"], "score": score, "want": family}
    return out


def shapes_family_mean(items: list) -> float:
    scores = [item["score"] for item in items if item["family"] == item["want"]]
    return sum(scores) / len(scores) if scores else float("nan")
