"""Extra device -> host syncs of LightKV and the baselines on 6-layer tiny LLaVA and Qwen2.5-VL models (CPU; counts
the ops that sync on CUDA).

python docs/results/syncs-cpu/count_syncs.py [--all | --families]   (with PYTHONPATH pointing at the lightkv tree)

Without options: LightKV on LLaVA only (the rows measured first); --all adds Qwen2.5-VL and ToMe, FastV, PDrop, DART;
--families: LightKV on the other families' tiny models (batch 1, and a padded batch of 2 with more images in row 2).
"""
import logging
import sys

import torch

import lightkv
from lightkv import testing
from lightkv.perf.syncs import count_syncs, format_report

logging.getLogger("lightkv").setLevel(logging.ERROR)  # skip warnings of the small Qwen images
torch.manual_seed(0)
llava = testing.tiny_llava(num_layers=6)  # 16 x 16 = 256 vision tokens per image
schedule = dict(layers=(1, 2, 4), windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))
one = testing.llava_prompt(llava, [1, 3, 4], [7, 8, 9])
two = testing.llava_prompt(llava, [1, 3, 4, 5, 6, 10, 11], [7, 8], seed=1)
cases = [("LLaVA", llava, "lightkv", lightkv.LightKV(**schedule), "batch 1", one),
         ("LLaVA", llava, "lightkv", lightkv.LightKV(**schedule), "padded batch 2", testing.batch_prompts([one, two]))]
if "--all" in sys.argv:
    qwen = testing.tiny_qwen2_5_vl(num_layers=6)
    q_schedule = dict(layers=(1, 2), windows=(1, 1), ratios=(0.5, 0.5))
    two_images = testing.llava_prompt(llava, [1, 3, 4, 5, 6, 10, 11], [7, 8], num_images=2, seed=1)
    q_one = testing.qwen_prompt(qwen, [1, 3, 4], [7, 8, 9])  # a 6 x 8 grid
    q_two = testing.qwen_prompt(qwen, [1, 3], [7], images=[(4, 4), (6, 8)], seed=1)
    cases = []
    for family, model, sched, inputs in (
            ("LLaVA", llava, schedule, (one, testing.batch_prompts([one, two_images]))),
            ("Qwen2.5-VL", qwen, q_schedule, (q_one, testing.batch_prompts([q_one, q_two])))):
        methods = {"lightkv": lightkv.LightKV(**sched), "tome": lightkv.ToMe(**sched),
                   "fastv": lightkv.FastV(layer=1), "pdrop": lightkv.PDrop(layers=sched["layers"]),
                   "dart": lightkv.DART(layer=1, num_pivots=4)}
        for name, method in methods.items():
            cases += [(family, model, name, method, "batch 1", inputs[0]),
                      (family, model, name, method, "padded batch 2 (2 images in row 2)", inputs[1])]
if "--families" in sys.argv:
    T = testing
    families = [  # (name, builder, prompt of one image, prompt of several images / tiles / crops)
        ("LLaVA-NeXT", T.tiny_llava_next, lambda m: T.llava_next_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.llava_next_prompt(m, [1, 3], [7], image_sizes=((20, 30), (30, 20), (24, 24)), seed=1)),
        ("LLaVA-OneVision", T.tiny_llava_onevision, lambda m: T.llava_next_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.llava_next_prompt(m, [1, 3], [7], image_sizes=((20, 30), (40, 12)), video_frames=2, seed=1)),
        ("InternVL", T.tiny_internvl, lambda m: T.internvl_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.internvl_prompt(m, [1, 3], [7], tiles=[2, 1, 3], seed=1)),
        ("Idefics3", T.tiny_idefics3, lambda m: T.idefics3_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.idefics3_prompt(m, [1, 3], [7], images=[(1, 2), (0, 0), (2, 2)], seed=1)),
        ("Mistral3", T.tiny_mistral3, lambda m: T.mistral3_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.mistral3_prompt(m, [1, 3], [7], images=[(3, 4), (2, 5), (4, 4)], seed=1)),
        ("Pixtral-LLaVA", T.tiny_pixtral_llava, lambda m: T.mistral3_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.mistral3_prompt(m, [1, 3], [7], images=[(3, 4), (2, 5), (4, 4)], seed=1)),
        ("GLM-4V", T.tiny_glm4v, lambda m: T.glm4v_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.glm4v_prompt(m, [1, 3], [7], images=[(6, 8), (4, 4)], seed=1)),
        ("Gemma 3", T.tiny_gemma3, lambda m: T.gemma3_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.gemma3_prompt(m, [1, 3], [7], num_images=2, seed=1)),
        ("Aya Vision", T.tiny_aya_vision, lambda m: T.aya_vision_prompt(m, [1, 3, 4], [7, 8, 9]),
         lambda m: T.aya_vision_prompt(m, [1, 3], [7], tiles=[2, 1], seed=1)),
    ]
    cases = []
    for family, build, one_image, more in families:
        model = build(num_layers=6)
        method = lightkv.LightKV(layers=(1, 2, 4), windows=(1, 1, 1), ratios=(0.5, 0.5, 0.5))
        cases += [(family, model, "lightkv", method, "batch 1", one_image(model)),
                  (family, model, "lightkv", method, "padded batch 2 (more images in row 2)",
                   testing.batch_prompts([one_image(model), more(model)]))]
for family, model, name, method, label, inputs in cases:
    report = count_syncs(model, method, inputs, decode_steps=3)
    print(f"{family} {name}, {label}: {format_report(report)}")
