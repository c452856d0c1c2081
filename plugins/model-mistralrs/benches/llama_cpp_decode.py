"""llama.cpp's side of the decode benchmark (benches/decode.rs runs it).

Loads a GGUF file with llama-cpp-python on the CPU with a fixed thread count and measures, the
way the Rust side does: prompt processing (one batched evaluation of a long prompt) and batch-1
decoding (sample at temperature 1 with no truncation, evaluate the token, repeat). Prints one
JSON object.

    python llama_cpp_decode.py MODEL.gguf --threads 2 --tokens 128 \
        --prompt "The history of" --long-prompt-file long.txt
"""

import argparse
import json
import time

from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--long-prompt-file", required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with open(args.long_prompt_file, encoding="utf-8") as f:
        long_prompt = f.read()

    llm = Llama(
        model_path=args.model,
        n_ctx=2048,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=args.seed,
        verbose=False,
    )

    # Prompt processing: one evaluation of the whole long prompt, best of three.
    long_ids = llm.tokenize(long_prompt.encode("utf-8"), add_bos=False, special=True)
    prompt_seconds = []
    for _ in range(3):
        llm.reset()
        started = time.perf_counter()
        llm.eval(long_ids)
        prompt_seconds.append(time.perf_counter() - started)

    # Batch-1 decoding at temperature 1, no top-k/top-p/min-p, end-of-sequence ignored so that
    # every run decodes the same number of tokens. Best of three.
    prompt_ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=True)
    decode_seconds = []
    for _ in range(3):
        llm.reset()
        llm.eval(prompt_ids)
        started = time.perf_counter()
        for _ in range(args.tokens):
            token = llm.sample(top_k=0, top_p=1.0, min_p=0.0, temp=1.0)
            llm.eval([token])
        decode_seconds.append(time.perf_counter() - started)

    print(
        json.dumps(
            {
                "prompt_tokens": len(long_ids),
                "prompt_tok_s": len(long_ids) / min(prompt_seconds),
                "decode_tokens": args.tokens,
                "decode_tok_s": args.tokens / min(decode_seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
