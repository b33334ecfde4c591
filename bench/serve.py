"""``deltatune serve`` under load: mixed-delta batches against one delta at a time.

K random LoRA deltas (r=8, alpha=16 on the 7 projections of every block; A as initialised, B drawn
with std 0.06 so the deltas answer differently) go onto the bundled SmolLM2-135M-Instruct. Two
servers run side by side, each a real ``deltatune serve`` process on loopback with the same
deltas: one decodes requests for different deltas in one continuous batch (the default), the
other with ``--one-delta-at-a-time`` (a batch holds one delta's requests; the delta of the
oldest waiting request goes next — what serving without mixed batches does, still with
continuous batching within a delta).

For each N clients (``--clients``) and K deltas (``--ks``), N asyncio clients of the official
``openai`` package each send ``--requests`` chat requests one after the other (client i asks
delta i mod K; its j-th request asks the (i + j·N)-th date question of the bundled held-out
data, so no two requests of a phase ask the same while there are questions enough; greedy,
``--max-tokens`` new tokens at most) to one server, then the same requests to the other (the
order of the two alternates from one configuration to the next). The clients are made and
connected before the clock starts. Per server: completion tokens per second over the phase's
wall time, p50 and p95 request latency, and requests without an answer. At the
largest N every answer is checked against ``deltatune generate``'s for its delta and
question (the model with that delta activated, greedy ``generate``), computed in this process.

    HF_HUB_OFFLINE=1 python bench/serve.py [--clients 1,8,32] [--ks 1,4,16] [--max-tokens 16] [--requests 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

import deltatune as dt
from deltatune.cli.main import _user_prompt
from deltatune.models import load_model_and_tokenizer
from deltatune.train.data import demo_data_path, load_examples
from deltatune.train.evaluate import generate_completions

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("mixed", "one delta at a time")


def make_deltas(count: int, root: Path) -> dict[str, Path]:
    model, _ = load_model_and_tokenizer(None)
    dirs = {}
    for i in range(count):
        name = f"d{i}"
        dt.attach(model, dt.LoRAConfig(r=8, alpha=16, targets=PROJECTIONS), name, activate=False)
        torch.manual_seed(i)
        with torch.no_grad():
            for path, p in model.named_parameters():
                if f".deltas.{name}." in path and path.endswith(".B"):  # zero at init, drawn here
                    p.normal_(std=0.06)
        (dirs[name],) = dt.save(model, root / name, name)
    return dirs


def questions() -> list[str]:
    return [f"{e.prompt[-1]['content'] if e.is_chat else e.prompt}" for e in load_examples(demo_data_path("test"))]


def start_server(dirs: dict[str, Path], port: int, dtype: str, extra: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "deltatune", "serve", "--port", str(port), "--max-batch", "32", "--dtype", dtype,
               *[a for name, d in dirs.items() for a in ("--delta", f"{name}={d}")], *extra]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())


async def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0, timeout=5)
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited:\n{log.read_text()}")
        try:
            await client.models.list()
            return
        except openai.APIConnectionError:
            await asyncio.sleep(0.5)
    raise SystemExit(f"the server at {url} did not come up")


class Result(NamedTuple):
    client: int
    delta: str
    question: str
    answer: str | None  # None: the request failed
    tokens: int         # completion tokens
    latency: float


async def load(url: str, clients: int, k: int, requests: int, max_tokens: int, asked: list[str]):
    """Every client's requests, one after the other (client i's j-th asks question i + j·clients):
    returns (wall seconds, a Result per request)."""
    import openai

    # a client of its own per user, as separate users have: one connection each, no shared pool;
    # made and connected (one GET /v1/models each) before the clock starts: 32 clients' first
    # requests take ~0.7 s of this process's time here, the benchmark's own cost, not the server's
    users = [openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0, timeout=600) for _ in range(clients)]
    await asyncio.gather(*(user.models.list() for user in users))

    async def one_client(i: int):
        client = users[i]
        done = []
        for j in range(requests):
            question = asked[(i + j * clients) % len(asked)]
            started = time.perf_counter()
            try:
                reply = await client.chat.completions.create(
                    model=f"d{i % k}", messages=[{"role": "user", "content": question}],
                    max_tokens=max_tokens, temperature=0)
                answer, tokens = reply.choices[0].message.content, reply.usage.completion_tokens
            except openai.APIError as exc:
                print(f"  request of client {i} failed: {exc}", flush=True)
                answer, tokens = None, 0
            done.append(Result(i, f"d{i % k}", question, answer, tokens, time.perf_counter() - started))
        return done

    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one_client(i) for i in range(clients))) for r in rs]
    return time.perf_counter() - started, results


async def server_stats(url: str) -> dict:
    import openai

    return await openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0).get("/stats", cast_to=object)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def references(dirs: dict[str, Path], pairs: set[tuple[str, str]], max_tokens: int, dtype: str) -> dict[tuple[str, str], str]:
    """``deltatune generate``'s answer for each (delta, question)."""
    model, tokenizer = load_model_and_tokenizer(None, dtype=dtype)
    for name, directory in dirs.items():
        dt.load(model, directory, name, activate=False)
    answers = {}
    for name in sorted({n for n, _ in pairs}):
        dt.activate(model, name)
        asked = sorted(q for n, q in pairs if n == name)
        for question, answer in zip(asked, generate_completions(
                model, tokenizer, [_user_prompt(tokenizer, q) for q in asked], max_new_tokens=max_tokens)):
            answers[(name, question)] = answer
    return answers


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client (clients of N=1 send 4 times as many)")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--dtype", default="float32", help="the base's dtype in the servers and the reference answers "
                        "(deltatune serve --dtype): float32 | bfloat16 | float16")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    asked = questions()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_deltas(max(ks), root)
        urls = {mode: f"http://127.0.0.1:{args.port + i}/v1" for i, mode in enumerate(MODES)}
        servers = {}
        try:
            for i, mode in enumerate(MODES):  # one after the other: two loading at once share the cores badly
                servers[mode] = start_server(dirs, args.port + i, args.dtype, [] if mode == "mixed" else ["--one-delta-at-a-time"],
                                             root / f"server-{i}.log")
                await wait_until_up(urls[mode], servers[mode], root / f"server-{i}.log")
            # one request each, so first-call costs stay out of the timings
            for mode in MODES:
                await load(urls[mode], 1, 1, 1, 2, asked)
            rows, checked = [], []
            for n in client_counts:
                for k in ks:
                    requests = args.requests * (4 if n == 1 else 1)
                    order = MODES if len(rows) % 4 == 0 else MODES[::-1]
                    measured = {}
                    for mode in order:
                        measured[mode] = await load(urls[mode], n, k, requests, args.max_tokens, asked)
                    for mode in MODES:
                        seconds, results = measured[mode]
                        tokens = sum(r.tokens for r in results)
                        lost = sum(r.answer is None for r in results)
                        latencies = [r.latency for r in results if r.answer is not None]
                        rows.append((n, k, mode, len(results), lost, tokens, seconds, tokens / seconds,
                                     percentile(latencies, 0.5), percentile(latencies, 0.95)))
                        print(f"N={n:>2} K={k:>2} {mode:<20} {len(results):>3} requests ({lost} lost), {tokens:>4} tokens "
                              f"in {seconds:6.1f} s: {tokens / seconds:6.1f} tokens/s, p50 {rows[-1][8]:.2f} s, "
                              f"p95 {rows[-1][9]:.2f} s", flush=True)
                        if n == max(client_counts):
                            checked.extend((mode, n, k, r) for r in results)
            engine_stats = {mode: await server_stats(urls[mode]) for mode in MODES}
        finally:
            for process in servers.values():
                process.terminate()
            for process in servers.values():
                process.wait(timeout=60)

        # every delta's answer to the first question too, to show the deltas answer differently
        # (a check that could not see a request routed to the wrong delta otherwise)
        wanted = references(dirs, {(r.delta, r.question) for *_, r in checked}
                            | {(name, asked[0]) for name in dirs}, args.max_tokens, args.dtype)
        wrong = [(mode, n, k, r) for mode, n, k, r in checked
                 if r.answer is not None and r.answer.strip() != wanted[(r.delta, r.question)]]
        lost = sum(r.answer is None for *_, r in checked)
        distinct = len({wanted[(name, asked[0])] for name in dirs})

    print("\n| clients | deltas K | serving | requests (lost) | tokens/s | p50 latency | p95 latency | mixed / one-at-a-time |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    by_config = {(r[0], r[1], r[2]): r for r in rows}
    for n, k, mode, count, lost_here, _, _, throughput, p50, p95 in rows:
        ratio = throughput / by_config[(n, k, MODES[1])][7]
        print(f"| {n} | {k} | {mode} | {count} ({lost_here}) | {throughput:.1f} | {p50:.2f} s | {p95:.2f} s | "
              f"{f'{ratio:.2f}x' if mode == 'mixed' else ''} |")
    print(f"\nat N={max(client_counts)}: {len(checked)} requests, {lost} without an answer, {len(wrong)} answered "
          f"differently from deltatune generate; the first question's answer differs between deltas: "
          f"{distinct} distinct answers from {len(dirs)} deltas")
    for mode in MODES:
        stats = engine_stats[mode]
        print(f"{mode} server, all phases: {stats['steps']} decode steps ({stats['decode_seconds']:.1f} s), "
              f"{stats['prefills']} prefills ({stats['prefill_seconds']:.1f} s), {stats['cached_prompt_tokens']} of "
              f"{stats['prompt_tokens']} prompt tokens from the prefix cache, at most {stats['max_batch']} rows and "
              f"{stats['max_models_in_a_step']} deltas in a step")
    for mode, n, k, r in wrong[:5]:
        print(f"  {mode} N={n} K={k} {r.delta}: {r.answer!r} vs {wanted[(r.delta, r.question)]!r}")


if __name__ == "__main__":
    asyncio.run(main())
