"""Train the bundled LLaVA-architecture model from scratch on the procedural shapes QA set (CPU, seeded).

    python scripts/train_tiny_llava.py --out models/tiny-llava-shapes

Each training sequence is one image followed by several question/answer turns (half of them also hold a
dense caption turn, "describe the image"); the loss covers the answer words and the closing </s>. The weights are saved as fp32 safetensors (about 16 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lightkv.evaluation.shapes import (COLORS, FAMILIES, SHAPES, SIZES, SPLIT_SEEDS, describe, make_questions,
                                      make_scene, make_split, object_mask)
from lightkv.evaluation.tiny_model import build_config, build_processor


def encode_sequence(tokenizer, image_token_id, n_image_tokens, qas):
    """input ids and labels for '<s> USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ...' (answers may be
    several words: the dense caption turn)."""
    tok = tokenizer.convert_tokens_to_ids
    ids, labels = [tok("<s>")], [-100]
    for i, (question, answer) in enumerate(qas):
        words = ["USER:"] + (["<image>"] if i == 0 else []) + question.split() + ["ASSISTANT:"]
        for w in words:
            if w == "<image>":
                ids += [image_token_id] * n_image_tokens
                labels += [-100] * n_image_tokens
            else:
                ids.append(tok(w))
                labels.append(-100)
        answer_ids = [tok(w) for w in answer.split()] + [tok("</s>")]
        ids += answer_ids
        labels += answer_ids
    return ids, labels


def make_batch(processor, config, rng, batch_size, max_qas, caption_rate=0.5):
    tokenizer = processor.tokenizer
    n_img = config.image_seq_length
    images, seqs, patch_labels = [], [], []
    for _ in range(batch_size):
        scene = make_scene(rng)
        count = int(rng.integers(1, max_qas + 1))
        qas = [(q.question, q.answer) for q in make_questions(scene, rng, count)]
        if rng.random() < caption_rate:
            # a dense caption turn (every object's attributes and quadrant) at a random place in the sequence:
            # far more supervision per image than one-word answers, so the vision tower learns to see sooner
            qas.insert(int(rng.integers(len(qas) + 1)), ("describe the image", describe(scene)))
        images.append(scene.image)
        patch_labels.append(patch_targets(scene, config.vision_config.patch_size))
        seqs.append(encode_sequence(tokenizer, config.image_token_id, n_img, qas))
    length = max(len(s[0]) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((batch_size, length), pad)
    labels = torch.full((batch_size, length), -100)
    mask = torch.zeros(batch_size, length, dtype=torch.long)
    for b, (ids, lab) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return ({"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values, "labels": labels},
            torch.stack(patch_labels))


AUX_CLASSES = (1 + len(COLORS), 1 + len(SHAPES), 1 + len(SIZES), 4)  # color, shape, size (0 = background), quadrant


def patch_targets(scene, patch):
    """(P, 4) long per-patch targets of the auxiliary vision loss: the object under the patch centre (its
    color, shape and size; 0 on background) and the patch's quadrant of the image."""
    mask = object_mask(scene)
    side = mask.shape[0] // patch
    centre = mask[patch // 2 :: patch, patch // 2 :: patch][:side, :side].reshape(-1)
    color = np.zeros_like(centre, dtype=np.int64)
    shape = np.zeros_like(color)
    size = np.zeros_like(color)
    for i, obj in enumerate(scene.objects):
        at = centre == i + 1
        color[at] = 1 + list(COLORS).index(obj.color)
        shape[at] = 1 + SHAPES.index(obj.shape)
        size[at] = 1 + list(SIZES).index(obj.size)
    rows, cols = np.divmod(np.arange(side * side), side)
    quadrant = (rows >= side // 2) * 2 + (cols >= side // 2)
    return torch.from_numpy(np.stack([color, shape, size, quadrant], axis=1))


@torch.no_grad()
def quick_eval(model, processor, items, batch_size=50):
    """Accuracy per family of the first-token answer on (scene, [question]) items."""
    tokenizer = processor.tokenizer
    model.eval()
    correct, total = {f: 0 for f in FAMILIES}, {f: 0 for f in FAMILIES}
    flat = [(s, q) for s, qs in items for q in qs]
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        texts = [f"<s> USER: <image> {q.question} ASSISTANT:" for _, q in chunk]
        inputs = processor(images=[s.image for s, _ in chunk], text=texts, return_tensors="pt", padding=True)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        pred = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for p, (_, q) in zip(pred, chunk):
            total[q.family] += 1
            correct[q.family] += int(p == q.answer)
    model.train()
    acc = {f: correct[f] / max(1, total[f]) for f in FAMILIES}
    acc["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    return acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/tiny-llava-shapes")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-qas", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--caption-rate", type=float, default=0.5, help="share of sequences with a caption turn")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary vision loss")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(SPLIT_SEEDS["train"] + args.seed)
    processor = build_processor()
    config = build_config(processor.tokenizer)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    model.train()
    # Auxiliary dense loss on the vision features the projector reads (CLIP's vision_feature_layer output):
    # a linear head predicts, per patch, the object under it and the patch's quadrant. It teaches the tower
    # what is where long before the language loss alone would; the head is not part of the saved model.
    encoder_layers = model.model.vision_tower.encoder.layers
    feature_layer = encoder_layers[config.vision_feature_layer]
    captured = {}
    feature_layer.register_forward_hook(lambda m, a, out: captured.__setitem__("x", out[0] if isinstance(out, tuple)
                                                                                  else out))
    aux_head = torch.nn.Linear(config.vision_config.hidden_size, sum(AUX_CLASSES))
    # The vision tower and projector get a lower learning rate: at the language model's rate their residual
    # stream grew to ~1000x the text embeddings' norm within a few hundred steps and the model stopped using
    # the image (answers at the language prior).
    groups = []
    groups.append({"params": list(aux_head.parameters()), "weight_decay": 0.0, "lr": args.vision_lr})
    for is_vision in (False, True):
        params = [(n, p) for n, p in model.named_parameters()
                  if ("vision_tower" in n or "multi_modal_projector" in n) == is_vision]
        lr = args.vision_lr if is_vision else args.lr
        groups.append({"params": [p for n, p in params if p.dim() >= 2], "weight_decay": 0.05, "lr": lr})
        groups.append({"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    val_items = make_split("val", args.eval_images, 1)
    log = {"args": vars(args), "steps": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    running = aux_running = None
    for step in range(1, args.steps + 1):
        batch, patch_labels = make_batch(processor, config, rng, args.batch_size, args.max_qas, args.caption_rate)
        lm_loss = model(**batch).loss
        aux_logits = aux_head(captured["x"][:, 1:])  # (B, P, sum(AUX_CLASSES)), CLS dropped
        aux_loss = sum(torch.nn.functional.cross_entropy(part.reshape(-1, part.shape[-1]), patch_labels[..., k].reshape(-1))
                       for k, part in enumerate(aux_logits.split(AUX_CLASSES, dim=-1)))
        loss = lm_loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = lm_loss.item() if running is None else 0.95 * running + 0.05 * lm_loss.item()
        aux_running = aux_loss.item() if step == 1 else 0.95 * aux_running + 0.05 * aux_loss.item()
        if step % 25 == 0:
            print(f"step {step} loss {running:.4f} aux {aux_running:.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s",
                  flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = quick_eval(model, processor, val_items)
            with torch.no_grad():
                feats = model.model.get_image_features(pixel_values=batch["pixel_values"][:4]).pooler_output
                feat_norm = float(torch.stack(list(feats)).norm(dim=-1).mean())
            log["steps"].append({"step": step, "loss": running, "aux_loss": aux_running,
                                 "seconds": time.time() - start, "val": acc,
                                 "image_feature_norm": feat_norm})
            print(f"  val {json.dumps({k: round(v, 3) for k, v in acc.items()})} feature norm {feat_norm:.2f}",
                  flush=True)
            model.save_pretrained(out, safe_serialization=True)
            processor.save_pretrained(out)
            (out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
