"""The lmms-eval model ``lightkv``: any model family lightkv supports, with any method or none.

Registered through the ``lmms_eval.models`` entry point when lightkv is installed (``pip install
"lightkv[eval]"``), so the ordinary lmms-eval command line drives it:

    lmms-eval --model lightkv --tasks mme,pope --batch_size 8 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=lightkv,budget=0.55

model_args (besides ``pretrained``):
  method        none (default) or any registered method, as a spec without ',' or '=' (``fastv``,
                ``lightkv@0.55``; ``lightkv.methods.spec``; ``lightkv methods`` lists the names).
  budget        average retained vision fraction over all decoder layers (``lightkv.match_budget``); or give
                the method's own fields instead, lists as [12,18,24] or 12;18;24 (``layers=12;18;24,...``).
  grid          one image's token grid RxC for budget matching (default: from the config of fixed-resolution
                models such as LLaVA-1.5, from max_pixels for the Qwen2-VL family; else required with budget).
  min_pixels, max_pixels  image size bounds of Qwen2-VL-family processors (passed to AutoProcessor).
  device        a torch device (default: the accelerate process's device: cuda:<local rank> or cpu).
  device_map    passed to from_pretrained ("auto" spreads a large model over the visible GPUs).
  dtype         auto (default), bfloat16, float16, float32.
  attn_implementation  sdpa (default) or eager.
  batch_size    prompts per generate call (also lmms-eval's --batch_size).
  max_new_tokens  default when a task sets none (1024).
  chat_template a Jinja template (string or file) replacing the processor's.
  stats_path    where to write the efficiency statistics (JSON, per task; ``.rank<r>`` added under data parallel).

Data parallel: ``accelerate launch --num_processes N -m lmms_eval --model lightkv ...``: every process loads
the model on its own device and lmms-eval shards the documents.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from loguru import logger as eval_logger
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ..adapters import get_adapter
from ..engine import apply
from .lmms_stats import TaskStats, summarize
from .method_spec import build_method, spec_from_model_args

__all__ = ["LightKVModel", "truncate_at_stop", "GENERATE_KWARGS"]

# generation kwargs of a task that reach model.generate (others, e.g. until or image_aspect_ratio, do not)
GENERATE_KWARGS = ("max_new_tokens", "min_new_tokens", "top_p", "top_k", "num_beams", "repetition_penalty",
                   "length_penalty", "no_repeat_ngram_size")


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the whole text when none occurs)."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def _parse_grid(grid: Any) -> tuple[int, int] | None:
    if grid is None or grid == "":
        return None
    if isinstance(grid, int) and not isinstance(grid, bool):
        return grid, grid
    parts = str(grid).lower().replace("*", "x").split("x")
    try:
        rows, cols = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        rows = cols = 0
    if len(parts) > 2 or rows < 1 or cols < 1:
        raise ValueError(f"grid must be RxC (e.g. 24x24) or one side, got {grid!r}")
    return rows, cols


def _config_grid(config: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
    """Token grid of one image for budget matching, as the family's adapter tells it (``Adapter.image_grid``):
    fixed-resolution models (LLaVA-1.5) from the config; models whose grid follows the image (Qwen2-VL family)
    from ``max_pixels``, the largest image the processor makes (benchmark images are mostly larger, so they come
    out near it); None otherwise (no adapter for the family, or no ``max_pixels``)."""
    from ..adapters import adapter_class_for_config

    adapter_cls = adapter_class_for_config(config)
    return None if adapter_cls is None else adapter_cls.image_grid(config, max_pixels)


def _size_dict(size: Any) -> dict:
    """An image processor's ``size`` (dict or SizeDict) as a plain dict of its set entries."""
    if size is None:
        return {}
    keys = getattr(size, "__dataclass_fields__", None) or (size.keys() if isinstance(size, dict) else ())
    return {k: (size[k] if isinstance(size, dict) else getattr(size, k)) for k in keys
            if (size[k] if isinstance(size, dict) else getattr(size, k)) is not None}


class _StopStrings(StoppingCriteria):
    """Ends a row once its decoded continuation contains a stop string (any tokenizer: it reads text, not
    token pieces); the text is cut at the stop string afterwards (``truncate_at_stop``)."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=False)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class LightKVModel(lmms):
    """lmms-eval model: a HuggingFace image-text-to-text model with a lightkv method applied (or none)."""

    is_simple = True

    def __init__(self, pretrained: str, method: str = "none", budget: float | None = None, grid: Any = None,
                 device: str | None = None, device_map: str | None = None, dtype: str = "auto",
                 attn_implementation: str = "sdpa", batch_size: int | str = 1, max_new_tokens: int = 1024,
                 chat_template: str | None = None, stats_path: str | None = None, trust_remote_code: bool = False,
                 use_cache: bool = True, min_pixels: int | None = None, max_pixels: int | None = None,
                 max_batch_size: Any = None, **method_fields: Any) -> None:
        # max_batch_size: passed by lmms-eval's --max_batch_size, unused (batches have a fixed size)
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}") from None
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        # method=, budget= and the method's fields as one spec, checked before any model is loaded
        spec = spec_from_model_args(method, budget, method_fields)
        self.accelerator = Accelerator()
        # accelerate launch / torchrun set these; lmms-eval shards the documents by them
        self._rank = int(os.environ.get("RANK", self.accelerator.process_index))
        self._world_size = int(os.environ.get("WORLD_SIZE", self.accelerator.num_processes))
        local_rank = int(os.environ.get("LOCAL_RANK", self.accelerator.local_process_index))
        if device_map in ("", "none", "None"):
            device_map = None
        if device_map is not None and self._world_size > 1:
            raise ValueError("device_map splits one model over several GPUs; it cannot be combined with data "
                             f"parallel ({self._world_size} processes): use one or the other")

        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        if dtype not in ("auto", None) and isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        load: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                                "trust_remote_code": trust_remote_code}
        if device_map is not None:
            load["device_map"] = device_map
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, **load).eval()
        if device_map is None:
            if device and self._world_size == 1:
                self._device = torch.device(device)
            else:  # one GPU per process under data parallel
                self._device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
            self._model.to(self._device)
        else:
            # inputs go where the input embeddings run; each layer's own device is the engine's business
            self._device = self._model.get_input_embeddings().weight.device
            if self._device.type == "meta":  # offloaded embeddings run on the first GPU
                self._device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        if min_pixels is not None or max_pixels is not None:
            # as size= (transformers 5 warns at every call for processors loaded with min_pixels/max_pixels)
            size = _size_dict(getattr(getattr(self.processor, "image_processor", None), "size", None))
            if "longest_edge" not in size:
                raise ValueError("min_pixels / max_pixels apply to Qwen2-VL-family processors (pixel bounds as "
                                 f"shortest_edge / longest_edge), not to {type(self.processor).__name__}")
            size.update({k: int(v) for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels))
                         if v is not None})
            self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code, size=size)
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._tokenizer.padding_side = "left"
        if chat_template:
            template = Path(chat_template)
            self.processor.chat_template = template.read_text() if template.is_file() else chat_template
        self.pretrained = pretrained
        self.max_new_tokens = int(max_new_tokens)
        self.use_cache = bool(use_cache)
        self.stats_path = stats_path

        num_layers = len(get_adapter(self._model).decoder_layers) if spec.name != "none" else None
        grid_hw = _parse_grid(grid) or _config_grid(config, max_pixels)
        if spec.budget is not None and grid_hw is None:
            raise ValueError(f"cannot tell the image token grid of {type(self._model).__name__} (its resolution "
                             "varies): give grid=RxC (e.g. grid=24x24) or max_pixels= with budget=")
        self.method = build_method(spec, num_layers=num_layers, grid=grid_hw)
        self.method_label = "none" if self.method is None else (
            f"{spec.name}@{spec.budget:.2f}" if spec.budget is not None else str(method))
        self.handle = apply(self._model, self.method) if self.method is not None else None
        self._stats: dict[str, TaskStats] = defaultdict(TaskStats)
        self._prefill: dict | None = None
        config = self._model.config
        self._image_token_id = next((getattr(config, k) for k in ("image_token_id", "image_token_index")
                                     if isinstance(getattr(config, k, None), int)), None)
        self._hooks = [self._model.register_forward_pre_hook(self._prefill_start, with_kwargs=True),
                       self._model.register_forward_hook(self._prefill_end, with_kwargs=True)]
        if self.rank == 0:
            eval_logger.info(f"lightkv: {type(self._model).__name__} from {pretrained} on {self._device}, "
                             f"method {self.method!r}, {self._world_size} process(es)")

    # -- lmms interface -------------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    # -- prompts --------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for v in visuals if v is not None]
        for v in visuals:
            if not hasattr(v, "convert"):
                raise ValueError(f"lightkv model: task {task} gives a {type(v).__name__} visual; only images are "
                                 "supported (no video or audio)")
        return [v.convert("RGB") for v in visuals]

    def _prompt(self, context: str, num_images: int) -> str:
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        text = context.replace(image_token, "").strip() if num_images else context
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return " ".join([image_token] * num_images + [text])

    def _inputs(self, prompts: list[str], images: list[list]) -> dict:
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if any(images):
            if not all(images):
                raise ValueError("lightkv model: a batch mixes prompts with and without images; use batch_size=1 "
                                 "for such a task")
            kwargs["images"] = images
        return self.processor(**kwargs).to(self._device)

    # -- efficiency statistics ------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _prefill_start(self, module, args, kwargs) -> None:
        record = self._prefill
        if record is None or "start" in record:
            return
        # the prefill's own rows: under beam search generate has already expanded every prompt num_beams times
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor):
            record["tokens"] = mask.sum(1).tolist()
            record["has_image"] = (ids == self._image_token_id).any(1).tolist() if self._image_token_id is not None \
                else [False] * ids.shape[0]
        self._sync()
        record["start"] = time.perf_counter()

    def _prefill_end(self, module, args, kwargs, output) -> None:
        record = self._prefill
        if record is None or "seconds" in record or "start" not in record:
            return
        self._sync()
        record["seconds"] = time.perf_counter() - record["start"]
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        per_slot = []  # bytes of one cached token (keys + values) in each layer
        for layer in getattr(cache, "layers", None) or []:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() == 4:
                per_slot.append(2 * keys.shape[1] * keys.shape[3] * keys.element_size())
        record["per_slot"] = per_slot
        record["stats"] = self.handle.stats if self.handle is not None else None

    def _record(self, task: str, prompts: int, record: dict, generate_s: float, output_tokens: int) -> None:
        """Add one batch's prefill to ``task``'s counters; a sequence is one prompt (with all its beams)."""
        per_slot = record.get("per_slot", [])
        full_tokens = record.get("tokens", [])  # real tokens of each prefill row before compression
        stats = record.get("stats")
        if stats is not None:
            tokens = stats.tokens
            fractions = [f for f in stats.retained_fraction if f is not None]
        else:
            tokens = [[n] * len(per_slot) for n in full_tokens]
            fractions = [1.0] * sum(record.get("has_image", []))
        kv = sum(sum(n * b for n, b in zip(row, per_slot)) for row in tokens)
        full = sum(full_tokens) * sum(per_slot)
        self._stats[task].add(sequences=prompts, batches=1, retained_sum=sum(fractions), retained_count=len(fractions),
                              kv_bytes=kv, uncompressed_kv_bytes=full, prefill_s=record.get("seconds", 0.0),
                              generate_s=generate_s, output_tokens=output_tokens)

    def efficiency(self) -> dict:
        """Per task: sequences, retained_fraction, kv_bytes_per_sequence, kv_ratio, prefill_ms_per_sequence, ..."""
        return {task: summarize(s.raw()) for task, s in self._stats.items()}

    def _write_stats(self) -> None:
        if not self.stats_path:
            return
        path = Path(self.stats_path)
        if self._world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self._rank}{path.suffix or '.json'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        method = None if self.method is None else {"class": type(self.method).__name__, **{
            k: (list(v) if isinstance(v, tuple) else v) for k, v in self.method.__dict__.items() if not k.startswith("_")}}
        path.write_text(json.dumps({"model": self.pretrained, "method": self.method_label, "method_config": method,
                                    "rank": self._rank, "world_size": self._world_size,
                                    "raw": {task: s.raw() for task, s in self._stats.items()},
                                    "tasks": self.efficiency()}, indent=1))

    # -- generation -----------------------------------------------------------------------------------------
    def _generate_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen = dict(gen_kwargs)
        until = gen.pop("until", None)
        if until is None:
            until = [self._tokenizer.decode([self.eot_token_id])] if self.eot_token_id is not None else []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        temperature = gen.pop("temperature", None)
        do_sample = gen.pop("do_sample", None)
        do_sample = float(temperature) > 0 if temperature is not None else bool(do_sample)
        out = {k: gen[k] for k in GENERATE_KWARGS if gen.get(k) is not None}
        out.setdefault("max_new_tokens", self.max_new_tokens)
        out["do_sample"] = do_sample
        if do_sample:
            out["temperature"] = float(temperature) if temperature is not None else 1.0
        else:
            out.pop("top_p", None)
            out.pop("top_k", None)
        return out, [stop for stop in until if stop]

    @torch.no_grad()
    def _generate(self, task: str, prompts: list[str], images: list[list], gen_kwargs: dict
                  ) -> list[GenerationResult]:
        kwargs, until = self._generate_kwargs(gen_kwargs)
        inputs = self._inputs(prompts, images)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self.eot_token_id
        if until:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self._tokenizer, until,
                                                                             inputs["input_ids"].shape[1])])
        self._prefill = {}
        start = time.perf_counter()
        try:
            output = self._model.generate(**inputs, **kwargs, pad_token_id=pad, use_cache=self.use_cache)
            self._sync()
            elapsed = time.perf_counter() - start
            record = self._prefill
        finally:
            self._prefill = None
        new = output[:, inputs["input_ids"].shape[1]:]
        texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        results = []
        output_tokens = 0
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        for r, (row, text) in enumerate(zip(new.tolist(), texts)):
            count = 0
            for token in row:
                if token == self.eot_token_id or token == pad:
                    break
                count += 1
            output_tokens += count
            results.append(GenerationResult(truncate_at_stop(text, until), TokenCounts(
                input_tokens=int(prompt_tokens[r]), output_tokens=count)))
        self._record(task, len(prompts), record, elapsed, output_tokens)
        return results

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        # one batch holds requests of one task with equal generation kwargs, in arrival (document) order
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = request.args
            groups[(task, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="lightkv generate")
        for (task, _), indices in groups.items():
            for at in range(0, len(indices), self._batch_size):
                chunk = indices[at:at + self._batch_size]
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task_name, split = requests[i].args
                    visuals = self._visuals(doc_to_visual, doc_id, task_name, split)
                    images.append(visuals)
                    prompts.append(self._prompt(context, len(visuals)))
                gen_kwargs = requests[chunk[0]].args[1]
                for i, result in zip(chunk, self._generate(task, prompts, images, gen_kwargs)):
                    results[i] = result
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), result.text)
                bar.update(len(chunk))
        bar.close()
        self._write_stats()
        return results

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | image, context) and whether greedy decoding would produce it, one request at a time."""
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="lightkv loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = dict(self._inputs([self._prompt(context, len(visuals))], [visuals]))
            prompt_length = inputs["input_ids"].shape[1]
            cont = self._tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            cont = cont.to(self._device)
            for key, value in list(inputs.items()):
                # every per-token tensor (ids, mask, token types) grows by the continuation
                if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == prompt_length:
                    fill = cont if key == "input_ids" else torch.full_like(cont, 1 if key == "attention_mask" else 0)
                    inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
            self._prefill = {}
            start = time.perf_counter()
            try:
                logits = self._model(**inputs, use_cache=True).logits  # (1, N, V)
                elapsed = time.perf_counter() - start
                record = self._prefill
            finally:
                self._prefill = None
            logprobs = torch.log_softmax(logits[0, prompt_length - 1:-1].float(), dim=-1)  # (C, V)
            target = cont[0]
            total = float(logprobs.gather(1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target).all())
            out.append((total, greedy))
            self._record(task, 1, record, elapsed, 0)
        self._write_stats()
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the lightkv lmms-eval model does not implement multi-round generation")
