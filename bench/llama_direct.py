"""llama-cpp-python on its own: one ``Llama`` loaded as Mesh's embedded engine loads it, then
one JSON request per stdin line, one JSON answer per stdout line.

    python -m bench.llama_direct GGUF_PATH [--threads 2] [--ctx 8192] [--batch 256]

A request is ``{"prompt": str, "max_tokens": int}``; the answer has the completion's text,
its prompt and completion token counts and the wall seconds of the whole call (greedy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import llama_cpp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=args.batch, verbose=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": req["prompt"]}],
            max_tokens=req["max_tokens"],
            temperature=0.0,
            repeat_penalty=1.0,
        )
        seconds = time.perf_counter() - t0
        assert isinstance(out, dict)  # stream=False: one response, not an iterator
        usage = out["usage"]
        print(json.dumps({
            "text": out["choices"][0]["message"]["content"],
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "seconds": seconds,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
