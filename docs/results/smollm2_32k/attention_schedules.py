"""The one-off experiment behind ``attention_schedules_fp32_w2.jsonl`` (not a project option).

Reads essay window 2 (the first ``length`` tokens of the 32k window) in fp32 with a factor file and one
attention schedule, and prints one JSON line: perplexity overall and per 4k range. Schedules:
``const`` (the file's attention scaling), ``none`` (1.0), ``attn:X`` (a constant X on cos/sin), and
``lognc:K``: the file's constant, plus queries at position p > 8192 multiplied by (ln p / ln 8192) ** K
(Qwen's logn attention for K = 1; K < 0 softens far queries instead).

    PYTHONPATH=. python docs/results/smollm2_32k/attention_schedules.py 32768 lognc:1 \
        docs/results/smollm2_32k/searched_trial33.json
"""

import dataclasses
import json
import math
import sys

import torch

from models.loading import load_model
from models.patch import apply_factors
from models.rope import RopeFactors, RopeGeometry
from objectives.data import EMBEDDED_CORPUS, load_windows
from objectives.perplexity import perplexity

ORIGINAL_LENGTH = 8192


def main(length: int, schedule: str, factor_file: str) -> None:
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    native = RopeGeometry.from_config(model.config)
    factors = RopeFactors.load(factor_file, RopeGeometry(native.rotary_dim, native.base, ORIGINAL_LENGTH))
    if schedule == "none":
        factors = dataclasses.replace(factors, attention_scaling=1.0)
    elif schedule.startswith("attn:"):
        factors = dataclasses.replace(factors, attention_scaling=float(schedule.split(":")[1]))
    apply_factors(model, factors)
    if schedule.startswith("lognc:"):
        power = float(schedule.split(":")[1])
        position = torch.arange(length, dtype=torch.float32) + 1
        scale = torch.where(position > ORIGINAL_LENGTH, position.log() / math.log(ORIGINAL_LENGTH), 1.0) ** power

        def scale_queries(module, args, output):  # before RoPE, which is linear: the same as after it
            return output * scale[: output.shape[1], None].to(output.dtype)

        for layer in model.get_decoder().layers:
            layer.self_attn.q_proj.register_forward_hook(scale_queries)
    window = load_windows(EMBEDDED_CORPUS, tokenizer, 32768, 1, first_window=2)[0][:length]
    result = perplexity(model, [window], progress=False, position_bins=length // 4096)
    print(json.dumps({"variant": schedule, "factors": factor_file, "length": length, "window": 2, "data": "essays",
                      "ppl": result.perplexity, "bins": [round(p, 3) for p in result.position_perplexities],
                      "s": round(result.seconds, 1)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
