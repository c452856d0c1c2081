"""Loads the adapter that `peft_export` wrote with Hugging Face peft on top of the same GGUF
(dequantized by transformers) and compares its per-token log-probs with the trainer's.

    python peft_check.py MODEL.gguf ADAPTER_DIR

Exits non-zero when the adapter's effect disagrees: the adapted log-probs must match the
trainer's far more closely than the adapter moves them, which fails for a transposed or
row-permuted factor.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def token_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)


def main():
    model_path, adapter_dir = sys.argv[1], sys.argv[2]
    ours = json.load(open(os.path.join(adapter_dir, "logprobs.json")))
    ids = torch.tensor([ours["tokens"]])
    base = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(model_path)),
        gguf_file=os.path.basename(model_path),
        dtype=torch.float32,
    )
    base.eval()
    base_logp = token_logprobs(base, ids)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    adapted_logp = token_logprobs(model, ids)

    ours_base = torch.tensor(ours["base"])
    ours_adapted = torch.tensor(ours["adapted"])
    report = {
        "tokens": len(ours["tokens"]),
        "base_max_abs_diff": (base_logp - ours_base).abs().max().item(),
        "adapted_max_abs_diff": (adapted_logp - ours_adapted).abs().max().item(),
        "adapter_effect_max": (ours_adapted - ours_base).abs().max().item(),
    }
    print(json.dumps(report, indent=2))
    # The trainer and transformers dequantize the same Q4_1 file to f32, so beyond float
    # rounding they compute the same function.
    ok = (
        report["base_max_abs_diff"] < 1e-3
        and report["adapted_max_abs_diff"] < 1e-3
        and report["adapter_effect_max"] > 100 * report["adapted_max_abs_diff"]
    )
    if not ok:
        print("peft does not compute what the trainer computes with this adapter", file=sys.stderr)
        sys.exit(1)
    print("peft loads the adapter and agrees with the trainer")


if __name__ == "__main__":
    main()
