"""Extra device -> host syncs of LightKV on a 6-layer tiny LLaVA (CPU; counts the ops that sync on CUDA).

python docs/results/syncs-cpu/count_syncs.py   (with PYTHONPATH pointing at the lightkv tree to measure)
"""
import torch

from lightkv import LightKV, testing
from lightkv.perf.syncs import count_syncs, format_report

torch.manual_seed(0)
model = testing.tiny_llava(num_layers=6)  # 16 x 16 = 256 vision tokens per image
method = LightKV(layers=(1, 2, 4), windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))
one = testing.llava_prompt(model, [1, 3, 4], [7, 8, 9])
two = testing.llava_prompt(model, [1, 3, 4, 5, 6, 10, 11], [7, 8], seed=1)
for name, inputs in (("batch 1", one), ("padded batch 2", testing.batch_prompts([one, two]))):
    report = count_syncs(model, method, inputs, decode_steps=3)
    print(f"{name}: {format_report(report)}")
