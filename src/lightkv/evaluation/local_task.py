"""The shapes test split as a local lmms-eval task: images, a jsonl data set and a task YAML in one folder.

The questions are ``harness.question_set(per_family)``, the ones ``lightkv demo`` / ``compare`` and
``harness.evaluate`` use, in the same order (``question_id`` = index). Nothing is downloaded: lmms-eval reads
test.jsonl with the ``json`` builder, and the task's document functions open the PNGs.

    folder = write_shapes_task("out/shapes-task", per_family=20)
    # lmms-eval --include_path out/shapes-task --tasks lightkv_shapes --model lightkv --model_args pretrained=...
"""

from __future__ import annotations

import json
from pathlib import Path

from .harness import question_set

__all__ = ["TASK_NAME", "TEMPLATE", "write_shapes_task", "read_shapes_task"]

TASK_NAME = "lightkv_shapes"
TEMPLATE = Path(__file__).resolve().parent / "lmms_tasks" / "lightkv_shapes.yaml"


def write_shapes_task(folder: str | Path, per_family: int = 20, split: str = "test", task: str = TASK_NAME) -> Path:
    """Write ``per_family`` questions of each family of ``split`` as an lmms-eval task named ``task``.

    Creates folder/images/<id>.png, folder/test.jsonl and folder/<task>.yaml (which includes the packaged
    template ``lmms_tasks/lightkv_shapes.yaml``). Returns the folder, to pass to ``--include_path``.
    """
    if isinstance(per_family, bool) or not isinstance(per_family, int) or per_family < 1:
        raise ValueError(f"per_family must be an integer >= 1, got {per_family!r}")
    if not task.isidentifier():
        raise ValueError(f"task must be a plain name (letters, digits, _), got {task!r}")
    folder = Path(folder).resolve()
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (scene, question) in enumerate(question_set(per_family, split=split)):
        path = images / f"{index:05d}.png"
        scene.image.save(path)
        rows.append({"question_id": index, "family": question.family, "question": question.question,
                     "answer": question.answer, "image": str(path)})
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # `include` takes an absolute path; data_files is resolved against this YAML's folder by lmms-eval
    (folder / f"{task}.yaml").write_text(
        f"include: {json.dumps(str(TEMPLATE))}\n"
        f"task: {task}\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: test.jsonl\n")
    return folder


def read_shapes_task(folder: str | Path) -> list[dict]:
    """The rows of a folder written by ``write_shapes_task``, in question_id order."""
    lines = (Path(folder) / "test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
