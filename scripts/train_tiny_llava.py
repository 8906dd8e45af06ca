"""Train a bundled model from scratch on the procedural shapes QA set (seeded; CPU by default).

    python scripts/train_tiny_llava.py --arch llava --out src/lightkv/models/tiny-llava-shapes
    python scripts/train_tiny_llava.py --arch qwen2.5-vl --out src/lightkv/models/tiny-qwen2.5-vl-shapes

--arch llava: transformers LlavaForConditionalGeneration (CLIP tower, projector, Llama decoder);
--arch qwen2.5-vl: Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL tower with window attention and 2x2 patch
merging, M-RoPE decoder). Both see 16 x 16 = 256 vision tokens per 64 px image and share the decoder size.

Each training sequence is one image followed by several isolated question/answer turns (some sequences also
hold a dense caption turn, "describe the image"); the loss covers the answer words and the closing </s>, plus
training-only auxiliary losses (per-patch vision targets, word-embedding alignment, the grounding probe). The
weights are saved as fp32 safetensors (about 18 MB). The defaults are not the bundled recipe: the exact command
of the bundled model is in its training_log.json ("args") and in docs/results/training-sweep/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lightkv.evaluation.shapes import (COLORS, FAMILIES, QUADRANTS, SHAPES, SIZES, SPLIT_SEEDS, describe, make_questions,
                                      make_scene, make_split, object_mask, quadrant)
from lightkv.evaluation.tiny_model import (QwenShapesProcessor, build_config, build_processor, build_qwen_config,
                                          build_qwen_image_processor, format_prompt, format_qwen_prompt,
                                          QWEN_MERGE_SIZE, QWEN_PATCH_SIZE)


class Arch:
    """What differs between the two bundled architectures: model class, processor, chat layout, features."""

    def __init__(self, name: str, patch_size: int | None = None, merge_size: int | None = None, **shape):
        self.name = name
        if name == "llava":
            from transformers import LlavaForConditionalGeneration

            if patch_size is not None or merge_size is not None:
                raise ValueError("--qwen-patch-size / --qwen-merge-size apply to --arch qwen2.5-vl only")
            self.processor = build_processor()
            self.config = build_config(self.processor.tokenizer, **shape)
            self.model_class = LlavaForConditionalGeneration
            self.prompt = format_prompt
            # '<s> USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...'
            self.start, self.user, self.image = ["<s>"], ["USER:"], ["<image>"]
            self.assistant, self.end = ["ASSISTANT:"], "</s>"
            self.image_token_id = self.config.image_token_id
        elif name == "qwen2.5-vl":
            from transformers import Qwen2_5_VLForConditionalGeneration

            # patch and merge sizes with patch * merge = 4 px keep the 16 x 16 grid of 256 tokens an image
            patch = QWEN_PATCH_SIZE if patch_size is None else patch_size
            merge = QWEN_MERGE_SIZE if merge_size is None else merge_size
            if patch * merge != 4:
                raise ValueError("--qwen-patch-size x --qwen-merge-size must be 4 px (a 16 x 16 token grid)")
            self.processor = QwenShapesProcessor(image_processor=build_qwen_image_processor(patch, merge))
            self.config = build_qwen_config(self.processor.tokenizer, patch_size=patch, merge_size=merge, **shape)
            self.model_class = Qwen2_5_VLForConditionalGeneration
            self.prompt = format_qwen_prompt
            # '<|im_start|> user <|vision_start|><|image_pad|>...<|vision_end|> q1 <|im_end|> <|im_start|> assistant
            #  a1 <|im_end|> <|im_start|> user q2 <|im_end|> ...'
            self.start, self.user = [], ["<|im_start|>", "user"]
            self.image = ["<|vision_start|>", "<image>", "<|vision_end|>"]
            self.assistant, self.end = ["<|im_end|>", "<|im_start|>", "assistant"], "<|im_end|>"
            self.image_token_id = self.config.image_token_id
        else:
            raise ValueError(f"unknown --arch {name!r}: llava or qwen2.5-vl")

    def feature_hooks(self, model, captured):
        """Record, for the auxiliary losses, the per-token image features (B, 256, D) the vision loss reads
        ("x") and the same tokens in the decoder's embedding space ("projected", the alignment loss)."""
        if self.name == "llava":
            # CLIP's vision_feature_layer output, CLS dropped (what the projector reads), and the projector's output
            layer = model.model.vision_tower.encoder.layers[self.config.vision_feature_layer]
            layer.register_forward_hook(
                lambda m, a, out: captured.__setitem__("x", (out[0] if isinstance(out, tuple) else out)[:, 1:]))
            model.model.multi_modal_projector.register_forward_hook(
                lambda m, a, out: captured.__setitem__("projected", out))
            return

        # Qwen: the merged tokens in raster order (the tower's pooler_output) are both
        def record(m, a, out):
            merged = out.pooler_output.reshape(-1, 256, out.pooler_output.shape[-1])
            captured["x"] = captured["projected"] = merged

        model.model.visual.register_forward_hook(record)

    def attribute_word_ids(self) -> list[torch.Tensor]:
        """Token ids of the color, shape, size and quadrant words, in the auxiliary targets' class order."""
        tok = self.processor.tokenizer.convert_tokens_to_ids
        return [torch.tensor([tok(w) for w in words]) for words in (list(COLORS), SHAPES, list(SIZES), QUADRANTS)]

    def feature_dim(self) -> int:
        return self.config.vision_config.hidden_size if self.name == "llava" else self.config.vision_config.out_hidden_size


def encode_sequence(arch: Arch, n_image_tokens, qas):
    """One image and several question/answer turns packed in one sequence (answers may be several words: the
    dense caption turn); the loss covers the answer words and the turn's end token.

    Returns ids, labels, segment (0: the shared prefix with the image, k: turn k), position and the index of
    each turn's first token. Each turn is
    laid out as if it were the only one: it starts at the position right after the prefix and, through the
    attention mask built in make_batch, sees only the prefix and itself. So every turn is exactly the
    evaluation prompt followed by its answer, and no turn can copy an answer from another turn's text (with
    plain concatenation, answers after a caption turn could be read off the caption instead of the image).
    """
    tok = arch.processor.tokenizer.convert_tokens_to_ids
    ids, labels = [], []
    for w in arch.start + arch.user + arch.image:
        ids += [arch.image_token_id] * n_image_tokens if w == "<image>" else [tok(w)]
    labels = [-100] * len(ids)
    segment = [0] * len(ids)
    position = list(range(len(ids)))
    prefix = len(ids)
    starts = []
    for k, (question, answer) in enumerate(qas, start=1):
        starts.append(len(ids))
        prompt = [tok(w) for w in question.split() + arch.assistant]
        answer_ids = [tok(w) for w in answer.split()] + [tok(arch.end)]
        ids += prompt + answer_ids
        labels += [-100] * len(prompt) + answer_ids
        segment += [k] * (len(prompt) + len(answer_ids))
        position += list(range(prefix, prefix + len(prompt) + len(answer_ids)))
    return ids, labels, segment, position, starts


# present, color, shape, size, quadrant, row, column of the object a question word names
GROUND_CLASSES = (2, len(COLORS), len(SHAPES), len(SIZES), 4, 16, 16)


def grounding_targets(scene, question: str) -> list[tuple[int, list[int]]]:
    """(word index, targets) for the question words that name an object: the shape word (or, in "what shape is
    the <color> object", the color word; in an existence question, its last word) with the named object's
    attributes and place, or only "absent" when no object matches."""
    words = question.split()

    def targets(o):
        row, col = min(15, int(o.y) // 4), min(15, int(o.x) // 4)
        return [1, list(COLORS).index(o.color), SHAPES.index(o.shape), list(SIZES).index(o.size),
                QUADRANTS.index(quadrant(o)), row, col]

    if words[:3] == ["is", "there", "a"]:
        match = [o for o in scene.objects if o.color == words[3] and o.shape == words[4]]
        return [(4, targets(match[0]) if match else [0] + [-100] * 6)]
    if words[:2] == ["what", "shape"]:
        return [(4, targets(next(o for o in scene.objects if o.color == words[4])))]
    by_shape = {o.shape: o for o in scene.objects}
    return [(i, targets(by_shape[w])) for i, w in enumerate(words) if w in by_shape]


def grounding_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the grounding head on the marked question words (targets -100 elsewhere)."""
    total = logits.new_zeros(())
    marked = targets[..., 0] >= 0
    if not marked.any():
        return total
    for k, part in enumerate(logits[marked].split(GROUND_CLASSES, dim=-1)):
        target = targets[marked][:, k]
        if (target >= 0).any():  # (absent objects have no attributes)
            total = total + torch.nn.functional.cross_entropy(part[target >= 0], target[target >= 0])
    return total


def turn_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, N) bool attention mask for packed turns: causal, and a token of turn k sees the prefix
    (segment 0) and turn k only; padding (segment -1) sees only itself."""
    n = segment.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    mask = causal & ((seg_k == 0) | (seg_k == seg_q)) & (seg_q >= 0) & (seg_k >= 0)
    mask |= torch.eye(n, dtype=torch.bool)
    return mask[:, None]


def mrope_positions(input_ids: torch.Tensor, position: torch.Tensor, image_token_id: int, side: int) -> torch.Tensor:
    """(3, B, N) Qwen2-VL M-RoPE positions of packed sequences with one side x side image in the prefix: text
    tokens get their position on all three axes, image tokens (start, start + row, start + column), and text
    after the image continues from start + side (the layout get_rope_index gives one unpacked prompt)."""
    first = (input_ids == image_token_id).int().argmax(-1, keepdim=True)  # (B, 1)
    out = position.clone().unsqueeze(0).repeat(3, 1, 1)
    is_image = input_ids == image_token_id
    offset = position - first
    out[1] = torch.where(is_image, first + offset // side, out[1])
    out[2] = torch.where(is_image, first + offset % side, out[2])
    out[0] = torch.where(is_image, first.expand_as(position), out[0])
    after = position >= first + side * side
    return torch.where(after.unsqueeze(0), out - (side * side - side), out)


def make_batch(arch: Arch, rng, batch_size, max_qas, caption_rate=0.5, min_qas=1, families=FAMILIES):
    processor, patch = arch.processor, 4  # one vision token covers 4 x 4 pixels in both architectures
    tokenizer = processor.tokenizer
    images, seqs, patch_labels, grounds = [], [], [], []
    for _ in range(batch_size):
        scene = make_scene(rng)
        count = int(rng.integers(min_qas, max_qas + 1))
        qas = [(q.question, q.answer) for q in make_questions(scene, rng, count, families)]
        if rng.random() < caption_rate:
            # a dense caption turn (every object's attributes and quadrant): far more supervision per image
            # than one-word answers, so the vision tower learns to see sooner
            qas.insert(int(rng.integers(len(qas) + 1)), ("describe the image", describe(scene)))
        images.append(scene.image)
        patch_labels.append(patch_targets(scene, patch))
        seqs.append(encode_sequence(arch, 256, qas))
        grounds.append([(start + i, t) for start, (question, _) in zip(seqs[-1][4], qas)
                        for i, t in grounding_targets(scene, question)])
    length = max(len(s[0]) for s in seqs)
    input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
    labels = torch.full((batch_size, length), -100)
    segment = torch.full((batch_size, length), -1)
    position = torch.zeros(batch_size, length, dtype=torch.long)
    ground = torch.full((batch_size, length, len(GROUND_CLASSES)), -100)
    for b, (ids, lab, seg, pos, _) in enumerate(seqs):
        for i, t in grounds[b]:
            ground[b, i] = torch.tensor(t)
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        segment[b, : len(seg)] = torch.tensor(seg)
        position[b, : len(pos)] = torch.tensor(pos)
    batch = {"input_ids": input_ids, "attention_mask": turn_mask(segment), "labels": labels}
    vision = processor.image_processor(images, return_tensors="pt")
    batch["pixel_values"] = vision["pixel_values"]
    if arch.name == "llava":
        batch["position_ids"] = position
    else:
        batch["image_grid_thw"] = vision["image_grid_thw"]
        batch["mm_token_type_ids"] = (input_ids == arch.image_token_id).to(torch.int32)
        batch["position_ids"] = mrope_positions(input_ids, position, arch.image_token_id, 16)
    return batch, torch.stack(patch_labels), ground


# color, shape, size (0 = background), quadrant, row, column of the patch
AUX_CLASSES = (1 + len(COLORS), 1 + len(SHAPES), 1 + len(SIZES), 4, 16, 16)


def patch_targets(scene, patch):
    """(P, 6) long per-patch targets of the auxiliary vision loss: the object under the patch centre (its
    color, shape and size; 0 on background), the patch's quadrant of the image, its row and its column."""
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
    return torch.from_numpy(np.stack([color, shape, size, quadrant, rows, cols], axis=1))


def auxiliary_loss(logits: torch.Tensor, labels: torch.Tensor, balance: bool) -> torch.Tensor:
    """Sum over the four per-patch targets of the cross-entropy; with ``balance``, the mean over object
    patches and the mean over background patches weigh half each."""
    total = logits.new_zeros(())
    is_object = (labels[..., 0] > 0).reshape(-1).float()
    for k, part in enumerate(logits.split(AUX_CLASSES, dim=-1)):
        ce = torch.nn.functional.cross_entropy(part.reshape(-1, part.shape[-1]), labels[..., k].reshape(-1),
                                               reduction="none")
        if balance:
            obj = (ce * is_object).sum() / is_object.sum().clamp(min=1)
            bg = (ce * (1 - is_object)).sum() / (1 - is_object).sum().clamp(min=1)
            total = total + 0.5 * (obj + bg)
        else:
            total = total + ce.mean()
    return total


def alignment_loss(projected: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor,
                   word_ids: list[torch.Tensor], temperature: float = 10.0) -> torch.Tensor:
    """Image features aligned with the decoder's word embeddings (the role of LLaVA's stage-1 alignment, which
    a from-scratch model lacks): on object patches, the cosine similarity between the projected feature and
    the embedding of each color / shape / size / quadrant word, scaled, must pick the patch's own word."""
    is_object = labels[..., 0] > 0
    x = torch.nn.functional.normalize(projected[is_object], dim=-1)
    total = projected.new_zeros(())
    for k, ids in enumerate(word_ids):
        words = torch.nn.functional.normalize(embeddings[ids.to(embeddings.device)], dim=-1)
        target = labels[is_object][:, k] - (1 if k < 3 else 0)  # color/shape/size classes start at 1
        total = total + torch.nn.functional.cross_entropy(temperature * x @ words.T, target)
    return total


def tie_query_key_init(model, scale: float) -> None:
    """Start every decoder query head with the weights of the key head it reads (scaled): q.k is then a
    positive form of the two tokens' hidden states, so a question word attends to the image tokens that
    resemble it from the first step (with the alignment loss, the tokens of the object it names) instead of
    waiting for gradient descent to find that match."""
    text = model.config.get_text_config()
    group = text.num_attention_heads // text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            attn.k_proj.weight.mul_(scale)
            keys = attn.k_proj.weight.view(text.num_key_value_heads, head_dim, -1)
            attn.q_proj.weight.copy_(keys.repeat_interleave(group, dim=0).reshape_as(attn.q_proj.weight))


def is_vision_parameter(name: str) -> bool:
    """The vision tower and projector (LLaVA) or the visual tower with its merger (Qwen2.5-VL)."""
    return any(part in name for part in ("vision_tower", "multi_modal_projector", "visual"))


def image_batch(arch: Arch, rng, batch_size):
    """Images only, with their per-patch targets (the vision warm-up phase)."""
    scenes = [make_scene(rng) for _ in range(batch_size)]
    vision = arch.processor.image_processor([s.image for s in scenes], return_tensors="pt")
    inputs = {"pixel_values": vision["pixel_values"]}
    if arch.name != "llava":
        inputs["image_grid_thw"] = vision["image_grid_thw"]
    return inputs, torch.stack([patch_targets(s, 4) for s in scenes])


def patch_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of the auxiliary head on object patches, per target (color, shape, size) and quadrant."""
    is_object = labels[..., 0] > 0
    out = {}
    names = ("color", "shape", "size", "quadrant", "row", "column")
    for k, (name, part) in enumerate(zip(names, logits.split(AUX_CLASSES, -1))):
        hit = part.argmax(-1) == labels[..., k]
        out[name] = float(hit[is_object].float().mean())
    return out


def vision_warmup(model, arch: Arch, aux_head, captured, args, device, log, word_ids):
    """Train the vision tower (and projector) with the auxiliary per-patch loss alone before the language
    model sees it: LLaVA-style models start from a pretrained vision encoder, and the bundled models, trained
    from scratch, otherwise learn to tell shapes apart (circle / square / cross outlines inside 4 px patches)
    only slowly through the language loss. Costs a fraction of a full step per batch (no decoder)."""
    params = [p for n, p in model.named_parameters() if is_vision_parameter(n)]
    params += list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.warmup_lr, weight_decay=0.05, betas=(0.9, 0.98))
    steps = args.vision_warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = np.random.default_rng(SPLIT_SEEDS["train"] + args.seed + 1)
    val_rng = np.random.default_rng(SPLIT_SEEDS["val"])
    val_inputs, val_labels = image_batch(arch, val_rng, 64)
    start = time.time()
    for step in range(1, steps + 1):
        inputs, labels = image_batch(arch, rng, args.warmup_batch)
        model.model.get_image_features(**{k: v.to(device) for k, v in inputs.items()})
        labels = labels.to(device)
        loss = auxiliary_loss(aux_head(captured["x"]), labels, True)
        if args.align_weight:
            embeddings = model.get_input_embeddings().weight.detach()  # fixed targets while the decoder waits
            loss = loss + args.align_weight * alignment_loss(captured["projected"], labels, embeddings, word_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                model.model.get_image_features(**{k: v.to(device) for k, v in val_inputs.items()})
                acc = patch_accuracy(aux_head(captured["x"]).cpu(), val_labels)
            log.setdefault("vision_warmup", []).append({"step": step, "loss": loss.item(), "val_patch_accuracy": acc,
                                                        "seconds": time.time() - start})
            print(f"vision warm-up {step} loss {loss.item():.3f} object-patch accuracy "
                  + " ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" {time.time() - start:.0f}s", flush=True)


@torch.no_grad()
def quick_eval(model, arch: Arch, items, device, batch_size=50):
    """Accuracy per family of the first-token answer on (scene, [question]) items."""
    processor = arch.processor
    tokenizer = processor.tokenizer
    model.eval()
    correct, total = {f: 0 for f in FAMILIES}, {f: 0 for f in FAMILIES}
    flat = [(s, q) for s, qs in items for q in qs]
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        texts = [arch.prompt(q.question) for _, q in chunk]
        inputs = processor(images=[s.image for s, _ in chunk], text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
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
    ap.add_argument("--arch", default="llava", choices=["llava", "qwen2.5-vl"])
    ap.add_argument("--out", default=None, help="default: src/lightkv/models/tiny-<arch>-shapes")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-qas", type=int, default=10)
    ap.add_argument("--min-qas", type=int, default=1, help="question turns per image: uniform in [min, max]")
    ap.add_argument("--family-weights", default="",
                    help="how often each question family is drawn, e.g. 'existence=2,spatial=2' (default 1 each)")
    ap.add_argument("--init-from", default=None, help="start from these weights (no vision warm-up); for pilots")
    ap.add_argument("--init-vision-from", default=None,
                    help="take the vision tower and projector from this model (no vision warm-up); for pilots")
    ap.add_argument("--align-weight", type=float, default=0.0,
                    help="weight of the loss aligning image features with the decoder's word embeddings")
    ap.add_argument("--ground-weight", type=float, default=0.0,
                    help="weight of the grounding loss: a probe on a middle decoder layer must tell, at each question "
                         "word that names an object, whether it is there and its attributes and place")
    ap.add_argument("--ground-layer", type=int, default=3, help="decoder layer whose output the probe reads")
    ap.add_argument("--qk-tied-init", type=float, default=0.0,
                    help="start query heads as copies of their key heads, weights scaled by this (0: off)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--caption-rate", type=float, default=0.5, help="share of sequences with a caption turn")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary vision loss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    ap.add_argument("--heads", type=int, default=6, help="decoder attention heads (hidden size 192)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--qwen-patch-size", type=int, default=None,
                    help="Qwen2.5-VL tower patch size in px (default 2; patch x merge must be 4)")
    ap.add_argument("--qwen-merge-size", type=int, default=None,
                    help="Qwen2.5-VL spatial merge size (default 2: 2 x 2 patches a token; 1: a patch a token)")
    ap.add_argument("--vision-warmup-steps", type=int, default=0,
                    help="steps of vision-only training (auxiliary per-patch loss) before the full model's")
    ap.add_argument("--warmup-batch", type=int, default=32)
    ap.add_argument("--warmup-lr", type=float, default=1e-3)
    ap.add_argument("--freeze-vision-after", type=int, default=0,
                    help="stop training the vision tower and projector after this many steps (0: never); the "
                         "Qwen2.5-VL tower's backward (1,024 patches an image at 2 px) is a third of a step on the CPU")
    ap.add_argument("--aux-balance", action="store_true",
                    help="auxiliary loss: object and background patches weigh half each (objects cover ~10%%)")
    args = ap.parse_args()
    out = Path(args.out or f"src/lightkv/models/tiny-{args.arch}-shapes")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(SPLIT_SEEDS["train"] + args.seed)
    arch = Arch(args.arch, heads=args.heads, kv_heads=args.kv_heads, rope_theta=args.rope_theta,
                vision_layers=args.vision_layers, patch_size=args.qwen_patch_size, merge_size=args.qwen_merge_size)
    model = arch.model_class(arch.config) if args.init_from is None else arch.model_class.from_pretrained(args.init_from)
    if args.init_vision_from:
        donor = arch.model_class.from_pretrained(args.init_vision_from).state_dict()
        missing = model.load_state_dict({k: v for k, v in donor.items() if is_vision_parameter(k)}, strict=False)
        print(f"vision tower and projector from {args.init_vision_from} ({len(missing.missing_keys)} decoder tensors new)")
    if args.qk_tied_init:
        tie_query_key_init(model, args.qk_tied_init)
    model.set_attn_implementation("sdpa")
    model.to(device).train()
    # Auxiliary dense loss on the image features the decoder reads: a linear head predicts, per vision token,
    # the object under it and the token's quadrant. It teaches the tower what is where long before the
    # language loss alone would; the head is not part of the saved model.
    captured = {}
    arch.feature_hooks(model, captured)
    word_ids = arch.attribute_word_ids()
    aux_head = torch.nn.Linear(arch.feature_dim(), sum(AUX_CLASSES)).to(device)
    # Grounding probe (dropped after training like aux_head): the question words that name an object learn to
    # look it up in the image by a middle layer, so the answer position only has to read them; without it the
    # decoder ignored those words (swapping "circle" for "cross" changed no answer) and answered from priors.
    ground_head = torch.nn.Linear(arch.config.get_text_config().hidden_size, sum(GROUND_CLASSES)).to(device)
    model.model.language_model.layers[args.ground_layer].register_forward_hook(
        lambda m, a, out: captured.__setitem__("hidden", out[0] if isinstance(out, tuple) else out))
    # The vision tower and projector get a lower learning rate: at the language model's rate their residual
    # stream grew to ~1000x the text embeddings' norm within a few hundred steps and the model stopped using
    # the image (answers at the language prior).
    groups = []
    groups.append({"params": list(aux_head.parameters()), "weight_decay": 0.0, "lr": args.vision_lr})
    groups.append({"params": list(ground_head.parameters()), "weight_decay": 0.0, "lr": args.lr})
    for is_vision in (False, True):
        params = [(n, p) for n, p in model.named_parameters() if is_vision_parameter(n) == is_vision]
        lr = args.vision_lr if is_vision else args.lr
        groups.append({"params": [p for n, p in params if p.dim() >= 2], "weight_decay": 0.05, "lr": lr})
        groups.append({"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    val_items = make_split("val", args.eval_images, 1)
    weights = {f: 1 for f in FAMILIES}
    for part in filter(None, args.family_weights.split(",")):
        name, value = part.split("=")
        if name not in weights:
            raise SystemExit(f"--family-weights: unknown family {name!r}; families are {FAMILIES}")
        weights[name] = int(value)
    families = tuple(f for f in FAMILIES for _ in range(weights[f]))
    log = {"args": vars(args) | {"out": str(out)}, "steps": []}
    if args.vision_warmup_steps and args.init_from is None and args.init_vision_from is None:
        vision_warmup(model, arch, aux_head, captured, args, device, log, word_ids)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    running = aux_running = ground_running = None
    for step in range(1, args.steps + 1):
        if step == args.freeze_vision_after + 1 and args.freeze_vision_after:
            # no gradient reaches the tower from here on (AdamW skips parameters without one); the auxiliary
            # head keeps reading its features
            for n, p in model.named_parameters():
                if is_vision_parameter(n):
                    p.requires_grad_(False)
            print(f"vision tower and projector frozen after step {args.freeze_vision_after}", flush=True)
        batch, patch_labels, ground = make_batch(arch, rng, args.batch_size, args.max_qas, args.caption_rate, args.min_qas,
                                         families)
        batch = {k: v.to(device) for k, v in batch.items()}
        lm_loss = model(**batch).loss
        aux_logits = aux_head(captured["x"])  # (B, 256, sum(AUX_CLASSES))
        patch_labels = patch_labels.to(device)
        aux_loss = auxiliary_loss(aux_logits, patch_labels, args.aux_balance)
        loss = lm_loss + args.aux_weight * aux_loss
        if args.align_weight:
            loss = loss + args.align_weight * alignment_loss(captured["projected"], patch_labels,
                                                             model.get_input_embeddings().weight, word_ids)
        ground_loss = grounding_loss(ground_head(captured["hidden"]), ground.to(device))
        if args.ground_weight:
            loss = loss + args.ground_weight * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = lm_loss.item() if running is None else 0.95 * running + 0.05 * lm_loss.item()
        aux_running = aux_loss.item() if step == 1 else 0.95 * aux_running + 0.05 * aux_loss.item()
        ground_running = ground_loss.item() if step == 1 else 0.95 * ground_running + 0.05 * ground_loss.item()
        if step % 25 == 0:
            print(f"step {step} loss {running:.4f} aux {aux_running:.3f} ground {ground_running:.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s",
                  flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = quick_eval(model, arch, val_items, device)
            log["steps"].append({"step": step, "loss": running, "aux_loss": aux_running, "ground_loss": ground_running,
                                 "seconds": time.time() - start, "val": acc})
            print(f"  val {json.dumps({k: round(v, 3) for k, v in acc.items()})}", flush=True)
            model.save_pretrained(out, safe_serialization=True)
            arch.processor.save_pretrained(out)
            (out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
