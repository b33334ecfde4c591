"""``deltatune serve``: the official ``openai`` client against a real uvicorn server on loopback,
a tiny model and three deltas of different methods. Greedy answers must equal ``deltatune
generate``'s (its own code path: the model loaded with the delta alone, the prompt rendered and
batch-generated as the command does), also when the three are asked at once and share decode
steps; every error class has its status and names what was wrong."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

import deltatune as dt
from deltatune.cli.main import _load_with_delta, _user_prompt, app as cli_app
from deltatune.layer import delta_layers
from deltatune.models import load_model_and_tokenizer
from deltatune.train.data import encode_prompt
from deltatune.train.evaluate import generate_completions

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from deltatune.serving.app import create_app  # noqa: E402  (needs fastapi, as the two above)
from deltatune.serving.engine import PREFILL_FORWARD_TOKENS, BatchLayer, length_groups, Engine, RequestError, Sampling, Sequence  # noqa: E402

DELTAS = {
    "lora-a": dt.LoRAConfig(r=4, targets=["all-linear"]),
    "lora-b": dt.LoRAConfig(r=2, targets=["attn", "ffn.down"]),
    "prefix": dt.config("prefix", num_virtual_tokens=3, init="random"),
}
PROMPTS = {"lora-a": "cat", "lora-b": "the quick brown fox", "prefix": "dog", None: "sun"}
KEY = "test-key"


@pytest.fixture(scope="module")
def delta_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deltas")
    dirs = {}
    for seed, (name, config) in enumerate(DELTAS.items()):
        model, _ = load_model_and_tokenizer(str(tiny_dir))
        dt.attach(model, config, name)
        torch.manual_seed(seed)
        with torch.no_grad():  # far from zero, so every delta changes the answers
            for p in dt.trainable_parameters(model, name):
                p.normal_(std=0.5)
        dt.save(model, root / name, name)
        dirs[name] = root / name
    return dirs


def reference(tiny_dir, delta_dir, prompt: str, max_new_tokens: int) -> str:
    """What ``deltatune generate PROMPT --delta DIR --max-new-tokens N`` answers."""
    model, tokenizer = _load_with_delta(str(tiny_dir), delta_dir)
    return generate_completions(model, tokenizer, [_user_prompt(tokenizer, prompt)], max_new_tokens=max_new_tokens)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: Engine, **options):
    server = uvicorn.Server(uvicorn.Config(create_app(engine, **options), host="127.0.0.1", port=free_port(),
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.config.port}/v1"


def engine_with(tiny_dir, delta_dirs, **options) -> Engine:
    model, tokenizer = load_model_and_tokenizer(str(tiny_dir))
    engine = Engine(model, tokenizer, base_name="tiny", **options)
    futures = [engine.load_delta(name, path) for name, path in delta_dirs.items()]
    engine.step()
    for future in futures:
        future.result()
    return engine


@pytest.fixture(scope="module")
def server(tiny_dir, delta_dirs):
    engine = engine_with(tiny_dir, delta_dirs, max_deltas=4, gather_ms=150)
    server, thread, url = start(engine, api_key=KEY, allow_admin=True)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


def test_models_lists_the_base_and_every_delta(client):
    assert [m.id for m in client.models.list().data] == ["tiny", *DELTAS]


def test_each_delta_answers_as_deltatune_generate(client, tiny_dir, delta_dirs):
    answers = {}
    for name, prompt in PROMPTS.items():
        reply = client.chat.completions.create(model=name or "tiny", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=10, temperature=0)
        answers[name] = reply.choices[0].message.content
        assert answers[name].strip() == reference(tiny_dir, delta_dirs.get(name), prompt, 10)
        assert reply.usage.completion_tokens <= 10
    assert len(set(answers.values())) == len(answers), "the deltas should change the answers"
    # /v1/completions takes the prompt text as it is
    model, tokenizer = _load_with_delta(str(tiny_dir), delta_dirs["lora-a"])
    text = client.completions.create(model="lora-a", prompt="Once upon", max_tokens=6, temperature=0).choices[0].text
    assert text.strip() == generate_completions(model, tokenizer, ["Once upon"], max_new_tokens=6)[0]


def test_concurrent_requests_for_three_deltas_share_batches_and_answer_the_same(server, tiny_dir, delta_dirs):
    stats_before = openai.OpenAI(base_url=server, api_key=KEY).get("/stats", cast_to=object)

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=server, api_key=KEY, max_retries=0)

        async def ask(name):
            messages = [{"role": "user", "content": PROMPTS[name]}]
            if name == "prefix":  # one of them streamed: the chunks add up to the same answer
                stream = await client.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                                              temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])
            reply = await client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
            return reply.choices[0].message.content

        return await asyncio.gather(*(ask(name) for name in DELTAS))

    answers = asyncio.run(ask_all())
    for name, answer in zip(DELTAS, answers):
        assert answer.strip() == reference(tiny_dir, delta_dirs[name], PROMPTS[name], 12)
    stats = openai.OpenAI(base_url=server, api_key=KEY).get("/stats", cast_to=object)
    assert stats["max_models_in_a_step"] == 3 and stats["mixed_steps"] > stats_before["mixed_steps"]


def test_stop_max_tokens_and_seed(client):
    ask = dict(model="lora-a", messages=[{"role": "user", "content": "cat"}])
    full = client.chat.completions.create(**ask, max_tokens=10, temperature=0).choices[0]
    assert full.finish_reason == "length"
    stop = full.message.content[4:6]
    cut = client.chat.completions.create(**ask, max_tokens=10, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full.message.content[: full.message.content.index(stop)]
    streamed = client.chat.completions.create(**ask, max_tokens=10, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content
    sampled = [client.chat.completions.create(**ask, max_tokens=10, temperature=1.5, top_p=0.9, seed=seed)
               .choices[0].message.content for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_bad_requests_name_the_field(client):
    ask = dict(model="lora-a", messages=[{"role": "user", "content": "cat"}])
    for field, value in [("temperature", 5.0), ("top_p", 0.0), ("max_tokens", 0), ("n", 2), ("max_tokens", 10**6)]:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**{**ask, field: value})
        assert error.value.body["param"] == field and field in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="lora-a", messages=[{"role": "robot", "content": "x"}])
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(**{**ask, "model": "lora-z"})
    assert "lora-z" in error.value.message and "lora-a" in error.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).models.list()


def test_admin_loads_and_unloads_deltas_within_the_limit(client, tiny_dir, delta_dirs):
    extra = client.post("/admin/deltas", body={"name": "again", "path": str(delta_dirs["lora-b"])}, cast_to=object)
    assert extra["bytes"] > 0 and "again" in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(model="again", messages=[{"role": "user", "content": "cat"}],
                                            max_tokens=8, temperature=0).choices[0].message.content
    assert answer.strip() == reference(tiny_dir, delta_dirs["lora-b"], "cat", 8)
    with pytest.raises(openai.ConflictError) as error:  # a fifth delta is over --max-deltas 4
        client.post("/admin/deltas", body={"name": "fifth", "path": str(delta_dirs["lora-a"])}, cast_to=object)
    assert "max-deltas" in error.value.message
    client.delete("/admin/deltas/again", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="again", messages=[{"role": "user", "content": "cat"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as error:
        client.post("/admin/deltas", body={"name": "missing", "path": str(tiny_dir / "nowhere")}, cast_to=object)
    assert "nowhere" in error.value.message


def test_a_full_queue_answers_503_with_retry_after_and_admin_is_off_by_default(tiny_dir, delta_dirs):
    engine = engine_with(tiny_dir, {}, max_waiting=0)
    server, thread, url = start(engine)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat"}])
        assert error.value.status_code == 503 and error.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.PermissionDeniedError) as error:
            client.post("/admin/deltas", body={"name": "a", "path": str(delta_dirs["lora-a"])}, cast_to=object)
        assert "--allow-admin" in error.value.message
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_sequences_join_and_leave_a_running_batch_between_steps(tiny_dir, delta_dirs):
    """The engine driven step by step: a request already decoding is joined by two more (one
    for the base), one leaves early; every answer is still generate's."""
    engine = engine_with(tiny_dir, delta_dirs)
    assert engine._stacks  # the loaded LoRA deltas' factors were stacked when they were loaded
    tokenizer = engine.tokenizer
    asked = [("lora-a", "cat", 16), ("prefix", "a much longer prompt than the others", 9), (None, "sun", 3)]
    events = {name: [] for name, _, _ in asked}

    def submit(name, prompt, max_tokens):
        engine.submit(Sequence(model=name, prompt=encode_prompt(tokenizer, _user_prompt(tokenizer, prompt)),
                               sampling=Sampling(max_tokens=max_tokens, temperature=0), emit=events[name].append))

    submit(*asked[0])
    for _ in range(3):
        engine.step()
    submit(*asked[1])
    submit(*asked[2])
    while engine._running or engine._waiting:
        engine.step()
    for name, prompt, max_tokens in asked:
        text = "".join(value for kind, value in events[name] if kind == "text")
        assert events[name][-1][0] == "done"
        assert text.strip() == reference(tiny_dir, delta_dirs.get(name), prompt, max_tokens)
    # the two joining together prefill in one forward, or in two where padding the short prompt
    # to the long one's width would cost more than another forward (length_groups)
    joined = [len(encode_prompt(tokenizer, _user_prompt(tokenizer, prompt))) for _, prompt, _ in asked[1:]]
    assert engine.stats.max_models_in_a_step == 3
    assert engine.stats.prefills == 1 + len(length_groups(joined, PREFILL_FORWARD_TOKENS))


def test_rows_joining_and_leaving_in_any_order_keep_every_answer_exact(tiny_dir, delta_dirs, monkeypatch):
    """Requests of different lengths and answer lengths join at different steps and leave in
    another order than they came (a leaving row's place taken by one of the last rows, joiners
    longer than the batch widening it on the left, the cache's buffers growing on both axes):
    every answer is still generate's."""
    engine = engine_with(tiny_dir, {n: d for n, d in delta_dirs.items() if n != "prefix"}, max_batch=5, join_wait_steps=0)
    tokenizer = engine.tokenizer
    asked = [("lora-a", "cat", 14), ("lora-b", "the quick brown fox jumps", 3), (None, "sun", 9),
             ("lora-b", "dog", 1), ("lora-a", "a much longer prompt than any other here, by far", 6),
             (None, "moon and stars over the sea", 12), ("lora-a", "tree", 4), ("lora-b", "river", 8)]
    arrivals = {0: asked[:3], 2: asked[3:5], 3: asked[5:6], 5: asked[6:]}
    events = [[] for _ in asked]
    moved, widened = [], []
    move_rows, add_rows = BatchLayer.move_rows, BatchLayer.add_rows
    monkeypatch.setattr(BatchLayer, "move_rows", lambda self, targets, *rest: moved.append(len(targets)) or move_rows(self, targets, *rest))
    monkeypatch.setattr(BatchLayer, "add_rows", lambda self, keys, *rest: widened.append(keys.shape[2] > self.keys.shape[2]) or add_rows(self, keys, *rest))
    for step in range(200):
        for name, prompt, max_tokens in arrivals.get(step, []):
            engine.submit(Sequence(model=name, prompt=encode_prompt(tokenizer, _user_prompt(tokenizer, prompt)),
                                   sampling=Sampling(max_tokens=max_tokens, temperature=0),
                                   emit=events[asked.index((name, prompt, max_tokens))].append))
        if step > max(arrivals) and not (engine._running or engine._waiting):
            break
        engine.step()
    for (name, prompt, max_tokens), got in zip(asked, events):
        assert got[-1][0] == "done"
        text = "".join(value for kind, value in got if kind == "text")
        assert text.strip() == reference(tiny_dir, delta_dirs.get(name), prompt, max_tokens), (name, prompt)
    assert engine.stats.max_batch == 5 and engine.stats.max_models_in_a_step == 3
    assert any(moved) and any(widened)  # the paths this test is about were taken


def test_batch_layer_keeps_rows_and_columns_as_concatenated_tensors_would():
    """BatchLayer against plain tensors: appending columns, rows joining (shorter and longer than
    the batch), a leaving row's place taken by the last row, leading columns cut, and a layer
    whose tensors transformers replaced."""
    def kv(rows, columns):
        return torch.randn(rows, 2, columns, 3), torch.randn(rows, 2, columns, 3)

    def right_aligned(tensor, width):
        return torch.cat([torch.zeros(*tensor.shape[:2], width - tensor.shape[2], tensor.shape[3]), tensor], 2)

    layer, (keys, values) = BatchLayer(), kv(2, 5)
    layer.update(keys, values)
    for _ in range(20):  # past the first buffers' spare columns
        step = kv(2, 1)
        layer.update(*step)
        keys, values = torch.cat([keys, step[0]], 2), torch.cat([values, step[1]], 2)
    torch.testing.assert_close((layer.keys, layer.values), (keys, values))
    for rows, columns in ((1, 4), (2, 40)):  # shorter than the batch, then longer: it widens on the left
        joining = kv(rows, columns)
        layer.add_rows(*joining, max_rows=8)
        width = max(keys.shape[2], columns)
        keys = torch.cat([right_aligned(keys, width), right_aligned(joining[0], width)])
        values = torch.cat([right_aligned(values, width), right_aligned(joining[1], width)])
    assert layer.keys.shape == keys.shape and layer.buffers[0].shape[0] == 8
    # right-aligned parts equal; the columns left of a row's own are masked, only finite values
    for row, columns in enumerate([25, 25, 4, 40, 40]):
        torch.testing.assert_close(layer.keys[row, :, -columns:], keys[row, :, -columns:])
        torch.testing.assert_close(layer.values[row, :, -columns:], values[row, :, -columns:])
    assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    layer.move_rows(torch.tensor([1]), torch.tensor([4]), rows=4)  # row 1 leaves, row 4 takes its place
    order = [0, 4, 2, 3]
    torch.testing.assert_close(layer.keys[:, :, -4:], keys[order][:, :, -4:])
    layer.drop_columns(15)
    assert layer.keys.shape[2] == 25
    torch.testing.assert_close(layer.values[:, :, -4:], values[order][:, :, -4:])
    step = kv(4, 1)
    kept = layer.keys.clone()
    layer.update(*step)
    torch.testing.assert_close(layer.keys, torch.cat([kept, step[0]], 2))
    layer.keys = layer.keys[:2].clone()  # as transformers' batch_select_indices leaves it
    layer.values = layer.values[:2].clone()
    before = layer.keys.clone()
    step = kv(2, 1)
    torch.testing.assert_close(layer.update(*step)[0], torch.cat([before, step[0]], 2))


def test_length_groups_split_joiners_where_padding_costs_more_than_a_forward():
    assert length_groups([10, 12, 11], 32) == [[1, 2, 0]]
    assert length_groups([100, 10, 12, 98], 32) == [[0, 3], [2, 1]]  # 2·100 + 2·12 + 64 < 4·100 + 32
    assert length_groups([100, 10], 200) == [[0, 1]]  # a costly forward: pad rather than split
    assert sorted(i for g in length_groups(list(range(1, 40, 3)), 8) for i in g) == list(range(13))
    assert length_groups([], 32) == []


@pytest.mark.parametrize("method, options, message", [
    ("prompt", {"num_virtual_tokens": 2}, "virtual tokens"),  # cache columns beyond the tokens
    ("lst", {}, "beside the KV cache"),  # a side network's cache of its own
])
def test_a_delta_whose_state_is_not_its_kv_cache_is_refused(tiny_dir, tmp_path, method, options, message):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.config(method, **options), "odd")
    dt.save(model, tmp_path / "odd", "odd")
    engine = engine_with(tiny_dir, {})
    future = engine.load_delta("odd", tmp_path / "odd")
    engine.step()
    with pytest.raises(dt.ConfigError, match=message):
        future.result()
    assert engine.models() == ["tiny"] and not dt.deltas(engine.model)


def test_unknown_models_and_bad_parameters_are_refused_before_queueing(tiny_dir):
    engine = engine_with(tiny_dir, {})
    with pytest.raises(RequestError) as error:
        engine.resolve("nope")
    assert error.value.status == 404
    with pytest.raises(RequestError) as error:
        engine.submit(Sequence(model=None, prompt=[5], sampling=Sampling(stop=("",)), emit=print))
    assert error.value.status == 400 and error.value.field == "stop"


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--delta", "nodir"], "NAME=DIR"),
    (["--delta", "a=x", "--delta", "a=y"], "twice"),
])
def test_serve_refuses_bad_options_in_one_line(args, message):
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_route_block_reuses_its_stacked_factors_only_without_gradients(tiny_dir, delta_dirs):
    """The engine decodes many steps in one route() block: the stacked LoRA factors are kept
    for the block's next forward when nothing needs gradients, and the answers stay exact."""
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    for name in ("lora-a", "lora-b"):
        dt.load(model, delta_dirs[name], name, activate=False)
    names = ["lora-a", "lora-b", None]
    first, second = torch.randint(4, 90, (3, 5)), torch.randint(4, 90, (3, 5))
    with torch.no_grad():
        with dt.route(model, names):
            routed = [model(first).logits, model(second).logits]
            layer = next(l for l in delta_layers(model).values() if l.routing is not None)
            assert layer.routing.stacks  # kept after the first forward
        for ids, got in zip((first, second), routed):
            for row, name in enumerate(names):
                dt.activate(model, name) if name else dt.deactivate(model)
                torch.testing.assert_close(got[row], model(ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
    dt.deactivate(model)
    for p in dt.trainable_parameters(model, ["lora-a", "lora-b"]):
        p.requires_grad_(True)
    with dt.route(model, names):
        model(first).logits.sum().backward()
        assert not any(l.routing.stacks for l in delta_layers(model).values())


def test_stacks_kept_across_routes_serve_any_row_order_and_subset_exactly(tiny_dir, delta_dirs, monkeypatch):
    """A server hands one stacks dict to every route(): rows in another order, or a subset of the
    stacked deltas, reuse the layers' stacked factors (one-token decoding rows and longer rows alike)
    and compute what each delta computes alone."""
    import deltatune.layer as layer_module

    model, _ = load_model_and_tokenizer(str(tiny_dir))
    for name in ("lora-a", "lora-b"):
        dt.load(model, delta_dirs[name], name, activate=False)
    dt.attach(model, dt.LoRAConfig(r=3, targets=["all-linear"]), "lora-c", activate=False)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in dt.trainable_parameters(model, "lora-c"):
            p.normal_(std=0.5)
    stacked = []
    original = layer_module._stack_factors
    monkeypatch.setattr(layer_module, "_stack_factors", lambda factors, *rest: stacked.append(tuple(factors)) or original(factors, *rest))
    stacks: dict = {}
    batches = [["lora-a", "lora-b", "lora-c", None], ["lora-c", None, "lora-a", "lora-b"], ["lora-b", "lora-a", "lora-b", None]]
    for width in (1, 4):  # a decoding step's one token per row, then a prefill's several
        stacked.clear()
        for names in batches:
            ids = torch.randint(4, 90, (len(names), width))
            with torch.no_grad(), dt.route(model, names, stacks=stacks):
                got = model(ids).logits
            for row, name in enumerate(names):
                dt.activate(model, name) if name else dt.deactivate(model)
                with torch.no_grad():
                    torch.testing.assert_close(got[row], model(ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
            dt.deactivate(model)
        # each layer stacked once, its deltas in attach order, for the first batch (width 1); never again
        if width == 1:
            assert len(stacked) == len(stacks) > 0
            assert set(stacked) == {("lora-a", "lora-b", "lora-c"), ("lora-a", "lora-c")}
        else:
            assert stacked == []


def test_a_batch_of_few_stacked_deltas_takes_their_slots_without_restacking(tiny_dir, monkeypatch):
    """A server stacks all its deltas once; a later batch holding a few of many takes just their
    slots out of the stack (the products then run over those deltas only, not over every slot)
    and a batch holding them all again reuses the whole stack: nothing is stacked twice, and
    every row computes what its delta computes alone."""
    import deltatune.layer as layer_module

    model, _ = load_model_and_tokenizer(str(tiny_dir))
    names = [f"d{i}" for i in range(14)]
    torch.manual_seed(3)
    for name in names:
        dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q", "ffn.down"]), name, activate=False)
        with torch.no_grad():
            for p in dt.trainable_parameters(model, name):
                p.normal_(std=0.5)
    stacked, slot_counts = [], []
    original_stack, original_bmm = layer_module._stack_factors, torch.bmm
    monkeypatch.setattr(layer_module, "_stack_factors", lambda factors, *rest: stacked.append(tuple(factors)) or original_stack(factors, *rest))
    monkeypatch.setattr(torch, "bmm", lambda a, b: slot_counts.append(a.shape[0]) or original_bmm(a, b))
    stacks: dict = {}
    for batch in (names, ["d9", None, "d2", "d9"], names[::-1]):
        slot_counts.clear()
        ids = torch.randint(4, 90, (len(batch), 3))
        with torch.no_grad(), dt.route(model, batch, stacks=stacks):
            got = model(ids).logits
        # 14 stacked, 2 wanted: 14 > 2·2 + 8, so the products run over the two deltas' slots
        assert set(slot_counts) == ({2} if len(set(batch) - {None}) == 2 else {len(names)})
        for row, name in enumerate(batch):
            dt.activate(model, name) if name else dt.deactivate(model)
            with torch.no_grad():
                torch.testing.assert_close(got[row], model(ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
        dt.deactivate(model)
    assert len(stacked) == len(stacks) > 0 and set(stacked) == {tuple(names)}


def test_prompts_sharing_a_prefix_reuse_its_keys_and_values_per_delta(client, server, tiny_dir, delta_dirs):
    """A prompt that starts like an earlier prompt of the same delta takes the keys and values of
    every token they share from the prefix cache (usage.prompt_tokens_details says how many) and
    answers as generate does; each delta (and the base) keeps its own blocks. A concurrent burst
    mixing cached and uncached prefixes in one prefill answers the same."""
    shared = "the quick brown fox jumps over the lazy dog and runs far away " * 3
    tokenizer = load_model_and_tokenizer(str(tiny_dir))[1]
    first, second = (encode_prompt(tokenizer, shared + tail) for tail in ("cat", "sun"))
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)

    def generated(name, prompt, tokens=6):
        model, tokenizer = _load_with_delta(str(tiny_dir), delta_dirs.get(name))
        return generate_completions(model, tokenizer, [prompt], max_new_tokens=tokens)[0]

    for name in ("lora-a", "lora-b", "prefix", None):
        replies = [client.completions.create(model=name or "tiny", prompt=shared + tail, max_tokens=6, temperature=0)
                   for tail in ("cat", "sun")]
        cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
        assert cached == [0, common], (name, cached)  # to the token, not to the last whole block
        assert cached[1] < replies[1].usage.prompt_tokens
        for reply, tail in zip(replies, ("cat", "sun")):
            assert reply.choices[0].text.strip() == generated(name, shared + tail)

    stats_before = openai.OpenAI(base_url=server, api_key=KEY).get("/stats", cast_to=object)
    fresh = "a small red boat sails across the wide blue sea at dawn " * 3
    asked = [("lora-a", shared + "moon"), ("lora-a", fresh + "moon"), ("lora-b", fresh + "star"),
             ("lora-b", fresh + "tree"), ("prefix", shared + "star"), (None, fresh + "cat")]

    async def ask_all():
        async_client = openai.AsyncOpenAI(base_url=server, api_key=KEY, max_retries=0)
        return await asyncio.gather(*(async_client.completions.create(model=name or "tiny", prompt=prompt, max_tokens=6,
                                                                      temperature=0) for name, prompt in asked))

    replies = asyncio.run(ask_all())
    for (name, prompt), reply in zip(asked, replies):
        assert reply.choices[0].text.strip() == generated(name, prompt)
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    assert cached[0] > 0 and cached[4] > 0 and cached[1] == cached[2] == cached[5] == 0
    assert cached[3] > 0  # waited one step for lora-b's other request to compute the shared blocks
    stats = openai.OpenAI(base_url=server, api_key=KEY).get("/stats", cast_to=object)
    assert stats["cached_prompt_tokens"] - stats_before["cached_prompt_tokens"] == sum(cached)


def test_the_serve_command_answers_and_stops_on_sigterm(tiny_dir, delta_dirs):
    """``deltatune serve`` itself: the engine on the main thread, HTTP on another; SIGTERM lets the
    running step finish and the process exit cleanly."""
    import signal
    import subprocess
    import sys

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", str(tiny_dir), "--port", str(port),
                                "--delta", f"lora-a={delta_dirs['lora-a']}", "--delta", f"lora-b={delta_dirs['lora-b']}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                assert [m.id for m in client.models.list().data][1:] == ["lora-a", "lora-b"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        reply = client.chat.completions.create(model="lora-b", messages=[{"role": "user", "content": "cat"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content.strip() == reference(tiny_dir, delta_dirs["lora-b"], "cat", 8)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0 and "lora-a, lora-b on http://127.0.0.1" in " ".join(output.split()), output
    assert "Traceback" not in output, output
