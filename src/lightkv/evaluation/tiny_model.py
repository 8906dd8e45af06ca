"""The bundled model's architecture, tokenizer, chat template and image processor (built from code, offline).

A transformers ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer projector, Llama decoder with
grouped-query attention) and a ``LlavaProcessor`` (word-level tokenizer, CLIP image processor) saved with
``save_pretrained``, so ``AutoProcessor.from_pretrained(path)`` and ``LlavaForConditionalGeneration
.from_pretrained(path)`` load it exactly as they load a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from .shapes import IMAGE_SIZE, vocabulary

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "PATCH_SIZE", "build_processor", "build_config", "BUNDLED_MODEL",
           "format_prompt"]

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
BUNDLED_MODEL = Path(__file__).resolve().parents[3] / "models" / "tiny-llava-shapes"


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


def build_config(tokenizer, text_layers: int = 8):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
    text = LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=text_layers,
                       num_attention_heads=6, num_key_value_heads=2, vocab_size=len(tokenizer),
                       max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
