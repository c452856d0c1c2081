"""The PyTorch peer of the round benchmark: one GRPO + SAPO pass with a PEFT LoRA adapter over
exactly the batch the Rust benchmark trained on (written by `--dump-batch`), on the CPU.

Same model (the GGUF, dequantized to f32 by transformers), same LoRA (rank 8, alpha 16 on
q/k/v/o), same loss (clipped surrogate with eps 0.2, SAPO w 0.1 and t 0.8, token mean over the
model's own tokens, log-probs at the recorded sampling temperature), same optimizer (AdamW,
lr 5e-5, gradient norm clipped to 1), same mini-batches of 8 in micro-batches of 2.

    python benches/torch_peer.py BATCH.json --model PATH.gguf [--threads N]

Prints one JSON object: seconds per optimizer step, trained tokens per second, peak RSS.
"""

import argparse
import json
import os
import random
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def advantages(batch):
    groups = {}
    for i, s in enumerate(batch):
        groups.setdefault(s["group"], []).append(i)
    adv = [0.0] * len(batch)
    keep = [True] * len(batch)
    for members in groups.values():
        r = [batch[i]["reward"] for i in members]
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5 if len(r) > 1 else 0.0
        for i in members:
            if std <= 1e-12:
                keep[i] = False
            else:
                adv[i] = (batch[i]["reward"] - mean) / (std + 1e-6)
    return adv, keep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("batch")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)

    batch = json.load(open(args.batch))
    adv, keep = advantages(batch)
    data = [(s, a) for s, a, k in zip(batch, adv, keep) if k]

    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.model)),
        gguf_file=os.path.basename(args.model),
        dtype=torch.float32,
    )
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    model.train()
    load_seconds = time.time() - started
    rss_after_load = peak_rss_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    random.shuffle(data)
    eps, w, t = 0.2, 0.1, 0.8
    step_times = []
    trained_tokens = 0
    for m0 in range(0, len(data), 8):
        mini = data[m0:m0 + 8]
        n_tokens = sum(sum(s["mask"][1:]) for s, _ in mini)
        n_pos = sum(sum(s["mask"][1:]) for s, a in mini if a >= 0)
        if n_tokens == 0:
            continue
        t0 = time.time()
        opt.zero_grad(set_to_none=True)
        for u0 in range(0, len(mini), 2):
            micro = mini[u0:u0 + 2]
            length = max(len(s["tokens"]) for s, _ in micro)
            ids = torch.zeros((len(micro), length), dtype=torch.long)
            attn = torch.zeros((len(micro), length), dtype=torch.long)
            mask = torch.zeros((len(micro), length - 1))
            old = torch.zeros((len(micro), length - 1))
            temp = torch.tensor([s["temperature"] for s, _ in micro]).view(-1, 1, 1)
            a = torch.tensor([a for _, a in micro]).view(-1, 1)
            for row, (s, _) in enumerate(micro):
                n = len(s["tokens"])
                ids[row, :n] = torch.tensor(s["tokens"])
                attn[row, :n] = 1
                mask[row, :n - 1] = torch.tensor(s["mask"][1:], dtype=torch.float32)
                old[row, :n - 1] = torch.tensor(s["logprobs"][1:]) * mask[row, :n - 1]
                trained_tokens += n
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1] / temp
            logp = torch.log_softmax(logits.float(), dim=-1)
            logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(logp - old)
            pg = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
            loss = (pg * mask).sum() / n_tokens
            pos = (a >= 0).float() * mask * (ratio.detach() <= t).float()
            if n_pos > 0:
                loss = loss + w * (pos * (old - logp)).sum() / n_pos
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step_times.append(time.time() - t0)

    total = sum(step_times)
    print(json.dumps({
        "engine": "pytorch " + torch.__version__ + " + peft",
        "threads": args.threads,
        "sequences": len(data),
        "steps": len(step_times),
        "seconds_per_step": total / max(len(step_times), 1),
        "train_tokens_per_s": trained_tokens / total if total else None,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": rss_after_load,
        "model_load_seconds": load_seconds,
    }, indent=2))


if __name__ == "__main__":
    main()
