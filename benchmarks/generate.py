"""Decode throughput: lmloop's generator vs HF ``model.generate`` and vs llama.cpp, same model, prompts, tokens.

Model: the packaged ``smollm2`` (SmolLM2-135M-Instruct; shipped as a Q4_1 GGUF, which lmloop converts to an
fp32 HF directory). Prompts: eight chat prompts rendered with the model's chat template; every contender
gets the same token ids. Greedy decoding, exactly ``--new-tokens`` new tokens per prompt (the end token is
ignored so counts match), at batch 1 (the first prompt) and batch 8 (all eight).

  hf-generate (the baseline): ``model.generate(input_ids, attention_mask, do_sample=False,
      max_new_tokens=N, min_new_tokens=N)`` on the fp32 ``LlamaForCausalLM`` with default settings
      (dynamic KV cache, sdpa attention); batch 8 left-padded (``padding_side="left"``).
  lmloop-<backend>: ``Generator.generate(ids=...)`` at batch 1 and ``Generator.generate_batch`` (the static
      batch) at batch 8, with the end token ignored. Backends (``Generator.load(ref, backend=...)``):
      ``fast`` the lean fp32 forward of :mod:`lmloop.infer.fastllama`, ``bf16`` the same with bfloat16
      weights, ``q4`` with 4-bit weights in llama.cpp's Q4_1 layout (what ``auto`` picks for smollm2,
      whose layers are already 4-bit); ``hf`` (the transformers forward in lmloop's loop) on request.
  llama.cpp: ``llama_cpp.Llama`` (llama-cpp-python, built from source: ``pip install
      llama-cpp-python==0.3.36``; skipped with a message if it is not installed) on the packaged GGUF
      itself (Q4_1, the weights lmloop's fp32 copy was made from), greedy (top_k=1, temp 0), the same
      token ids, ``n_threads`` = lmloop's torch threads. Its Python API decodes one sequence at a time,
      so "batch 8" is the eight prompts one after another. Weight repacking (``use_extra_bufts``) is off:
      with it, llama_decode segfaulted in the 0.3.36 build on this AMX machine (``--llama-repack``).

Timed: the whole call (prompt + decode) per contender; tokens/s = generated tokens / wall time. Each
contender runs once untimed first (model/kernels warm, lean forward built: its build time is printed).
Contenders alternate within each round (the order flips every round) so machine noise hits all; each
figure is the median over ``--rounds`` with the min-max spread. "match" = the mean fraction of each
row's tokens that agree with hf-generate's before the first difference (fp32 rounding in a different
batch shape, int8 or Q4_1 arithmetic make greedy text drift after near-ties).

  python benchmarks/generate.py --quick              # 1 round, 32 tokens
  python benchmarks/generate.py                      # 3 rounds, 64 tokens, batch 1 and 8
  python benchmarks/generate.py --threads 1 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain photosynthesis to a ten-year-old.",
    "List five uses of a paperclip and explain each one.",
    "What is the capital of France, and why is it famous?",
    "Give me a recipe for pancakes with step by step instructions.",
    "Describe the water cycle in detail.",
    "Why is the sky blue? Explain the physics.",
    "Write a letter to a friend about a trip to the mountains.",
]


def hf_generate(model, tok, ids: list[list[int]], n: int) -> list[list[int]]:
    import torch

    tok.padding_side = "left"
    enc = tok.pad([{"input_ids": x} for x in ids], return_tensors="pt")  # (B, T) left-padded + mask
    with torch.inference_mode():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id
        )
    return out[:, enc["input_ids"].shape[1] :].tolist()


def lmloop_generate(gen, ids: list[list[int]], n: int) -> list[list[int]]:
    if len(ids) == 1:
        gen.generate(ids=ids[0], temperature=0, max_new_tokens=n)
        return [gen.last.token_ids]
    return [
        g.token_ids for g in gen.generate_batch(ids, [{"temperature": 0, "max_new_tokens": n}] * len(ids))
    ]


def llama_generate(llm, ids: list[list[int]], n: int) -> list[list[int]]:
    outs = []
    for x in ids:
        llm.reset()  # no prompt-prefix reuse from the previous call: every prompt is evaluated
        toks = []
        for t in llm.generate(x, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(t)  # the end token is not checked: exactly n tokens like the others
            if len(toks) == n:
                break
        outs.append(toks)
    return outs


def match(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens equal before the first difference."""
    fr = []
    for x, y in zip(a, b, strict=True):
        k = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        fr.append(k / max(len(y), 1))
    return sum(fr) / len(fr)


def load_llama(path: str, threads: int, repack: bool):
    try:
        import llama_cpp.llama as lcl
    except ImportError:
        print(
            "llama.cpp arm skipped: llama_cpp is not importable (pip install llama-cpp-python==0.3.36 "
            "builds it from source with cmake, ~20 min on 2 cores)",
            flush=True,
        )
        return None
    if not repack:
        # llama.cpp repacks Q4 weights for its AVX512/AMX kernels ("extra buffer types"); in the 0.3.36
        # build here (native, AMX_INT8 CPU) that path segfaults in llama_decode, so it is off by default
        default = lcl.llama_cpp.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p

        lcl.llama_cpp.llama_model_default_params = no_repack
    return lcl.Llama(
        model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="packaged name or HF dir (llama.cpp needs its GGUF)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, help="torch threads and llama.cpp n_threads (default: torch's)")
    ap.add_argument("--backends", default="fast,bf16,q4", help="lmloop backends to measure")
    ap.add_argument("--headline", default="q4", help="the lmloop backend the targets are checked on")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp arm")
    ap.add_argument(
        "--llama-repack", action="store_true", help="let llama.cpp repack weights (segfaults in 0.3.36 here)"
    )
    ap.add_argument("--quick", action="store_true", help="1 round, 32 new tokens")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.new_tokens = 1, 32

    import torch

    from lmloop.infer.generate import Generator

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    n = a.new_tokens
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    backends = [b for b in a.backends.split(",") if b]
    if a.headline not in backends:
        sys.exit(f"--headline {a.headline} must be one of --backends {backends}")

    base = Generator.load(a.model, backend="hf")
    model, tok = base.model, base.tokenizer
    ids = [base.prompt_ids(p) for p in PROMPTS]
    gens, build_s = {}, {}
    for b in backends:
        t = time.perf_counter()
        gens[b] = Generator(tok, model, base.path).use_backend(b)
        build_s[b] = time.perf_counter() - t
        gens[b].eos_ids = lambda: (
            set()
        )  # the end token never stops a row: exactly n tokens (like min_new_tokens)
    arms = {"hf-generate": lambda x: hf_generate(model, tok, x, n)}
    arms.update({f"lmloop-{b}": (lambda x, g=gens[b]: lmloop_generate(g, x, n)) for b in backends})
    llm = None
    if not a.no_llama:
        gguf = sorted(Path(base.path).glob("*.gguf"))
        if not gguf:
            print(f"llama.cpp arm skipped: no .gguf file in {base.path}", flush=True)
        else:
            llm = load_llama(str(gguf[0]), threads, a.llama_repack)
            if llm is not None:
                arms["llama.cpp"] = lambda x: llama_generate(llm, x, n)
    print(
        f"model {a.model} | prompts {[len(x) for x in ids]} tokens | {n} new tokens | threads {threads} | "
        f"rounds {a.rounds} | lean forward build s: "
        + ", ".join(f"{b} {s:.2f}" for b, s in build_s.items() if b != "hf"),
        flush=True,
    )

    results: dict[str, dict] = {}
    for bs in sizes:
        batch = ids[:bs]
        for fn in arms.values():  # untimed warm-up: allocators, oneDNN/fbgemm kernels, llama.cpp buffers
            fn(batch[:1])
        times: dict[str, list[float]] = {k: [] for k in arms}
        toks: dict[str, list[list[int]]] = {}
        names = list(arms)
        for r in range(a.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t = time.perf_counter()
                toks[name] = arms[name](batch)
                times[name].append(time.perf_counter() - t)
                assert all(len(x) == n for x in toks[name]), (name, [len(x) for x in toks[name]])
                print(
                    f"  batch {bs} round {r + 1}: {name:14s} {bs * n / times[name][-1]:8.1f} tok/s",
                    flush=True,
                )
        rows = {}
        for name, ts in times.items():
            rows[name] = {
                "tok_s": bs * n / statistics.median(ts),
                "tok_s_min": bs * n / max(ts),
                "tok_s_max": bs * n / min(ts),
                "match_hf": match(toks[name], toks["hf-generate"]),
            }
        hf = rows["hf-generate"]["tok_s"]
        lc = rows.get("llama.cpp", {}).get("tok_s")
        print(
            f"\nbatch {bs}: {'contender':14s} {'tok/s':>8s} {'[min-max]':>15s} {'vs hf':>7s} {'vs llama':>9s} {'match':>6s}"
        )
        for name, r in rows.items():
            r["vs_hf"] = r["tok_s"] / hf
            r["vs_llama"] = r["tok_s"] / lc if lc else None
            vl = f"{r['vs_llama']:8.2f}x" if lc else "       --"
            print(
                f"         {name:14s} {r['tok_s']:8.1f} [{r['tok_s_min']:6.1f}-{r['tok_s_max']:6.1f}] "
                f"{r['vs_hf']:6.2f}x {vl} {r['match_hf'] * 100:5.0f}%"
            )
        print()
        results[bs] = rows

    head = f"lmloop-{a.headline}"
    for bs, rows in results.items():
        r = rows[head]
        line = f"batch {bs}: {head} vs hf-generate {r['vs_hf']:.2f}x [target >= 2x: {'met' if r['vs_hf'] >= 2 else 'NOT met'}]"
        if r["vs_llama"] is not None:
            ok = r["vs_llama"] >= 0.5
            line += f", vs llama.cpp {r['vs_llama']:.2f}x [target >= 0.5x: {'met' if ok else 'NOT met'}]"
        print(line)
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "model": a.model,
                    "new_tokens": n,
                    "threads": threads,
                    "build_s": build_s,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
