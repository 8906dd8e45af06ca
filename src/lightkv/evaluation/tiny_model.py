"""The bundled model's architecture, tokenizer, chat template and image processor (built from code, offline).

A transformers ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer projector, Llama decoder with
grouped-query attention) and a ``LlavaProcessor`` (word-level tokenizer, CLIP image processor) saved with
``save_pretrained``, so ``AutoProcessor.from_pretrained(path)`` and ``LlavaForConditionalGeneration
.from_pretrained(path)`` load it exactly as they load a hub checkpoint.
"""

from __future__ import annotations

from ..bundled import BUNDLED_MODEL, BUNDLED_QWEN_MODEL  # re-exported: the paths live in lightkv.bundled
from .shapes import IMAGE_SIZE, vocabulary

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "PATCH_SIZE", "build_processor", "build_config", "BUNDLED_MODEL",
           "format_prompt", "BUNDLED_QWEN_MODEL", "QwenShapesProcessor", "build_qwen_config", "format_qwen_prompt"]

PATCH_SIZE = 4  # 64 px / 4 = a 16 x 16 grid of vision tokens
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{{ '<s>' }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' USER:' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ ' <image>' }}{% elif item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}"
    "{% endfor %}{{ ' ASSISTANT:' }}"
    "{% else %}{% for item in message['content'] %}{{ ' ' + item['text'] }}{% endfor %}{{ ' </s>' }}{% endif %}"
    "{% endfor %}"
)


def format_prompt(question: str) -> str:
    """The text the chat template produces for one user turn with one image (no trailing answer)."""
    return f"<s> USER: <image> {question} ASSISTANT:"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"],
                                   padding_side="left", model_max_length=1024)
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


def build_config(tokenizer, text_layers: int = 8, heads: int = 6, kv_heads: int = 2, rope_theta: float = 10000.0,
                 vision_layers: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=vision_layers, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
    text = LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tokenizer),
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                       max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)


# -- the Qwen2.5-VL-architecture bundled model ----------------------------------------------------------------
# Qwen2.5-VL's vision tower cuts 2 x P x P (time x height x width) patches and merges M x M of them into one
# token. The builders' default is the real models' layout, M = 2: a 64 px image with 2 px patches is a 32 x 32
# patch grid, i.e. 16 x 16 = 256 vision tokens, as for LLaVA. Any P x M = 4 px keeps that token grid; the bundled
# model uses P = 4, M = 1 (its tower then sees 256 patches like LLaVA's CLIP; see its training notes).
QWEN_PATCH_SIZE = 2
QWEN_MERGE_SIZE = 2
QWEN_SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|image_pad|>",
                       "<|vision_end|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|> ' + message['role'] }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ ' <|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|> assistant' }}{% endif %}"
)


def format_qwen_prompt(question: str) -> str:
    """The Qwen chat template's text for one user turn with one image, ending with the assistant's header."""
    return f"<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> {question} <|im_end|> <|im_start|> assistant"


def build_qwen_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = QWEN_SPECIAL_TOKENS + ["user", "assistant"] + vocabulary()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = QWEN_SPECIAL_TOKENS[1:3] + QWEN_SPECIAL_TOKENS[4:]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=special, padding_side="left", model_max_length=1024)
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


def build_qwen_image_processor(patch_size: int = QWEN_PATCH_SIZE, merge_size: int = QWEN_MERGE_SIZE):
    from transformers import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    size={"shortest_edge": pixels, "longest_edge": pixels},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], do_convert_rgb=True)


class QwenShapesProcessor:
    """What ``Qwen2_5_VLProcessor`` does for image prompts, without its video processor.

    transformers' Qwen2-VL video processor needs torchvision, which the core install leaves out, and the
    processor class cannot be built without it. This class pairs the saved tokenizer and image processor and
    produces the same inputs: each ``<|image_pad|>`` expanded to the image's merged token count, left padding,
    ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (1 on image tokens).
    """

    def __init__(self, tokenizer=None, image_processor=None):
        self.tokenizer = tokenizer if tokenizer is not None else build_qwen_tokenizer()
        self.image_processor = image_processor if image_processor is not None else build_qwen_image_processor()
        self.image_token = "<|image_pad|>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = QWEN_CHAT_TEMPLATE

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        return cls(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))

    def save_pretrained(self, path) -> None:
        self.tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, **_):
        import torch

        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images is not None:
            vision = self.image_processor(images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            expanded, k = [], 0
            for t in texts:
                parts = t.split(self.image_token)
                pieces = [parts[0]]
                for p in parts[1:]:
                    pieces.append(self.image_token * counts[k] + p)
                    k += 1
                expanded.append("".join(pieces))
            if k != len(counts):
                raise ValueError(f"{k} image placeholders for {len(counts)} images")
            texts = expanded
        enc = self.tokenizer(texts, return_tensors="pt", padding=padding)
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   mm_token_type_ids=(enc["input_ids"] == self.image_token_id).to(torch.int32))
        from transformers import BatchFeature

        return BatchFeature(out, tensor_type=None)


def build_qwen_config(tokenizer, text_layers: int = 8, heads: int = 6, kv_heads: int = 2,
                      rope_theta: float = 10000.0, vision_layers: int = 4, patch_size: int = QWEN_PATCH_SIZE,
                      merge_size: int = QWEN_MERGE_SIZE):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    # window_size is in pixels: 32 px = 8 x 8 tokens (16 x 16 patches at P = 2), four windows per 64 px image;
    # odd blocks attend over the whole image, as Qwen2.5-VL alternates windowed and full blocks
    vision = dict(depth=vision_layers, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=patch_size,
                  spatial_merge_size=merge_size, temporal_patch_size=2, out_hidden_size=192,
                  window_size=32, fullatt_block_indexes=list(range(1, vision_layers, 2)))
    half = 192 // heads // 2  # M-RoPE sections (temporal, rows, columns) in Qwen2.5-VL's 2:3:3 proportion
    section = [half // 4, half - half // 4 - (half - half // 4) // 2, (half - half // 4) // 2]
    text = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=text_layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=1024,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                                    "mrope_section": section},
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=ids("<|im_end|>"))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
                            pad_token_id=tokenizer.pad_token_id)
